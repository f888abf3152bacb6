"""Linear probes on frozen features: how much a representation knows, measured the standard way.

Pure PyTorch (no Ray, no Hydra), used by ``speech-ssl probe`` (:mod:`speech_ssl.stages.probe`) and by the
pretraining loop's periodic monitor (:class:`ProbeMonitor`, ``pretrain probe.every_updates``).

* ``speaker``: each utterance's features of one layer, mean-pooled over its valid frames, standardised
  with the training split's statistics -> one linear layer -> softmax over the speakers of the training
  manifest (``speaker`` field). Reports train/valid accuracy and the chance level (the share of the
  validation set that the most frequent training speaker holds, and 1 / speakers).
* ``ctc``: frame-level features -> one linear layer -> CTC over the characters of the training
  transcripts (the project's :class:`~speech_ssl.data.TextNormalizer` and :class:`~speech_ssl.data.Vocabulary`,
  blank 0). Reports the validation CER/WER of greedy decoding (``speech_ssl.asr.scoring``, jiwer).

Features come from :class:`speech_ssl.embed.Embedder` (eval mode, no gradients; layers numbered as
transformers' ``hidden_states``, -1 the last Transformer layer) and are computed once, kept in memory, and
the linear layer is then trained with AdamW for a fixed number of epochs (full batch or mini-batches).
Everything random (holdout split, subsampling, initialisation, batch order) comes from ``seed`` through
private generators, so a probe is deterministic and never touches the caller's RNG streams.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from speech_ssl.config import ConfigError
from speech_ssl.data import BatchStream, DataConfig, IngestReport, TextNormalizer, Utterance, Vocabulary

log = logging.getLogger(__name__)

TASKS = ("speaker", "ctc")
# Defaults of the training schedule per task: (epochs, batch size in utterances (0: full batch), lr).
_DEFAULTS = {"speaker": (200, 0, 1e-2), "ctc": (40, 16, 5e-3)}


@dataclass
class ProbeSettings:
    """task: speaker (utterance-level, mean-pooled; accuracy) | ctc (frame-level; CER of greedy decoding).
    layer: transformers' hidden_states numbering (0: the Transformer's input, i: layer i; -1 the last).
    valid_fraction: with valid=none, this fraction of the training manifest is held out (per speaker for
        the speaker task, so every held-out speaker has training utterances), deterministically from seed.
    max_utterances: use at most this many utterances of each split (a seeded sample; null: all).
    epochs / batch_size / lr: AdamW on the linear layer; null picks the task's default (speaker: 200 epochs,
        full batch, lr 1e-2; ctc: 40 epochs, 16 utterances per step, lr 5e-3). batch_size 0: full batch.
    weight_decay: AdamW's decoupled weight decay. seed: split, sample, initialisation, batch order."""

    task: str = field(default="speaker", metadata={"choices": list(TASKS)})
    layer: int = -1
    valid_fraction: float = 0.2
    max_utterances: Optional[int] = None
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    weight_decay: float = 0.01
    seed: int = 0

    def schedule(self) -> tuple[int, int, float]:
        epochs, batch, lr = _DEFAULTS[self.task]
        return (epochs if self.epochs is None else self.epochs,
                batch if self.batch_size is None else self.batch_size,
                lr if self.lr is None else self.lr)


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def check_settings(settings: ProbeSettings, prefix: str = "") -> None:
    """ConfigError naming the key of a setting out of range."""
    if settings.task not in TASKS:
        raise ConfigError(_key(prefix, "task"), f"unknown probe task {settings.task!r}.", TASKS)
    if not 0.0 < settings.valid_fraction < 1.0:
        raise ConfigError(_key(prefix, "valid_fraction"), f"must be between 0 and 1, got {settings.valid_fraction}.")
    epochs, batch, lr = settings.schedule()
    if epochs < 1:
        raise ConfigError(_key(prefix, "epochs"), f"must be at least 1, got {epochs}.")
    if batch < 0:
        raise ConfigError(_key(prefix, "batch_size"), f"must be 0 (full batch) or more, got {batch}.")
    if not lr > 0:
        raise ConfigError(_key(prefix, "lr"), f"must be positive, got {lr}.")
    if settings.max_utterances is not None and settings.max_utterances < 2:
        raise ConfigError(_key(prefix, "max_utterances"), f"must be at least 2 (or null), got {settings.max_utterances}.")


def is_none(value: Optional[str]) -> bool:
    return value is None or str(value).strip().lower() in ("none", "null", "")


# ---------------------------------------------------------------------------------------------------
# Splits and labels
# ---------------------------------------------------------------------------------------------------

