"""CTC fine-tuning model (paper section 4.3): the wav2vec 2.0 encoder plus a linear head over the vocabulary.

Vocabulary convention (transformers style): index 0 is ``<pad>`` and doubles as the CTC blank.
Time and channel masking come from the encoder's config (``mask_prob``, ``mask_channel_prob``) and
apply in training mode only. Freezing is done by toggling ``requires_grad`` (no ``no_grad`` tricks), so
a trainer can rebuild DDP around the parameters that train.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speech_ssl.models.config import ModelConfig
from speech_ssl.models.dropout import Dropout
from speech_ssl.models.wav2vec2 import Wav2Vec2Model

BLANK = 0


@dataclass
class CTCOutput:
    logits: Tensor  # [B, T', V]
    lengths: Tensor  # [B] valid frames
    padding_mask: Optional[Tensor] = None

    def log_probs(self) -> Tensor:
        """[B, T', V] fp32 log-softmax."""
        return F.log_softmax(self.logits.float(), dim=-1)

    def loss_sum(self, targets: Tensor, target_lengths: Tensor) -> Tensor:
        """CTC loss summed over the batch (blank 0, zero_infinity, fp32). targets [B, L], padding ignored."""
        with torch.autocast(device_type=self.logits.device.type, enabled=False):
            log_probs = self.log_probs().transpose(0, 1)  # [T', B, V]
            return F.ctc_loss(log_probs, targets.long(), self.lengths.long(), target_lengths.long(),
                              blank=BLANK, reduction="sum", zero_infinity=True)


class Wav2Vec2ForCTC(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2 (blank + one symbol), got {vocab_size}")
        self.config = cfg
        self.vocab_size = vocab_size
        self.encoder = Wav2Vec2Model(cfg)
        self.final_dropout = Dropout(cfg.final_dropout)
        self.ctc_head = nn.Linear(cfg.embed_dim, vocab_size)
        nn.init.xavier_uniform_(self.ctc_head.weight)  # fairseq's Linear()
        nn.init.zeros_(self.ctc_head.bias)
        self._feature_encoder_frozen = False

    @classmethod
    def from_pretrained_encoder(cls, encoder: Wav2Vec2Model, vocab_size: int, **overrides: Any) -> "Wav2Vec2ForCTC":
        """A CTC model whose encoder starts from ``encoder``'s weights; ``overrides`` change the config
        (fine-tuning's masking, layerdrop, final_dropout...; shapes must stay the same)."""
        cfg = encoder.config.replace(**overrides) if overrides else encoder.config
        model = cls(cfg, vocab_size)
        model.encoder.load_state_dict(encoder.state_dict())
        return model

    def forward(self, inputs: Tensor, lengths: Optional[Tensor] = None) -> CTCOutput:
        enc = self.encoder(inputs, lengths)
        logits = self.ctc_head(self.final_dropout(enc.last_hidden_state))
        return CTCOutput(logits=logits, lengths=enc.lengths, padding_mask=enc.padding_mask)

    # -- freezing ---------------------------------------------------------------------------------
    def freeze_feature_encoder(self) -> None:
        """Keep the conv front end frozen for good (fairseq fine-tuning: feature_grad_mult 0)."""
        self._feature_encoder_frozen = True
        for p in self.encoder.feature_encoder.parameters():
            p.requires_grad_(False)

    def freeze_encoder(self, frozen: bool = True) -> None:
        """Freeze (or unfreeze) the whole encoder; unfreezing leaves a frozen feature encoder frozen."""
        for p in self.encoder.parameters():
            p.requires_grad_(not frozen)
        if self._feature_encoder_frozen:
            for p in self.encoder.feature_encoder.parameters():
                p.requires_grad_(False)

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        return self.encoder.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        return self.ctc_head.parameters()
