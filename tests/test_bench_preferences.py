"""bench/sample_efficiency.py on the constraints task: the preference file the dataset-reading methods get is
pi_0's judged pairs from the same seed's offline DPO run (best vs worst of the judge's scores, ties dropped)."""

from __future__ import annotations

import importlib.util
import json

from tests.conftest import ROOT


def _bench():
    spec = importlib.util.spec_from_file_location("sample_efficiency", ROOT / "bench" / "sample_efficiency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_preferences_come_from_the_offline_runs_judged_generations(tmp_path):
    run = tmp_path / "offline_dpo" / "seed0"
    rows = [
        {"prompt": [{"role": "user", "content": "a"}], "responses": ["a0", "a1", "a2", "a3"],
         "scores": [0.2, 0.9, -0.1, 0.5], "truncated": [False] * 4},
        {"prompt": [{"role": "user", "content": "b"}], "responses": ["b0", "b1"], "scores": [0.3, 0.3],
         "truncated": [False, False]},  # a tie: no pair
    ]
    later = {"prompt": "c", "responses": ["c0", "c1"], "scores": [0.0, 1.0], "truncated": [False, True]}
    for it, chunk in (("iter_000", rows), ("iter_001", [later])):
        (run / it).mkdir(parents=True)
        (run / it / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chunk))
    path = _bench().preferences_from(run, tmp_path / "prefs.jsonl")
    got = [json.loads(line) for line in path.read_text().splitlines()]
    assert got == [{"prompt": [{"role": "user", "content": "a"}], "chosen": "a1", "rejected": "a2"},
                   {"prompt": "c", "chosen": "c1", "rejected": "c0"}]


def test_constraints_overrides_give_xpo_its_two_samples_and_everyone_else_four(tmp_path):
    bench = _bench()
    size = bench.CONSTRAINTS_CPU
    xpo = bench.overrides("xpo", 0, tmp_path, size, task="constraints")
    dpo = bench.overrides("iterative_dpo", 1, tmp_path, size, task="constraints")
    assert "generation.num_samples=2" in xpo and "generation.num_samples=4" in dpo
    assert "model=constraints" in dpo and "seed=1" in dpo and "eval.implicit_pairs=0" in dpo
