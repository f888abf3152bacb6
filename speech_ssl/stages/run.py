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
    storage_path: shared storage for the training checkpoints on multi-node clusters (s3://bucket/prefix,
        gs://..., an NFS path): they go to <storage_path>/<output_dir name>/<stage>.
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
    """Run the pipeline; returns its summary (printed as Markdown at the end)."""
    import pipelines
    from speech_ssl.pipeline import render_markdown, run_pipeline
    from speech_ssl.runtime import dashboard_url, ray_session

    from speech_ssl.stages.common import check_output_dir

    check_output_dir("output_dir", cfg.output_dir)
    definition = pipelines.load(cfg.pipeline)
    stages = definition.stages(cfg)  # every configuration error surfaces here, before Ray starts
    log.info("pipeline %s: %s -> %s", cfg.pipeline, " -> ".join(s.name for s in stages), cfg.output_dir)
    with ray_session(cfg.ray):
        url = dashboard_url()
        if url:
            log.info("Ray dashboard: http://%s", url)
        summary = run_pipeline(cfg.pipeline, stages, cfg.output_dir, force=cfg.force,
                               summarize=definition.summarize)
    print("\n" + render_markdown(summary), flush=True)
    return summary
