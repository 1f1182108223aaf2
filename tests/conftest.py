"""Shared fixtures: tiny random-init models and preference examples, all built offline."""

from __future__ import annotations

import random

import pytest
import torch

from selfalign.tasks.tiny import build_model
from selfalign.train import PreferenceExample

VOCAB = 64


def make_model(seed: int = 0, arch: str = "qwen2"):  # no tokenizer saved: qwen2 is fine
    return build_model(VOCAB, arch=arch, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, seed=seed)


def make_examples(n: int, seed: int = 0, with_ref_sample: bool = False) -> list[PreferenceExample]:
    rng = random.Random(seed)

    def ids(lo: int, hi: int) -> list[int]:
        return [rng.randrange(6, VOCAB) for _ in range(rng.randint(lo, hi))]

    return [
        PreferenceExample(ids(2, 7), ids(1, 6), ids(1, 6), ids(1, 6) if with_ref_sample else None) for _ in range(n)
    ]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def builtin_task(tmp_path_factory):
    """The built-in task (SFT of pi_0, ~35 s) built once per test session in a private cache;
    SELFALIGN_CACHE points there so the loop and subprocesses reuse it."""
    import os

    from selfalign.tasks.builtin import build_task

    cache = tmp_path_factory.mktemp("selfalign_cache")
    old = os.environ.get("SELFALIGN_CACHE")
    os.environ["SELFALIGN_CACHE"] = str(cache)
    yield build_task(progress=False)
    if old is None:
        os.environ.pop("SELFALIGN_CACHE", None)
    else:
        os.environ["SELFALIGN_CACHE"] = old


def without_timings(rows):
    """Metrics rows (dicts, or metrics.jsonl text) less their wall-clock 'time/...' entries, which differ
    from run to run: what a deterministic comparison of two runs compares."""
    import json

    if isinstance(rows, str):
        rows = [json.loads(line) for line in rows.splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]
