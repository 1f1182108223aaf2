"""Simulated human feedback: Bradley-Terry noise over another judge's scores.

Adding independent Gumbel noise of scale T to each score makes every pairwise comparison
a Bradley-Terry draw: P(a ranked above b) = sigmoid((s_a - s_b) / T), and the ranking of K
candidates a Plackett-Luce draw. T = 0 returns the scores unchanged (a noiseless annotator).

The noise of candidate j of prompt i in a call is drawn from a generator seeded with
(seed, key, i, j), not from a running stream: a caller that passes score(..., key=) per chunk of
work gets the same labels whether or not the run was interrupted and resumed in between.
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
        self.seed = seed
        self.calls = 0

    @property
    def labels(self) -> int:
        return self.inner.labels

    @property
    def keeps_answers(self) -> bool:
        return self.inner.keeps_answers

    def _gumbel(self, key: str) -> float:
        u = min(max(random.Random(key).random(), 1e-12), 1 - 1e-12)
        return -math.log(-math.log(u))

    def score(self, prompts: Sequence[Prompt], candidates: Sequence[Sequence[str]],
              key: str = "") -> list[list[float]]:
        scores = self.inner.score(prompts, candidates, key=key)
        self.calls += 1
        if self.temperature == 0:
            return scores
        # Without a key, successive calls must still differ: the call count stands in.
        key = key or f"call{self.calls}"
        return [[s + self.temperature * self._gumbel(f"{self.seed}:{key}:{i}:{j}") for j, s in enumerate(row)]
                for i, row in enumerate(scores)]
