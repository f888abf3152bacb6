"""What a training run tells its user: metrics.jsonl, TensorBoard, progress lines, curves, alarms."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from speech_ssl.progress import eta, format_duration

log = logging.getLogger("speech_ssl.train")


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, float):
        if key in ("lr",):
            return f"{key} {value:.2e}"
        if key.endswith("fraction") or key in ("accuracy", "valid_accuracy"):
            return f"{key} {value:.3f}"
        return f"{key} {value:.4g}"
    return f"{key} {value}"


class MetricsLogger:
    """Rank 0's sink for metrics: ``metrics.jsonl``, TensorBoard and a progress line per log step.

    ``progress_keys`` are the metrics shown on the progress line (all of them go to the files); every train
    line carries the ETA (counted from where this run started: ``truncate_after``).
    """

    def __init__(self, output_dir: Path, max_updates: int, progress_keys: Sequence[str], tensorboard: bool = True):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / "metrics.jsonl"
        self.max_updates = max_updates
        self.progress_keys = list(progress_keys)
        self.started = time.monotonic()
        self.start_update: Optional[int] = None
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.output_dir / "tensorboard"))
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                log.warning("tensorboard is not installed: metrics go to metrics.jsonl only")

    def truncate_after(self, update: int) -> None:
        """Forget records past ``update`` (a resumed run replays those updates and logs them again).
        Also where this run starts: the ETA on the progress lines counts from here."""
        self.start_update = update
        self.started = time.monotonic()
        records = read_metrics(self.path)
        kept = [r for r in records if r.get("update", 0) <= update]
        if len(kept) != len(records):
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            tmp.replace(self.path)

    def write(self, split: str, update: int, metrics: dict[str, float]) -> None:
        record = {"split": split, "update": update, "time": round(time.time(), 3), **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{split}/{key}", value, update)
            self.writer.flush()
        if self.start_update is None:
            self.start_update = update
        line = [f"[{split}] update {update}/{self.max_updates}"]
        keys = self.progress_keys if split == "train" else sorted(metrics)
        line += [_fmt(k, metrics[k]) for k in keys if k in metrics]
        if split == "train":
            left = eta(update - self.start_update, self.max_updates - self.start_update,
                       time.monotonic() - self.started)
            line.append(f"eta {format_duration(left)}" if left is not None else "eta -")
        log.info(" | ".join(line))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not Path(path).exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out_path: Path) -> Path:
    """Lay ``fig`` out, write it as a PNG atomically (a reader never sees half an image) and close it."""
    fig.tight_layout()
    tmp = Path(out_path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    pyplot().close(fig)
    tmp.replace(out_path)
    return Path(out_path)


def plot_curves(metrics_path: Path, out_path: Path, panels: Sequence[tuple[str, Sequence[str]]],
                title: str = "") -> Optional[Path]:
    """A PNG with one panel per (title, [metric keys]) from ``metrics.jsonl`` (train and valid lines)."""
    records = read_metrics(metrics_path)
    if not records:
        return None
    plt = pyplot()
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, (panel_title, keys) in zip(axes.flat, panels):
        for split, style in (("train", "-"), ("valid", "o-"), ("probe", "s-")):
            for key in keys:
                points = [(r["update"], r[key]) for r in records if r.get("split") == split and key in r
                          and isinstance(r[key], (int, float)) and math.isfinite(r[key])]
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, style, label=f"{split} {key}", markersize=3)
        ax.set_title(panel_title)
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return save_figure(fig, out_path)


class CollapseMonitor:
    """Warns when pretraining looks collapsed: code perplexity stuck near 1 per group, or the contrastive loss at
    chance level (ln(K+1) nats per masked frame) long after warmup. Each alarm is raised once per
    episode and cleared when the metric recovers."""

    def __init__(self, num_negatives: int, after_updates: int, patience: int = 3, groups: int = 1):
        self.chance = math.log(num_negatives + 1)
        # Code perplexity is summed over the G codebook groups: G means one entry used per group.
        self.collapsed_below = 1.5 * groups
        self.after = after_updates
        self.patience = patience
        self.low_perplexity = 0
        self.at_chance = 0
        self.raised: set[str] = set()

    def check(self, update: int, metrics: dict[str, float]) -> list[str]:
        alarms = []
        ppl = metrics.get("code_perplexity")
        if ppl is not None:
            self.low_perplexity = self.low_perplexity + 1 if ppl < self.collapsed_below else 0
            if self.low_perplexity >= self.patience and "codebook" not in self.raised:
                alarms.append(f"codebook collapse: code perplexity {ppl:.2f} has stayed near 1 for "
                              f"{self.low_perplexity} log steps (raise diversity_weight, slow the temperature "
                              "decay, or lower the learning rate)")
                self.raised.add("codebook")
            elif self.low_perplexity == 0:
                self.raised.discard("codebook")
        contrastive = metrics.get("contrastive_per_frame")
        if contrastive is not None and update >= self.after:
            self.at_chance = self.at_chance + 1 if contrastive > 0.98 * self.chance else 0
            if self.at_chance >= self.patience and "chance" not in self.raised:
                alarms.append(f"no learning: the contrastive loss {contrastive:.3f} sits at chance level "
                              f"ln(K+1) = {self.chance:.3f} after {update} updates")
                self.raised.add("chance")
            elif self.at_chance == 0:
                self.raised.discard("chance")
        for alarm in alarms:
            log.warning("COLLAPSE ALARM at update %d: %s", update, alarm)
        return alarms
