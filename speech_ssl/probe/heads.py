"""The probes' trainable parts: a SUPERB-style layer mix and one linear layer, fit on frozen features.

``LayerMix`` is the weighted-sum featurizer of SUPERB (Yang et al., 2021; s3prl's ``Featurizer``): each
hidden state is standardised, then the layers are summed with softmax weights learned jointly with the linear
head, so a probe reads what the whole model knows rather than one layer of it. With a single layer it is the
identity on that layer.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from speech_ssl.data import Vocabulary


class LayerMix(torch.nn.Module):
    """[..., layers, dim] -> [..., dim]: softmax(w) weighted sum of per-layer standardised features.

    mean / std: [layers, dim] statistics of the training features (each layer its own scale, so the weights
    compare layers rather than their magnitudes). ``w`` starts at zero: every layer weighs the same."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.logits = torch.nn.Parameter(torch.zeros(mean.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - self.mean) / self.std
        if x.shape[-2] == 1:
            return x[..., 0, :]
        return torch.einsum("...ld,l->...d", x, self.weights())

    def weights(self) -> torch.Tensor:
        return self.logits.softmax(-1)


def standardiser(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (floored) standard deviation over the first axis of [n, layers, dim] features."""
    x = x.float()
    return x.mean(dim=0), x.std(dim=0, unbiased=False).clamp(min=1e-5)


def _chunks(n: int, batch: int, generator: torch.Generator) -> list[torch.Tensor]:
    if batch <= 0 or batch >= n:
        return [torch.arange(n)]
    order = torch.randperm(n, generator=generator)
    return list(order.split(batch))


def _head(mix: LayerMix, dim: int, classes: int, seed: int) -> torch.nn.Linear:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.nn.Linear(dim, classes)


def _optimizer(mix: LayerMix, head: torch.nn.Linear, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # The layer weights are a distribution, not a scale: decaying them would pull every probe toward uniform.
    return torch.optim.AdamW([{"params": head.parameters(), "weight_decay": weight_decay},
                              {"params": [mix.logits], "weight_decay": 0.0}], lr=lr)


def fit_classifier(train_x: torch.Tensor, train_y: torch.Tensor, valid_x: torch.Tensor, valid_y: torch.Tensor,
                   num_classes: int, epochs: int, batch_size: int, lr: float, weight_decay: float,
                   seed: int) -> dict[str, Any]:
    """Layer mix + linear softmax classifier on [n, layers, dim] utterance features.

    Returns the accuracies on both splits, the final training loss and the learned layer weights."""
    mean, std = standardiser(train_x)
    mix = LayerMix(mean, std)
    head = _head(mix, train_x.shape[-1], num_classes, seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = _optimizer(mix, head, lr, weight_decay)
    loss = torch.tensor(0.0)
    with torch.enable_grad():
        for _ in range(epochs):
            for idx in _chunks(len(train_x), batch_size, generator):
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(head(mix(train_x[idx])), train_y[idx])
                loss.backward()
                optimizer.step()
    with torch.no_grad():
        train_acc = float((head(mix(train_x)).argmax(-1) == train_y).float().mean())
        valid_acc = float((head(mix(valid_x)).argmax(-1) == valid_y).float().mean()) if len(valid_x) else float("nan")
        weights = mix.weights().tolist()
    return {"valid_accuracy": valid_acc, "train_accuracy": train_acc, "train_loss": float(loss.detach()),
            "layer_weights": weights}


def _pad(seqs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    out = seqs[0].new_zeros((len(seqs), int(lengths.max())) + tuple(seqs[0].shape[1:]))
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out, lengths


def ctc_frames_needed(ids: Sequence[int]) -> int:
    """Frames CTC needs for a target: its length plus a blank between every repeated pair."""
    return len(ids) + sum(1 for a, b in zip(ids, ids[1:]) if a == b)


def fit_ctc(train_x: Sequence[torch.Tensor], train_targets: Sequence[Sequence[int]], valid_x: Sequence[torch.Tensor],
            valid_refs: Sequence[str], vocab: Vocabulary, epochs: int, batch_size: int, lr: float,
            weight_decay: float, seed: int) -> dict[str, Any]:
    """Layer mix + frame-wise linear layer trained with CTC on [frames, layers, dim] features; greedy CER/WER
    on the validation split and the learned layer weights."""
    from speech_ssl.asr.scoring import error_counts, rates

    mean, std = standardiser(torch.cat(list(train_x)))
    mix = LayerMix(mean, std)
    head = _head(mix, train_x[0].shape[-1], len(vocab), seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = _optimizer(mix, head, lr, weight_decay)
    targets = [torch.tensor(t, dtype=torch.long) for t in train_targets]
    loss_value = float("nan")
    with torch.enable_grad():
        for _ in range(epochs):
            for idx in _chunks(len(train_x), batch_size, generator):
                feats, lengths = _pad([train_x[i] for i in idx.tolist()])
                tgt = [targets[i] for i in idx.tolist()]
                log_probs = head(mix(feats)).log_softmax(-1).transpose(0, 1)  # [T, B, V]
                loss = F.ctc_loss(log_probs, torch.cat(tgt), lengths, torch.tensor([len(t) for t in tgt]),
                                  blank=vocab.blank_id, reduction="sum", zero_infinity=True) / len(tgt)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_value = float(loss.detach())
    with torch.no_grad():
        hyps = [vocab.decode_ctc(head(mix(x)).argmax(-1).tolist()) for x in valid_x]
        weights = mix.weights().tolist()
    counts = error_counts(list(valid_refs), hyps)
    return {**rates(counts), **{k: counts[k] for k in ("word_errors", "words", "char_errors", "chars")},
            "train_loss": loss_value, "layer_weights": weights,
            "examples": [{"ref": r, "hyp": h} for r, h in list(zip(valid_refs, hyps))[:5]]}
