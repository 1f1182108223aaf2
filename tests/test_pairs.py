"""Pair selectors: who wins, ties give no pair, y_ref can land on either side in SELM's ranking."""

from __future__ import annotations

import random

import pytest

from selfalign.pairs import Pair, best_random, best_worst, random_pair, selm_three_way


def test_best_worst():
    assert best_worst([0.1, 0.9, -0.3, 0.5], random.Random(0)) == Pair(1, 2)
    assert best_worst([0.2, 0.2, 0.2], random.Random(0)) is None


def test_best_random_draws_only_strictly_lower():
    rng = random.Random(0)
    picks = {best_random([1.0, 3.0, 2.0, 3.0, 0.0], rng) for _ in range(200)}
    assert picks == {Pair(1, 0), Pair(1, 2), Pair(1, 4)}
    assert best_random([1.0, 1.0], rng) is None


def test_random_pair_orders_by_score_and_skips_ties():
    rng = random.Random(0)
    seen = set()
    for _ in range(300):
        p = random_pair([0.0, 1.0, 1.0], rng)
        if p is not None:
            assert [0.0, 1.0, 1.0][p.chosen] > [0.0, 1.0, 1.0][p.rejected]
            seen.add(p)
    assert seen == {Pair(1, 0), Pair(2, 0)}
    assert sum(random_pair([0.0, 1.0, 1.0], random.Random(s)) is None for s in range(300)) > 0


def test_selm_three_way_places_y_ref_anywhere():
    assert selm_three_way(2.0, 1.0, 0.0) == Pair(0, 2)  # y_ref best: chosen
    assert selm_three_way(-1.0, 1.0, 0.0) == Pair(1, 0)  # y_ref worst: rejected
    assert selm_three_way(0.5, 1.0, 0.0) == Pair(1, 2)  # in between: the dataset pair
    assert selm_three_way(1.0, 1.0, 1.0) is None


def test_bad_scores_are_errors():
    with pytest.raises(ValueError, match="at least 2"):
        best_worst([1.0], random.Random(0))
    with pytest.raises(ValueError, match="NaN"):
        best_worst([1.0, float("nan")], random.Random(0))
