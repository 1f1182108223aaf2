"""Truncated samples: responses cut off at max_new_tokens before any end token, and what becomes of them.

A truncated response is not a finished answer: judged and trained on as one, it teaches the
policy that answers may stop anywhere. The generator keeps the end token it stopped at (and
cuts what follows), so a response is truncated exactly when it is max_new_tokens long and
its last token is not an end token (one of tokens.stop_token_ids, the ids generation stops
at). `generation.truncated` chooses what happens next: keep (judge and pair it like any
other), penalize (its score becomes a penalty before pairing) or drop (it never enters a pair).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence


def is_truncated(ids: Sequence[int], max_new_tokens: int, end_ids: Collection[int]) -> bool:
    """Whether a response (token ids, end token kept) stopped at the length limit instead of an end token."""
    return len(ids) >= max_new_tokens and (not ids or ids[-1] not in end_ids)


def penalized_scores(scores: Sequence[Sequence[float]], truncated: Sequence[Sequence[bool]],
                     penalty: float | None) -> list[list[float]]:
    """Each truncated response's score replaced by `penalty`, or, when None, by the lowest score of all minus 1.

    The default ranks a truncated response below every finished one, whatever the judge's scale:
    it becomes the rejected response of any pair it shares with a finished answer. The pair
    selectors only order scores, so the size of the gap does not matter.
    """
    if penalty is None:
        penalty = min((s for row in scores for s in row), default=0.0) - 1.0
    return [[penalty if t else s for s, t in zip(row, flags)] for row, flags in zip(scores, truncated)]


def finished(truncated: Sequence[bool]) -> list[int]:
    """Indices of the responses that ended with an end token (the candidates left by truncated=drop)."""
    return [i for i, t in enumerate(truncated) if not t]
