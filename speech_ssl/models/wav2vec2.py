"""wav2vec 2.0: the encoder (``Wav2Vec2Model``) and the self-supervised objective (``Wav2Vec2ForPreTraining``).

Encoder (paper section 2): front end -> LayerNorm -> Linear to the model width -> dropout -> span masking
(a learned mask embedding replaces masked frames) -> channel masking (fine-tuning) -> context network.

Pretraining (section 3, fairseq semantics): the quantized conv features of the masked frames are the
targets; each masked frame's context vector is scored by cosine similarity / kappa (in fp32) against its
own target and K distractors, the targets of other masked frames of the same utterance, drawn uniformly
with replacement (never itself, never padding; a distractor with the positive's codeword is ignored).
``loss_sum = sum CE + diversity_weight * diversity * N + feature_penalty_weight * penalty * N`` with N
the masked frames; the trainer divides by the total N of all workers.

Implementation note: the objective has fixed shapes and never reads a value back to the host, so that a
step can be queued on a GPU without waiting and compiled whole (``torch.compile``). Every frame of the
batch is scored, by one similarity matrix per utterance over all its frames [B, T, T] and an index
lookup, and the loss and statistics weight the frames by the mask; fairseq and transformers gather the
masked frames first (a data-dependent shape) and materialise K+1 target copies per frame. The numbers
are the same; the extra work (unmasked frames, about half) is well under 1% of a step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speech_ssl.models.config import ModelConfig
from speech_ssl.models.dropout import Dropout
from speech_ssl.models.frontend import ConvFeatureEncoder
from speech_ssl.models.masking import compute_channel_mask, compute_span_mask, padding_mask_from_lengths
from speech_ssl.models.quantizer import GumbelQuantizer
from speech_ssl.models.transformer import ContextNetwork


@dataclass
class FeatureOutput:
    """The front end's output, before the Transformer."""

    features: Tensor  # [B, T', C] conv features after the feature LayerNorm, before projection
    padding_mask: Optional[Tensor]  # [B, T'] True = padding, or None
    lengths: Tensor  # [B] valid frames
    feature_penalty: Tensor  # mean square of the conv features (before the LayerNorm) over valid frames


@dataclass
class EncoderOutput:
    last_hidden_state: Tensor  # [B, T', D]
    padding_mask: Optional[Tensor]  # [B, T'] True = padding, or None
    lengths: Tensor  # [B]
    features: Tensor  # [B, T', C] post-LN conv features (pre-projection): the quantizer's input
    hidden_states: Optional[tuple[Tensor, ...]] = None  # transformers numbering
    mask_time: Optional[Tensor] = None  # [B, T'] the time mask that was applied, or None
    feature_penalty: Optional[Tensor] = None


