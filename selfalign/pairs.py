"""Pair selection: from K scored candidates for one prompt, pick (chosen, rejected) or nothing.

Every selector takes the candidates' scores (higher is better) and a random generator and
returns a `Pair` of candidate indices, or None when the scores cannot order a pair (all
tied). Ties produce no pair; the caller counts them. Selectors never look at the text.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Pair:
    """Indices into the candidate list: chosen is strictly preferred to rejected."""

    chosen: int
    rejected: int


def _check(scores: Sequence[float]) -> None:
    if len(scores) < 2:
        raise ValueError(f"pair selection needs at least 2 candidates, got {len(scores)}")
    if any(s != s for s in scores):
        raise ValueError("pair selection got a NaN score")


def best_worst(scores: Sequence[float], rng: random.Random) -> Pair | None:
    """Highest vs lowest score (the RLHF-workflow default). Among equal bests or worsts, the first."""
    _check(scores)
    hi = max(range(len(scores)), key=lambda i: scores[i])
    lo = min(range(len(scores)), key=lambda i: scores[i])
    return Pair(hi, lo) if scores[hi] > scores[lo] else None


def best_random(scores: Sequence[float], rng: random.Random) -> Pair | None:
    """Highest score vs a uniformly drawn candidate with a strictly lower score."""
    _check(scores)
    hi = max(range(len(scores)), key=lambda i: scores[i])
    lower = [i for i in range(len(scores)) if scores[i] < scores[hi]]
    return Pair(hi, rng.choice(lower)) if lower else None


def random_pair(scores: Sequence[float], rng: random.Random) -> Pair | None:
    """Two distinct candidates drawn uniformly, ordered by score; a tie gives no pair."""
    _check(scores)
    i, j = rng.sample(range(len(scores)), 2)
    if scores[i] == scores[j]:
        return None
    return Pair(i, j) if scores[i] > scores[j] else Pair(j, i)


def selm_three_way(ref_score: float, chosen_score: float, rejected_score: float) -> Pair | None:
    """SELM's ranking of y_ref against the dataset's chosen and rejected responses.

    Candidates are indexed 0 = y_ref, 1 = dataset chosen, 2 = dataset rejected; the best
    becomes chosen and the worst rejected, so y_ref can end up on either side (or neither).
    """
    return best_worst([ref_score, chosen_score, rejected_score], random.Random(0))


SELECTORS: dict[str, Callable[[Sequence[float], random.Random], Pair | None]] = {
    "best_worst": best_worst,
    "best_random": best_random,
    "random": random_pair,
}
