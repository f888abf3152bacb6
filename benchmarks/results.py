"""Issue 9's results table: does self-supervised pretraining pay off with few labels? One command.

For each corpus under ../shared/data (see its README):

* pretrain a CPU-sized model (``--model``, fbank-tiny by default; `conf/pretrain/recipe/cpu_tiny`) on the
  unlabeled audio for a wall-clock budget (``--pretrain-minutes``). The trainer counts updates, not
  minutes, so a short calibration run measures seconds per update first and the budget becomes
  ``trainer.max_updates`` (kept in ``calibration.json``, so a resumed run trains to the same length). A
  speaker probe monitors the representations during pretraining (``probe.every_updates``), and once more on
  the initial (random) weights;
  - tts-harvard: pretrain on ``unlabeled``; labeled budgets ``train_10min`` and ``train_1h``; evaluate on
    ``dev`` and ``test``;
  - speechocean762: pretrain on the audio of ``train`` and ``unlabeled`` (transcripts dropped); labeled
    budgets: a deterministic 30-minute subset of ``train`` (written beside the runs) and all of ``train``;
    ``dev`` split by speaker into a selection half (picks checkpoints) and a report half (the tables);
* fine-tune the pretrained model on each budget, and train the same architecture from scratch
  (``finetune init=none``) with the same budget and recipe (`conf/finetune/recipe/cpu_tiny`);
* evaluate CER and WER (greedy decoding) of every fine-tuned model; the headline budget of each corpus
  (tts-harvard 10 min, speechocean762 30 min) with every seed of ``--seeds`` (default 1 2 3), the others
  with the first;
* probe the frozen pretrained model on a task unlike its data: spoken digits (``../shared/data/fsdd``),
  k = 1, 5, 20 examples per digit, against random initial weights and filterbanks on the same draws;
* write ``<out>/RESULTS.md`` (tables, commands to reproduce, hardware, wall times) and PNG plots under
  ``<out>/results/`` (pretraining curves, probe accuracy against updates, CER against labeled minutes).

Every stage goes through its Python API with the configuration the command line would build
(``conf/<command>/config.yaml`` + recipe + overrides), so each arm is also one ``speech-ssl`` command
(listed in RESULTS.md). Every arm is resumable: training continues from its newest checkpoint, and
finished arms (``train_summary.json`` at the target update count, evaluation JSONs) are skipped, so an
interrupted multi-hour run continues where it stopped.

    .venv/bin/python benchmarks/results.py                          # both corpora, 60 min pretraining each
    .venv/bin/python benchmarks/results.py --corpora tts-harvard --pretrain-minutes 30 --seeds 1 2 3
    .venv/bin/python benchmarks/results.py --smoke                  # minutes: tiny budgets, a few utterances
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"
CORPORA = ("tts-harvard", "speechocean762")
# corpus -> (reported split, headline label budget, pretrained / scratch CER bound on the mean of the seeds)
TARGETS = {"tts-harvard": ("test", "10min", 0.8), "speechocean762": ("dev_report", "30min", 0.75)}
HEADLINE = {corpus: budget for corpus, (_, budget, _) in TARGETS.items()}
FSDD = "fsdd"  # the downstream task unlike the pretraining data: spoken digits, 8 kHz

log = logging.getLogger("results")


# ---------------------------------------------------------------------------------------------------
# Manifests
# ---------------------------------------------------------------------------------------------------

def read_rows(manifest: Path) -> list[dict]:
    base = manifest.parent
    rows = []
    for line in manifest.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            row["path"] = str((base / row["path"]).resolve()) if "://" not in row["path"] else row["path"]
            rows.append(row)
    return rows


def write_rows(path: Path, rows: list[dict], drop_text: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            row = {k: v for k, v in row.items() if not (drop_text and k == "text")}
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)
    return path


def minutes(rows: list[dict]) -> float:
    return sum(r["duration"] for r in rows) / 60


def duration_subset(rows: list[dict], seconds: float, seed: int) -> list[dict]:
    """A deterministic subset of about ``seconds`` of audio (rows sorted by path, seeded shuffle, in order)."""
    rows = sorted(rows, key=lambda r: r["path"])
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    picked, total = [], 0.0
    for i in order:
        if total >= seconds:
            break
        picked.append(i)
        total += rows[i]["duration"]
    return [rows[i] for i in sorted(picked)]


def speaker_halves(rows: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    """(selection, report): the speakers split in two halves (sorted, seeded shuffle), so that the split that
    picks checkpoints shares no speaker with the split that is reported."""
    speakers = sorted({r["speaker"] for r in rows})
    random.Random(seed).shuffle(speakers)
    chosen = set(speakers[: len(speakers) // 2])
    return [r for r in rows if r["speaker"] in chosen], [r for r in rows if r["speaker"] not in chosen]


def speaker_subset(rows: list[dict], speakers: int, per_speaker: int, seed: int) -> list[dict]:
    """``per_speaker`` utterances of each of ``speakers`` speakers (seeded): the speaker probe's manifest."""
    groups: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: r["path"]):
        groups.setdefault(r["speaker"], []).append(r)
    rng = random.Random(seed)
    chosen = sorted(rng.sample(sorted(s for s in groups if len(groups[s]) >= 2), min(speakers, len(groups))))
    out = []
    for s in chosen:
        members = groups[s][:]
        rng.shuffle(members)
        out += members[:per_speaker]
    return out


