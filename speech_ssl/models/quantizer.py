"""Gumbel product quantizer (paper section 2, "quantization module"; fairseq GumbelVectorQuantizer).

Conv features [N, C] -> G groups of V logits; one entry per group is chosen (Gumbel-softmax,
straight-through, in training; argmax in eval) and the chosen codewords (each codebook_dim / G wide)
are concatenated into the quantized target [N, codebook_dim].

The temperature is annealed by optimizer updates, ``max(t_max * decay**updates, t_min)``, and lives in
a buffer so that it is saved in the state dict and restored with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn


@dataclass
class QuantizerOutput:
    quantized: Tensor  # [N, codebook_dim]
    codes: Tensor  # [N, G] chosen entry per group (what defines "the same codeword")
    prob_perplexity: Tensor  # perplexity of the batch-averaged softmax, summed over groups (differentiable)
    code_perplexity: Tensor  # perplexity of the batch-averaged argmax choices, summed over groups
    diversity: Tensor  # (G*V - prob_perplexity) / (G*V): 0 when every entry is used equally


def perplexity(probs: Tensor) -> Tensor:
    """exp(entropy) of each group's distribution [G, V], summed over groups (fairseq's epsilon 1e-7)."""
    return torch.exp(-(probs * torch.log(probs + 1e-7)).sum(dim=-1)).sum()


class GumbelQuantizer(nn.Module):
    def __init__(self, in_dim: int, groups: int, entries: int, codebook_dim: int,
                 temperature: tuple[float, float, float] = (2.0, 0.5, 0.999995)):
        super().__init__()
        self.groups = groups
        self.entries = entries
        self.logits_proj = nn.Linear(in_dim, groups * entries)  # fairseq weight_proj
        self.codebook = nn.Parameter(torch.empty(groups * entries, codebook_dim // groups))  # fairseq vars
        nn.init.normal_(self.logits_proj.weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.logits_proj.bias)
        nn.init.uniform_(self.codebook)
        self.max_temperature, self.min_temperature, self.temperature_decay = temperature
        self.register_buffer("temperature", torch.tensor(float(self.max_temperature)))

    def set_num_updates(self, num_updates: int) -> None:
        value = max(self.max_temperature * self.temperature_decay ** num_updates, self.min_temperature)
        self.temperature.fill_(value)
        self.temperature_value = value

    @property
    def temperature_value(self) -> float:
        """The temperature as a number, without reading the buffer back from the device each step."""
        cached = self.__dict__.get("_temperature_value")
        if cached is None:  # first use, or the buffer was loaded from a state dict
            cached = self.__dict__["_temperature_value"] = float(self.temperature)
        return cached

    @temperature_value.setter
    def temperature_value(self, value: float) -> None:
        self.__dict__["_temperature_value"] = value

    def _load_from_state_dict(self, *args, **kwargs):  # a loaded temperature replaces the cached number
        self.__dict__.pop("_temperature_value", None)
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: Tensor, weights: Optional[Tensor] = None) -> QuantizerOutput:
        """x [N, C] -> QuantizerOutput. weights [N] (0 / 1): which frames the statistics are taken over
        (the masked ones in pretraining); None: all of them. Fixed shapes, no host reads."""
        n = x.size(0)
        logits = self.logits_proj(x).float().view(n, self.groups, self.entries)
        entries = torch.arange(self.entries, device=x.device)
        if weights is None:
            weights = logits.new_ones(n)
        weights = weights.to(logits.dtype).view(n, 1, 1)
        total = weights.sum().clamp(min=1)
        # Statistics over the weighted frames, without Gumbel noise.
        probs = torch.softmax(logits, dim=-1)
        prob_ppl = perplexity((probs * weights).sum(dim=0) / total)
        argmax = logits.argmax(dim=-1)
        with torch.no_grad():
            counts = ((argmax.unsqueeze(-1) == entries).to(logits.dtype) * weights).sum(dim=0) / total
            code_ppl = perplexity(counts)
        if self.training:
            gumbel = -torch.empty_like(logits).exponential_().log()
            soft = torch.softmax((logits + gumbel) / self.temperature, dim=-1)
            codes = soft.argmax(dim=-1)
            hard = (codes.unsqueeze(-1) == entries).to(soft.dtype)
            onehot = hard - soft.detach() + soft  # straight-through: hard forward, soft gradient
        else:
            codes = argmax
            onehot = (codes.unsqueeze(-1) == entries).to(logits.dtype)
        codebook = self.codebook.view(self.groups, self.entries, -1)
        # [G, N, V] @ [G, V, d] -> [G, N, d] -> [N, G * d]
        quantized = torch.bmm(onehot.transpose(0, 1).to(codebook.dtype), codebook)
        quantized = quantized.transpose(0, 1).reshape(n, -1)
        num_vars = self.groups * self.entries
        return QuantizerOutput(quantized=quantized, codes=codes, prob_perplexity=prob_ppl,
                               code_perplexity=code_ppl, diversity=(num_vars - prob_ppl) / num_vars)
