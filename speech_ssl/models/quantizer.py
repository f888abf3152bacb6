"""Gumbel product quantizer (paper section 2, "quantization module"; fairseq GumbelVectorQuantizer).

Conv features [N, C] -> G groups of V logits; one entry per group is chosen (Gumbel-softmax,
straight-through, in training; argmax in eval) and the chosen codewords (each codebook_dim / G wide)
are concatenated into the quantized target [N, codebook_dim].

The temperature is annealed by optimizer updates, ``max(t_max * decay**updates, t_min)``, and lives in
a buffer so that it is saved in the state dict and restored with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
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

    def forward(self, x: Tensor) -> QuantizerOutput:
        n = x.size(0)
        logits = self.logits_proj(x).float().view(n, self.groups, self.entries)
        # Statistics over the frames given (the masked ones, in pretraining), without Gumbel noise.
        probs = torch.softmax(logits, dim=-1)
        prob_ppl = perplexity(probs.sum(dim=0) / max(n, 1))
        argmax = logits.argmax(dim=-1)
        with torch.no_grad():
            counts = F.one_hot(argmax, self.entries).float().sum(dim=0) / max(n, 1)
            code_ppl = perplexity(counts)
        if self.training:
            gumbel = -torch.empty_like(logits).exponential_().log()
            soft = torch.softmax((logits + gumbel) / self.temperature, dim=-1)
            codes = soft.argmax(dim=-1)
            hard = F.one_hot(codes, self.entries).to(soft.dtype)
            onehot = hard - soft.detach() + soft  # straight-through: hard forward, soft gradient
        else:
            codes = argmax
            onehot = F.one_hot(codes, self.entries).to(logits.dtype)
        codebook = self.codebook.view(self.groups, self.entries, -1)
        # [G, N, V] @ [G, V, d] -> [G, N, d] -> [N, G * d]
        quantized = torch.bmm(onehot.transpose(0, 1).to(codebook.dtype), codebook)
        quantized = quantized.transpose(0, 1).reshape(n, -1)
        num_vars = self.groups * self.entries
        return QuantizerOutput(quantized=quantized, codes=codes, prob_perplexity=prob_ppl,
                               code_perplexity=code_ppl, diversity=(num_vars - prob_ppl) / num_vars)