@dataclass
class Corpus:
    name: str
    pretrain: Path                       # unlabeled audio (text dropped)
    pretrain_valid: Path                 # a few held-out utterances for the pretraining validation loss
    probe: Path                          # speaker-labelled utterances of the probe (text dropped)
    budgets: dict[str, Path]             # label budget name -> labeled manifest
    budget_minutes: dict[str, float]
    finetune_valid: Path
    eval_sets: dict[str, Path]
    finetune_overrides: list[str] = field(default_factory=list)  # on top of the cpu_tiny recipe, every arm
    notes: list[str] = field(default_factory=list)


def build_corpus(name: str, data: Path, work: Path, smoke: bool) -> Corpus:
    """Write the manifests of ``name``'s arms under ``work/manifests`` (absolute paths; text dropped where the
    audio is for pretraining)."""
    src = data / name
    out = work / "manifests"
    load = lambda split: read_rows(src / f"{split}.jsonl")  # noqa: E731
    notes, finetune_overrides = [], []
    if name == "tts-harvard":
        unlabeled = load("unlabeled")
        budgets = {"10min": load("train_10min"), "1h": load("train_1h")}
        evals = {"dev": load("dev"), "test": load("test")}
        finetune_valid = evals["dev"]
        probe_source, probe_shape = unlabeled, (42, 7)  # every voice of the pretraining audio
    elif name == "speechocean762":
        train = load("train")
        unlabeled = [*train, *load("unlabeled")]
        budgets = {"30min": duration_subset(train, 1800, seed=0), "all": train}
        select, report = speaker_halves(load("dev"), seed=0)
        evals = {"dev_report": report}
        finetune_valid = select
        probe_source, probe_shape = train, (60, 5)
        # At this corpus's error rates dev WER is 0.98-1.0 for every checkpoint (800-update runs, last stop):
        # picking the best by WER picked noise, e.g. a scratch model's update 133. CER separates them.
        finetune_overrides.append("ctc.select_by=valid_cer")
        notes.append(f"dev, the only labeled held-out split, is split by speaker (`speaker_halves`, seed 0): the "
                     f"selection half ({len({r['speaker'] for r in select})} speakers, {minutes(select):.0f} min) "
                     f"picks each run's best checkpoint (by CER), the report half "
                     f"({len({r['speaker'] for r in report})} speakers, {minutes(report):.0f} min) is what the "
                     "tables show.")
    else:
        raise SystemExit(f"unknown corpus {name!r}; choose from {', '.join(CORPORA)}")
    pretrain_valid = duration_subset(finetune_valid, 300, seed=1)  # ~5 min of held-out audio
    # Many speakers, few utterances each: a random model's mean-pooled features already tell a dozen speakers
    # apart (about 0.9 held-out accuracy on 14-15 speakers here), so the probe needs more classes to show change.
    probe = speaker_subset(probe_source, speakers=probe_shape[0], per_speaker=probe_shape[1], seed=0)
    if smoke:  # a handful of utterances everywhere
        rng = random.Random(0)
        unlabeled = rng.sample(unlabeled, 24)
        budgets = {k: v[: (12 if i == 0 else 20)] for i, (k, v) in enumerate(budgets.items())}
        evals = {k: v[:10] for k, v in evals.items()}
        finetune_valid = finetune_valid[:10]
        pretrain_valid = pretrain_valid[:6]
        probe = speaker_subset(probe_source, speakers=3, per_speaker=6, seed=0)
    return Corpus(
        name=name,
        pretrain=write_rows(out / "pretrain.jsonl", unlabeled, drop_text=True),
        pretrain_valid=write_rows(out / "pretrain_valid.jsonl", pretrain_valid, drop_text=True),
        probe=write_rows(out / "probe_speakers.jsonl", [{k: v for k, v in r.items() if k != "text"} for r in probe]),
        budgets={k: write_rows(out / f"train_{k}.jsonl", v) for k, v in budgets.items()},
        budget_minutes={k: minutes(v) for k, v in budgets.items()},
        finetune_valid=write_rows(out / "finetune_valid.jsonl", finetune_valid),
        eval_sets={k: write_rows(out / f"eval_{k}.jsonl", v) for k, v in evals.items()},
        finetune_overrides=finetune_overrides,
        notes=notes,
    )


