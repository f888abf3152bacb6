"""RESULTS.md and its plots from the results protocol's collected results (results_pipeline.Protocol.collect).

``write_report`` writes ``<out>/RESULTS.md`` (setup, error-rate tables, the scratch recipe, targets,
pretraining, the fsdd digit probe, the speaker and CTC probes, wall times, commands to reproduce, raw JSON)
and ``<out>/results/*.png``: pretraining curves (``speech_ssl.train.metrics.plot_curves``, as every training
run draws its own), speaker-probe accuracy against updates, CER against labeled minutes.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

from results_corpora import CORPORA, HEADLINE, TARGETS
from speech_ssl.pipeline import format_seconds
from speech_ssl.train.metrics import plot_curves, pyplot, read_metrics, save_figure

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN_PANELS = (("loss (nats per masked frame)", ("loss", "valid_loss")),
                   ("contrastive accuracy", ("accuracy", "valid_accuracy")),
                   ("codebook perplexity", ("code_perplexity", "prob_perplexity")))


def metrics_records(run_dir: str | Path) -> list[dict]:
    return read_metrics(Path(run_dir) / "metrics.jsonl")


# ---------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------

def probe_points(result: dict) -> list[tuple[int, float]]:
    points = [(0, result["probe_init"]["accuracy"])]
    points += [(r["update"], r["probe_accuracy"]) for r in metrics_records(result["pretrain_dir"])
               if r.get("split") == "probe" and "probe_accuracy" in r]
    return points


def plot_probe(results: list[dict], path: Path) -> Path:
    fig, ax = pyplot().subplots(figsize=(6.5, 4))
    for result in results:
        pts = probe_points(result)
        line = ax.plot(*zip(*pts), "o-", label=f"{result['corpus']} ({result['probe_init']['speakers']} speakers)")
        ax.axhline(result["probe_init"]["chance_accuracy"], color=line[0].get_color(), ls=":", lw=1)
    ax.set_xlabel("pretraining updates")
    ax.set_ylabel("speaker probe accuracy (held out)")
    ax.set_title("linear speaker probe on the last layer (dotted: chance)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def cer_table(result: dict, split: str) -> dict[tuple[str, str], list[float]]:
    table: dict[tuple[str, str], list[float]] = {}
    for arm in result["arms"]:
        if split in arm["scores"]:
            table.setdefault((arm["budget"], arm["init"]), []).append(arm["scores"][split]["cer"])
    return table


def plot_cer(results: list[dict], path: Path) -> Path:
    fig, axes = pyplot().subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for ax, result in zip(axes[0], results):
        split = TARGETS[result["corpus"]][0]
        table = cer_table(result, split)
        for init, style in (("pretrained", "o-"), ("scratch", "s--")):
            pts = sorted((result["budget_minutes"][b], values) for (b, i), values in table.items() if i == init)
            if pts:
                xs = [p[0] for p in pts]
                ys = [statistics.mean(p[1]) for p in pts]
                err = [statistics.pstdev(p[1]) if len(p[1]) > 1 else 0.0 for p in pts]
                ax.errorbar(xs, ys, yerr=err, fmt=style, capsize=3, label=init)
        ax.set_xscale("log")
        ax.set_xlabel("labeled minutes")
        ax.set_ylabel(f"CER on {split}")
        ax.set_title(result["corpus"])
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------
# RESULTS.md
# ---------------------------------------------------------------------------------------------------

def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {"nproc": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    try:
        info["nproc"] = int(subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip())
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()
        info["memory_gb"] = round(int(mem[1]) / 1e6, 1)
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    info["load_average_at_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return info


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.1f}"


def headline(result: dict) -> Optional[str]:
    """One line for the pipeline summary: the headline budget's CER, pretrained against scratch."""
    split, budget, _ = TARGETS[result["corpus"]]
    table = cer_table(result, split)
    pre, scr = table.get((budget, "pretrained")), table.get((budget, "scratch"))
    if not (pre and scr):
        return None
    return (f"{result['corpus']} {split}, {budget} labels: CER pretrained **{_pct(statistics.mean(pre))} %**, "
            f"scratch {_pct(statistics.mean(scr))} % (mean of {len(pre)} seeds)")


