"""Frozen features for the probes: hidden states of a model (one layer or all of them), or the mean log-mel
filterbank of each utterance (the baseline that needs no model)."""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from speech_ssl.data import BatchStream, DataConfig, IngestReport, TextNormalizer, Utterance
from speech_ssl.data.model_inputs import inference_data, model_batch_stream

FBANK_BINS = 80


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
    """Padded batches (length order, in this process, at the model's rate) of what ``model_config``'s front
    end reads."""
    return model_batch_stream(utterances, inference_data(data, model_config), model_config, "pad", use_ray=False,
                              normalizer=normalizer)


def fbank_batches(utterances: Sequence[Utterance], data: DataConfig, sample_rate: int = 16000) -> BatchStream:
    """Padded batches of raw (not mean-normalised) 80-bin log-mel filterbanks, 10 ms hop."""
    from speech_ssl.data import FeatureSpec

    data = dataclasses.replace(data, sample_rate=sample_rate, shuffle=False)
    spec = FeatureSpec(kind="fbank", sample_rate=sample_rate, n_mels=FBANK_BINS, normalize=False)
    return BatchStream(utterances, data, spec, mode="pad", use_ray=False)


@dataclass
class Features:
    """Per utterance: ``vectors[i]``, [layers, dim] pooled or [frames, layers, dim], with its id and row.

    layers: the hidden-state indices along the layer axis (transformers' numbering; [] for filterbanks)."""

    ids: list[str]
    vectors: list[torch.Tensor]
    rows: list[Optional[Utterance]]
    texts: list[Optional[str]]
    report: IngestReport
    layers: list[int]
    seconds: float = 0.0

    @property
    def speakers(self) -> list[Optional[str]]:
        return [None if u is None else u.speaker for u in self.rows]


def _epoch(batches: Sequence[Any] | BatchStream):
    return batches.iter_epoch(0) if isinstance(batches, BatchStream) else batches


def extract(model: torch.nn.Module, batches: Sequence[Any] | BatchStream, layers: Sequence[int], pooled: bool,
            device: torch.device, rows: dict[str, Utterance], report: Optional[IngestReport] = None) -> Features:
    """Hidden states ``layers`` (0..num_layers) for every batch (a BatchStream's first epoch, or a list of its
    batches), stacked along a layer axis. rows: id -> Utterance. Runs the encoder in eval mode, no gradients.

    Several layers of frame features are kept in float16: all 13 hidden states of BASE for every frame would
    otherwise hold 40 KB per frame."""
    from speech_ssl.embed.embedder import Embedder

    started = time.perf_counter()
    out = Features([], [], [], [], report if report is not None else IngestReport(), list(layers))
    keep = torch.float16 if (not pooled and len(layers) > 1) else torch.float32
    with frozen(model):
        embedder = Embedder(model, layers=list(layers), pooling="mean" if pooled else "none", device=device)
        for batch in _epoch(batches):
            lengths = batch.lengths
            if bool((lengths == batch.inputs.shape[1]).all()):
                lengths = None
            for k, emb in enumerate(embedder(batch.inputs, lengths)):
                stacked = np.stack([np.asarray(emb[i]) for i in embedder.layers], axis=-2)
                out.ids.append(batch.ids[k])
                out.vectors.append(torch.from_numpy(np.ascontiguousarray(stacked)).to(keep))
                out.rows.append(rows.get(batch.ids[k]))
                out.texts.append(batch.texts[k])
    return _finished(out, batches, started)


def extract_fbank(batches: Sequence[Any] | BatchStream, rows: dict[str, Utterance]) -> Features:
    """Each utterance's log-mel filterbank averaged over its frames: [1, 80] vectors (one 'layer')."""
    started = time.perf_counter()
    out = Features([], [], [], [], IngestReport(), [])
    for batch in _epoch(batches):
        inputs = torch.as_tensor(batch.inputs, dtype=torch.float32)
        for k, length in enumerate(torch.as_tensor(batch.lengths).tolist()):
            out.ids.append(batch.ids[k])
            out.vectors.append(inputs[k, :length].mean(dim=0, keepdim=True))
            out.rows.append(rows.get(batch.ids[k]))
            out.texts.append(batch.texts[k])
    return _finished(out, batches, started)


def _finished(out: Features, batches: Sequence[Any] | BatchStream, started: float) -> Features:
    """``out`` with the stream's ingest report (a Ray stream has one) and the time taken."""
    if isinstance(batches, BatchStream):
        out.report = batches.report
    out.seconds = time.perf_counter() - started
    return out