# ---------------------------------------------------------------------------------------------------
# Stages through their Python APIs, configured exactly as the command line would be
# ---------------------------------------------------------------------------------------------------

def stage_config(command: str, overrides: list[str]):
    from speech_ssl.cli.hydra_app import build_config, check_overrides, compose_config

    return build_config(command, compose_config(command, check_overrides(command, overrides)))


def command_line(command: str, overrides: list[str]) -> str:
    return "speech-ssl " + command + " " + " ".join(overrides)


class Runner:
    """Runs arms, skipping finished ones, and remembers each arm's command and wall time."""

    def __init__(self, work: Path):
        self.work = work
        self.commands: list[tuple[str, str]] = []  # (arm, command line)
        self.walls_path = work / "wall_seconds.json"
        self.walls: dict[str, float] = json.loads(self.walls_path.read_text()) if self.walls_path.exists() else {}

    def run(self, arm: str, command: str, overrides: list[str], done: bool) -> Any:
        self.commands.append((arm, command_line(command, overrides)))
        if done:
            log.info("%s: done before, skipped", arm)
            return None
        from speech_ssl.stages import COMMANDS

        cfg = stage_config(command, overrides)
        log.info("%s: %s", arm, command_line(command, overrides))
        started = time.monotonic()
        try:
            return COMMANDS[command].load().run(cfg)
        finally:  # wall time adds up over resumes
            self.walls[arm] = self.walls.get(arm, 0.0) + time.monotonic() - started
            self.walls_path.write_text(json.dumps(self.walls, indent=1))


def training_done(output_dir: Path, updates: int) -> bool:
    summary = output_dir / "train_summary.json"
    return summary.exists() and json.loads(summary.read_text()).get("updates", -1) >= updates


def calibrate(runner: Runner, corpus: Corpus, base: list[str], work: Path, minutes_budget: float, smoke: bool,
              fixed_updates: Optional[int]) -> dict:
    """max_updates for the pretraining budget, from a short run's seconds per update (kept in calibration.json)."""
    path = work / "calibration.json"
    if path.exists():
        return json.loads(path.read_text())
    if fixed_updates:
        result = {"max_updates": fixed_updates, "seconds_per_update": None, "source": "--pretrain-updates"}
    else:
        steps = 4 if smoke else 40
        out = work / "calibrate"
        runner.run(f"{corpus.name}/calibrate", "pretrain",
                   [*base, f"output_dir={out}", f"trainer.max_updates={steps}", "trainer.log_every=2" if smoke else
                    "trainer.log_every=5", f"trainer.checkpoint_every={steps}", "trainer.validate_every=0"],
                   done=training_done(out, steps))
        records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
        rates = [r["seconds_per_update"] for r in records if r.get("split") == "train" and "seconds_per_update" in r]
        rate = statistics.median(rates[1:] or rates)  # the first window holds start-up
        # 20 % of the budget is left for validation, the probes, checkpoints and epoch starts (with 15 % a
        # 60-minute tts-harvard run took 60.6 min: the 40 calibration updates run faster than the average).
        updates = max(10, int(minutes_budget * 60 * 0.80 / rate))
        if smoke:
            updates = min(updates, 12)
        result = {"max_updates": updates, "seconds_per_update": rate, "calibration_updates": steps,
                  "budget_minutes": minutes_budget, "source": "calibrated"}
    path.write_text(json.dumps(result, indent=1))
    return result


def temperature_override(model: str, updates: int, anneal_fraction: Optional[float]) -> list[str]:
    """The Gumbel temperature schedule compressed to this run's length, as a model override.

    fairseq's decay (0.999995 per update) takes the temperature from 2.0 to its floor 0.5 in about 277k of
    400k updates, ~70 % of the run; over a few thousand updates it would barely leave 2.0, so the quantizer
    would sample near-uniformly noisy codes for the whole run. The same shape here: the floor is reached
    after ``anneal_fraction`` of ``updates``. None keeps the preset's decay."""
    if not anneal_fraction:
        return []
    from speech_ssl.stages.common import resolve_model_config

    cfg = resolve_model_config(model, {})
    steps = max(1, int(updates * anneal_fraction))
    decay = (cfg.temperature_min / cfg.temperature_max) ** (1.0 / steps)
    return [f"model_overrides.temperature_decay={decay:.8f}"]


