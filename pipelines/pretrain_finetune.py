"""prepare -> pretrain -> finetune -> evaluate -> embed.

    prepare    data.unlabeled/train/valid/test -> prepare/{unlabeled,train,valid,test}.jsonl
    cache      (cache=true) prepare/unlabeled.jsonl decoded once for pretrain's model -> cache/unlabeled/,
               which pretrain and embed then read instead of the audio
    pretrain   prepare/unlabeled.jsonl (validated on prepare/valid.jsonl's audio) -> pretrain/best
    finetune   init pretrain/best, prepare/train.jsonl + valid.jsonl -> finetune/best
    evaluate   finetune/best on prepare/test.jsonl -> evaluate/results.json (WER, CER), results.hyp.jsonl
    embed      pretrain/best over prepare/unlabeled.jsonl -> embed/*.parquet

Set ``finetune.init=none`` to fine-tune from scratch, ``pretrain.data.valid=none`` to pretrain without
validation (the best checkpoint is then the last), ``embed.checkpoint=...`` / ``embed.input=...`` to embed
something else; every other stage setting is under ``pretrain.*``, ``finetune.*``, ``evaluate.*``, ``embed.*``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from pipelines.common import (given, manifest, none_or, owned, prepare, require_data, shared, trainer_storage,
                              training_storage)
from speech_ssl.pipeline import Stage
from speech_ssl.stages import cache, embed, evaluate, finetune, pretrain

NAME = "pretrain_finetune"


def stages(cfg, published: Optional[str] = None) -> list[Stage]:
    """The stages, wired under ``cfg.output_dir``; ``published``: the run's URI output_dir (see
    ``pipelines.common.shared``)."""
    out = Path(cfg.output_dir).resolve()
    data = require_data(cfg, NAME, ["unlabeled", "train", "valid", "test"])
    for key, value in (("pretrain.output_dir", cfg.pretrain.output_dir), ("finetune.output_dir", cfg.finetune.output_dir),
                       ("evaluate.output", cfg.evaluate.output), ("embed.output", cfg.embed.output)):
        owned(value, key, f"a folder under {out}")

    pt_dir, ft_dir = out / "pretrain", out / "finetune"
    unlabeled = manifest(out, "unlabeled")
    caching = []
    if cfg.cache:
        cached = shared(out, published, "cache", "unlabeled")
        cc = cache.Config(input=unlabeled, output=cached, model=cfg.pretrain.model,
                          model_overrides=cfg.pretrain.model_overrides, sample_rate=cfg.pretrain.data.sample_rate,
                          segment_duration=cfg.pretrain.data.segment_duration, extensions=cfg.pretrain.data.extensions,
                          ray=cfg.ray)
        caching = [Stage("cache", cache.run, cc, needs=["prepare"], provides=["unlabeled"])]
        unlabeled = cached
    pt_trainer = trainer_storage(cfg.pretrain.trainer, cfg.storage_path, out)
    pt = replace(cfg.pretrain, output_dir=str(pt_dir), trainer=pt_trainer, ray=cfg.ray,
                 data=replace(cfg.pretrain.data, train=given(cfg.pretrain.data.train, unlabeled),
                              valid=none_or(given(cfg.pretrain.data.valid, manifest(out, "valid")))))
    ft_trainer = trainer_storage(cfg.finetune.trainer, cfg.storage_path, out)
    ft = replace(cfg.finetune, output_dir=str(ft_dir),
                 init=given(cfg.finetune.init, shared(out, published, "pretrain", "best")),
                 trainer=ft_trainer, ray=cfg.ray,
                 data=replace(cfg.finetune.data, train=given(cfg.finetune.data.train, manifest(out, "train")),
                              valid=given(cfg.finetune.data.valid, manifest(out, "valid"))))
    ev = replace(cfg.evaluate, checkpoint=given(cfg.evaluate.checkpoint, shared(out, published, "finetune", "best")),
                 output=str(out / "evaluate" / "results.json"), ray=cfg.ray,
                 data=replace(cfg.evaluate.data, test=given(cfg.evaluate.data.test, manifest(out, "test"))))
    em = replace(cfg.embed, checkpoint=given(cfg.embed.checkpoint, shared(out, published, "pretrain", "best")),
                 input=given(cfg.embed.input, unlabeled), output=shared(out, published, "embed"), ray=cfg.ray)
    after = ["prepare"] + (["cache"] if caching else [])
    return [
        prepare(cfg, out, data),
        *caching,
        Stage("pretrain", pretrain.run, pt, needs=after, provides=["best"], continues=True,
              storage=training_storage(pt_dir, pt_trainer)),
        Stage("finetune", finetune.run, ft, needs=["prepare", "pretrain"], provides=["best"], continues=True,
              storage=training_storage(ft_dir, ft_trainer)),
        Stage("evaluate", evaluate.run, ev, needs=["prepare", "finetune"]),
        Stage("embed", embed.run, em, needs=[*after, "pretrain"]),
    ]


def summarize(out: Path, results: dict[str, Any]) -> dict[str, Any]:
    """The test-set error rates of the fine-tuned model first, then where everything is."""
    pt, ft, ev, em = (results.get(k) or {} for k in ("pretrain", "finetune", "evaluate", "embed"))
    pt_metrics, ft_metrics = pt.get("metrics", {}), ft.get("metrics", {})
    highlights = []
    if ev:
        highlights.append(f"fine-tuned model on the test set ({ev.get('decoder')} decoding, {ev.get('utterances')} "
                          f"utterances): **CER {100 * ev['cer']:.1f} %**, WER {100 * ev['wer']:.1f} %")
    if "valid_cer" in ft_metrics:
        highlights.append(f"fine-tuning: {ft.get('updates')} updates; validation CER {100 * ft_metrics['valid_cer']:.1f} %, "
                          f"WER {100 * ft_metrics.get('valid_wer', float('nan')):.1f} % (best checkpoint)")
    if pt:
        parts = [f"{pt.get('updates')} updates"]
        for key, label in (("loss", "train loss"), ("accuracy", "train accuracy"), ("valid_loss", "validation loss"),
                           ("valid_accuracy", "validation accuracy")):
            if isinstance(pt_metrics.get(key), (int, float)):
                parts.append(f"{label} {pt_metrics[key]:.3f}")
        highlights.append("pretraining: " + ", ".join(parts))
    if em:
        counts = em.get("counts", {})
        highlights.append(f"embeddings: {counts.get('used')} utterances ({em.get('audio_hours', {}).get('total', 0):.3f} h), "
                          f"layers {em.get('layers')}, pooling {em.get('pooling')}, {len(em.get('shards', []))} Parquet shard(s)")
    outputs = {
        "pretrained checkpoint": str(out / "pretrain" / "best"),
        "fine-tuned checkpoint": str(out / "finetune" / "best"),
        # One path per entry: the summary shows each relative to output_dir.
        "pretraining metrics (TensorBoard: tensorboard/ beside it)": str(out / "pretrain" / "metrics.jsonl"),
        "fine-tuning metrics (TensorBoard: tensorboard/ beside it)": str(out / "finetune" / "metrics.jsonl"),
        "pretraining curves (PNG)": str(out / "pretrain" / "curves.png"),
        "fine-tuning curves (PNG)": str(out / "finetune" / "curves.png"),
        "test scores": str(out / "evaluate" / "results.json"),
        "test hypotheses": ev.get("hypotheses", str(out / "evaluate" / "results.hyp.jsonl")),
        "embeddings (Parquet)": em.get("output", str(out / "embed")),
        "stage logs and records": f"{out}/<stage>/stage.log, stage.json",
    }
    return {
        "results": {"test_wer": ev.get("wer"), "test_cer": ev.get("cer"), "test_utterances": ev.get("utterances"),
                    "valid_wer": ft_metrics.get("valid_wer"), "valid_cer": ft_metrics.get("valid_cer"),
                    "pretrain_updates": pt.get("updates"), "finetune_updates": ft.get("updates"),
                    "embedded_utterances": em.get("counts", {}).get("used")},
        "highlights": highlights,
        "outputs": outputs,
    }
