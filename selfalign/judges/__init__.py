"""Judges: score K candidate responses per prompt, counting every label asked for.

A judge returns one float per candidate (higher is better); pair selection (pairs.py) turns
scores into training pairs. `labels` counts candidates scored, the unit a labelling budget
is spent in; resumed runs read it back from the run directory instead of asking again.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

Prompt = str | list[dict[str, str]]


class JudgeError(ValueError):
    """A judge misbehaved (raised, returned the wrong number of scores, or NaN); the message says which."""


class Judge(Protocol):
    labels: int

    def score(self, prompts: Sequence[Prompt], candidates: Sequence[Sequence[str]],
              key: str = "") -> list[list[float]]:
        """For each prompt, one score per candidate response.

        key: names this call's unit of work (the loop passes the stage and chunk); a judge with
        randomness (NoisyJudge) seeds it from the key, so a resumed run gets the same labels.
        A deterministic judge ignores it.
        """
        ...


def load_callable(spec: str) -> Callable[..., Any]:
    """Import 'pkg.module:function' and return the function; JudgeError says what is missing."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise JudgeError(f"'{spec}' is not of the form 'pkg.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise JudgeError(f"cannot import module '{module_name}' named in '{spec}' ({e})") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise JudgeError(f"module '{module_name}' has no function '{attr}' (from '{spec}')")
    return fn


def check_scores(scores: Any, expected: int, source: str) -> list[float]:
    """Scores as floats, or JudgeError naming the source and what is wrong."""
    try:
        values = [float(s) for s in scores]
    except (TypeError, ValueError) as e:
        raise JudgeError(f"{source} must return a list of numbers ({e})") from e
    if len(values) != expected:
        raise JudgeError(f"{source} returned {len(values)} scores for {expected} responses")
    bad = [i for i, v in enumerate(values) if math.isnan(v) or math.isinf(v)]
    if bad:
        raise JudgeError(f"{source} returned a non-finite score ({values[bad[0]]}) for response {bad[0]}")
    return values


def flatten(prompts: Sequence[Prompt], candidates: Sequence[Sequence[str]]) -> tuple[list[Prompt], list[str]]:
    if len(prompts) != len(candidates):
        raise ValueError(f"{len(prompts)} prompts but {len(candidates)} candidate lists")
    flat_p = [p for p, cands in zip(prompts, candidates) for _ in cands]
    flat_r = [r for cands in candidates for r in cands]
    return flat_p, flat_r


def unflatten(values: Sequence[float], candidates: Sequence[Sequence[str]]) -> list[list[float]]:
    out, i = [], 0
    for cands in candidates:
        out.append(list(values[i : i + len(cands)]))
        i += len(cands)
    return out
