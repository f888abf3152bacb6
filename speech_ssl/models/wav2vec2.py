"""wav2vec 2.0: the encoder (``Wav2Vec2Model``) and the self-supervised objective (``Wav2Vec2ForPreTraining``).

Encoder (paper section 2): front end -> LayerNorm -> Linear to the model width -> dropout -> span masking
(a learned mask embedding replaces masked frames) -> channel masking (fine-tuning) -> context network.

Pretraining (section 3, fairseq semantics): the quantized conv features of the masked frames are the
targets; each masked frame's context vector is scored by cosine similarity / kappa (in fp32) against its
own target and K distractors, the targets of other masked frames of the same utterance, drawn uniformly
with replacement (never itself, never padding; a distractor with the positive's codeword is ignored).
``loss_sum = sum CE + diversity_weight * diversity * N + feature_penalty_weight * penalty * N`` with N
the masked frames; the trainer divides by the total N of all workers.

Implementation note: the logits come from one similarity matrix per utterance over its masked frames
[B, M, M] and an index lookup, instead of materialising K+1 target copies per frame (fairseq and
transformers do the latter); the numbers are the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

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
    def extract_features(self, inputs: Tensor, lengths: Optional[Tensor] = None) -> FeatureOutput:
        """Front end + feature LayerNorm: the part shared by the context network and the quantizer."""
        raw = self.feature_encoder(inputs)
        batch, time, _ = raw.shape
        if lengths is None:
            out_lengths = torch.full((batch,), time, dtype=torch.long, device=raw.device)
            padding_mask = None
            penalty = raw.float().pow(2).mean()
        else:
            out_lengths = self.output_lengths(lengths.to(raw.device).long()).clamp(max=time)
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
    loss_sum: Tensor  # scalar: summed over masked frames (see module docstring)
    sample_size: int  # number of masked frames (targets)
    logs: dict[str, float] = field(default_factory=dict)
    logits: Optional[Tensor] = None  # [N, K+1] fp32, target at index 0
    mask_time: Optional[Tensor] = None  # [B, T']

    @property
    def loss(self) -> Tensor:
        return self.loss_sum / max(self.sample_size, 1)


def sample_negatives(rows: Tensor, positions: Tensor, counts: Tensor, num_negatives: int) -> Tensor:
    """K distractor positions for every masked frame, within the same utterance, never itself.

    rows, positions [N]: each masked frame's utterance and its index among that utterance's masked
    frames; counts [B]: masked frames per utterance. Returns [N, K] positions in [0, counts[row]).
    Uniform over the other masked frames, with replacement (fairseq). Frames of an utterance with a
    single masked frame get position 0 (itself); the caller masks those logits out.
    """
    others = (counts[rows] - 1).clamp(min=1).unsqueeze(1)  # [N, 1]
    draw = torch.rand(rows.size(0), num_negatives, device=rows.device)
    neg = torch.floor(draw * others).long()
    neg = torch.minimum(neg, others - 1)  # rand * n can round up to n in float32
    neg = neg + (neg >= positions.unsqueeze(1)).long()  # skip the positive: uniform over the others
    return torch.minimum(neg, (counts[rows] - 1).clamp(min=0).unsqueeze(1))


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

    def set_num_updates(self, num_updates: int) -> None:
        """Anneal the Gumbel temperature to ``max(t_max * decay**num_updates, t_min)``."""
        self.quantizer.set_num_updates(num_updates)

    @property
    def temperature(self) -> float:
        return float(self.quantizer.temperature)

    def forward(self, inputs: Tensor, lengths: Optional[Tensor] = None,
                mask_time: Optional[Tensor] = None) -> PretrainingOutput:
        cfg = self.config
        feats = self.encoder.extract_features(inputs, lengths)
        if mask_time is None:
            mask_time = self.encoder.compute_time_mask(feats)
        enc = self.encoder.contextualize(feats, mask_time)

        # Masked frames, utterance by utterance (row-major), and their place within the utterance.
        rows, _ = mask_time.nonzero(as_tuple=True)
        counts = mask_time.sum(dim=1)
        num_masked = int(rows.numel())
        starts = torch.cumsum(counts, 0) - counts
        positions = torch.arange(num_masked, device=rows.device) - starts[rows]

        context = self.context_projection(enc.last_hidden_state[mask_time])  # [N, F]
        quant = self.quantizer(self.dropout_features(feats.features[mask_time]))
        targets = self.target_projection(quant.quantized)  # [N, F]

        logits = self._contrastive_logits(context, targets, quant.codes, rows, positions, counts)
        if num_masked:
            contrastive = F.cross_entropy(logits, torch.zeros(num_masked, dtype=torch.long, device=logits.device),
                                          reduction="sum")
        else:
            contrastive = logits.sum()  # zero, keeps the graph
        diversity_term = cfg.diversity_weight * quant.diversity * num_masked
        penalty_term = cfg.feature_penalty_weight * feats.feature_penalty * num_masked
        loss_sum = contrastive + diversity_term + penalty_term

        with torch.no_grad():
            if num_masked:
                is_max = logits.argmax(-1) == 0
                is_min = logits.argmin(-1) == 0
                correct = int(is_max.sum() - (is_max & is_min).sum())  # fairseq: all-equal rows count wrong
            else:
                correct = 0
            logs = {
                "contrastive": float(contrastive),  # sums over masked frames: they add up to loss_sum
                "diversity_sum": float(diversity_term),
                "feature_penalty_sum": float(penalty_term),
                "diversity": float(quant.diversity),  # this batch's raw values (average them)
                "feature_penalty": float(feats.feature_penalty),
                "correct": float(correct),
                "count": float(num_masked),
                "code_perplexity": float(quant.code_perplexity),
                "prob_perplexity": float(quant.prob_perplexity),
                "temperature": self.temperature,
                "num_masked": float(num_masked),
                "num_frames": float(feats.lengths.sum()),
            }
        return PretrainingOutput(loss_sum=loss_sum, sample_size=num_masked, logs=logs, logits=logits.detach(),
                                 mask_time=mask_time)

    def _contrastive_logits(self, context: Tensor, targets: Tensor, codes: Tensor, rows: Tensor,
                            positions: Tensor, counts: Tensor) -> Tensor:
        """[N, K+1] fp32 logits cos(c, [q_pos, q_neg...]) / kappa; invalid distractors at -inf."""
        cfg = self.config
        batch = counts.numel()
        num_masked = rows.numel()
        width = int(counts.max()) if num_masked else 0
        negatives = sample_negatives(rows, positions, counts, cfg.num_negatives)  # [N, K]
        index = torch.cat([positions.unsqueeze(1), negatives], dim=1)  # [N, K+1]
        with torch.autocast(device_type=context.device.type, enabled=False):
            c = F.normalize(context.float(), dim=-1, eps=1e-8)
            q = F.normalize(targets.float(), dim=-1, eps=1e-8)
            # Per-utterance layout [B, M, F] of the masked frames, then all pairwise cosines [B, M, M].
            c_rows = c.new_zeros(batch, width, c.size(-1)).index_put((rows, positions), c)
            q_rows = q.new_zeros(batch, width, q.size(-1)).index_put((rows, positions), q)
            sims = torch.bmm(c_rows, q_rows.transpose(1, 2))
            frame = (rows * width + positions) * width  # offset of each masked frame's row of sims
            logits = sims.reshape(-1)[frame.unsqueeze(1) + index] / cfg.logit_temp  # [N, K+1]
        # A distractor with the positive's codeword (every group equal) is no distractor.
        flat = (rows * width).unsqueeze(1) + negatives
        code_rows = codes.new_zeros(batch * width, codes.size(1)).index_put((rows * width + positions,), codes)
        same_code = (code_rows[flat] == codes.unsqueeze(1)).all(-1)
        invalid = same_code | (counts[rows] < 2).unsqueeze(1)
        return torch.cat([logits[:, :1], logits[:, 1:].masked_fill(invalid, float("-inf"))], dim=1)