def setup_section(results: list[dict], args, wall_seconds: float) -> list[str]:
    hw = hardware()
    lines = ["# Results (issue 9): does self-supervised pretraining pay off with few labels?", ""]
    if args.smoke:
        lines += ["> **SMOKE RUN**: tiny budgets on a handful of utterances, to check the runner end to end. "
                  "These numbers mean nothing; run `benchmarks/results.py` without `--smoke` for the real table.", ""]
    lines += [f"Generated by `benchmarks/results.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
              f"total wall time of this invocation {format_seconds(wall_seconds)} "
              f"(arms finished earlier were skipped; their wall times below are from when they ran).", "",
              "## Setup", "",
              f"- model: `{args.model}` preset, pretrained with `recipe=cpu_tiny`, fine-tuned with `recipe=cpu_tiny` "
              f"for {', '.join(f'{n} updates ({c})' for c, n in args.finetune_updates.items() if c in args.corpora)} "
              "(pretrained and from scratch alike), greedy decoding; "
              f"seeds {', '.join(map(str, args.seeds))}",
              f"- hardware: {hw.get('cpu', '?')}, nproc {hw.get('nproc')}, {hw.get('memory_gb', '?')} GB RAM; "
              f"Python {hw['python']}, torch {hw.get('torch', '?')}; load average at the end {hw['load_average_at_end']} "
              "(the machine is shared)", ""]
    for r in results:
        c = r["calibration"]
        rate = f"{c['seconds_per_update']:.2f} s/update measured over {c['calibration_updates']} updates" \
            if c.get("seconds_per_update") else "fixed by --pretrain-updates"
        lines.append(f"- {r['corpus']}: pretraining budget {args.pretrain_minutes:g} min -> "
                     f"{c['max_updates']} updates ({rate})")
    missing = [c for c in CORPORA if c not in {r["corpus"] for r in results}]
    if missing:
        lines.append(f"- not in this run: {', '.join(missing)} (add it with `--corpora {' '.join(CORPORA)}`; "
                     "finished arms are kept)")
    lines.append("- Gumbel temperature: " + (
        f"2.0 -> 0.5 over the first {args.anneal_fraction:.0%} of the pretraining updates (fairseq's schedule "
        "shape compressed to the run; `model_overrides.temperature_decay`)" if args.anneal_fraction else
        "the preset's per-update decay"))
    return lines + [""]


def error_rates_section(results: list[dict], seeds: list[int]) -> list[str]:
    lines = ["## Error rates", ""]
    for r in results:
        splits = r["eval_sets"]
        lines += [f"### {r['corpus']}", ""]
        for note in r["notes"]:
            lines += [f"Note: {note}", ""]
        header = "| labels | minutes | init | " + " | ".join(f"CER {s} % | WER {s} %" for s in splits) + \
            " | CER ratio pretrained / scratch |"
        lines += [header, "|" + "---|" * (4 + 2 * len(splits))]
        for budget in r["budget_minutes"]:
            means: dict[str, dict[str, dict[str, float]]] = {}
            spread: dict[str, dict[str, str]] = {}
            for init in ("pretrained", "scratch"):
                arms = [a for a in r["arms"] if a["budget"] == budget and a["init"] == init]
                means[init] = {s: {k: statistics.mean(a["scores"][s][k] for a in arms) for k in ("cer", "wer")}
                               for s in splits} if arms else {}
                spread[init] = {s: (f" ± {100 * statistics.stdev(a['scores'][s]['cer'] for a in arms):.1f} "
                                    f"(n={len(arms)})" if len(arms) > 1 else "") for s in splits}
            for init in ("pretrained", "scratch"):
                if not means[init]:
                    continue
                cells = " | ".join(f"{_pct(means[init][s]['cer'])}{spread[init][s]} | {_pct(means[init][s]['wer'])}"
                                   for s in splits)
                ratio = ""
                if init == "pretrained" and means["scratch"]:
                    ratio = " / ".join(f"{means['pretrained'][s]['cer'] / max(means['scratch'][s]['cer'], 1e-9):.2f} ({s})"
                                       for s in splits)
                lines.append(f"| {budget} | {r['budget_minutes'][budget]:.1f} | {init} | {cells} | {ratio} |")
        lines.append("")
        if len(seeds) > 1:
            lines += [f"(CER: mean ± sample sd over seeds {', '.join(map(str, seeds))} at the headline budget "
                      f"{HEADLINE[r['corpus']]}, the first seed elsewhere; per-seed values below)", ""]
            for a in r["arms"]:
                if a["budget"] == HEADLINE[r["corpus"]]:
                    lines.append(f"- {a['budget']} {a['init']} seed {a['seed']}: " + ", ".join(
                        f"CER {s} {_pct(a['scores'][s]['cer'])} %" for s in splits))
            lines.append("")
    return lines


