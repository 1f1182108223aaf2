"""A pairwise ranker: ranks K candidates by aggregated pairwise preferences (as PairRM ranks).

compare(prompts, responses_a, responses_b) returns P(a is better than b) for each pair of a batch:
one call gets every comparison of a judge call (all prompts of the chunk, K(K-1)/2 pairs each), so
a batched model (PairRM, an LLM server) sees them together. Each unordered pair is compared once
(one label); a candidate's score is its mean win probability against the others, so the
best-ranked candidate is the one that beats the rest most convincingly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import combinations

from . import JudgeError, Prompt, check_scores, load_callable

BATCH_FORM = ("pairwise functions are called on batches: fn(prompts, responses_a, responses_b) -> one P(a better "
              "than b) per pair; wrap a per-pair fn(prompt, a, b) as [fn(p, a, b) for p, a, b in zip(prompts, "
              "responses_a, responses_b)]")

Compare = Callable[[list[Prompt], list[str], list[str]], Sequence[float]]


class PairwiseJudge:
    """Scores = mean pairwise win probability; `compare` is a batched callable or 'pkg.module:function'.

    keeps_answers: whether `compare` answers a repeated comparison from its own record of paid answers
    (the LLM judge's compare does)."""

    def __init__(self, compare: Compare | str, keeps_answers: bool = False) -> None:
        self.name = compare if isinstance(compare, str) else getattr(compare, "__qualname__", repr(compare))
        self.compare = load_callable(compare) if isinstance(compare, str) else compare
        self.labels = 0
        self.keeps_answers = keeps_answers

    def _probs(self, prompts: list[Prompt], a: list[str], b: list[str]) -> list[float]:
        try:
            raw = self.compare(prompts, a, b)
        except JudgeError:
            raise
        except Exception as e:  # a user's function: report it as input to fix, not a crash
            raise JudgeError(f"pairwise comparator '{self.name}' raised {type(e).__name__}: {e} ({BATCH_FORM})") from e
        if isinstance(raw, (int, float)) or not hasattr(raw, "__len__"):
            raise JudgeError(f"pairwise comparator '{self.name}' returned {raw!r} for a batch of {len(a)} pairs; "
                             f"{BATCH_FORM}")
        probs = check_scores(raw, len(a), f"pairwise comparator '{self.name}'")
        bad = next((p for p in probs if not 0.0 <= p <= 1.0), None)
        if bad is not None:
            raise JudgeError(f"pairwise comparator '{self.name}' returned {bad}, not a probability in [0, 1]")
        return probs

    def score(self, prompts: Sequence[Prompt], candidates: Sequence[Sequence[str]],
              key: str = "") -> list[list[float]]:
        where = [(n, i, j) for n, cands in enumerate(candidates) for i, j in combinations(range(len(cands)), 2)]
        probs = self._probs([prompts[n] for n, _, _ in where], [candidates[n][i] for n, i, _ in where],
                            [candidates[n][j] for n, _, j in where]) if where else []
        wins = [[0.0] * len(cands) for cands in candidates]
        for (n, i, j), p in zip(where, probs):
            wins[n][i] += p
            wins[n][j] += 1.0 - p
        self.labels += len(where)
        return [[w / max(1, len(row) - 1) for w in row] for row in wins]
