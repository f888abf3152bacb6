"""Pretraining throughput on Ray Train with 1 and 2 workers, and where an update's time goes.

For each model preset and worker count, a short `speech-ssl pretrain` run on real audio (the first log
window, which includes Ray start-up and the first decodes, is discarded). Reports audio seconds per
second per worker and in total, scaling efficiency (2-worker total / (2 x 1-worker)), and seconds per
update split into data wait, forward, backward (which includes DDP's gradient all-reduce), the
statistics all-reduce and the optimizer step. The communication cost of DDP is estimated as the growth
of backward time from 1 to 2 workers (same per-worker batch).

    python benchmarks/bench_train.py                       # tiny and fbank-tiny, 1 and 2 workers
    python benchmarks/bench_train.py --models tiny --updates 60
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tts-harvard" / "unlabeled.jsonl"


def _subset(manifest: Path, count: int, out: Path) -> Path:
    lines = manifest.read_text().splitlines()[:count]
    base = manifest.parent
    rows = []
    for line in lines:
        row = json.loads(line)
        row["path"] = str((base / row["path"]).resolve())
        row.pop("text", None)  # pretraining never sees transcripts
        rows.append(json.dumps(row))
    out.write_text("\n".join(rows) + "\n")
    return out


def _run(model: str, workers: int, manifest: Path, updates: int, log_every: int, batch_seconds: float) -> dict:
    from speech_ssl.runtime import RayConfig
    from speech_ssl.stages import pretrain
    from speech_ssl.train.config import OptimConfig, TrainerConfig

    out = Path(tempfile.mkdtemp(prefix=f"bench-{model}-{workers}w-"))
    cfg = pretrain.Config(
        output_dir=str(out / "run"),
        data=pretrain.PretrainDataConfig(train=str(manifest), crop_duration=4.0, min_duration=1.0,
                                         batch_seconds=batch_seconds, num_cpus_per_reader=0.5),
        model=model,
        trainer=TrainerConfig(num_workers=workers, cpus_per_worker=1.0 if workers == 1 else 0.5,
                              max_updates=updates, log_every=log_every, validate_every=0, checkpoint_every=updates,
                              optim=OptimConfig(lr=5e-4, schedule="constant", warmup_updates=10)),
        ray=RayConfig(),
    )
    started = time.monotonic()
    pretrain.run(cfg)
    wall = time.monotonic() - started
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if r["split"] == "train"][1:]  # drop the warm-up window
    shutil.rmtree(out, ignore_errors=True)

    def mean(key):
        return statistics.fmean(r[key] for r in windows)

    return {
        "model": model, "workers": workers, "updates": updates, "wall_s": round(wall, 1),
        "audio_s_per_s_per_worker": mean("audio_seconds_per_second"),
        "audio_s_per_s_total": mean("audio_seconds_per_second") * workers,
        "seconds_per_update": mean("seconds_per_update"),
        "data_wait_s": mean("data_wait_s"), "forward_s": mean("forward_s"), "backward_s": mean("backward_s"),
        "sync_s": mean("sync_s"), "optimizer_s": mean("optimizer_s"),
        "data_wait_fraction": mean("data_wait_fraction"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--utterances", type=int, default=600)
    parser.add_argument("--models", nargs="+", default=["tiny", "fbank-tiny"])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--updates", type=int, default=50)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--batch-seconds", type=float, default=32.0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train.json")
    args = parser.parse_args()
    if not args.data.exists():
        raise SystemExit(f"benchmark data not found: {args.data}")

    from speech_ssl.runtime import RayConfig, ray_session

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    manifest = _subset(args.data, args.utterances, tmp / "subset.jsonl")
    results = []
    with ray_session(RayConfig(include_dashboard=False)):
        for model in args.models:
            for workers in args.workers:
                print(f"== {model}, {workers} worker(s)", flush=True)
                results.append(_run(model, workers, manifest, args.updates, args.log_every, args.batch_seconds))
                print(json.dumps(results[-1]), flush=True)
    by = {(r["model"], r["workers"]): r for r in results}
    for model in args.models:
        one, two = by.get((model, 1)), by.get((model, 2))
        if one and two:
            two["scaling_efficiency"] = two["audio_s_per_s_total"] / (2 * one["audio_s_per_s_total"])
            two["ddp_comm_estimate_s"] = two["backward_s"] - one["backward_s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.processor() or platform.machine(), "cpus": __import__("os").cpu_count(),
            "load_average": __import__("os").getloadavg(), "utterances": args.utterances,
            "batch_seconds": args.batch_seconds}
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print("\n| model | workers | audio s/s per worker | total | scaling eff. | s/update | data wait | forward | "
          "backward (+DDP) | stats sync | optimizer |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['workers']} | {r['audio_s_per_s_per_worker']:.1f} | {r['audio_s_per_s_total']:.1f} | "
              f"{r.get('scaling_efficiency', float('nan')):.2f} | {r['seconds_per_update']:.3f} | {r['data_wait_s']:.3f} | "
              f"{r['forward_s']:.3f} | {r['backward_s']:.3f} | {r['sync_s']:.4f} | {r['optimizer_s']:.3f} |")
    print(f"\nload average during the run: {meta['load_average']}; results in {args.out}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