def scratch_section(results: list[dict]) -> list[str]:
    lines = ["## The scratch arm's recipe", "",
             "Each scratch arm uses the learning rate and length that did best from scratch on the selection split "
             "(headline budget, first seed): a sweep of multiples of the fine-tuning recipe's learning rate at its "
             "length, then the best one at twice the length (`CorpusProtocol.sweep` in "
             "`benchmarks/results_pipeline.py`). Pretrained arms keep the recipe.", "",
             "| corpus | lr | updates | selection CER % | chosen |", "|---|---|---|---|---|"]
    for r in results:
        sc = r.get("scratch") or {}
        for t in sc.get("sweep", []):
            chosen = t["updates"] == sc["updates"] and t["lr"] == (sc["lr"] if sc["lr"] is not None else sc["base_lr"])
            lines.append(f"| {r['corpus']} | {t['lr']:g} | {t['updates']} | {_pct(t['select_cer'])} | "
                         f"{'yes' if chosen else ''} |")
    return lines + [""]


def targets_section(results: list[dict]) -> list[str]:
    lines = ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for r in results:
        split, budget, bound = TARGETS[r["corpus"]]
        table = cer_table(r, split)
        pre, scr = table.get((budget, "pretrained")), table.get((budget, "scratch"))
        if pre and scr:
            ratio = statistics.mean(pre) / max(statistics.mean(scr), 1e-9)
            lines.append(f"| {r['corpus']} {split}, {budget} labels: pretrained CER <= {bound} x scratch "
                         f"(mean of {len(pre)} seeds) | {_pct(statistics.mean(pre))} % vs "
                         f"{_pct(statistics.mean(scr))} % = {ratio:.2f} x | {'yes' if ratio <= bound else 'no'} |")
            if r["corpus"] == "speechocean762":
                lines.append(f"| {r['corpus']} {split}, {budget}: every pretrained seed below every scratch seed | "
                             f"worst pretrained {_pct(max(pre))} %, best scratch {_pct(min(scr))} % | "
                             f"{'yes' if max(pre) < min(scr) else 'no'} |")
        init_acc, final_acc = r["probe_init"]["accuracy"], r["probe_final"]["accuracy"]
        lines.append(f"| {r['corpus']}: all-layer speaker probe, pretrained >= random initial model | "
                     f"{final_acc:.3f} vs {init_acc:.3f} | {'yes' if final_acc >= init_acc else 'no'} |")
        digits = r.get("probe_fsdd")
        if digits:
            arms = digits["arms"]
            above = all(arms["model"][str(k)]["mean"] > max(arms["random_init"][str(k)]["mean"],
                                                            arms["fbank"][str(k)]["mean"]) for k in digits["shots"])
            lines.append(f"| fsdd from {r['corpus']} features: above both baselines at k = "
                         f"{', '.join(map(str, digits['shots']))} (mean of {digits['draws']} draws) | see below | "
                         f"{'yes' if above else 'no'} |")
            if "5" in arms["model"]:
                gain = arms["model"]["5"]["mean"] - arms["random_init"]["5"]["mean"]
                lines.append(f"| fsdd from {r['corpus']} features, k = 5: >= 10 points above random init | "
                             f"{100 * gain:+.1f} points | {'yes' if gain >= 0.10 else 'no'} |")
        records = [x for x in metrics_records(r["pretrain_dir"]) if x.get("split") == "train"
                   and isinstance(x.get("code_perplexity"), (int, float))]
        if records:
            low = min(x["code_perplexity"] for x in records)
            lines.append(f"| {r['corpus']}: no codebook collapse (code perplexity well above 1 throughout) | "
                         f"min {low:.1f}, last {records[-1]['code_perplexity']:.1f} | {'yes' if low > 2 else 'no'} |")
    return lines


