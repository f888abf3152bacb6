"""A probe's picture: accuracy against labeled examples per class for each arm (few-shot classify), and the
learned layer weights of an all-layer probe."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional


def plot_probe(result: dict[str, Any], out_path: Path) -> Optional[Path]:
    """Write ``out_path`` (PNG) for ``result``; None when there is nothing to draw (one fixed layer, not classify)."""
    classify = result["task"] == "classify"
    weights = result.get("layer_weights")
    if classify and isinstance(weights, dict):
        weights = weights.get(str(max(result["shots"])))
    has_weights = result.get("layer") == "all" and bool(weights)
    if not classify and not has_weights:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from speech_ssl.probe.fewshot import ARM_NAMES

    panels = int(classify) + int(has_weights)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 3.6), squeeze=False)
    axes = list(axes.flat)
    if classify:
        ax = axes.pop(0)
        shots = result["shots"]
        for arm, by_shots in result["arms"].items():
            means = [by_shots[str(k)]["mean"] for k in shots]
            sds = [by_shots[str(k)]["sd"] for k in shots]
            ax.errorbar(shots, means, yerr=sds, marker="o", capsize=3, label=ARM_NAMES.get(arm, arm))
        ax.axhline(result["chance_accuracy"], color="grey", linestyle=":", label="chance (majority class)")
        ax.set_xscale("log")
        ax.set_xticks(shots, [str(k) for k in shots])
        ax.set_xlabel("labeled examples per class")
        ax.set_ylabel("valid accuracy")
        ax.set_title(f"{result['label_key']}: mean ± sd of {result['draws']} draws", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if has_weights:
        ax = axes.pop(0)
        ax.bar(range(len(weights)), weights)
        ax.axhline(1.0 / len(weights), color="grey", linestyle=":", label="uniform")
        ax.set_xlabel("hidden state (0: Transformer input)")
        ax.set_ylabel("softmax weight")
        ax.set_title("learned layer weights" + (f" (k={max(result['shots'])})" if classify else ""), fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out_path = Path(out_path)
    tmp = out_path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(out_path)
    return out_path
