"""``speech-ssl run``: a chained pipeline from ``pipelines/`` on one Ray (embedded, or the given cluster).

    speech-ssl run pipeline=pretrain_finetune data.unlabeled=<dir or manifest> data.train=<manifest> \\
        data.valid=<manifest> data.test=<manifest> output_dir=runs/all pretrain.trainer.max_updates=20

Each stage writes to ``<output_dir>/<stage>/`` with its resolved configuration and a completion record
(``stage.json``) and log (``stage.log``); later stages read earlier outputs by path. Running the same
command again skips finished stages, resumes an interrupted one (training from its newest checkpoint), and
after a failure starts again at the stage that failed; ``force=true`` runs every stage afresh. The run ends
with a results summary (also ``<output_dir>/summary.json`` and ``summary.md``). With no data arguments it
runs on the demo corpus that ships with the package.

Pipelines: ``pretrain_finetune`` (prepare -> [cache ->] pretrain -> finetune -> evaluate -> embed), ``embed_corpus``
(prepare -> embed, with ``embed.checkpoint``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

from speech_ssl import storage
from speech_ssl.runtime import RayConfig
from speech_ssl.stages import embed as embed_stage
from speech_ssl.stages import evaluate as evaluate_stage
from speech_ssl.stages import finetune as finetune_stage
from speech_ssl.stages import prepare as prepare_stage
from speech_ssl.stages import pretrain as pretrain_stage

log = logging.getLogger(__name__)


def pipeline_names() -> list[str]:
    import pipelines

    return pipelines.names()


@dataclass
class PipelineDataConfig:
    """unlabeled: audio to pretrain on (and to embed): a directory, manifest, list of paths or URI.
    train / valid / test: labeled manifests (JSONL with `text`, or fairseq TSV + .wrd) for fine-tuning,
    its validation, and the final evaluation."""

    unlabeled: Optional[str] = None
    train: Optional[str] = None
    valid: Optional[str] = None
    test: Optional[str] = None


# The stage settings of a pipeline: the stages' own configs, with the paths the pipeline wires left empty.
def _prepare() -> prepare_stage.Config:
    return prepare_stage.Config(input="", output="")


def _pretrain() -> pretrain_stage.Config:
    return pretrain_stage.Config(output_dir="", data=pretrain_stage.PretrainDataConfig(train=""))


def _finetune() -> finetune_stage.Config:
    return finetune_stage.Config(output_dir="", init="", data=finetune_stage.FinetuneDataConfig(train="", valid=""))


def _evaluate() -> evaluate_stage.Config:
    return evaluate_stage.Config(checkpoint="", data=evaluate_stage.EvalDataConfig(test=""))


def _embed() -> embed_stage.Config:
    return embed_stage.Config(checkpoint="", input="", output="")


@dataclass
class Config:
    """
    pipeline: which chain of stages (pipelines/): pretrain_finetune | embed_corpus.
    output_dir: every stage writes to <output_dir>/<stage>/; summary.json and summary.md at the top.
    force: run every stage afresh (their folders are emptied first) instead of skipping finished ones.
    output_dir may be a URI (s3://bucket/runs/run1, gs://...): the stages then run in a local work folder of
        the driver whose files are uploaded to it (each atomically) when the run ends or fails; the training
        checkpoints go straight to <output_dir>/<stage>/, and a re-run on any machine resumes from it.
    storage_path: where the training checkpoints go instead (s3://bucket/prefix, gs://..., an NFS path):
        <storage_path>/<output_dir name>/<stage>. Set, it wins over output_dir for the checkpoints; leave it
        unset when output_dir is itself shared (a URI, or NFS mounted on every node).
    cache: decode the unlabeled audio once into a decoded-audio cache (a `cache` stage after prepare, for
        pretrain's model; `speech-ssl cache --help`) that pretraining and embedding then read instead of
        decoding it every epoch.
    data: the pipeline's inputs (default: the demo corpus, see conf/run/config.yaml).
    prepare / pretrain / finetune / evaluate / embed: each stage's own settings (`speech-ssl <stage> --help`).
        Paths the pipeline wires (a stage's output folder, init/checkpoint/input from an earlier stage)
        are empty here; give one to override the wiring (finetune.init=none fine-tunes from scratch,
        embed.checkpoint=... embeds with another model). A stage's output folder is always the pipeline's.
    ray: one Ray for the whole pipeline: embedded (dashboard on 127.0.0.1) or ray.address / RAY_ADDRESS.
    """

    pipeline: str = field(default="pretrain_finetune", metadata={"choices": pipeline_names})
    output_dir: str = "outputs/run"
    force: bool = False
    storage_path: Optional[str] = None
    cache: bool = False
    data: PipelineDataConfig = field(default_factory=PipelineDataConfig)
    prepare: prepare_stage.Config = field(default_factory=_prepare)
    pretrain: pretrain_stage.Config = field(default_factory=_pretrain)
    finetune: finetune_stage.Config = field(default_factory=_finetune)
    evaluate: evaluate_stage.Config = field(default_factory=_evaluate)
    embed: embed_stage.Config = field(default_factory=_embed)
    ray: RayConfig = field(default_factory=RayConfig)


def run(cfg: Config) -> dict[str, Any]:
    """Run the pipeline; returns its summary (printed at the end; the Markdown in <output_dir>/summary.md)."""
    from speech_ssl.stages.common import check_output_dir

    check_output_dir("output_dir", cfg.output_dir)
    if storage.is_uri(cfg.output_dir):
        return _run_on_uri(cfg)
    return _run(cfg)


def _run(cfg: Config, published: Optional[str] = None) -> dict[str, Any]:
    """The pipeline in the local folder ``cfg.output_dir``; with ``published`` (the URI output_dir), what a
    later stage reads from an earlier one (checkpoints, embeddings) is wired to and read from the URI, and
    each stage's folder is uploaded as soon as it finishes, so that a stage on another node finds it."""
    import dataclasses

    import pipelines
    from speech_ssl.pipeline import render_console, run_pipeline
    from speech_ssl.runtime import ray_session

    definition = pipelines.load(cfg.pipeline)
    stages = definition.stages(cfg, published)  # every configuration error surfaces here, before Ray starts
    if published is not None:
        stages = [dataclasses.replace(s, fn=_uploading(s.fn, cfg.output_dir, published, s.name)) for s in stages]
    log.info("pipeline %s: %s -> %s", cfg.pipeline, " -> ".join(s.name for s in stages),
             published or cfg.output_dir)
    with ray_session(cfg.ray, log_dir=f"{cfg.output_dir.rstrip('/')}/logs"):  # says where the dashboard is
        summary = run_pipeline(cfg.pipeline, stages, cfg.output_dir, force=cfg.force,
                               summarize=definition.summarize)
    print(render_console(summary), end="", flush=True)  # the full Markdown: <output_dir>/summary.md
    return summary


def _uploading(fn, work: str, uri: str, stage: str):
    """``fn``, then the stage's local folder uploaded to ``<uri>/<stage>`` (its checkpoints are there already)."""

    def run_then_upload(config):
        result = fn(config)
        storage.put_tree(f"{work}/{stage}", storage.join(uri, stage),
                         exclude=lambda rel: _is_checkpoint_file(f"{stage}/{rel}"))
        return result

    return run_then_upload


def _is_checkpoint_file(rel: str) -> bool:
    """``<stage>/checkpoint_*/...`` (and Ray Train's own run files): they stay where they are (the URI)."""
    parts = rel.split("/")
    return len(parts) > 2 and parts[1].startswith("checkpoint_")


# Files that later stages read from the URI itself (weights, embedding and cache shards): a driver seeding
# its work folder from the URI leaves them there.
_READ_FROM_URI = (".safetensors", ".parquet", ".arrow")


def _is_seeded(rel: str) -> bool:
    return not (_is_checkpoint_file(rel) or rel.endswith(_READ_FROM_URI))


def _run_on_uri(cfg: Config) -> dict[str, Any]:
    """``output_dir`` on a URI: run in the driver's local work folder (same last name, so checkpoints keyed
    by it land at ``<output_dir>/<stage>``), seeded from what the URI already holds (records, manifests,
    configs: a re-run on a fresh head skips and resumes as locally), each stage uploaded when it finishes,
    everything once more at the end, success or not."""
    import dataclasses

    uri = storage.normalize(cfg.output_dir)
    work = storage.local_work_dir(uri)
    storage.get_tree(uri, work, exclude=lambda rel: not _is_seeded(rel))
    local = dataclasses.replace(cfg, output_dir=str(work),
                                storage_path=cfg.storage_path or storage.parent_of(uri))
    try:
        return _run(local, published=uri)
    finally:
        storage.put_tree(work, uri, skip=(".speech-ssl.lock",), exclude=_is_checkpoint_file)
        log.info("outputs uploaded to %s", uri)