def pretraining_section(results: list[dict], plots: dict[str, str]) -> list[str]:
    lines = ["", "## Pretraining", ""]
    for r in results:
        m = r["pretrain_summary"].get("metrics", {})
        v = r["pretrain_summary"].get("valid", {})
        lines.append(f"- {r['corpus']}: {r['pretrain_summary']['updates']} updates; last train loss "
                     f"{m.get('loss', float('nan')):.3f}, accuracy {m.get('accuracy', float('nan')):.3f}, code "
                     f"perplexity {m.get('code_perplexity', float('nan')):.1f}; validation loss "
                     f"{v.get('valid_loss', float('nan')):.3f}, accuracy {v.get('valid_accuracy', float('nan')):.3f}. "
                     f"Curves: ![{r['corpus']}]({plots[r['corpus']]})")
    return lines


def probes_section(results: list[dict], probe_png: str) -> list[str]:
    lines = ["", "## Downstream: spoken digits (fsdd), frozen features", "",
             "`speech-ssl probe task=classify` on `../shared/data/fsdd` (real speakers, 8 kHz resampled to 16 kHz, "
             "digits 0-9; train: recordings 5-49, test: 0-4 of the same 5 speakers): mean-pooled features of every "
             "hidden state mixed by learned weights, a linear head trained on k examples per digit, several random "
             "draws of those examples; the same draws for this model, the same architecture with random initial "
             "weights, and mean 80-bin log-mel filterbanks. Test accuracy, mean ± sd over the draws.", "",
             "| pretrained on | k | this model | random init | filterbanks |", "|---|---|---|---|---|"]
    for r in results:
        digits = r.get("probe_fsdd")
        for k in (digits or {}).get("shots", []):
            cell = lambda arm: f"{digits['arms'][arm][str(k)]['mean']:.3f} ± {digits['arms'][arm][str(k)]['sd']:.3f}"  # noqa: E731
            lines.append(f"| {r['corpus']} | {k} | {cell('model')} | {cell('random_init')} | {cell('fbank')} |")
    lines += ["", "## Linear speaker probe during pretraining", "",
              "Mean-pooled features of every hidden state mixed by learned softmax weights (SUPERB's protocol, "
              "`layer=all`), a linear softmax classifier (`speech-ssl probe`, 100 full-batch AdamW "
              "epochs) trained on most of each speaker's utterances and scored on one held-out utterance per speaker "
              "(`valid_fraction=0.2`); update 0 is the initial (random) model, the others come from the pretraining "
              "run's own monitor (`probe.every_updates`). Probe sets: tts-harvard, 7 utterances of each of the 42 "
              "voices of `unlabeled`; speechocean762, 5 utterances of each of 60 speakers of `train` (speaker labels "
              "only).", "",
              f"![probe accuracy]({probe_png})", "", "| corpus | speakers | chance | update: accuracy |",
              "|---|---|---|---|"]
    for r in results:
        pts = ", ".join(f"{u}: {a:.3f}" for u, a in probe_points(r))
        lines.append(f"| {r['corpus']} | {r['probe_init']['speakers']} | {r['probe_init']['chance_accuracy']:.3f} | "
                     f"{pts} |")
    lines += ["", "## Linear CTC character probe", "",
              "Frame-level features of the frozen model (every hidden state, learned layer weights) -> one linear "
              "layer trained with CTC on the smallest label budget (`speech-ssl probe task=ctc`, 40 epochs, AdamW), "
              "greedy-decoded on up to 300 utterances of the reported split: how much of the characters the "
              "representation makes linearly readable, before any fine-tuning.", "",
              "| corpus | labels | CER random init % | CER pretrained % | WER random init % | WER pretrained % |",
              "|---|---|---|---|---|---|"]
    for r in results:
        pc = r.get("probe_ctc") or {}
        if pc.get("init") and pc.get("final"):
            lines.append(f"| {r['corpus']} | {r['ctc_probe_budget']} | {_pct(pc['init'].get('cer'))} | "
                         f"{_pct(pc['final'].get('cer'))} | {_pct(pc['init'].get('wer'))} | "
                         f"{_pct(pc['final'].get('wer'))} |")
    return lines


