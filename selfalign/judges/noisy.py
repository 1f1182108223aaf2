"""Simulated human feedback: Bradley-Terry noise over another judge's scores.

Adding independent Gumbel noise of scale T to each score makes every pairwise comparison
a Bradley-Terry draw: P(a ranked above b) = sigmoid((s_a - s_b) / T), and the ranking of K
candidates a Plackett-Luce draw. T = 0 returns the scores unchanged (a noiseless annotator).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from . import Judge, Prompt


class NoisyJudge:
    """Wraps `inner`; its scores get Gumbel(0, temperature) noise from a seeded generator."""

    def __init__(self, inner: Judge, temperature: float, seed: int = 0) -> None:
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.inner = inner
        self.temperature = temperature
        self.rng = random.Random(seed)

    @property
    def labels(self) -> int:
        return self.inner.labels

    def _gumbel(self) -> float:
        u = min(max(self.rng.random(), 1e-12), 1 - 1e-12)
        return -math.log(-math.log(u))

    def score(self, prompts: Sequence[Prompt], candidates: Sequence[Sequence[str]]) -> list[list[float]]:
        scores = self.inner.score(prompts, candidates)
        if self.temperature == 0:
            return scores
        return [[s + self.temperature * self._gumbel() for s in row] for row in scores]
