"""The embedding batch function: a padded batch and its lengths -> per-utterance, per-layer arrays.

Pure PyTorch (no Ray), so it can be measured on any machine alone; the Ray Data actors of
``speech-ssl embed`` wrap it. What it does, and why it is fast:

* Only the encoder runs (no quantizer, projections or CTC head), and only up to the deepest requested
  layer (``max_layer``): asking for layer 6 of a 12-layer model skips half the Transformer.
* Layer numbering is transformers' ``hidden_states``: 0 is the context network's input (after the
  positional convolution and, for post-LN models, its LayerNorm), ``i`` the output of layer ``i``.
  Negative layers count from the end (-1 is the last layer).
* Padding never changes a valid frame, in either front-end norm mode. Layer-norm front ends are exact
  under padding anyway. A group-norm front end (wav2vec 2.0 BASE) normalises each channel over time, so
  fairseq and transformers give a padded utterance different features; here the model's own front end
  runs with the lengths (``extract_features(..., exact_padding=True)``), and its group norm takes its
  statistics over each utterance's valid steps only, which is what the utterance gets alone. The
  Transformer masks padded keys (``scaled_dot_product_attention``) and
  zeroes padded frames before the positional convolution. So bucketed, padded batches are safe for
  every model, and a batch whose rows all have one length runs without any mask.
* ``pooling="mean"`` averages each utterance's valid frames (in fp32) on the device before the copy.
* On CPUs the front end runs one utterance at a time (its early activations, 512 channels at 3.2 kHz
  for BASE, overflow the caches for a whole batch: per utterance it does the same work about 1.4x faster
  per CPU second, and needs no masking); the Transformer always runs on the padded batch, where its
  matrix products are large. On GPUs the whole batch goes through the front end at once.
* Precision (``speech_ssl.precision``): ``auto`` (the default) is bf16 autocast on GPUs that have it
  (else fp16), bf16 autocast on CPUs with native bf16 dot products (AMX, avx512_bf16, Arm bf16; detected
  and logged) and fp32 on other CPUs. ``fp32`` / ``bf16`` force either (fp16: GPUs only). The resolved
  choice is ``Embedder.precision``; bf16 embeddings differ from fp32 ones by about 1e-2 relative.
* Host copies (GPUs): no per-batch host synchronisation of its own (frame counts and whether a batch
  needs a padding mask come from the input lengths on the host); inputs go up from pinned memory, and
  the embeddings come down into page-locked (pinned) host buffers with non-blocking copies on a side
  CUDA stream that waits for the compute stream. With ``embed_batches`` (an iterator over batches)
  batch ``i``'s results are returned after batch ``i+1`` was launched, so its device-to-host copy
  overlaps batch ``i+1``'s compute; ``__call__`` does the same for one batch, synchronously.
  What a profile of ``embed_batches`` should show (not measured: no GPU here; ``benchmarks/
  bench_embed.py --gpu`` measures it): ``Memcpy DtoH (Device -> Pinned)`` on the copy stream,
  concurrent with the next batch's kernels on the compute stream, and no ``Memcpy DtoH (Device ->
  Pageable)`` at all (23% of CUDA time before, H200, 160 x 4 s batches, last layer); the copy out of
  the pinned buffer into ordinary memory (a host memcpy) runs while the device computes the next batch.
* ``compile=True``: the front end and the Transformer each run under ``torch.compile(dynamic=True)``
  (batch sizes and lengths are symbolic, so varying batches do not recompile each time); the
  embeddings are those of eager mode (1e-4 in fp32).

    embedder = Embedder.from_checkpoint("ckpt/", layers=[6, -1], pooling="mean", device="cuda")
    out = embedder(waveforms, lengths)      # out[b][layer] -> np.ndarray [dim] (or [frames, dim])
    for out in embedder.embed_batches(batches):   # (waveforms, lengths) pairs; copies overlap compute
        ...
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

from speech_ssl.config import ConfigError
from speech_ssl.models import Wav2Vec2Model, fastpath, load
from speech_ssl.models.fastpath import masked_channel_norm
from speech_ssl.models.masking import padding_mask_from_lengths
from speech_ssl.models.wav2vec2 import FeatureOutput
from speech_ssl.precision import PRECISIONS, autocast, resolve_precision

if TYPE_CHECKING:  # the arrays come from Tensor.numpy(): importing the embedder needs only torch
    import numpy as np

POOLINGS = ("none", "mean")
OUTPUT_DTYPES = ("float32", "float16")
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}

__all__ = ["Embedder", "exact_features", "masked_channel_norm", "resolve_layers", "encoder_of", "POOLINGS",
           "PRECISIONS", "OUTPUT_DTYPES"]

log = logging.getLogger("speech_ssl.embed")


def encoder_of(model: torch.nn.Module) -> Wav2Vec2Model:
    """The encoder of any of our model classes (pretraining, CTC, or a bare encoder)."""
    if isinstance(model, Wav2Vec2Model):
        return model
    encoder = getattr(model, "encoder", None)
    if isinstance(encoder, Wav2Vec2Model):
        return encoder
    raise TypeError(f"not a wav2vec 2.0 model of speech_ssl: {type(model).__name__}")


def matmul_weights_in(encoder: Wav2Vec2Model, dtype: torch.dtype) -> Wav2Vec2Model:
    """A copy of ``encoder`` whose weights that feed only matrix products (Linear layers, the strided
    convolutions after the first) are stored in ``dtype``: the arithmetic autocast does, without casting
    every weight again for every batch (autocast keeps no cast for weights that do not require grad, and
    forgets its casts when its context closes: one context per batch). The caller's model is left as it is;
    norms, the positional convolution and the first convolution (whose statistics are taken in float64)
    keep their parameters."""
    from speech_ssl.models.frontend import ConvBlock

    encoder = copy.deepcopy(encoder)
    for module in encoder.modules():
        if isinstance(module, torch.nn.Linear) or (isinstance(module, ConvBlock) and module.in_channels > 1):
            module.weight.data = module.weight.data.to(dtype)
            if module.bias is not None:
                module.bias.data = module.bias.data.to(dtype)
    return encoder


def resolve_layers(layers: Sequence[int], num_layers: int) -> list[int]:
    """Requested layers as hidden_states indices in [0, num_layers], sorted, without repeats."""
    if not layers:
        raise ConfigError("layers", "at least one layer is needed (0 .. number of Transformer layers, or -1).")
    resolved = set()
    for layer in layers:
        index = int(layer) + num_layers + 1 if int(layer) < 0 else int(layer)
        if not 0 <= index <= num_layers:
            raise ConfigError("layers", f"layer {layer} does not exist: the model has {num_layers} Transformer "
                                        f"layers, so layers run from 0 (the Transformer's input) to {num_layers} "
                                        f"(or -1 for the last, down to -{num_layers + 1}).")
        resolved.add(index)
    return sorted(resolved)


def exact_features(encoder: Wav2Vec2Model, inputs: Tensor, lengths: Optional[Tensor],
                   drop_unused_mask: bool = True) -> FeatureOutput:
    """The front end + feature LayerNorm, giving every valid frame the value it has without padding
    (``encoder.extract_features`` with ``exact_padding``: a group norm over each row's valid steps).

    ``drop_unused_mask``: a padding mask without a padded frame becomes None (a host synchronisation;
    the Embedder decides that on the host from the lengths instead, and passes False).
    """
    feats = encoder.extract_features(inputs, lengths, exact_padding=True)
    if drop_unused_mask and feats.padding_mask is not None and not bool(feats.padding_mask.any()):
        # Rows of one length: no mask, so attention can take its fastest kernel.
        feats = FeatureOutput(feats.features, None, feats.lengths, feats.feature_penalty)
    return feats


@dataclass
class _InFlight:
    """A launched batch whose results are on their way to the host."""

    frames: list[int]  # valid output frames per utterance
    host: list[Tensor]  # per requested layer: pinned host buffers being filled (CUDA) or the results (CPU)
    copied: Optional["torch.cuda.Event"]  # recorded on the copy stream after the copies (CUDA)


class Embedder:
    """Per-utterance embeddings of chosen layers from a wav2vec 2.0 encoder (eval mode, no gradients).

    model: any of our model classes (only its encoder is kept). layers: hidden_states indices (negative
    from the end). pooling: ``none`` ([frames, dim] per utterance) or ``mean`` ([dim]). device: where
    the encoder runs. precision: ``auto`` (bf16 autocast on GPUs and on CPUs with native bf16, else fp32;
    see ``speech_ssl.precision``), ``fp32``, ``bf16`` (any device) or ``fp16`` (GPUs); the resolved
    choice is ``self.precision``. dtype: of the returned arrays, ``float32`` or ``float16``.
    batch_frontend: run the front end on the whole padded batch (default on GPUs) or one utterance at a
    time (default on CPUs); the results are the same. compile: run the front end and the Transformer
    under ``torch.compile(dynamic=True)``.

    One Embedder may be shared by threads: the device work of one batch runs at a time.
    """

    def __init__(self, model: torch.nn.Module, layers: Sequence[int] = (-1,), pooling: str = "none",
                 device: Union[str, torch.device] = "cpu", precision: str = "auto", dtype: str = "float32",
                 batch_frontend: Optional[bool] = None, compile: bool = False):
        if pooling not in POOLINGS:
            raise ConfigError("pooling", f"unknown pooling {pooling!r}.", POOLINGS)
        if dtype not in OUTPUT_DTYPES:
            raise ConfigError("dtype", f"unknown output dtype {dtype!r}.", list(OUTPUT_DTYPES))
        self.device = torch.device(device)
        self.requested_precision = precision
        self.precision = resolve_precision(precision, self.device, "precision")
        encoder = encoder_of(model)
        self.config = encoder.config
        self.encoder = encoder.eval().requires_grad_(False).to(self.device)
        if self.precision in ("bf16", "fp16"):
            self.encoder = matmul_weights_in(self.encoder, torch.bfloat16 if self.precision == "bf16" else torch.float16)
        self.layers = resolve_layers(layers, self.config.num_layers)
        self.max_layer = max(self.layers)
        self.pooling = pooling
        self.dtype = dtype
        self.batch_frontend = self.device.type != "cpu" if batch_frontend is None else batch_frontend
        self.compile = bool(compile)
        self._lock = threading.Lock()
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._row_features, self._batch_features, self._context = (
            self._row_features_eager, self._batch_features_eager, self._context_eager)
        if self.compile:
            self._row_features = torch.compile(self._row_features_eager, dynamic=True)
            self._batch_features = torch.compile(self._batch_features_eager, dynamic=True)
            self._context = torch.compile(self._context_eager, dynamic=True)
        log.info("embedder: layers %s, pooling %s, precision %s%s, %s on %s%s", self.layers, pooling, self.precision,
                 f" (asked {precision})" if precision != self.precision else "", dtype, self.device,
                 ", torch.compile" if self.compile else "")

    @classmethod
    def from_checkpoint(cls, path: str, **kwargs) -> "Embedder":
        """Load ours, a transformers directory or a fairseq file (``speech_ssl.models.load``)."""
        return cls(load(path), **kwargs)

    @property
    def dim(self) -> int:
        return self.config.embed_dim

    @property
    def frame_rate(self) -> float:
        """Output frames per second of audio."""
        unit = self.config.sample_rate if self.config.frontend == "conv" else 100.0  # fbank: 10 ms frames
        return unit / self.config.frame_stride

    def output_lengths(self, lengths: Tensor) -> Tensor:
        """Valid output frames for ``lengths`` input samples (or fbank frames)."""
        return self.encoder.output_lengths(lengths.long())

    # -- the stages (compiled with compile=True) --------------------------------------------------
    def _row_features_eager(self, inputs: Tensor) -> Tensor:
        return self.encoder.extract_features(inputs, None).features

    def _batch_features_eager(self, inputs: Tensor, lengths: Optional[Tensor]) -> Tensor:
        return exact_features(self.encoder, inputs, lengths, drop_unused_mask=False).features

    def _context_eager(self, features: Tensor, padding_mask: Optional[Tensor], frames: Tensor) -> tuple[Tensor, ...]:
        feats = FeatureOutput(features, padding_mask, frames, features.new_zeros(()))
        out = self.encoder.contextualize(feats, None, self.max_layer, output_hidden_states=True)
        return tuple(out.hidden_states[layer] for layer in self.layers)

    # -- one batch on the device --------------------------------------------------------------------
    def _hidden(self, inputs: Tensor, lengths: Optional[Tensor]) -> tuple[tuple[Tensor, ...], list[int], Tensor]:
        """(requested layers [B, T', D] on the device, valid frames on the host, the same on the device).

        Which rows are padded, and their frame counts, are worked out on the host from the lengths, so
        the device is never waited for (unless ``lengths`` is given on the device).
        """
        batch, width = inputs.shape[0], inputs.shape[1]
        full = int(self.output_lengths(torch.tensor([width]))[0])
        host_lengths = None if lengths is None else lengths.detach().to("cpu").long()
        if host_lengths is not None and bool((host_lengths == width).all()):
            host_lengths = None  # rows of one length: nothing is padded
        frames = [full] * batch if host_lengths is None else self.output_lengths(host_lengths).clamp(min=0).tolist()
        on_device = self.device.type != "cpu"
        if on_device and inputs.device.type == "cpu":
            inputs = inputs.pin_memory()  # an asynchronous copy, not waiting for the previous batch
        inputs = inputs.to(self.device, non_blocking=True)
        frames_dev = torch.tensor(frames, dtype=torch.long).to(self.device, non_blocking=True)
        with autocast(self.device, self.precision):
            if lengths is not None and not self.batch_frontend:
                # The front end on each row's valid part alone, padded back into a batch of features.
                row_lengths = [width] * batch if host_lengths is None else host_lengths.tolist()
                rows = [self._row_features(inputs[b:b + 1, :n]) for b, n in enumerate(row_lengths)]
                time = fastpath.padded_length(max(frames), rows[0])  # CPU bf16: a bucketed length, masked
                features = rows[0].new_zeros(batch, time, rows[0].shape[-1])
                for b, row in enumerate(rows):
                    features[b, : row.shape[1]] = row[0]
            else:
                dev_lengths = None if host_lengths is None else host_lengths.to(self.device, non_blocking=True)
                features = self._batch_features(inputs, dev_lengths)
                time = features.shape[1]
            padded = any(f != time for f in frames)
            mask = padding_mask_from_lengths(frames_dev, time) if padded else None
            hidden = self._context(features, mask, frames_dev)
        return hidden, frames, frames_dev

    @torch.inference_mode()
    def hidden_states(self, inputs: Tensor, lengths: Optional[Tensor] = None) -> tuple[dict[int, Tensor], Tensor]:
        """The requested layers on the device: ({layer: [B, T', D]}, valid frames [B]).

        inputs: [B, samples] waveforms (or [B, frames, n_mels] filterbanks), zero-padded; lengths: [B]
        valid samples (frames), or None when nothing is padded.
        """
        with self._lock:
            hidden, _, frames = self._hidden(inputs, lengths)
        return dict(zip(self.layers, hidden)), frames

    def _launch(self, inputs: Tensor, lengths: Optional[Tensor]) -> _InFlight:
        """Compute a batch and start its copy to the host (on a GPU: returns before either is done)."""
        out_dtype = _TORCH_DTYPES[self.dtype]
        with self._lock, torch.inference_mode():
            hidden, frames, frames_dev = self._hidden(inputs, lengths)
            outputs = []
            for h in hidden:
                if self.pooling == "mean":
                    valid = (torch.arange(h.shape[1], device=h.device)[None, :] < frames_dev[:, None]).unsqueeze(-1)
                    summed = (h.float() * valid).sum(dim=1)
                    outputs.append((summed / frames_dev.clamp(min=1).to(summed.dtype)[:, None]).to(out_dtype))
                else:
                    outputs.append(h[:, :max(frames, default=0)].to(out_dtype).contiguous())
            if self._copy_stream is None:  # CPUs (and devices other than CUDA: a plain copy)
                return _InFlight(frames, [out.cpu() for out in outputs], None)
            # Pinned buffers filled by non-blocking copies on the copy stream, once the compute stream
            # has produced the outputs; the compute stream goes on with the next batch meanwhile.
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            host = []
            with torch.cuda.stream(self._copy_stream):
                for out in outputs:
                    buffer = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
                    buffer.copy_(out, non_blocking=True)
                    out.record_stream(self._copy_stream)  # not reused by the compute stream before copied
                    host.append(buffer)
                copied = torch.cuda.Event()
                copied.record(self._copy_stream)
            return _InFlight(frames, host, copied)

    def _finish(self, flight: _InFlight) -> list[dict[int, np.ndarray]]:
        """Wait for a launched batch's copies and split them per utterance."""
        if flight.copied is not None:
            flight.copied.synchronize()
        result: list[dict[int, np.ndarray]] = [{} for _ in flight.frames]
        for layer, buffer in zip(self.layers, flight.host):
            # Out of the pinned buffer into ordinary memory: callers keep results for long (a shard's
            # worth), and page-locked memory is a scarce, cached pool.
            array = buffer.numpy().copy() if flight.copied is not None else buffer.numpy()
            for b, n in enumerate(flight.frames):
                result[b][layer] = array[b] if self.pooling == "mean" else array[b, :n]
        return result

    def __call__(self, inputs: Tensor, lengths: Optional[Tensor] = None) -> list[dict[int, np.ndarray]]:
        """Per utterance, per layer: ``[frames, dim]`` (pooling none) or ``[dim]`` (mean) in ``dtype``.

        Synchronous: the arrays are complete when it returns (``embed_batches`` overlaps the copies).
        """
        return self._finish(self._launch(inputs, lengths))

    def embed_batches(self, batches: Iterable) -> Iterator[list[dict[int, np.ndarray]]]:
        """``self(inputs, lengths)`` for each ``(inputs, lengths)`` (or bare ``inputs``) of ``batches``, in order.

        On a GPU batch ``i``'s results are yielded once batch ``i+1`` has been launched, so the copy of
        batch ``i`` to the host overlaps batch ``i+1``'s compute (the iterable is read one batch ahead).
        On CPUs each batch is yielded as soon as it is computed.
        """
        pending: Optional[_InFlight] = None
        try:
            for batch in batches:
                inputs, lengths = batch if isinstance(batch, (tuple, list)) else (batch, None)
                flight = self._launch(inputs, lengths)
                if flight.copied is None:
                    yield self._finish(flight)
                    continue
                done, pending = pending, flight
                if done is not None:
                    yield self._finish(done)
            if pending is not None:
                done, pending = pending, None
                yield self._finish(done)
        finally:
            if pending is not None and pending.copied is not None:
                pending.copied.synchronize()  # abandoned: let its copies end before the buffers go
