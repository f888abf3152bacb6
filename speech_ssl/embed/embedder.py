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
  fairseq and transformers give a padded utterance different features; here that norm takes its
  statistics over each utterance's valid steps only (``masked_channel_norm``), which is what the
  utterance gets alone. The Transformer masks padded keys (``scaled_dot_product_attention``) and
  zeroes padded frames before the positional convolution. So bucketed, padded batches are safe for
  every model, and a batch whose rows all have one length runs without any mask.
* ``pooling="mean"`` averages each utterance's valid frames (in fp32) on the device before the copy.
* On CPUs the front end runs one utterance at a time (its early activations, 512 channels at 3.2 kHz
  for BASE, overflow the caches for a whole batch: per utterance it does the same work about 1.4x faster
  per CPU second, and needs no masking); the Transformer always runs on the padded batch, where its
  matrix products are large. On GPUs the whole batch goes through the front end at once.

    embedder = Embedder.from_checkpoint("ckpt/", layers=[6, -1], pooling="mean", device="cuda",
                                        precision="bf16")
    out = embedder(waveforms, lengths)      # out[b][layer] -> np.ndarray [dim] (or [frames, dim])
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from speech_ssl.config import ConfigError
from speech_ssl.models import Wav2Vec2Model, load
from speech_ssl.models.frontend import conv_output_lengths
from speech_ssl.models.masking import padding_mask_from_lengths
from speech_ssl.models.wav2vec2 import FeatureOutput

POOLINGS = ("none", "mean")
PRECISIONS = ("fp32", "bf16", "fp16")
OUTPUT_DTYPES = {"float32": np.float32, "float16": np.float16}
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def encoder_of(model: torch.nn.Module) -> Wav2Vec2Model:
    """The encoder of any of our model classes (pretraining, CTC, or a bare encoder)."""
    if isinstance(model, Wav2Vec2Model):
        return model
    encoder = getattr(model, "encoder", None)
    if isinstance(encoder, Wav2Vec2Model):
        return encoder
    raise TypeError(f"not a wav2vec 2.0 model of speech_ssl: {type(model).__name__}")


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


def masked_channel_norm(x: Tensor, lengths: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """GroupNorm with one group per channel over the valid steps of each row. x [B, T, C] channels-last.

    Mean and (biased) variance over ``lengths[b]`` steps of row ``b``, accumulated in fp32: a padded row
    gets the statistics it has alone. Padded steps get normalised too (their values are never read by a
    valid output frame of the convolutions that follow). Three passes over x (masked copy, squares,
    output) and no fp32 copy of a bf16 input: this tensor is the largest of the whole model (512
    channels at 3.2 kHz for BASE). E[x^2] - E[x]^2 is accurate here: conv outputs have near-zero mean.
    """
    valid = (torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]).unsqueeze(-1)  # [B, T, 1]
    count = lengths.clamp(min=1).to(torch.float32)[:, None, None]
    masked = x * valid.to(x.dtype)
    mean = masked.sum(dim=1, keepdim=True, dtype=torch.float32) / count
    var = (masked * masked).sum(dim=1, keepdim=True, dtype=torch.float32) / count - mean * mean
    scale = torch.rsqrt(var.clamp(min=0) + eps) * weight.float()
    shift = bias.float() - mean * scale
    return torch.addcmul(shift.to(x.dtype), x, scale.to(x.dtype))


def _convolve(block: torch.nn.Module, x: Tensor) -> Tensor:
    """The convolution of a front-end block alone (no norm, no GELU), channels-last [B, T, C] in and out.

    Only the block's parameters are used (a ``conv`` Conv1d, or a tap-major ``weight`` [k, C_in, C_out]
    with ``bias`` and ``stride``), so this does not depend on how the model computes its convolutions.
    """
    conv = getattr(block, "conv", None)
    if isinstance(conv, torch.nn.Conv1d):
        weight, bias, stride = conv.weight, conv.bias, conv.stride[0]
    else:
        weight, bias, stride = block.weight.permute(2, 1, 0), block.bias, block.stride
    return F.conv1d(x.transpose(1, 2), weight.to(x.dtype), None if bias is None else bias.to(x.dtype),
                    stride=stride).transpose(1, 2)


def exact_features(encoder: Wav2Vec2Model, inputs: Tensor, lengths: Optional[Tensor]) -> FeatureOutput:
    """The front end + feature LayerNorm, giving every valid frame the value it has without padding.

    Front ends without a group norm are exact as they are (``encoder.extract_features``). With one, the
    blocks are run here with ``masked_channel_norm`` in place of the group norm (same parameters).
    """
    frontend = encoder.feature_encoder
    has_group_norm = any(getattr(block, "norm_kind", None) == "group" for block in frontend.layers)
    if lengths is None or not has_group_norm:
        feats = encoder.extract_features(inputs, lengths)
    else:
        x = inputs.unsqueeze(-1) if frontend.frontend == "conv" else inputs  # channels-last [B, T, C]
        steps = lengths.to(inputs.device).long()
        for block, kernel, stride in zip(frontend.layers, frontend.kernels, frontend.strides):
            steps = conv_output_lengths(steps, [kernel], [stride])
            if block.norm_kind == "group":
                x = F.gelu(masked_channel_norm(_convolve(block, x), steps, block.norm.weight, block.norm.bias,
                                               block.norm.eps))
            else:
                x = block(x)
        time = x.shape[1]
        steps = steps.clamp(max=time)
        feats = FeatureOutput(encoder.feature_norm(x), padding_mask_from_lengths(steps, time), steps,
                              x.new_zeros(()))
    if feats.padding_mask is not None and not bool(feats.padding_mask.any()):
        # Rows of one length: no mask, so attention can take its fastest kernel.
        feats = FeatureOutput(feats.features, None, feats.lengths, feats.feature_penalty)
    return feats


