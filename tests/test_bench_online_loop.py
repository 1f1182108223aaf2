"""bench/online_loop.py end to end at a minimal size on the built-in task's tiny model.

The selfalign side always runs; the TRL side runs where trl (the `bench` extra) is installed,
and is otherwise listed as skipped by the script itself, which this test checks too.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HAS_TRL = importlib.util.find_spec("trl") is not None and importlib.util.find_spec("datasets") is not None


def test_online_loop_bench_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "results"
    cmd = [sys.executable, str(ROOT / "bench" / "online_loop.py"), "--model", "tiny", "--configs", "selfalign-hf,trl-hf",
           "--iterations", "1", "--prompts", "8", "--batch", "8", "--micro-batch", "8", "--eval-prompts", "8",
           "--out", str(out), "--timeout", "300"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((out / "online_loop_tiny_cpu.json").read_text())
    md = (out / "online_loop_tiny_cpu.md").read_text()
    assert result["command"].startswith("python bench/online_loop.py --model tiny") and result["command"] in md
    assert not [r for r in result["runs"] if "error" in r], result["runs"]
    ours = result["summary"]["selfalign-hf"]
    # Every prompt of the slice is labelled; ties (equal gold reward) are not trained on.
    assert ours["labelled_pairs"] == 8 and 0 < ours["pairs_trained"] <= 8
    assert 0 <= ours["heldout_reward"] <= 1 and len(result["runs"][0]["heldout_rewards"]) == 8
    # The stage shares are fractions of the training time and, with "other", add up to 1.
    assert all(0 <= v <= 1 for v in ours["shares"].values())
    assert abs(sum(ours["shares"].values()) - 1) < 1e-6
    assert ours["stage_s"]["generation"] > 0 and ours["stage_s"]["update"] > 0
    assert ours["peak_rss_mib"] > 50  # a Python process with torch loaded
    # pi_0 is evaluated by the same function: same prompts, same number of scores.
    assert len(result["pi0"]["heldout_rewards"]) == 8
    if HAS_TRL:
        peer = result["summary"]["trl-hf"]
        assert peer["labelled_pairs"] == 8 and peer["stage_s"]["generation"] > 0
        assert peer["stage_s"]["reference_logprobs"] > 0 and peer["stage_s"]["update"] > 0
        assert [r["selfalign"] for r in result["ratios"]] == ["selfalign-hf"] and result["ratios"][0]["speedup"] > 0
        assert "selfalign-hf / trl-hf" in md
    else:
        assert "trl-hf" in result["skipped"] and "trl-hf" not in result["summary"]
