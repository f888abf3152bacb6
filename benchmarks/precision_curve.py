"""Does bf16 training track fp32? The same `tiny` pretraining run twice, ``trainer.precision=fp32`` and
``bf16``, from the same seed on the demo corpus, through the real command (Ray Data, the training loop).

    .venv/bin/python benchmarks/precision_curve.py --updates 500 [--batch-seconds 16] [--out DIR] [key=value ...]

Prints the loss of both runs at every logged update, the largest gap between their smoothed curves
(relative to the fp32 loss), the final losses and validation accuracies, the wall time of each run, and
writes ``curves.png`` with both curves. The runs diverge step by step (bf16 rounds differently, so masks
and distractors soon see different models), so the comparison is of curves, not of numbers per update:
"tracks" means the smoothed bf16 curve stays within a few per cent of fp32's and ends as low.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "speech_ssl" / "demo" / "corpus"


def run(precision: str, args, out: Path) -> tuple[list[dict], float]:
    output_dir = out / precision
    cmd = [sys.executable, "-m", "speech_ssl", "pretrain", f"output_dir={output_dir}",
           f"data.train={DEMO / 'unlabeled.jsonl'}", f"data.valid={DEMO / 'dev.jsonl'}",
           f"data.batch_seconds={args.batch_seconds}", f"trainer.max_updates={args.updates}",
           f"trainer.precision={precision}", "trainer.log_every=10", f"trainer.validate_every={args.updates}",
           f"trainer.checkpoint_every={args.updates}", "trainer.optim.warmup_updates=50", "trainer.seed=1",
           *args.overrides]
    shutil.rmtree(output_dir, ignore_errors=True)  # an existing run would be resumed
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return lines, seconds


def smooth(values: list[float], width: int) -> list[float]:
    out = []
    for i in range(len(values)):
        window = values[max(0, i - width + 1): i + 1]
        out.append(sum(window) / len(window))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=500)
    parser.add_argument("--batch-seconds", type=float, default=16.0)
    parser.add_argument("--smooth", type=int, default=5, help="logged points per moving average")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "precision"))
    parser.add_argument("overrides", nargs="*", help="more `speech-ssl pretrain` overrides for both runs (key=value)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from speech_ssl.precision import describe_cpu

    print(f"CPU: {describe_cpu()}", flush=True)
    runs = {p: run(p, args, out) for p in ("fp32", "bf16")}
    curves, valid = {}, {}
    for precision, (lines, _) in runs.items():
        curves[precision] = {int(x["update"]): float(x["loss"]) for x in lines if x.get("split") == "train"}
        valid[precision] = next((x for x in reversed(lines) if x.get("split") == "valid"), {})
    updates = sorted(set(curves["fp32"]) & set(curves["bf16"]))
    fp32 = smooth([curves["fp32"][u] for u in updates], args.smooth)
    bf16 = smooth([curves["bf16"][u] for u in updates], args.smooth)
    gaps = [abs(b - f) / abs(f) for f, b in zip(fp32, bf16)]
    worst = max(range(len(gaps)), key=gaps.__getitem__)
    print("\nupdate  fp32 loss  bf16 loss")
    for u in updates:
        print(f"{u:6d}  {curves['fp32'][u]:9.4f}  {curves['bf16'][u]:9.4f}")
    summary = {
        "updates": args.updates, "batch_seconds": args.batch_seconds, "cpu": describe_cpu(),
        "final_smoothed_loss": {"fp32": fp32[-1], "bf16": bf16[-1]},
        "max_smoothed_gap": gaps[worst], "max_gap_at_update": updates[worst],
        "mean_smoothed_gap": sum(gaps) / len(gaps),
        "valid": {p: {k: v for k, v in valid[p].items() if k not in ("split", "time")} for p in valid},
        "seconds": {p: runs[p][1] for p in runs},
    }
    print(json.dumps(summary, indent=2))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for precision in ("fp32", "bf16"):
        ax.plot(updates, [curves[precision][u] for u in updates], alpha=0.3)
        ax.plot(updates, fp32 if precision == "fp32" else bf16, label=f"{precision} (moving average)")
    ax.set_xlabel("update")
    ax.set_ylabel("training loss (per masked frame)")
    ax.set_title(f"tiny pretraining on the demo corpus: bf16 vs fp32\n{describe_cpu()}", fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    print(f"wrote {out / 'curves.png'}")


if __name__ == "__main__":
    main()