class Embedder:
    """Per-utterance embeddings of chosen layers from a wav2vec 2.0 encoder (eval mode, no gradients).

    model: any of our model classes (only its encoder is kept). layers: hidden_states indices (negative
    from the end). pooling: ``none`` ([frames, dim] per utterance) or ``mean`` ([dim]). device: where
    the encoder runs. precision: ``fp32``, or ``bf16`` / ``fp16`` autocast (GPU only). dtype: of the
    returned arrays, ``float32`` or ``float16``. batch_frontend: run the front end on the whole padded
    batch (default on GPUs) or one utterance at a time (default on CPUs); the results are the same.
    """

    def __init__(self, model: torch.nn.Module, layers: Sequence[int] = (-1,), pooling: str = "none",
                 device: Union[str, torch.device] = "cpu", precision: str = "fp32", dtype: str = "float32",
                 batch_frontend: Optional[bool] = None):
        if pooling not in POOLINGS:
            raise ConfigError("pooling", f"unknown pooling {pooling!r}.", POOLINGS)
        if precision not in PRECISIONS:
            raise ConfigError("precision", f"unknown precision {precision!r}.", PRECISIONS)
        if dtype not in OUTPUT_DTYPES:
            raise ConfigError("dtype", f"unknown output dtype {dtype!r}.", list(OUTPUT_DTYPES))
        self.device = torch.device(device)
        if precision != "fp32" and self.device.type != "cuda":
            raise ConfigError("precision", f"{precision} runs on GPUs only (a CPU computes it hundreds of times "
                                           "slower than fp32); use precision=fp32 on CPUs.")
        encoder = encoder_of(model)
        self.config = encoder.config
        self.encoder = encoder.eval().requires_grad_(False).to(self.device)
        self.layers = resolve_layers(layers, self.config.num_layers)
        self.max_layer = max(self.layers)
        self.pooling = pooling
        self.precision = precision
        self.dtype = dtype
        self.batch_frontend = self.device.type != "cpu" if batch_frontend is None else batch_frontend

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

    def _autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=_AUTOCAST[self.precision])

    @torch.inference_mode()
    def hidden_states(self, inputs: Tensor, lengths: Optional[Tensor] = None) -> tuple[dict[int, Tensor], Tensor]:
        """The requested layers on the device: ({layer: [B, T', D]}, valid frames [B]).

        inputs: [B, samples] waveforms (or [B, frames, n_mels] filterbanks), zero-padded; lengths: [B]
        valid samples (frames), or None when nothing is padded.
        """
        inputs = inputs.to(self.device, non_blocking=True)
        if lengths is not None:
            lengths = lengths.to(self.device, non_blocking=True)
        with self._autocast():
            if lengths is not None and not self.batch_frontend:
                feats = self._features_one_by_one(inputs, lengths)
            else:
                feats = exact_features(self.encoder, inputs, lengths)
            out = self.encoder.contextualize(feats, None, self.max_layer, output_hidden_states=True)
        return {layer: out.hidden_states[layer] for layer in self.layers}, out.lengths

    def _features_one_by_one(self, inputs: Tensor, lengths: Tensor) -> FeatureOutput:
        """The front end on each row's valid part alone, padded back into a batch of features."""
        rows = [self.encoder.extract_features(inputs[b:b + 1, :n], None).features[0]
                for b, n in enumerate(lengths.tolist())]
        frames = torch.tensor([r.shape[0] for r in rows], device=inputs.device)
        features = rows[0].new_zeros(len(rows), int(frames.max()), rows[0].shape[-1])
        for b, r in enumerate(rows):
            features[b, : r.shape[0]] = r
        mask = padding_mask_from_lengths(frames, features.shape[1])
        return FeatureOutput(features, mask if bool(mask.any()) else None, frames, features.new_zeros(()))

    @torch.inference_mode()
    def __call__(self, inputs: Tensor, lengths: Optional[Tensor] = None) -> list[dict[int, np.ndarray]]:
        """Per utterance, per layer: ``[frames, dim]`` (pooling none) or ``[dim]`` (mean) in ``dtype``."""
        hidden, frames = self.hidden_states(inputs, lengths)
        out_dtype = torch.float16 if self.dtype == "float16" else torch.float32
        frames_host = frames.cpu().tolist()
        result: list[dict[int, np.ndarray]] = [{} for _ in frames_host]
        for layer, h in hidden.items():
            if self.pooling == "mean":
                valid = (torch.arange(h.shape[1], device=h.device)[None, :] < frames[:, None]).unsqueeze(-1)
                summed = (h.float() * valid).sum(dim=1)
                pooled = (summed / frames.clamp(min=1).to(summed.dtype)[:, None]).to(out_dtype).cpu().numpy()
                for b in range(len(frames_host)):
                    result[b][layer] = pooled[b]
            else:
                width = max(frames_host) if frames_host else 0
                host = h[:, :width].to(out_dtype).cpu().numpy()
                for b, n in enumerate(frames_host):
                    result[b][layer] = host[b, :n]
        return result
