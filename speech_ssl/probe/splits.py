"""The rows a probe trains and scores on: labels checked, a held-out part when there is no valid manifest,
seeded subsamples, and the k-per-class draws of few-shot classification."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional, Sequence

from speech_ssl.config import ConfigError
from speech_ssl.data import Utterance
from speech_ssl.probe.settings import ProbeSettings


def label_of(task: str, utterance: Utterance, label_key: str = "label") -> Optional[str]:
    """What the task predicts for ``utterance``: its speaker, its transcript, or the manifest column ``label_key``."""
    if task == "speaker":
        return utterance.speaker
    if task == "ctc":
        return utterance.text
    return utterance.columns.get(label_key)


def holdout_split(utterances: Sequence[Utterance], fraction: float, seed: int, by_speaker: bool,
                  group_key=None) -> tuple[list[Utterance], list[Utterance]]:
    """(train, valid): ``fraction`` of the rows held out, deterministically (sorted by id, seeded shuffle).

    by_speaker: hold out that fraction of each speaker's rows (at least one of a speaker with two or more
    rows, never all of them), so every held-out speaker is also in the training part. group_key: the same,
    grouped by ``group_key(utterance)`` instead of the speaker (the classes of task=classify).
    """
    rows = sorted(utterances, key=lambda u: u.id)
    rng = random.Random(seed)
    if group_key is None and by_speaker:
        group_key = lambda u: str(u.speaker)  # noqa: E731
    if group_key is None:
        order = list(range(len(rows)))
        rng.shuffle(order)
        k = min(len(rows) - 1, max(1, round(fraction * len(rows)))) if len(rows) > 1 else 0
        held = set(order[:k])
        return [u for i, u in enumerate(rows) if i not in held], [u for i, u in enumerate(rows) if i in held]
    groups: dict[str, list[Utterance]] = {}
    for u in rows:
        groups.setdefault(group_key(u), []).append(u)
    train, valid = [], []
    for group in sorted(groups):
        members = groups[group]
        rng.shuffle(members)
        k = min(len(members) - 1, max(1, round(fraction * len(members)))) if len(members) > 1 else 0
        valid += members[:k]
        train += members[k:]
    return sorted(train, key=lambda u: u.id), sorted(valid, key=lambda u: u.id)


def subsample(utterances: Sequence[Utterance], limit: Optional[int], seed: int) -> list[Utterance]:
    """At most ``limit`` rows: a seeded sample in id order (all rows when ``limit`` is None)."""
    rows = sorted(utterances, key=lambda u: u.id)
    if limit is None or len(rows) <= limit:
        return rows
    picked = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in picked]


def few_shot_draw(labels: Sequence[str], shots: int, seed: int) -> list[int]:
    """Indices of ``shots`` examples of every class in ``labels`` (all of a class that has fewer), drawn
    with ``seed``: the same seed gives the same subset whatever model the features come from."""
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    rng = random.Random(seed)
    picked = []
    for label in sorted(by_class):
        members = by_class[label]
        picked += rng.sample(members, min(shots, len(members)))
    return sorted(picked)


def check_labels(task: str, train: Sequence[Utterance], valid: Optional[Sequence[Utterance]],
                 train_key: str, valid_key: str, label_key: str = "label") -> None:
    """ConfigError naming the manifest key when the rows lack what the task needs."""
    splits = [(train_key, train)] + ([(valid_key, valid)] if valid is not None else [])
    field_name = {"speaker": "speaker", "ctc": "text"}.get(task, label_key)
    for key, rows in splits:
        if not rows:
            raise ConfigError(key, "the manifest has no utterances.")
        missing = [u for u in rows if not label_of(task, u, label_key)]
        if missing:
            hint = " (set label_key to the manifest column that holds the class)" if task == "classify" else ""
            raise ConfigError(key, f"{len(missing)} of {len(rows)} rows have no '{field_name}' field (e.g. "
                                   f"{missing[0].source_path}); the {task} probe needs it on every row{hint}.")
    if task in ("speaker", "classify"):
        classes = {label_of(task, u, label_key) for u in train}
        if len(classes) < 2:
            raise ConfigError(train_key, f"all {len(train)} rows have one {field_name} ({next(iter(classes))!r}); "
                                         f"the {task} probe needs at least two.")


@dataclass
class ProbeData:
    """The two splits of a probe, checked and (optionally) subsampled; ``held_out`` when valid came from train."""

    train: list[Utterance]
    valid: list[Utterance]
    held_out: bool


def prepare_splits(settings: ProbeSettings, train: Sequence[Utterance], valid: Optional[Sequence[Utterance]],
                   train_key: str = "train", valid_key: str = "valid") -> ProbeData:
    """Check labels (ConfigError naming the key), hold out a fraction when ``valid`` is None, subsample."""
    check_labels(settings.task, train, valid, train_key, valid_key, settings.label_key)
    held_out = valid is None
    if held_out:
        group_key = None
        if settings.task == "classify":
            group_key = lambda u: label_of("classify", u, settings.label_key)  # noqa: E731
        train, valid = holdout_split(train, settings.valid_fraction, settings.seed, settings.task == "speaker",
                                     group_key)
        if not valid:
            raise ConfigError(valid_key, f"{train_key} has too few utterances to hold out a validation part "
                                         f"(valid_fraction={settings.valid_fraction}); give a valid manifest.")
    return ProbeData(subsample(train, settings.max_utterances, settings.seed),
                     subsample(valid, settings.max_utterances, settings.seed + 1), held_out)
