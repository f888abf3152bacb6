"""The results protocol's corpora: which splits of ../shared/data each arm reads, as manifests.

``layout(name, folder)`` says where a corpus's manifests are (a fixed set of files per corpus: the pipeline
wires its stages to them before they exist); ``write_manifests``, the pipeline's ``manifests`` stage, writes
them from ../shared/data (absolute audio paths; transcripts dropped where the audio is for pretraining) and
returns each label budget's minutes and the notes the report prints.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CORPORA = ("tts-harvard", "speechocean762")
# corpus -> (reported split, headline label budget, pretrained / scratch CER bound on the mean of the seeds)
TARGETS = {"tts-harvard": ("test", "10min", 0.8), "speechocean762": ("dev_report", "30min", 0.75)}
HEADLINE = {corpus: budget for corpus, (_, budget, _) in TARGETS.items()}


@dataclass(frozen=True)
class Corpus:
    """Where one corpus's manifests are (``folder``), and what every fine-tuning arm adds to the recipe."""

    name: str
    folder: Path
    budgets: tuple[str, ...]             # label budgets, smallest first
    eval_splits: tuple[str, ...]
    finetune_overrides: tuple[str, ...]  # on top of the cpu_tiny recipe, every arm

    @property
    def pretrain(self) -> Path:          # unlabeled audio (text dropped)
        return self.folder / "pretrain.jsonl"

    @property
    def pretrain_valid(self) -> Path:    # a few held-out utterances for the pretraining validation loss
        return self.folder / "pretrain_valid.jsonl"

    @property
    def probe(self) -> Path:             # speaker-labelled utterances of the probe (text dropped)
        return self.folder / "probe_speakers.jsonl"

    @property
    def finetune_valid(self) -> Path:    # the selection split: picks each run's best checkpoint
        return self.folder / "finetune_valid.jsonl"

    def budget(self, name: str) -> Path:
        return self.folder / f"train_{name}.jsonl"

    def eval_set(self, split: str) -> Path:
        return self.folder / f"eval_{split}.jsonl"

    def files(self) -> list[str]:
        """Every manifest, relative to ``folder``."""
        paths = [self.pretrain, self.pretrain_valid, self.probe, self.finetune_valid,
                 *map(self.budget, self.budgets), *map(self.eval_set, self.eval_splits)]
        return [p.name for p in paths]


def layout(name: str, folder: Path) -> Corpus:
    if name == "tts-harvard":
        return Corpus(name, folder, budgets=("10min", "1h"), eval_splits=("dev", "test"), finetune_overrides=())
    if name == "speechocean762":
        # At this corpus's error rates dev WER is 0.98-1.0 for every checkpoint (800-update runs, last stop):
        # picking the best by WER picked noise, e.g. a scratch model's update 133. CER separates them.
        return Corpus(name, folder, budgets=("30min", "all"), eval_splits=("dev_report",),
                      finetune_overrides=("ctc.select_by=valid_cer",))
    raise SystemExit(f"unknown corpus {name!r}; choose from {', '.join(CORPORA)}")


# ---------------------------------------------------------------------------------------------------
# Manifest rows
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


# ---------------------------------------------------------------------------------------------------
# The manifests stage
# ---------------------------------------------------------------------------------------------------

def write_manifests(cfg: dict[str, Any]) -> dict[str, Any]:
    """The ``manifests`` stage: ``cfg`` is {corpus, data (../shared/data), smoke, folder}. Returns each label
    budget's minutes and the corpus's notes for the report."""
    name, smoke = cfg["corpus"], cfg["smoke"]
    corpus = layout(name, Path(cfg["folder"]))
    src = Path(cfg["data"]) / name
    load = lambda split: read_rows(src / f"{split}.jsonl")  # noqa: E731
    notes = []
    if name == "tts-harvard":
        unlabeled = load("unlabeled")
        budgets = {"10min": load("train_10min"), "1h": load("train_1h")}
        evals = {"dev": load("dev"), "test": load("test")}
        finetune_valid = evals["dev"]
        probe_source, probe_shape = unlabeled, (42, 7)  # every voice of the pretraining audio
    else:  # speechocean762
        train = load("train")
        unlabeled = [*train, *load("unlabeled")]
        budgets = {"30min": duration_subset(train, 1800, seed=0), "all": train}
        select, report = speaker_halves(load("dev"), seed=0)
        evals = {"dev_report": report}
        finetune_valid = select
        probe_source, probe_shape = train, (60, 5)
        notes.append(f"dev, the only labeled held-out split, is split by speaker (`speaker_halves`, seed 0): the "
                     f"selection half ({len({r['speaker'] for r in select})} speakers, {minutes(select):.0f} min) "
                     f"picks each run's best checkpoint (by CER), the report half "
                     f"({len({r['speaker'] for r in report})} speakers, {minutes(report):.0f} min) is what the "
                     "tables show.")
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
    assert tuple(budgets) == corpus.budgets and tuple(evals) == corpus.eval_splits, "layout() and the splits disagree"
    write_rows(corpus.pretrain, unlabeled, drop_text=True)
    write_rows(corpus.pretrain_valid, pretrain_valid, drop_text=True)
    write_rows(corpus.probe, probe, drop_text=True)
    write_rows(corpus.finetune_valid, finetune_valid)
    for budget, rows in budgets.items():
        write_rows(corpus.budget(budget), rows)
    for split, rows in evals.items():
        write_rows(corpus.eval_set(split), rows)
    return {"budget_minutes": {k: minutes(v) for k, v in budgets.items()}, "notes": notes,
            "utterances": {"pretrain": len(unlabeled), "probe": len(probe),
                           **{f"train_{k}": len(v) for k, v in budgets.items()}}}
