"""The sample-efficiency benchmark's quick mode runs end to end (its full results live in bench/results/)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, without_timings

pytestmark = pytest.mark.slow  # runs the benchmark script as a child process


def test_quick_mode_runs_every_method_and_reports(tmp_path, builtin_task):
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "sample_efficiency.py"), "--quick", "--out",
                           str(tmp_path / "out"), "--workdir", str(tmp_path / "runs")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "sample_efficiency_quick.json").read_text())
    methods = ["offline_dpo", "iterative_dpo", "selm", "xpo", "sail_dp", "sail_pp", "sail_pr"]
    assert list(result["summary"]) == methods
    for m in methods:
        s = result["summary"][m]
        assert len(s["seeds"]) == 2 and 0 <= s["gold/sampled"][0] <= 1
    # Same rows per iteration for everyone; SAIL-PP's own labels are free.
    assert result["summary"]["iterative_dpo"]["labelled_pairs"] == result["summary"]["sail_dp"]["labelled_pairs"] == 16
    assert result["summary"]["sail_pp"]["labelled_pairs"] < 16 and result["summary"]["sail_dp"]["judge_labels"] == 0
    # The ablation's alpha = 0 run is iterative DPO exactly, seed for seed.
    a0, it = result["runs"]["selm alpha=0"], result["runs"]["iterative_dpo"]
    for x, y in zip(a0, it):
        assert without_timings([x["history"][-1]]) == without_timings([y["history"][-1]])
    # SAIL's own baseline is DPO on the dataset pairs: no judge call, every row a dataset pair.
    assert result["sail"]["dataset_dpo"]["judge_labels"] == 0 and result["sail"]["dataset_dpo"]["labelled_pairs"] == 16
    assert set(result["sail"]) == {"dataset_dpo", "sail_dp", "sail_pp", "sail_pp +baseline", "sail_pr", "sail_pr +baseline"}
    assert result["sail_pr_only"]["pr-only gamma=0.3"]["judge_labels"] == 32  # g = 1: every row judged
    md = (tmp_path / "out" / "sample_efficiency_quick.md").read_text()
    assert "| sail_pr |" in md and "## SELM alpha ablation" in md and "Command: `python bench/sample_efficiency.py" in md
    assert "## SAIL against its own baseline" in md and "| pr-only gamma=0.3 +baseline |" in md
    assert (tmp_path / "out" / "sample_efficiency_quick.png").stat().st_size > 10_000
