"""One whole probe: features once, then the head of the task (speaker, ctc or few-shot classify)."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Optional

import torch

from speech_ssl.config import ConfigError
from speech_ssl.data import DataConfig, TextNormalizer, Vocabulary
from speech_ssl.probe.features import Features, extract, model_batches
from speech_ssl.probe.heads import ctc_frames_needed, fit_classifier, fit_ctc
from speech_ssl.probe.settings import ProbeSettings, layer_index
from speech_ssl.probe.splits import ProbeData


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
    fit = fit_classifier(train_x, train_y, valid_x, valid_y, len(speakers), epochs, batch, lr,
                         settings.weight_decay, settings.seed)
    majority = Counter(train_y.tolist()).most_common(1)[0][0]
    return {
        "accuracy": fit["valid_accuracy"], "train_accuracy": fit["train_accuracy"],
        "chance_accuracy": float((valid_y == majority).float().mean()),
        "uniform_chance": 1.0 / len(speakers), "speakers": len(speakers),
        "valid_unseen_speakers": unseen, "train_loss": fit["train_loss"], "layer_weights": fit["layer_weights"],
        "train_utterances": len(train_y), "valid_utterances": len(valid_y),
    }


def _ctc_result(settings: ProbeSettings, tr: Features, va: Features, vocab: Vocabulary) -> dict[str, Any]:
    keep_x, keep_t, too_short = [], [], 0
    for x, text in zip(tr.vectors, tr.texts):
        ids = vocab.encode(text or "")
        if not ids or len(x) < ctc_frames_needed(ids):
            too_short += 1
            continue
        keep_x.append(x)
        keep_t.append(ids)
    if not keep_x:
        raise ConfigError("train", "no training utterance has a transcript that fits its frames (CTC needs at "
                                   "least one frame per character).")
    refs = [t or "" for t in va.texts]
    epochs, batch, lr = settings.schedule()
    fit = fit_ctc(keep_x, keep_t, list(va.vectors), refs, vocab, epochs, batch, lr, settings.weight_decay,
                  settings.seed)
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


def ingest_counts(features: Features) -> dict[str, int]:
    report = features.report
    return {"read": report.read, "used": report.used, "quarantined": report.quarantined, "filtered": report.filtered}


def probe_layers(settings: ProbeSettings, num_layers: int) -> list[int]:
    """The hidden states a probe reads: all of them (0..num_layers) or the one of ``settings.layer``."""
    index = layer_index(settings.layer, num_layers)
    return list(range(num_layers + 1)) if index is None else [index]


def model_features(model: torch.nn.Module, splits: ProbeData, settings: ProbeSettings, data: DataConfig,
                   device: torch.device, normalizer: Optional[TextNormalizer] = None,
                   batches: Optional[dict[str, Any]] = None) -> dict[str, Features]:
    """Features of both splits (decoded audio cached in ``batches`` when the caller keeps it between calls)."""
    from speech_ssl.embed.embedder import encoder_of

    config = encoder_of(model).config
    layers = probe_layers(settings, config.num_layers)
    pooled = settings.task != "ctc"
    features = {}
    for name, rows in (("train", splits.train), ("valid", splits.valid)):
        lookup = {u.id: u for u in rows}
        if batches is not None:
            if name not in batches:
                stream = model_batches(config, rows, data, normalizer)
                batches[name] = (list(stream.iter_epoch(0)), stream.report)
            cached, report = batches[name]
            features[name] = extract(model, cached, layers, pooled, device, lookup, report)
        else:
            features[name] = extract(model, model_batches(config, rows, data, normalizer), layers, pooled, device,
                                     lookup)
        features[name].report.raise_if_nothing_used(name)
    return features


def run_probe(model: torch.nn.Module, splits: ProbeData, settings: ProbeSettings, data: DataConfig,
              device: torch.device | str = "cpu", batches: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Features once, then the head; returns the results (accuracy or CER, layer weights, counts, timings).

    batches: a dict the caller keeps between calls (the pretraining monitor): the decoded audio of each split
    is cached there, so repeated probes only recompute the features.
    """
    from speech_ssl.embed.embedder import encoder_of

    device = torch.device(device)
    layers = encoder_of(model).config.num_layers
    index = layer_index(settings.layer, layers)
    if settings.task == "classify":
        from speech_ssl.probe.fewshot import run_classify

        return run_classify(model, splits, settings, data, device)
    normalizer = vocab = None
    if settings.task == "ctc":
        normalizer = TextNormalizer(data.text)
        vocab = _probe_vocabulary(normalizer, splits)
    started = time.perf_counter()
    features = model_features(model, splits, settings, data, device, normalizer, batches)
    extract_seconds = time.perf_counter() - started
    t0 = time.perf_counter()
    tr, va = features["train"], features["valid"]
    result = _speaker_result(settings, tr, va) if settings.task == "speaker" else _ctc_result(settings, tr, va, vocab)
    epochs, batch, lr = settings.schedule()
    result.update({
        "task": settings.task, "layer": "all" if index is None else index, "layers": tr.layers,
        "num_layers": layers, "valid_held_out": splits.held_out, "epochs": epochs, "batch_size": batch, "lr": lr,
        "seed": settings.seed, "extract_seconds": extract_seconds, "fit_seconds": time.perf_counter() - t0,
        "ingest": {name: ingest_counts(f) for name, f in features.items()},
    })
    return result


def _layer_words(result: dict[str, Any]) -> str:
    if result["layer"] != "all":
        return f"layer {result['layer']}"
    weights = result.get("layer_weights") or []
    top = max(range(len(weights)), key=weights.__getitem__) if weights else None
    return "all layers" + (f", heaviest {top} at {weights[top]:.2f}" if top is not None else "")


def summary_line(result: dict[str, Any]) -> str:
    """One line: the probe's score against its reference point."""
    if result["task"] == "classify":
        from speech_ssl.probe.fewshot import summary_line as classify_line

        return classify_line(result)
    if result["task"] == "speaker":
        return (f"speaker probe ({_layer_words(result)}): valid accuracy {result['accuracy']:.3f} "
                f"(train {result['train_accuracy']:.3f}, chance {result['chance_accuracy']:.3f}, "
                f"{result['speakers']} speakers, {result['train_utterances']}/{result['valid_utterances']} "
                "train/valid utterances)")
    return (f"ctc probe ({_layer_words(result)}): valid CER {result['cer']:.3f}, WER {result['wer']:.3f} "
            f"({result['train_utterances']}/{result['valid_utterances']} train/valid utterances, "
            f"{result['vocab_size']} tokens)")