def arm_suffix(lr: Optional[float], updates: int, default_updates: int) -> str:
    """The run folder's suffix for a scratch recipe other than the shared one (none for the shared one)."""
    return (f"_lr{lr:g}" if lr is not None else "") + (f"_u{updates}" if updates != default_updates else "")


def best_select_cer(ft_dir: Path) -> float:
    """The lowest CER on the selection split that the run's validations saw (what picks its best checkpoint)."""
    values = [r["valid_cer"] for r in metrics_records(ft_dir) if r.get("split") == "valid" and "valid_cer" in r]
    return min(values) if values else math.inf


def sweep_scratch(corpus: Corpus, args, seed: int, ft_updates: int, finetune_arm) -> dict:
    """The scratch arm's own learning rate and length, chosen on the selection split at the headline budget.

    A model trained from scratch sits on the CTC blank plateau far longer than a pretrained one: with the
    pretrained arm's recipe the comparison is against a model that has not started. Each multiple of the
    recipe's learning rate trains once (first seed, recipe length); the best also trains twice as long; the
    lowest selection CER wins and every scratch arm of the corpus uses it. The sweep is reported."""
    from speech_ssl.cli.hydra_app import compose_config

    base_lr = float(compose_config("finetune", ["recipe=cpu_tiny"]).trainer.optim.lr)
    budget = HEADLINE[corpus.name]
    manifest = corpus.budgets[budget]
    sweep = []

    def trial(lr: float, updates: int) -> None:
        shared = lr == base_lr and updates == ft_updates  # the recipe itself: the regular seed-1 arm
        name = f"{budget}_scratch_s{seed}" + ("" if shared else arm_suffix(lr, updates, ft_updates))
        ft_dir = finetune_arm(name, "none", manifest, seed, updates, None if shared else lr)
        sweep.append({"lr": lr, "updates": updates, "select_cer": best_select_cer(ft_dir), "dir": str(ft_dir)})

    if not args.scratch_lr_multiples:
        return {"lr": None, "updates": ft_updates, "sweep": [], "base_lr": base_lr}
    for multiple in args.scratch_lr_multiples:
        trial(base_lr * multiple, ft_updates)
    best = min(sweep, key=lambda t: t["select_cer"])
    trial(best["lr"], 2 * ft_updates)
    chosen = min(sweep, key=lambda t: t["select_cer"])
    lr = None if chosen["lr"] == base_lr else chosen["lr"]
    log.info("%s: scratch recipe lr %g, %d updates (selection CER %.3f)", corpus.name, chosen["lr"],
             chosen["updates"], chosen["select_cer"])
    return {"lr": lr, "updates": chosen["updates"], "sweep": sweep, "base_lr": base_lr}


