"""A pairwise ranker: ranks K candidates by aggregated pairwise preferences (as PairRM ranks).

compare(prompt, a, b) returns P(a is better than b). Each unordered pair is compared once
(one label); a candidate's score is its mean win probability against the others, so the
best-ranked candidate is the one that beats the rest most convincingly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import combinations

from . import JudgeError, Prompt, check_scores, load_callable


class PairwiseJudge:
    """Scores = mean pairwise win probability; `compare` is a callable or 'pkg.module:function'."""

    def __init__(self, compare: Callable[[Prompt, str, str], float] | str) -> None:
        self.name = compare if isinstance(compare, str) else getattr(compare, "__qualname__", repr(compare))
        self.compare = load_callable(compare) if isinstance(compare, str) else compare
        self.labels = 0

    def _prob(self, prompt: Prompt, a: str, b: str) -> float:
        try:
            raw = self.compare(prompt, a, b)
        except Exception as e:  # a user's function: report it as input to fix, not a crash
            raise JudgeError(f"pairwise comparator '{self.name}' raised {type(e).__name__}: {e}") from e
        (p,) = check_scores([raw], 1, f"pairwise comparator '{self.name}'")
        if not 0.0 <= p <= 1.0:
            raise JudgeError(f"pairwise comparator '{self.name}' returned {p}, not a probability in [0, 1]")
        return p

    def score(self, prompts: Sequence[Prompt], candidates: Sequence[Sequence[str]],
              key: str = "") -> list[list[float]]:
        out = []
        for prompt, cands in zip(prompts, candidates):
            k = len(cands)
            wins = [0.0] * k
            for i, j in combinations(range(k), 2):
                p = self._prob(prompt, cands[i], cands[j])
                wins[i] += p
                wins[j] += 1.0 - p
                self.labels += 1
            out.append([w / max(1, k - 1) for w in wins])
        return out
