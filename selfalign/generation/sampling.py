"""Sampling keyed per row: a row's tokens depend on its own key, never on what else is in the batch.

transformers' sampler draws every row from one global generator, so a prompt's samples change
with the batch it lands in, and so with the number of processes sharing the prompts. Here each
row's uniform at each step comes from a counter-based generator (SplitMix64) evaluated at
(row key, step): the same key gives the same stream on 1 or N processes, in any batch, on any
device. The token is then drawn by inverse CDF from the row's own warped distribution
(temperature, top-k, top-p: transformers' own warpers, in generate()'s order).

generate() runs greedy and this processor leaves one finite score per row (0 at the drawn token),
so its argmax is the sample. torch has no per-row generator short of one torch.Generator object
per row and step; the counter generator is one vectorized op and gives the same bits on CPU and GPU.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment


def signed(x: int) -> int:
    """A 64-bit pattern as torch's int64 holds it."""
    x &= MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def shift_right(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def splitmix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function on int64 bit patterns (multiplication wraps modulo 2^64)."""
    z = (z ^ shift_right(z, 30)) * signed(0xBF58476D1CE4E5B9)
    z = (z ^ shift_right(z, 27)) * signed(0x94D049BB133111EB)
    return z ^ shift_right(z, 31)


def mix(*parts: int) -> int:
    """One 64-bit key from several integers (seed, prompt key, sample index), each part through SplitMix64."""
    z = torch.tensor(0, dtype=torch.int64)
    for p in parts:
        z = splitmix64(z + signed(p) + signed(GOLDEN))
    return int(z)


def row_keys(seed: int, keys: list[int], num_samples: int) -> torch.Tensor:
    """The key of sample j of the prompt keyed keys[i], at row i * num_samples + j (generate()'s layout)."""
    return torch.tensor([mix(seed, k, j) for k in keys for j in range(num_samples)], dtype=torch.int64)


def uniforms(keys: torch.Tensor, step: int) -> torch.Tensor:
    """A float64 uniform in (0, 1) per key: SplitMix64 at counter `step` of the stream the key starts."""
    z = splitmix64(keys + signed((step + 1) * GOLDEN))
    return (shift_right(z, 11).double() + 0.5) / float(1 << 53)


class KeyedSampler(LogitsProcessor):
    """Draws each row's next token from its warped distribution with its own keyed uniform.

    keys: one int64 per row of the batch generate() runs (prompts repeated num_samples times);
    prompt_length: the padded prompt length, so that step 0 is the first new token.
    """

    def __init__(self, keys: torch.Tensor, prompt_length: int, temperature: float, top_k: int | None,
                 top_p: float | None) -> None:
        self.keys = keys
        self.prompt_length = prompt_length
        self.warpers = [TemperatureLogitsWarper(temperature)]
        if top_k is not None and top_k > 0:
            self.warpers.append(TopKLogitsWarper(top_k))
        if top_p is not None and top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        probs = torch.softmax(scores.double(), dim=-1)
        cdf = probs.cumsum(dim=-1)
        if self.keys.device != scores.device:  # moved once, not copied to the GPU at every step
            self.keys = self.keys.to(scores.device)
        u = uniforms(self.keys, input_ids.shape[1] - self.prompt_length)
        # Token t owns (cdf[t-1], cdf[t]]: the first index whose cdf reaches u; a token of probability 0 owns
        # nothing. Scaling by the row's total absorbs the cumulative sum's rounding.
        target = (u * cdf[:, -1]).unsqueeze(1)
        drawn = torch.searchsorted(cdf, target).clamp_(max=scores.shape[1] - 1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, drawn, 0.0)