def reproduce_section(args, commands: dict[str, str]) -> list[str]:
    work = os.path.relpath(args.work, ROOT) if args.work.is_relative_to(ROOT) else args.work
    lines = ["", "## Reproduce", "", "The whole table (resumable; finished arms are skipped):", "", "```",
             " ".join([".venv/bin/python benchmarks/results.py", *args.argv]), "```", "",
             "Each arm alone, from the repository root (manifests written by the runner under "
             f"`{work}/<corpus>/manifests/`):",
             "", "```"]
    for arm, cmd in commands.items():  # paths relative to the repository root, where the commands are meant to run
        lines.append(f"# {arm}\n{cmd.replace(str(ROOT) + os.sep, '')}")
    return lines + ["```"]


def write_report(results: list[dict], args, out: Path, wall_seconds: float, walls: dict[str, Optional[float]],
                 commands: dict[str, str]) -> Path:
    """RESULTS.md and the plots under ``out``; ``walls``: each stage's wall time, ``commands``: each
    speech-ssl stage's command line."""
    figures = out / "results"
    figures.mkdir(parents=True, exist_ok=True)
    rel = lambda p: os.path.relpath(p, out)  # noqa: E731
    plots = {}
    for r in results:
        png = plot_curves(Path(r["pretrain_dir"]) / "metrics.jsonl", figures / f"pretrain_{r['corpus']}.png",
                          PRETRAIN_PANELS, title=f"pretraining on {r['corpus']}")
        plots[r["corpus"]] = rel(png) if png else "(no metrics)"
    probe_png = rel(plot_probe(results, figures / "probe_accuracy.png"))
    cer_png = rel(plot_cer(results, figures / "cer_vs_labeled_minutes.png"))
    lines = [*setup_section(results, args, wall_seconds), *error_rates_section(results, args.seeds),
             *scratch_section(results), *targets_section(results), *pretraining_section(results, plots),
             *probes_section(results, probe_png),
             "", "## CER against labeled minutes", "", f"![CER vs labeled minutes]({cer_png})", "",
             "## Wall times", "", "| arm | wall |", "|---|---|",
             *(f"| {arm} | {format_seconds(seconds)} |" for arm, seconds in walls.items()),
             *reproduce_section(args, commands),
             "", "## Raw results", "", "<details><summary>JSON</summary>", "", "```json",
             json.dumps([{k: v for k, v in r.items() if k not in ("probe_init", "probe_final", "probe_ctc", "probe_fsdd")}
                         for r in results], indent=1, default=str)[:60000], "```", "</details>", ""]
    path = out / "RESULTS.md"
    path.write_text("\n".join(lines))
    return path