def holdout_split(utterances: Sequence[Utterance], fraction: float, seed: int,
                  by_speaker: bool) -> tuple[list[Utterance], list[Utterance]]:
    """(train, valid): ``fraction`` of the rows held out, deterministically (sorted by id, seeded shuffle).

    by_speaker: hold out that fraction of each speaker's rows (at least one of a speaker with two or more
    rows, never all of them), so every held-out speaker is also in the training part.
    """
    rows = sorted(utterances, key=lambda u: u.id)
    rng = random.Random(seed)
    if not by_speaker:
        order = list(range(len(rows)))
        rng.shuffle(order)
        k = min(len(rows) - 1, max(1, round(fraction * len(rows)))) if len(rows) > 1 else 0
        held = set(order[:k])
        return [u for i, u in enumerate(rows) if i not in held], [u for i, u in enumerate(rows) if i in held]
    groups: dict[str, list[Utterance]] = {}
    for u in rows:
        groups.setdefault(str(u.speaker), []).append(u)
    train, valid = [], []
    for speaker in sorted(groups):
        members = groups[speaker]
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


def check_labels(task: str, train: Sequence[Utterance], valid: Optional[Sequence[Utterance]],
                 train_key: str, valid_key: str) -> None:
    """ConfigError naming the manifest key when the rows lack what the task needs."""
    splits = [(train_key, train)] + ([(valid_key, valid)] if valid is not None else [])
    for key, rows in splits:
        if not rows:
            raise ConfigError(key, "the manifest has no utterances.")
        field_name = "speaker" if task == "speaker" else "text"
        missing = [u for u in rows if not getattr(u, field_name)]
        if missing:
            raise ConfigError(key, f"{len(missing)} of {len(rows)} rows have no '{field_name}' field (e.g. "
                                   f"{missing[0].source_path}); the {task} probe needs it on every row.")
    if task == "speaker":
        speakers = {u.speaker for u in train}
        if len(speakers) < 2:
            raise ConfigError(train_key, f"all {len(train)} rows have one speaker ({next(iter(speakers))!r}); the "
                                         "speaker probe needs at least two speakers.")


# ---------------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------------

