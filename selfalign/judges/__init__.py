"""Judges: score K candidate responses per prompt, counting every label asked for.

A judge returns one float per candidate (higher is better); pair selection (pairs.py) turns
scores into training pairs. `labels` counts candidates scored, the unit a labelling budget
is spent in; resumed runs read it back from the run directory instead of asking again.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

Prompt = str | list[dict[str, str]]


class JudgeError(ValueError):
    """A judge misbehaved (raised, returned the wrong number of scores, or NaN); the message says which."""


class Judge(Protocol):
    labels: int
    # Whether the judge keeps every answer it paid for and answers a repeated question from that record (the
    # LLM judge's judge_answers.jsonl): a call the loop asks again after a kill then costs nothing twice.
    keeps_answers: bool

    def score(self, prompts: Sequence[Prompt], candidates: Sequence[Sequence[str]],
              key: str = "") -> list[list[float]]:
        """For each prompt, one score per candidate response.

        key: names this call's unit of work (the loop passes the stage and chunk); a judge with
        randomness (NoisyJudge) seeds it from the key, so a resumed run gets the same labels.
        A deterministic judge ignores it.
        """
        ...


def _module_from_file(path: Path, spec: str):
    """The module of a .py file (loaded once per path: a second judge on the same file shares it)."""
    import importlib.util
    import sys

    name = f"selfalign_user_{abs(hash(str(path.resolve())))}_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise JudgeError(f"cannot load '{path}' named in '{spec}' as a Python module")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    try:
        loader_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise JudgeError(f"'{path}' named in '{spec}' raised {type(e).__name__} on import: {e}") from e
    return module


def load_callable(spec: str) -> Callable[..., Any]:
    """The function a spec names: 'pkg.module:function' (imported), or 'path/to/file.py:function' (a file, `~` and
    $VARS expanded, relative to the working directory). A bare 'module:function' that is not importable is also
    looked for as module.py in the working directory, where a user keeps a reward beside the prompts. JudgeError
    says what is missing."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise JudgeError(f"'{spec}' is not of the form 'pkg.module:function' or 'path/to/file.py:function'")
    local = Path(os.path.expandvars(os.path.expanduser(module_name)))
    if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
        if not local.is_file():
            raise JudgeError(f"'{spec}': no file {local.resolve()} (a path is relative to the working directory "
                             f"{Path.cwd()})")
        module = _module_from_file(local, spec)
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            beside = Path.cwd() / f"{module_name.replace('.', os.sep)}.py"
            if e.name != module_name.split(".")[0] or not beside.is_file():
                raise JudgeError(f"cannot import module '{module_name}' named in '{spec}' ({e}); name a file "
                                 f"instead: 'path/to/{module_name.split('.')[-1]}.py:{attr}'") from e
            module = _module_from_file(beside, spec)
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