class Wav2Vec2Model(nn.Module):
    """The wav2vec 2.0 encoder. inputs [B, S] waveform or [B, F, n_mels] fbank -> EncoderOutput."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.feature_encoder = ConvFeatureEncoder(cfg)
        self.feature_norm = nn.LayerNorm(cfg.conv_dim, eps=cfg.layer_norm_eps)
        self.feature_projection = nn.Linear(cfg.conv_dim, cfg.embed_dim)
        self.dropout_input = Dropout(cfg.dropout_input)
        self.mask_embedding = nn.Parameter(torch.empty(cfg.embed_dim).uniform_())
        self.context = ContextNetwork(cfg)

    # -- lengths and padding ---------------------------------------------------------------------
    def output_lengths(self, lengths: Tensor) -> Tensor:
        """Frames out of the front end for ``lengths`` input samples (or fbank frames)."""
        return self.feature_encoder.output_lengths(lengths)

    def padding_is_exact(self) -> bool:
        return padding_is_exact(self.config)

    # -- stages ----------------------------------------------------------------------------------
    def extract_features(self, inputs: Tensor, lengths: Optional[Tensor] = None,
                         exact_padding: bool = False) -> FeatureOutput:
        """Front end + feature LayerNorm: the part shared by the context network and the quantizer.

        ``exact_padding``: a group-norm front end takes its statistics over each row's valid steps, so that
        every valid frame gets the value it has without padding (the embedder); by default over all steps,
        padding included, as fairseq and transformers do (``padding_is_exact``).
        """
        lengths = None if lengths is None else lengths.to(inputs.device).long()
        raw = self.feature_encoder(inputs, lengths if exact_padding else None)
        batch, time, _ = raw.shape
        if lengths is None:
            out_lengths = torch.full((batch,), time, dtype=torch.long, device=raw.device)
            padding_mask = None
            penalty = raw.float().pow(2).mean()
        else:
            out_lengths = self.output_lengths(lengths).clamp(max=time)
            padding_mask = padding_mask_from_lengths(out_lengths, time)
            valid = (~padding_mask).unsqueeze(-1)
            denom = (out_lengths.sum() * raw.size(-1)).clamp(min=1)
            penalty = (raw.float().pow(2) * valid).sum() / denom
        return FeatureOutput(self.feature_norm(raw), padding_mask, out_lengths, penalty)

    def compute_time_mask(self, feats: FeatureOutput) -> Tensor:
        """A fresh span mask [B, T'] for these features (config's mask_prob / length / min_masks)."""
        cfg = self.config
        batch, time = feats.features.shape[:2]
        lengths = feats.lengths if feats.padding_mask is not None else None
        return compute_span_mask((batch, time), lengths, cfg.mask_prob, cfg.mask_length, cfg.mask_min_masks,
                                 cfg.require_same_masks, device=feats.features.device)

    def contextualize(self, feats: FeatureOutput, mask_time: Optional[Tensor] = None,
                      max_layer: Optional[int] = None, output_hidden_states: bool = False) -> EncoderOutput:
        """Projection, masking and the context network over extracted features."""
        cfg = self.config
        x = self.dropout_input(self.feature_projection(feats.features))
        if mask_time is not None:
            x = torch.where(mask_time.unsqueeze(-1), self.mask_embedding.to(x.dtype), x)
        if self.training and cfg.mask_channel_prob > 0:
            channels = compute_channel_mask(x.size(0), x.size(-1), cfg.mask_channel_prob,
                                            cfg.mask_channel_length, device=x.device)
            x = x.masked_fill(channels.unsqueeze(1), 0.0)
        x, hidden = self.context(x, feats.padding_mask, max_layer, output_hidden_states)
        return EncoderOutput(last_hidden_state=x, padding_mask=feats.padding_mask, lengths=feats.lengths,
                             features=feats.features, hidden_states=hidden, mask_time=mask_time,
                             feature_penalty=feats.feature_penalty)

    def forward(self, inputs: Tensor, lengths: Optional[Tensor] = None, mask_time: Optional[Tensor] = None,
                max_layer: Optional[int] = None, output_hidden_states: bool = False) -> EncoderOutput:
        """Encode a batch.

        ``mask_time`` [B, T']: frames to replace by the mask embedding. When None, a span mask is drawn
        in training mode if ``mask_prob > 0`` (fine-tuning's SpecAugment-style masking); never in eval.
        ``max_layer``: run only the first ``max_layer`` Transformer layers (no work past them).
        """
        feats = self.extract_features(inputs, lengths)
        if mask_time is None and self.training and self.config.mask_prob > 0:
            mask_time = self.compute_time_mask(feats)
        return self.contextualize(feats, mask_time, max_layer, output_hidden_states)


def padding_is_exact(cfg: ModelConfig) -> bool:
    """True when a padded batch gives every utterance the same outputs as running it alone.

    Group norm normalises each channel over time, padding included, so group-norm front ends are not
    exact (fairseq and transformers behave the same way; batch such models without padding, e.g. by
    cropping to the shortest utterance as fairseq does in pretraining).
    """
    return not (cfg.frontend == "conv" and cfg.conv_norm == "group")


# ----------------------------------------------------------------------------------------------------
# Pretraining
# ----------------------------------------------------------------------------------------------------


@dataclass
class PretrainingOutput:
    """The objective of a batch. Tensors stay on the device; reading ``logs`` or ``sample_size`` as
    numbers waits for the device (once, for all statistics together)."""

    loss_sum: Tensor  # scalar: summed over masked frames (see module docstring)
    num_masked: Tensor  # scalar (long): the number of masked frames (targets)
    stats: dict[str, Tensor] = field(default_factory=dict)  # 0-d tensors, see ``logs``
    frame_logits: Optional[Tensor] = None  # [B, T', K+1] fp32 for every frame, target at index 0
    mask_time: Optional[Tensor] = None  # [B, T']
    temperature: float = 0.0

    @property
    def sample_size(self) -> int:
        return int(self.num_masked)

    @property
    def logs(self) -> dict[str, float]:
        """The statistics as numbers (one device read)."""
        keys = list(self.stats)
        values = torch.stack([self.stats[k].float() for k in keys]).tolist() if keys else []
        out = dict(zip(keys, values))
        out["temperature"] = self.temperature
        return out

    @property
    def logits(self) -> Optional[Tensor]:
        """[N, K+1] logits of the masked frames, utterance by utterance (row-major)."""
        if self.frame_logits is None or self.mask_time is None:
            return None
        return self.frame_logits[self.mask_time]

    @property
    def loss(self) -> Tensor:
        return self.loss_sum / self.num_masked.clamp(min=1)


def masked_frame_table(mask_time: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Where the masked frames are, in fixed shapes. mask_time [B, T] ->

    counts [B]: masked frames per utterance; rank [B, T]: each masked frame's index among its
    utterance's masked frames (meaningless for unmasked frames, but within [0, T)); frame_of [B, T]:
    the frame of the j-th masked frame of each utterance in its first counts[b] entries.
    """
    time = mask_time.shape[1]
    positions = torch.arange(time, device=mask_time.device).expand_as(mask_time)
    counts = mask_time.sum(dim=1)
    rank = (mask_time.long().cumsum(dim=1) - 1).clamp(min=0)
    frame_of = torch.argsort(torch.where(mask_time, positions, positions + time), dim=1)
    return counts, rank, frame_of


def sample_negatives(mask_time: Tensor, num_negatives: int) -> Tensor:
    """K distractor frames [B, T, K] for every frame, drawn among the masked frames of its utterance.

    For a masked frame: uniform over the *other* masked frames of the same utterance, with replacement
    (fairseq), never itself, never padding. Utterances with a single masked frame get that frame (the
    caller masks those logits out). Rows of unmasked frames are drawn alike and never used.
    """
    batch, time = mask_time.shape
    counts, rank, frame_of = masked_frame_table(mask_time)
    others = (counts - 1).clamp(min=1).view(batch, 1, 1)
    draw = torch.rand(batch, time, num_negatives, device=mask_time.device)
    neg = torch.minimum(torch.floor(draw * others).long(), others - 1)  # rand * n can round up to n
    neg = neg + (neg >= rank.unsqueeze(-1)).long()  # skip the positive: uniform over the others
    neg = torch.minimum(neg, (counts - 1).clamp(min=0).view(batch, 1, 1))
    return frame_of.gather(1, neg.view(batch, -1)).view(batch, time, num_negatives)


class Wav2Vec2ForPreTraining(nn.Module):
    """Encoder + Gumbel quantizer + projections; forward returns the loss (PretrainingOutput)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Wav2Vec2Model(cfg)
        self.dropout_features = Dropout(cfg.dropout_features)
        self.quantizer = GumbelQuantizer(cfg.conv_dim, cfg.codebook_groups, cfg.codebook_entries, cfg.codebook_dim,
                                         (cfg.temperature_max, cfg.temperature_min, cfg.temperature_decay))
        self.target_projection = nn.Linear(cfg.codebook_dim, cfg.final_dim)  # fairseq project_q
        self.context_projection = nn.Linear(cfg.embed_dim, cfg.final_dim)  # fairseq final_proj
        self.compiled_objective: Optional[Callable] = None  # set by speech_ssl.models.compile

    def set_num_updates(self, num_updates: int) -> None:
        """Anneal the Gumbel temperature to ``max(t_max * decay**num_updates, t_min)``."""
        self.quantizer.set_num_updates(num_updates)

    @property
    def temperature(self) -> float:
        return self.quantizer.temperature_value

    def forward(self, inputs: Tensor, lengths: Optional[Tensor] = None,
                mask_time: Optional[Tensor] = None) -> PretrainingOutput:
        feats = self.encoder.extract_features(inputs, lengths)
        if mask_time is None:
            mask_time = self.encoder.compute_time_mask(feats)
        enc = self.encoder.contextualize(feats, mask_time)
        objective = self.compiled_objective or self._objective
        loss_sum, num_masked, frame_logits, stats = objective(
            enc.last_hidden_state, feats.features, mask_time, feats.feature_penalty, feats.lengths)
        return PretrainingOutput(loss_sum=loss_sum, num_masked=num_masked, stats=stats, frame_logits=frame_logits,
                                 mask_time=mask_time, temperature=self.temperature)

    def _objective(self, hidden: Tensor, features: Tensor, mask_time: Tensor, feature_penalty: Tensor,
                   lengths: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """Contrastive + diversity + feature penalty over the masked frames; fixed shapes, no host reads.

        hidden [B, T, D] context network output; features [B, T, C] post-LN conv features; mask_time [B, T].
        """
        cfg = self.config
        batch, time = mask_time.shape
        weights = mask_time.to(torch.float32)
        num_masked = mask_time.sum()
        counts = mask_time.sum(dim=1)

        context = self.context_projection(hidden)  # [B, T, F]
        quant = self.quantizer(self.dropout_features(features).reshape(batch * time, -1), weights.reshape(-1))
        targets = self.target_projection(quant.quantized).view(batch, time, -1)  # [B, T, F]
        negatives = sample_negatives(mask_time, cfg.num_negatives)  # [B, T, K] frame indices
        frame_logits = self._contrastive_logits(context, targets, quant.codes.view(batch, time, -1), negatives,
                                                counts)
        per_frame = torch.logsumexp(frame_logits, dim=-1) - frame_logits[..., 0]  # cross entropy, target 0
        # Selected, not multiplied by the mask: a non-finite unmasked frame (padding) must not reach the loss.
        contrastive = torch.where(mask_time, per_frame, 0.0).sum()
        masked = num_masked.to(torch.float32)
        diversity_term = cfg.diversity_weight * quant.diversity * masked
        penalty_term = cfg.feature_penalty_weight * feature_penalty * masked
        loss_sum = contrastive + diversity_term + penalty_term

        with torch.no_grad():
            is_max = frame_logits.argmax(-1) == 0
            is_min = frame_logits.argmin(-1) == 0
            correct = (is_max & ~is_min & mask_time).sum()  # fairseq: all-equal rows count wrong
            stats = {
                "contrastive": contrastive.detach(),  # sums over masked frames: they add up to loss_sum
                "diversity_sum": diversity_term.detach(),
                "feature_penalty_sum": penalty_term.detach(),
                "diversity": quant.diversity.detach(),  # this batch's raw values (average them)
                "feature_penalty": feature_penalty.detach(),
                "correct": correct,
                "count": num_masked,
                "code_perplexity": quant.code_perplexity.detach(),
                "prob_perplexity": quant.prob_perplexity.detach(),
                "num_masked": num_masked,
                "num_frames": lengths.sum(),
            }
        return loss_sum, num_masked, frame_logits.detach(), stats

    def _contrastive_logits(self, context: Tensor, targets: Tensor, codes: Tensor, negatives: Tensor,
                            counts: Tensor) -> Tensor:
        """[B, T, K+1] fp32 logits cos(c, [q_pos, q_neg...]) / kappa; invalid distractors at -inf.

        context, targets [B, T, F]; codes [B, T, G]; negatives [B, T, K] frame indices; counts [B].
        """
        cfg = self.config
        batch, time, num_negatives = negatives.shape
        with torch.autocast(device_type=context.device.type, enabled=False):
            c = F.normalize(context.float(), dim=-1, eps=1e-8)
            q = F.normalize(targets.float(), dim=-1, eps=1e-8)
            sims = torch.bmm(c, q.transpose(1, 2))  # [B, T, T]: every pairwise cosine of an utterance
            positive = (c * q).sum(-1, keepdim=True)  # [B, T, 1]
            logits = torch.cat([positive, sims.gather(2, negatives)], dim=-1) / cfg.logit_temp
        # A distractor with the positive's codeword (every group equal) is no distractor.
        groups = codes.shape[-1]
        neg_codes = codes.gather(1, negatives.reshape(batch, -1, 1).expand(-1, -1, groups))
        same_code = (neg_codes.view(batch, time, num_negatives, groups) == codes.unsqueeze(2)).all(-1)
        invalid = same_code | (counts < 2).view(batch, 1, 1)
        return torch.cat([logits[..., :1], logits[..., 1:].masked_fill(invalid, float("-inf"))], dim=-1)
