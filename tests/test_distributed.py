"""Data parallel: a 2-process update equals the 1-process update on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def launch(processes: int, out: Path, micro_batch_size: int) -> dict:
    # On CPU, `accelerate launch --cpu` starts several processes only through MPI; torchrun is what
    # accelerate's own multi-process launcher runs, and Accelerator picks up its environment (gloo on CPU).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           "-m", "tests.ddp_worker", str(out), str(micro_batch_size)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(Path(str(out) + ".json").read_text())


def test_two_process_update_equals_one_process(tmp_path):
    one = launch(1, tmp_path / "one.pt", micro_batch_size=8)
    two = launch(2, tmp_path / "two.pt", micro_batch_size=2)
    assert (one["processes"], two["processes"]) == (1, 2)
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-5)
    p1, p2 = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for name in p1:
        torch.testing.assert_close(p1[name], p2[name], atol=1e-5, rtol=1e-4, msg=name)