@contextmanager
def frozen(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode with gradients off for the block; its flags are restored after (so a model that
    is being trained can be probed in place)."""
    flags = [p.requires_grad for p in model.parameters()]
    training = model.training
    try:
        yield model
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(training)


def model_batches(model_config: Any, utterances: Sequence[Utterance], data: DataConfig,
                  normalizer: Optional[TextNormalizer] = None) -> BatchStream:
    """Padded batches (length order, in this process) of what ``model_config``'s front end reads."""
    from speech_ssl.train.tasks.pretrain import feature_spec_for

    rate = model_config.sample_rate
    data = dataclasses.replace(data, sample_rate=rate, shuffle=False)
    return BatchStream(utterances, data, feature_spec_for(model_config, rate), mode="pad", use_ray=False,
                       normalizer=normalizer)


@dataclass
class Features:
    """Per utterance: ``vectors[i]`` ([dim] pooled, or [frames, dim]), with its id, speaker and text."""

    ids: list[str]
    vectors: list[torch.Tensor]
    speakers: list[Optional[str]]
    texts: list[Optional[str]]
    report: IngestReport
    seconds: float = 0.0


def extract(model: torch.nn.Module, batches: Sequence[Any] | BatchStream, layer: int, pooled: bool,
            device: torch.device, rows: dict[str, Utterance], report: Optional[IngestReport] = None) -> Features:
    """Features of ``layer`` for every batch (a BatchStream's first epoch, or a list of its batches).

    rows: id -> Utterance (for the speaker field). Runs the encoder in eval mode without gradients."""
    from speech_ssl.embed.embedder import Embedder

    started = time.perf_counter()
    out = Features([], [], [], [], report if report is not None else IngestReport())
    iterator = batches.iter_epoch(0) if isinstance(batches, BatchStream) else batches
    with frozen(model):
        embedder = Embedder(model, layers=[layer], pooling="mean" if pooled else "none", device=device)
        index = embedder.layers[0]
        for batch in iterator:
            lengths = batch.lengths
            if bool((lengths == batch.inputs.shape[1]).all()):
                lengths = None
            for k, emb in enumerate(embedder(batch.inputs, lengths)):
                out.ids.append(batch.ids[k])
                out.vectors.append(torch.from_numpy(np.ascontiguousarray(emb[index])))
                out.speakers.append(rows[batch.ids[k]].speaker if batch.ids[k] in rows else None)
                out.texts.append(batch.texts[k])
    if isinstance(batches, BatchStream):
        out.report = batches.report
    out.seconds = time.perf_counter() - started
    return out


# ---------------------------------------------------------------------------------------------------
# The linear layers
# ---------------------------------------------------------------------------------------------------

def _standardiser(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False).clamp(min=1e-5)
    return mean, std


def _chunks(n: int, batch: int, generator: torch.Generator) -> list[torch.Tensor]:
    if batch <= 0 or batch >= n:
        return [torch.arange(n)]
    order = torch.randperm(n, generator=generator)
    return list(order.split(batch))


def fit_speaker(train_x: torch.Tensor, train_y: torch.Tensor, valid_x: torch.Tensor, valid_y: torch.Tensor,
                num_classes: int, epochs: int, batch_size: int, lr: float, weight_decay: float,
                seed: int) -> dict[str, float]:
    """A linear softmax classifier on standardised features; accuracies on both splits and the final loss."""
    mean, std = _standardiser(train_x)
    tx, vx = (train_x - mean) / std, (valid_x - mean) / std
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = torch.nn.Linear(tx.shape[1], num_classes)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    loss = torch.tensor(0.0)
    with torch.enable_grad():
        for _ in range(epochs):
            for idx in _chunks(len(tx), batch_size, generator):
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(head(tx[idx]), train_y[idx])
                loss.backward()
                optimizer.step()
    with torch.no_grad():
        train_acc = float((head(tx).argmax(-1) == train_y).float().mean())
        valid_acc = float((head(vx).argmax(-1) == valid_y).float().mean()) if len(vx) else float("nan")
    return {"train_accuracy": train_acc, "valid_accuracy": valid_acc, "train_loss": float(loss.detach())}


def _pad(seqs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    out = seqs[0].new_zeros(len(seqs), int(lengths.max()), seqs[0].shape[-1])
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out, lengths


def ctc_frames_needed(ids: Sequence[int]) -> int:
    """Frames CTC needs for a target: its length plus a blank between every repeated pair."""
    return len(ids) + sum(1 for a, b in zip(ids, ids[1:]) if a == b)


def fit_ctc(train_x: Sequence[torch.Tensor], train_targets: Sequence[Sequence[int]], valid_x: Sequence[torch.Tensor],
            valid_refs: Sequence[str], vocab: Vocabulary, epochs: int, batch_size: int, lr: float,
            weight_decay: float, seed: int) -> dict[str, Any]:
    """A frame-wise linear layer trained with CTC; greedy CER/WER on the validation split."""
    from speech_ssl.asr.scoring import error_counts, rates

    mean, std = _standardiser(torch.cat(list(train_x)))
    tx = [(x - mean) / std for x in train_x]
    vx = [(x - mean) / std for x in valid_x]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = torch.nn.Linear(tx[0].shape[1], len(vocab))
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    targets = [torch.tensor(t, dtype=torch.long) for t in train_targets]
    loss_value = float("nan")
    with torch.enable_grad():
        for _ in range(epochs):
            for idx in _chunks(len(tx), batch_size, generator):
                feats, lengths = _pad([tx[i] for i in idx.tolist()])
                tgt = [targets[i] for i in idx.tolist()]
                log_probs = head(feats).log_softmax(-1).transpose(0, 1)  # [T, B, V]
                loss = F.ctc_loss(log_probs, torch.cat(tgt), lengths, torch.tensor([len(t) for t in tgt]),
                                  blank=vocab.blank_id, reduction="sum", zero_infinity=True) / len(tgt)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_value = float(loss.detach())
    hyps = []
    with torch.no_grad():
        for x in vx:
            hyps.append(vocab.decode_ctc(head(x).argmax(-1).tolist()))
    counts = error_counts(list(valid_refs), hyps)
    return {**rates(counts), **{k: counts[k] for k in ("word_errors", "words", "char_errors", "chars")},
            "train_loss": loss_value, "examples": [{"ref": r, "hyp": h} for r, h in list(zip(valid_refs, hyps))[:5]]}


# ---------------------------------------------------------------------------------------------------
# A whole probe
# ---------------------------------------------------------------------------------------------------

@dataclass
class ProbeData:
    """The two splits of a probe, checked and (optionally) subsampled; ``held_out`` when valid came from train."""

    train: list[Utterance]
    valid: list[Utterance]
    held_out: bool


def prepare_splits(settings: ProbeSettings, train: Sequence[Utterance], valid: Optional[Sequence[Utterance]],
                   train_key: str = "train", valid_key: str = "valid") -> ProbeData:
    """Check labels (ConfigError naming the key), hold out a fraction when ``valid`` is None, subsample."""
    check_labels(settings.task, train, valid, train_key, valid_key)
    held_out = valid is None
    if held_out:
        train, valid = holdout_split(train, settings.valid_fraction, settings.seed, settings.task == "speaker")
        if not valid:
            raise ConfigError(valid_key, f"{train_key} has too few utterances to hold out a validation part "
                                         f"(valid_fraction={settings.valid_fraction}); give a valid manifest.")
    return ProbeData(subsample(train, settings.max_utterances, settings.seed),
                     subsample(valid, settings.max_utterances, settings.seed + 1), held_out)


def _speaker_result(settings: ProbeSettings, tr: Features, va: Features) -> dict[str, Any]:
    speakers = sorted({s for s in tr.speakers if s is not None})
    index = {s: i for i, s in enumerate(speakers)}
    if len(speakers) < 2:
        raise ConfigError("train", "fewer than two speakers are left after decoding; the speaker probe needs two.")
    keep = [i for i, s in enumerate(va.speakers) if s in index]
    unseen = len(va.speakers) - len(keep)
    if not keep:
        raise ConfigError("valid", "no validation utterance is of a speaker of the training manifest: a speaker "
                                   "probe scores the training speakers (use valid=none to hold out part of train).")
    train_x = torch.stack(tr.vectors).float()
    train_y = torch.tensor([index[s] for s in tr.speakers])
    valid_x = torch.stack([va.vectors[i] for i in keep]).float()
    valid_y = torch.tensor([index[va.speakers[i]] for i in keep])
    epochs, batch, lr = settings.schedule()
    fit = fit_speaker(train_x, train_y, valid_x, valid_y, len(speakers), epochs, batch, lr,
                      settings.weight_decay, settings.seed)
    majority = Counter(train_y.tolist()).most_common(1)[0][0]
    return {
        "accuracy": fit["valid_accuracy"], "train_accuracy": fit["train_accuracy"],
        "chance_accuracy": float((valid_y == majority).float().mean()),
        "uniform_chance": 1.0 / len(speakers), "speakers": len(speakers),
        "valid_unseen_speakers": unseen, "train_loss": fit["train_loss"],
        "train_utterances": len(train_y), "valid_utterances": len(valid_y),
    }


def _ctc_result(settings: ProbeSettings, tr: Features, va: Features, vocab: Vocabulary) -> dict[str, Any]:
    keep_x, keep_t, too_short = [], [], 0
    for x, text in zip(tr.vectors, tr.texts):
        ids = vocab.encode(text or "")
        if not ids or len(x) < ctc_frames_needed(ids):
            too_short += 1
            continue
        keep_x.append(x.float())
        keep_t.append(ids)
    if not keep_x:
        raise ConfigError("train", "no training utterance has a transcript that fits its frames (CTC needs at "
                                   "least one frame per character).")
    refs = [t or "" for t in va.texts]
    epochs, batch, lr = settings.schedule()
    fit = fit_ctc(keep_x, keep_t, [x.float() for x in va.vectors], refs, vocab, epochs, batch, lr,
                  settings.weight_decay, settings.seed)
    return {**fit, "vocab_size": len(vocab), "train_utterances": len(keep_x), "train_filtered": too_short,
            "valid_utterances": len(refs)}


def _probe_vocabulary(normalizer: TextNormalizer, splits: ProbeData) -> Vocabulary:
    """The characters of the training transcripts; one error per split listing the characters it cannot take."""
    from speech_ssl.errors import SpeechSSLError

    for key, rows in (("train", splits.train), ("valid", splits.valid)):
        try:
            normalizer.check(u.text for u in rows)
        except SpeechSSLError as err:
            raise SpeechSSLError(f"{key}: {err}") from None
    vocab = Vocabulary.build([u.text for u in splits.train], normalizer)
    try:
        vocab.check([normalizer(u.text) for u in splits.valid if u.text is not None])
    except SpeechSSLError as err:
        raise SpeechSSLError(f"valid: {err}") from None
    return vocab


def run_probe(model: torch.nn.Module, splits: ProbeData, settings: ProbeSettings, data: DataConfig,
              device: torch.device | str = "cpu", batches: Optional[dict[str, list]] = None) -> dict[str, Any]:
    """Features once, then the linear layer; returns the results (accuracy or CER, counts, timings).

    batches: a dict the caller keeps between calls (the pretraining monitor): the decoded audio of each split
    is cached there, so repeated probes only recompute the features.
    """
    from speech_ssl.embed.embedder import encoder_of

    device = torch.device(device)
    config = encoder_of(model).config
    layers = config.num_layers
    if not -layers - 1 <= settings.layer <= layers:
        raise ConfigError("layer", f"layer {settings.layer} does not exist: the model has {layers} Transformer "
                                   f"layers, so layers run from 0 (the Transformer's input) to {layers} (or -1 for "
                                   f"the last, down to -{layers + 1}).")
    normalizer = vocab = None
    if settings.task == "ctc":
        normalizer = TextNormalizer(data.text)
        vocab = _probe_vocabulary(normalizer, splits)
    started = time.perf_counter()
    features = {}
    for name, rows in (("train", splits.train), ("valid", splits.valid)):
        lookup = {u.id: u for u in rows}
        if batches is not None:
            if name not in batches:
                stream = model_batches(config, rows, data, normalizer)
                batches[name] = (list(stream.iter_epoch(0)), stream.report)
            cached, report = batches[name]
            features[name] = extract(model, cached, settings.layer, settings.task == "speaker", device, lookup, report)
        else:
            stream = model_batches(config, rows, data, normalizer)
            features[name] = extract(model, stream, settings.layer, settings.task == "speaker", device, lookup)
        features[name].report.raise_if_nothing_used(name)
    extract_seconds = time.perf_counter() - started
    t0 = time.perf_counter()
    tr, va = features["train"], features["valid"]
    if settings.task == "speaker":
        result = _speaker_result(settings, tr, va)
    else:
        result = _ctc_result(settings, tr, va, vocab)
    result.update({
        "task": settings.task, "layer": settings.layer if settings.layer >= 0 else settings.layer + layers + 1,
        "num_layers": layers, "valid_held_out": splits.held_out, "epochs": settings.schedule()[0],
        "batch_size": settings.schedule()[1], "lr": settings.schedule()[2], "seed": settings.seed,
        "extract_seconds": extract_seconds, "fit_seconds": time.perf_counter() - t0,
        "ingest": {name: {"read": f.report.read, "used": f.report.used, "quarantined": f.report.quarantined,
                          "filtered": f.report.filtered} for name, f in features.items()},
    })
    return result


def summary_line(result: dict[str, Any]) -> str:
    """One line: the probe's score against its reference point."""
    if result["task"] == "speaker":
        return (f"speaker probe (layer {result['layer']}): valid accuracy {result['accuracy']:.3f} "
                f"(train {result['train_accuracy']:.3f}, chance {result['chance_accuracy']:.3f}, "
                f"{result['speakers']} speakers, {result['train_utterances']}/{result['valid_utterances']} "
                "train/valid utterances)")
    return (f"ctc probe (layer {result['layer']}): valid CER {result['cer']:.3f}, WER {result['wer']:.3f} "
            f"({result['train_utterances']}/{result['valid_utterances']} train/valid utterances, "
            f"{result['vocab_size']} tokens)")


# ---------------------------------------------------------------------------------------------------
# During pretraining
# ---------------------------------------------------------------------------------------------------

class ProbeMonitor:
    """A probe of the model being trained, every ``every_updates`` updates (rank 0 only; see the training loop).

    Built on the driver (splits checked there, so a bad manifest fails before training starts), shipped to
    the training worker with the task; the decoded audio is cached on first use, so each later probe costs
    one forward pass over the probe's utterances plus the linear layer. Returns ``probe_accuracy`` (speaker)
    or ``probe_cer`` (ctc) and friends, which the loop writes to metrics.jsonl / TensorBoard (split ``probe``).
    """

    def __init__(self, splits: ProbeData, settings: ProbeSettings, data: DataConfig, every_updates: int):
        self.splits = splits
        self.settings = settings
        self.data = data
        self.every_updates = every_updates
        self._batches: dict[str, Any] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_batches"] = {}  # decoded audio stays where it was decoded
        return state

    def __call__(self, model: torch.nn.Module, device: torch.device) -> dict[str, float]:
        started = time.perf_counter()
        result = run_probe(model, self.splits, self.settings, self.data, device, batches=self._batches)
        if self.settings.task == "speaker":
            metrics = {"probe_accuracy": result["accuracy"], "probe_train_accuracy": result["train_accuracy"],
                       "probe_chance_accuracy": result["chance_accuracy"]}
        else:
            metrics = {"probe_cer": result["cer"], "probe_wer": result["wer"]}
        metrics["probe_layer"] = float(result["layer"])
        metrics["probe_seconds"] = time.perf_counter() - started
        if not all(math.isfinite(v) for v in metrics.values()):
            log.warning("probe gave non-finite values: %s", metrics)
        return metrics
