"""Few-shot classification from frozen features (``speech-ssl probe task=classify``).

A downstream task unlike the pretraining data, measured the way a user with few labels meets it: k labeled
examples per class (each value of ``shots``), ``draws`` random draws of that subset, the layer mix + linear
head fit on the draw and scored on the whole validation split. Two baselines see the same draws: the same
architecture with random initial weights (what pretraining adds over the architecture) and mean-pooled
80-bin log-mel filterbanks (what a model adds over the signal). Accuracies are reported per draw, with their
mean and sample standard deviation.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from speech_ssl.config import ConfigError
from speech_ssl.data import DataConfig
from speech_ssl.probe.features import Features, extract_fbank, fbank_batches
from speech_ssl.probe.heads import fit_classifier
from speech_ssl.probe.settings import ProbeSettings, layer_index
from speech_ssl.probe.splits import ProbeData, few_shot_draw, label_of

MODEL, RANDOM_INIT, FBANK = "model", "random_init", "fbank"
ARM_NAMES = {MODEL: "this model", RANDOM_INIT: "random initial weights", FBANK: "mean log-mel filterbank"}


def random_initial(config: Any, seed: int) -> torch.nn.Module:
    """The model's architecture with fresh random weights (seeded, without touching the caller's RNG)."""
    from speech_ssl.models import build

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build(config)


def arm_features(model: torch.nn.Module, splits: ProbeData, settings: ProbeSettings, data: DataConfig,
                 device: torch.device) -> dict[str, dict[str, Features]]:
    """Features of both splits for the model and, with ``settings.baselines``, for the two baselines."""
    from speech_ssl.embed.embedder import encoder_of
    from speech_ssl.probe.tasks import model_features

    arms = {MODEL: model_features(model, splits, settings, data, device)}
    if settings.baselines:
        config = encoder_of(model).config
        arms[RANDOM_INIT] = model_features(random_initial(config, settings.seed), splits, settings, data, device)
        arms[FBANK] = {name: extract_fbank(fbank_batches(rows, data, config.sample_rate), {u.id: u for u in rows})
                       for name, rows in (("train", splits.train), ("valid", splits.valid))}
    return arms


def _aligned(arms: dict[str, dict[str, Features]], split: str, label_key: str) -> tuple[list[str], list[str]]:
    """The ids every arm has features for (sorted) and their labels: the draws index this common list."""
    common = set.intersection(*(set(features[split].ids) for features in arms.values()))
    first = arms[MODEL][split]
    labels = {i: label_of("classify", row, label_key) for i, row in zip(first.ids, first.rows) if row is not None}
    ids = sorted(i for i in common if labels.get(i) is not None)
    return ids, [labels[i] for i in ids]


def _stack(features: Features, ids: list[str]) -> torch.Tensor:
    where = {i: k for k, i in enumerate(features.ids)}
    return torch.stack([features.vectors[where[i]] for i in ids]).float()


def _spread(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "accuracies": values}


def run_classify(model: torch.nn.Module, splits: ProbeData, settings: ProbeSettings, data: DataConfig,
                 device: torch.device) -> dict[str, Any]:
    """Every arm, every value of shots, every draw; returns the results dict (see the module docstring)."""
    from speech_ssl.embed.embedder import encoder_of

    num_layers = encoder_of(model).config.num_layers
    index = layer_index(settings.layer, num_layers)
    started = time.perf_counter()
    arms = arm_features(model, splits, settings, data, device)
    extract_seconds = time.perf_counter() - started
    train_ids, train_labels = _aligned(arms, "train", settings.label_key)
    valid_ids, valid_labels = _aligned(arms, "valid", settings.label_key)
    classes = sorted(set(train_labels))
    if len(classes) < 2:
        raise ConfigError("train", "fewer than two classes are left after decoding; classify needs two.")
    position = {c: i for i, c in enumerate(classes)}
    scored = [k for k, label in enumerate(valid_labels) if label in position]
    if not scored:
        raise ConfigError("valid", f"no validation utterance has a {settings.label_key!r} seen in train.")
    train_y = torch.tensor([position[c] for c in train_labels])
    valid_y = torch.tensor([position[valid_labels[k]] for k in scored])
    stacked = {arm: (_stack(f["train"], train_ids), _stack(f["valid"], valid_ids)[scored]) for arm, f in arms.items()}
    epochs, batch, lr = settings.schedule()
    t0 = time.perf_counter()
    results: dict[str, dict[str, Any]] = {arm: {} for arm in arms}
    weights: dict[str, list[float]] = {}
    for shots in settings.shots:
        accuracies: dict[str, list[float]] = {arm: [] for arm in arms}
        layer_weights = []
        for draw in range(settings.draws):
            picked = torch.tensor(few_shot_draw(train_labels, shots, settings.seed + draw))
            for arm, (train_x, valid_x) in stacked.items():
                fit = fit_classifier(train_x[picked], train_y[picked], valid_x, valid_y, len(classes), epochs, batch,
                                     lr, settings.weight_decay, settings.seed + draw)
                accuracies[arm].append(fit["valid_accuracy"])
                if arm == MODEL:
                    layer_weights.append(fit["layer_weights"])
        for arm in arms:
            results[arm][str(shots)] = _spread(accuracies[arm])
        weights[str(shots)] = [statistics.fmean(column) for column in zip(*layer_weights)]
    majority = max(classes, key=lambda c: sum(1 for k in scored if valid_labels[k] == c))
    return {
        "task": "classify", "label_key": settings.label_key, "classes": classes, "shots": list(settings.shots),
        "draws": settings.draws, "arms": results, "layer": "all" if index is None else index,
        "layers": arms[MODEL]["train"].layers, "num_layers": num_layers, "layer_weights": weights,
        "chance_accuracy": sum(1 for k in scored if valid_labels[k] == majority) / len(scored),
        "uniform_chance": 1.0 / len(classes), "train_utterances": len(train_ids), "valid_utterances": len(scored),
        "valid_held_out": splits.held_out, "epochs": epochs, "batch_size": batch, "lr": lr, "seed": settings.seed,
        "extract_seconds": extract_seconds, "fit_seconds": time.perf_counter() - t0,
    }


def summary_line(result: dict[str, Any]) -> str:
    """One line: accuracy per value of shots, the model first, the baselines in brackets."""
    parts = []
    for shots in result["shots"]:
        arms = result["arms"]
        model = arms[MODEL][str(shots)]
        text = f"k={shots} {model['mean']:.3f}±{model['sd']:.3f}"
        others = [f"{name} {arms[arm][str(shots)]['mean']:.3f}" for arm, name in
                  ((RANDOM_INIT, "random init"), (FBANK, "fbank")) if arm in arms]
        parts.append(text + (f" ({', '.join(others)})" if others else ""))
    layer = "all layers" if result["layer"] == "all" else f"layer {result['layer']}"
    return (f"classify probe ({result['label_key']}, {len(result['classes'])} classes, {layer}, {result['draws']} "
            f"draws): valid accuracy " + "; ".join(parts) + f"; chance {result['chance_accuracy']:.3f}")
