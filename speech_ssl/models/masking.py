"""Span masking with fairseq's ``compute_mask_indices`` semantics, vectorised in torch.

Paper section 3.1: sample a proportion ``p`` of frames as span starts and mask the ``M`` frames from
each start; spans may overlap. fairseq's exact rules, which we keep:

* each row's span count is ``max(min_masks, int(p * len / M + U[0,1)))`` from its *unpadded* length
  (probabilistic rounding);
* span starts are distinct, uniform over ``[0, len - M)`` (when that range is too short for the span
  count, over the first ``num_spans + 1`` frames), spans are cut at the row's end, never into padding;
* with ``require_same_masks`` every row is then trimmed, uniformly at random, to the smallest masked
  count of the batch, so that masked frames form a [B, M] block (fairseq's default).

All randomness comes from torch's global generator of the mask's device.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _ranks(keys: Tensor) -> Tensor:
    """Rank of every entry within its row (0 = smallest key)."""
    order = keys.argsort(dim=1)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(keys.size(1), device=keys.device).expand_as(order))
    return ranks


def compute_span_mask(
    shape: tuple[int, int],
    lengths: Optional[Tensor],
    mask_prob: float,
    mask_length: int,
    min_masks: int = 0,
    require_same_masks: bool = True,
    device: torch.device | str | None = None,
) -> Tensor:
    """A BoolTensor [B, T], True = masked, following fairseq's compute_mask_indices (static spans).

    ``lengths`` [B]: valid frames of each row (None: all ``T``). Padding is never masked.
    """
    batch, time = shape
    if lengths is not None:
        device = lengths.device
        sizes = lengths.to(torch.long).clamp(0, time)
    else:
        sizes = torch.full((batch,), time, dtype=torch.long, device=device)
    if batch == 0 or time == 0 or mask_prob <= 0:
        return torch.zeros(batch, time, dtype=torch.bool, device=device)

    # Span count per row: probabilistic rounding, at least min_masks.
    noise = torch.rand(batch, device=device)
    num_spans = torch.floor(mask_prob * sizes.to(torch.float64) / mask_length + noise.to(torch.float64))
    num_spans = num_spans.to(torch.long).clamp(min=min_masks)
    # Candidate starts: [0, size - span); fairseq falls back to num_spans + 1 candidates when short.
    candidates = torch.where(sizes - mask_length <= num_spans, num_spans + 1, sizes - mask_length)
    candidates = torch.minimum(candidates, sizes)
    num_spans = torch.minimum(num_spans, candidates)  # rows too short for their spans: all candidates
    positions = torch.arange(time, device=device).unsqueeze(0)

    # Distinct uniform starts: the num_spans smallest random keys among the candidate positions.
    keys = torch.rand(batch, time, device=device)
    keys = keys.masked_fill(positions >= candidates.unsqueeze(1), 2.0)
    starts = _ranks(keys) < num_spans.unsqueeze(1)

    # Frame t is masked if a span started within the last mask_length frames.
    started = starts.to(torch.int32).cumsum(dim=1)
    before = torch.nn.functional.pad(started, (mask_length, 0))[:, :time]
    mask = (started - before) > 0
    mask &= positions < sizes.unsqueeze(1)

    if require_same_masks and batch > 1:
        counts = mask.sum(dim=1)
        target = counts.min()
        # Keep a uniform random subset of `target` masked frames in every row.
        keys = torch.rand(batch, time, device=device).masked_fill(~mask, 2.0)
        mask = _ranks(keys) < target
    return mask


def compute_channel_mask(batch: int, channels: int, mask_prob: float, mask_length: int,
                         device: torch.device | str | None = None) -> Tensor:
    """A BoolTensor [B, C] of masked channels (fairseq: the same rules over the channel axis, no padding)."""
    return compute_span_mask((batch, channels), None, mask_prob, mask_length, min_masks=0,
                             require_same_masks=True, device=device)


def padding_mask_from_lengths(lengths: Optional[Tensor], time: int) -> Optional[Tensor]:
    """[B, T] True at padded frames, or None when nothing is padded."""
    if lengths is None:
        return None
    positions = torch.arange(time, device=lengths.device).unsqueeze(0)
    return positions >= lengths.unsqueeze(1)