def run_corpus(runner: Runner, corpus: Corpus, args, seeds: list[int]) -> dict:
    work = args.work / corpus.name
    model = [f"model={args.model}"]
    pt_dir = work / "pretrain"
    smoke = args.smoke
    pt_base = [*model, f"data.train={corpus.pretrain}", "recipe=cpu_tiny", f"trainer.seed={seeds[0]}"]
    if smoke:  # in-process training: a Ray Train worker group takes longer to start than a smoke run trains
        pt_base += ["data.crop_duration=2.0", "data.batch_seconds=8.0", "trainer.optim.warmup_updates=2",
                    "trainer.num_workers=0"]
    calib = calibrate(runner, corpus, pt_base, work, args.pretrain_minutes, smoke, args.pretrain_updates)
    updates = calib["max_updates"]
    pt_model = temperature_override(args.model, updates, args.anneal_fraction)
    every = max(1, updates // (3 if smoke else 8))
    interval = max(1, updates // (2 if smoke else 8))
    probe = [f"probe.every_updates={every}", f"probe.train={corpus.probe}", "probe.valid=none",
             "probe.max_utterances=300"]
    runner.run(f"{corpus.name}/pretrain", "pretrain",
               [*pt_base, *pt_model, f"data.valid={corpus.pretrain_valid}", f"output_dir={pt_dir}",
                f"trainer.max_updates={updates}",
                f"trainer.log_every={max(1, min(25, updates // 10))}", f"trainer.validate_every={interval}",
                f"trainer.checkpoint_every={interval}", "trainer.keep_last=1", *probe],
               done=training_done(pt_dir, updates))

    # The probe on the initial weights: the loop seeds torch with trainer.seed before building the model.
    init_ckpt = work / "init_model"
    if not (init_ckpt / "config.json").exists():
        import torch

        from speech_ssl.models import build, save_model
        from speech_ssl.stages.common import resolve_model_config

        torch.manual_seed(seeds[0])
        save_model(build(resolve_model_config(args.model, {})), init_ckpt)
    probe_init = work / "probe_init.json"
    runner.run(f"{corpus.name}/probe_init", "probe",
               [f"checkpoint={init_ckpt}", f"train={corpus.probe}", "valid=none", "max_utterances=300",
                "epochs=100", f"output={probe_init}"], done=probe_init.exists())
    probe_final = work / "probe_final.json"
    runner.run(f"{corpus.name}/probe_final", "probe",
               [f"checkpoint={pt_dir / 'last'}", f"train={corpus.probe}", "valid=none", "max_utterances=300",
                "epochs=100", f"output={probe_final}"], done=probe_final.exists())

    # The CTC character probe: how much of the characters a linear layer reads off frozen last-layer
    # features with the smallest label budget, on the random initial model and after pretraining.
    probe_ctc = {}
    ctc_train = next(iter(corpus.budgets.values()))
    ctc_valid = corpus.eval_sets[TARGETS[corpus.name][0]]
    for tag, ckpt in (("init", init_ckpt), ("final", pt_dir / "last")):
        out = work / f"probe_ctc_{tag}.json"
        extra = ["data.text.unknown=drop", "epochs=4"] if smoke else []
        runner.run(f"{corpus.name}/probe_ctc_{tag}", "probe",
                   [f"checkpoint={ckpt}", "task=ctc", f"train={ctc_train}", f"valid={ctc_valid}",
                    "max_utterances=300", f"output={out}", *extra], done=out.exists())
        probe_ctc[tag] = json.loads(out.read_text())

    # Spoken digits from frozen features: this model against random initial weights and filterbanks, the
    # same draws for all three (speech-ssl probe task=classify).
    digits = None
    if args.fsdd is not None:
        out = work / "probe_fsdd.json"
        extra = ["shots=[1,2]", "draws=2", "max_utterances=200", "epochs=50"] if smoke else []
        runner.run(f"{corpus.name}/probe_fsdd", "probe",
                   [f"checkpoint={pt_dir / 'last'}", "task=classify", f"train={args.fsdd / 'train.jsonl'}",
                    f"valid={args.fsdd / 'test.jsonl'}", f"output={out}", *extra], done=out.exists())
        digits = json.loads(out.read_text())

    ft_updates = args.finetune_updates[corpus.name]

    def finetune_arm(name: str, init: str, manifest: Path, seed: int, updates: int, lr: Optional[float]) -> Path:
        ft_dir = work / "finetune" / name
        interval = max(1, updates // (2 if smoke else 6))
        ft = [*model, f"init={init}", f"data.train={manifest}", f"data.valid={corpus.finetune_valid}",
              "recipe=cpu_tiny", f"output_dir={ft_dir}", f"trainer.seed={seed}", f"trainer.max_updates={updates}",
              f"trainer.validate_every={interval}", f"trainer.checkpoint_every={interval}",
              *([f"trainer.optim.lr={lr:g}"] if lr is not None else []), *corpus.finetune_overrides]
        if smoke:
            # A dozen utterances need not hold every letter of the validation transcripts.
            ft += ["trainer.log_every=2", "ctc.freeze_updates=2", "data.batch_seconds=12.0",
                   "data.text.unknown=drop", "trainer.num_workers=0"]
        runner.run(f"{corpus.name}/finetune/{name}", "finetune", ft, done=training_done(ft_dir, updates))
        return ft_dir

    scratch = sweep_scratch(corpus, args, seeds[0], ft_updates, finetune_arm)
    arms = []
    for budget, manifest in corpus.budgets.items():
        for init_name, init in (("pretrained", str(pt_dir / "best")), ("scratch", "none")):
            # Every seed at the headline budget (the figure the targets are about), the first elsewhere.
            for seed in (seeds if budget == HEADLINE[corpus.name] else seeds[:1]):
                lr, updates = (scratch["lr"], scratch["updates"]) if init_name == "scratch" else (None, ft_updates)
                name = f"{budget}_{init_name}_s{seed}" + arm_suffix(lr, updates, ft_updates)
                ft_dir = finetune_arm(name, init, manifest, seed, updates, lr)
                scores = {}
                for split, eval_manifest in corpus.eval_sets.items():
                    out = work / "evaluate" / name / f"{split}.json"
                    runner.run(f"{corpus.name}/evaluate/{name}/{split}", "evaluate",
                               [f"checkpoint={ft_dir / 'best'}", f"data.test={eval_manifest}", f"output={out}"],
                               done=out.exists())
                    scores[split] = json.loads(out.read_text())
                arms.append({"budget": budget, "minutes": corpus.budget_minutes[budget], "init": init_name,
                             "seed": seed, "dir": str(ft_dir), "scores": scores, "lr": lr,
                             "updates": json.loads((ft_dir / "train_summary.json").read_text())["updates"]})
    return {"corpus": corpus.name, "calibration": calib, "pretrain_dir": str(pt_dir), "arms": arms,
            "probe_init": json.loads(probe_init.read_text()), "probe_final": json.loads(probe_final.read_text()),
            "probe_ctc": probe_ctc, "ctc_probe_budget": next(iter(corpus.budgets)), "probe_fsdd": digits,
            "pretrain_summary": json.loads((pt_dir / "train_summary.json").read_text()), "notes": corpus.notes,
            "budget_minutes": corpus.budget_minutes, "eval_sets": list(corpus.eval_sets), "scratch": scratch}


# ---------------------------------------------------------------------------------------------------
# Report: plots and RESULTS.md
# ---------------------------------------------------------------------------------------------------

def metrics_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pretraining(result: dict, path: Path) -> Path:
    plt = _plt()
    records = metrics_records(Path(result["pretrain_dir"]))
    panels = (("loss (nats per masked frame)", ("loss", "valid_loss")),
              ("contrastive accuracy", ("accuracy", "valid_accuracy")),
              ("codebook perplexity", ("code_perplexity", "prob_perplexity")))
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    for ax, (title, keys) in zip(axes, panels):
        for split, style in (("train", "-"), ("valid", "o-")):
            for key in keys:
                pts = [(r["update"], r[key]) for r in records if r.get("split") == split and
                       isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
                if pts:
                    ax.plot(*zip(*pts), style, markersize=3, label=f"{split} {key}")
        ax.set_title(title)
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(f"pretraining on {result['corpus']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def probe_points(result: dict) -> list[tuple[int, float]]:
    points = [(0, result["probe_init"]["accuracy"])]
    points += [(r["update"], r["probe_accuracy"]) for r in metrics_records(Path(result["pretrain_dir"]))
               if r.get("split") == "probe" and "probe_accuracy" in r]
    return points


def plot_probe(results: list[dict], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
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
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def cer_table(result: dict, split: str) -> dict[tuple[str, str], list[float]]:
    table: dict[tuple[str, str], list[float]] = {}
    for arm in result["arms"]:
        if split in arm["scores"]:
            table.setdefault((arm["budget"], arm["init"]), []).append(arm["scores"][split]["cer"])
    return table


def plot_cer(results: list[dict], path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
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
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


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


def _fmt_minutes(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"


def write_report(results: list[dict], runner: Runner, args, out: Path, started: float) -> Path:
    figures = out / "results"
    figures.mkdir(parents=True, exist_ok=True)
    rel = lambda p: os.path.relpath(p, out)  # noqa: E731
    plots = {r["corpus"]: plot_pretraining(r, figures / f"pretrain_{r['corpus']}.png") for r in results}
    probe_png = plot_probe(results, figures / "probe_accuracy.png")
    cer_png = plot_cer(results, figures / "cer_vs_labeled_minutes.png")
    hw = hardware()
    seeds = args.seeds
    lines = ["# Results (issue 9): does self-supervised pretraining pay off with few labels?", ""]
    if args.smoke:
        lines += ["> **SMOKE RUN**: tiny budgets on a handful of utterances, to check the runner end to end. "
                  "These numbers mean nothing; run `benchmarks/results.py` without `--smoke` for the real table.", ""]
    lines += [f"Generated by `benchmarks/results.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
              f"total wall time of this invocation {_fmt_minutes(time.monotonic() - started)} "
              f"(arms finished earlier were skipped; their wall times below are from when they ran).", "",
              "## Setup", "",
              f"- model: `{args.model}` preset, pretrained with `recipe=cpu_tiny`, fine-tuned with `recipe=cpu_tiny` "
              f"for {', '.join(f'{n} updates ({c})' for c, n in args.finetune_updates.items() if c in args.corpora)} "
              "(pretrained and from scratch alike), greedy decoding; "
              f"seeds {', '.join(map(str, seeds))}",
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
    lines.append(f"- Gumbel temperature: " + (
        f"2.0 -> 0.5 over the first {args.anneal_fraction:.0%} of the pretraining updates (fairseq's schedule "
        "shape compressed to the run; `model_overrides.temperature_decay`)" if args.anneal_fraction else
        "the preset's per-update decay"))
    lines.append("")
    # ---- the main table --------------------------------------------------------------------------
    lines += ["## Error rates", ""]
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
    # ---- the scratch arm's own recipe -----------------------------------------------------------------
    lines += ["## The scratch arm's recipe", "",
              "Each scratch arm uses the learning rate and length that did best from scratch on the selection split "
              "(headline budget, first seed): a sweep of multiples of the fine-tuning recipe's learning rate at its "
              "length, then the best one at twice the length (`sweep_scratch`). Pretrained arms keep the recipe.", "",
              "| corpus | lr | updates | selection CER % | chosen |", "|---|---|---|---|---|"]
    for r in results:
        sc = r.get("scratch") or {}
        for t in sc.get("sweep", []):
            chosen = t["updates"] == sc["updates"] and t["lr"] == (sc["lr"] if sc["lr"] is not None else sc["base_lr"])
            lines.append(f"| {r['corpus']} | {t['lr']:g} | {t['updates']} | {_pct(t['select_cer'])} | "
                         f"{'yes' if chosen else ''} |")
    lines.append("")
    # ---- targets -----------------------------------------------------------------------------------
    lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
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
        records = [x for x in metrics_records(Path(r["pretrain_dir"])) if x.get("split") == "train"
                   and isinstance(x.get("code_perplexity"), (int, float))]
        if records:
            low = min(x["code_perplexity"] for x in records)
            lines.append(f"| {r['corpus']}: no codebook collapse (code perplexity well above 1 throughout) | "
                         f"min {low:.1f}, last {records[-1]['code_perplexity']:.1f} | {'yes' if low > 2 else 'no'} |")
    lines += ["", "## Pretraining", ""]
    for r in results:
        m = r["pretrain_summary"].get("metrics", {})
        v = r["pretrain_summary"].get("valid", {})
        lines.append(f"- {r['corpus']}: {r['pretrain_summary']['updates']} updates; last train loss "
                     f"{m.get('loss', float('nan')):.3f}, accuracy {m.get('accuracy', float('nan')):.3f}, code "
                     f"perplexity {m.get('code_perplexity', float('nan')):.1f}; validation loss "
                     f"{v.get('valid_loss', float('nan')):.3f}, accuracy {v.get('valid_accuracy', float('nan')):.3f}. "
                     f"Curves: ![{r['corpus']}]({rel(plots[r['corpus']])})")
    lines += ["", "## Downstream: spoken digits (fsdd), frozen features", "",
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
              f"![probe accuracy]({rel(probe_png)})", "", "| corpus | speakers | chance | update: accuracy |",
              "|---|---|---|---|"]
    for r in results:
        pts = ", ".join(f"{u}: {a:.3f}" for u, a in probe_points(r))
        lines.append(f"| {r['corpus']} | {r['probe_init']['speakers']} | {r['probe_init']['chance_accuracy']:.3f} | "
                     f"{pts} |")
    lines += ["", "## Linear CTC character probe", "",
              "Frame-level features of the frozen model (every hidden state, learned layer weights) -> one linear layer trained with CTC on the "
              "smallest label budget (`speech-ssl probe task=ctc`, 40 epochs, AdamW), greedy-decoded on up to 300 "
              "utterances of the reported split: how much of the characters the representation makes "
              "linearly readable, before any fine-tuning.", "",
              "| corpus | labels | CER random init % | CER pretrained % | WER random init % | WER pretrained % |",
              "|---|---|---|---|---|---|"]
    for r in results:
        pc = r.get("probe_ctc") or {}
        if "init" in pc and "final" in pc:
            lines.append(f"| {r['corpus']} | {r['ctc_probe_budget']} | {_pct(pc['init'].get('cer'))} | "
                         f"{_pct(pc['final'].get('cer'))} | {_pct(pc['init'].get('wer'))} | "
                         f"{_pct(pc['final'].get('wer'))} |")
    lines += ["", "## CER against labeled minutes", "", f"![CER vs labeled minutes]({rel(cer_png)})", "",
              "## Wall times", "", "| arm | wall |", "|---|---|"]
    for arm, seconds in runner.walls.items():
        lines.append(f"| {arm} | {_fmt_minutes(seconds)} |")
    lines += ["", "## Reproduce", "", "The whole table (resumable; finished arms are skipped):", "", "```",
              " ".join([".venv/bin/python benchmarks/results.py", *args.argv]), "```", "",
              "Each arm alone, from the repository root (manifests written by the runner under "
              f"`{os.path.relpath(args.work, ROOT) if args.work.is_relative_to(ROOT) else args.work}/<corpus>/manifests/`):",
              "", "```"]
    seen = set()
    for arm, cmd in runner.commands:
        if arm not in seen:
            seen.add(arm)
            # paths relative to the repository root, where the commands are meant to run
            lines.append(f"# {arm}\n{cmd.replace(str(ROOT) + os.sep, '')}")
    lines += ["```", "", "## Raw results", "", "<details><summary>JSON</summary>", "", "```json",
              json.dumps([{k: v for k, v in r.items() if k not in ("probe_init", "probe_final", "probe_ctc", "probe_fsdd")}
                          for r in results],
                         indent=1, default=str)[:60000], "```", "</details>", ""]
    path = out / "RESULTS.md"
    path.write_text("\n".join(lines))
    return path


def finetune_updates(values: list[str], default: int, parser: argparse.ArgumentParser) -> dict[str, int]:
    """``["800", "speechocean762=2000"]`` -> updates per corpus (a bare number sets every corpus)."""
    updates = dict.fromkeys(CORPORA, default)
    for value in values:
        corpus, _, number = value.rpartition("=")
        if corpus and corpus not in CORPORA:
            parser.error(f"--finetune-updates {value}: unknown corpus {corpus!r}; choose from {', '.join(CORPORA)}")
        if not number.isdigit() or int(number) < 1:
            parser.error(f"--finetune-updates {value}: expected N or CORPUS=N with N a positive integer")
        for name in ([corpus] if corpus else CORPORA):
            updates[name] = int(number)
    return updates


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpora", nargs="+", default=list(CORPORA), choices=CORPORA)
    parser.add_argument("--pretrain-minutes", type=float, default=None,
                        help="wall-clock pretraining budget per corpus (default 60; smoke 0.2)")
    parser.add_argument("--pretrain-updates", type=int, default=None,
                        help="pretraining updates instead of a calibrated time budget")
    parser.add_argument("--finetune-updates", nargs="+", default=None, metavar="[CORPUS=]N",
                        help="fine-tuning updates of every arm, for all corpora (N) or one (CORPUS=N); "
                             "default 1500 (smoke 4)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3],
                        help="fine-tuning seeds of the headline budget (other budgets run the first)")
    parser.add_argument("--scratch-lr-multiples", nargs="*", type=float, default=None,
                        help="the scratch arm's learning-rate sweep, as multiples of the recipe's (default 0.5 1 2 4; "
                             "smoke 1 2; none: the scratch arms use the recipe)")
    parser.add_argument("--fsdd", type=Path, default=DATA / FSDD,
                        help="the spoken-digit corpus of the downstream probe (skipped when absent)")
    parser.add_argument("--model", default="fbank-tiny")
    parser.add_argument("--anneal-fraction", type=float, default=0.7,
                        help="the Gumbel temperature reaches its floor after this fraction of the pretraining "
                             "updates, as fairseq's schedule does over 400k (0: the preset's per-update decay)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where RESULTS.md and results/*.png go (default docs/; smoke outputs/results-smoke/)")
    parser.add_argument("--work", type=Path, default=None,
                        help="runs and manifests (default outputs/results/; smoke <out>/work)")
    parser.add_argument("--data", type=Path, default=DATA, help="the shared corpora (../shared/data)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny budgets on a handful of utterances, training in-process (a few minutes)")
    args = parser.parse_args(argv)
    args.argv = argv
    if args.pretrain_minutes is None:
        args.pretrain_minutes = 0.2 if args.smoke else 60.0
    if args.scratch_lr_multiples is None:
        args.scratch_lr_multiples = [1.0, 2.0] if args.smoke else [0.5, 1.0, 2.0, 4.0]
    args.finetune_updates = finetune_updates(args.finetune_updates or [], default=4 if args.smoke else 1500,
                                             parser=parser)
    if args.out is None:
        args.out = ROOT / ("outputs/results-smoke" if args.smoke else "docs")
    if args.work is None:
        args.work = args.out / "work" if args.smoke else ROOT / "outputs" / "results"
    args.out, args.work = args.out.resolve(), args.work.resolve()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("speech_ssl").setLevel(logging.INFO)
    missing = [c for c in args.corpora if not (args.data / c).is_dir()]
    if missing:
        print(f"results.py: no corpus {', '.join(missing)} under {args.data} (see ../shared/data/README.md)",
              file=sys.stderr)
        return 2
    if args.fsdd is not None and not (args.fsdd / "train.jsonl").exists():
        log.warning("no fsdd corpus at %s: the downstream digit probe is skipped", args.fsdd)
        args.fsdd = None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from speech_ssl.runtime import RayConfig, ray_session

    started = time.monotonic()
    runner = Runner(args.work)
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    # One local Ray for every stage (each would start its own otherwise); no dashboard: on 2 cores its
    # process takes CPU from the training worker for nothing a batch experiment reads.
    with ray_session(RayConfig(include_dashboard=False)):
        for name in args.corpora:
            corpus = build_corpus(name, args.data, args.work / name, args.smoke)
            results.append(run_corpus(runner, corpus, args, args.seeds))
    (args.work / "results.json").write_text(json.dumps(results, indent=1, default=str))
    path = write_report(results, runner, args, args.out, started)
    print(f"wrote {path} and {args.out / 'results'}/*.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
