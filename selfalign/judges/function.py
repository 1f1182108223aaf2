"""A judge that calls a Python function: verifiable rewards, rule-based scores, gold rewards."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from . import JudgeError, Prompt, check_scores, flatten, load_callable, unflatten


class FunctionJudge:
    """Scores with fn(prompts: list, responses: list[str]) -> list[float], one score per pair.

    `fn` is a callable or a 'pkg.module:function' string. Every (prompt, response) scored
    counts as one label.
    """

    def __init__(self, fn: Callable[[list[Prompt], list[str]], Sequence[float]] | str) -> None:
        self.name = fn if isinstance(fn, str) else getattr(fn, "__qualname__", repr(fn))
        self.fn = load_callable(fn) if isinstance(fn, str) else fn
        self.labels = 0
        self.keeps_answers = False

    def score(self, prompts: Sequence[Prompt], candidates: Sequence[Sequence[str]],
              key: str = "") -> list[list[float]]:
        flat_p, flat_r = flatten(prompts, candidates)
        if not flat_r:
            return [[] for _ in candidates]
        try:
            raw = self.fn(flat_p, flat_r)
        except Exception as e:  # a user's function: report it as input to fix, not a crash
            raise JudgeError(f"reward function '{self.name}' raised {type(e).__name__}: {e}") from e
        scores = check_scores(raw, len(flat_r), f"reward function '{self.name}'")
        self.labels += len(flat_r)
        return unflatten(scores, candidates)
