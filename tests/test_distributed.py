"""Data parallel: a 2-process update equals the 1-process update on the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, subprocess_env

pytestmark = pytest.mark.slow  # torchrun child processes


def launch(processes: int, out: Path, micro_batch_size: int) -> dict:
    # On CPU, `accelerate launch --cpu` starts several processes only through MPI; torchrun is what
    # accelerate's own multi-process launcher runs, and Accelerator picks up its environment (gloo on CPU).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           "-m", "tests.ddp_worker", str(out), str(micro_batch_size)]
    env = subprocess_env()
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


def test_two_process_online_loop_shards_generation_and_completes(tmp_path, builtin_task):
    """The quickstart recipe under torchrun with 2 processes: generation is sharded and gathered
    back in prompt order, judged once, trained data-parallel, and evaluated once."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "selfalign", "run", "quickstart", "iterations=1", "prompts_per_iteration=16", "eval.prompts=8",
           "generation.max_new_tokens=10", "judge.noise=0", f"output_dir={out}", "--no-progress"]
    env = subprocess_env()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # One table, from the main process.
    assert sum(line.split()[:3] == ["iteration", "judge", "labels"] for line in proc.stdout.splitlines()) == 1
    rows = [json.loads(line) for line in (out / "iter_000" / "generations.jsonl").read_text().splitlines()]
    prompts = [json.loads(line)["prompt"] for line in (out / "iter_000" / "prompts.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == prompts and all(len(r["responses"]) == 4 for r in rows)
    from selfalign.tasks.builtin import gold_reward

    # Scores stored with each response are that response's gold reward for ITS prompt.
    for r in rows:
        assert r["scores"] == gold_reward([r["prompt"]] * 4, r["responses"])
    metrics = json.loads((out / "iter_000" / "metrics.json").read_text())
    assert metrics["labels"] == 64 and "gold/greedy" in metrics


def test_one_and_two_processes_label_the_same_pairs(tmp_path, builtin_task):
    """Generation is keyed per prompt and the noisy judge per chunk: the first iteration's samples, labels and
    pairs are the same on 1 and 2 processes. Later iterations start from updates whose data-parallel gradient
    reductions differ in float rounding, so only the first is compared exactly."""
    args = ["-m", "selfalign", "run", "quickstart", "iterations=1", "prompts_per_iteration=24", "eval.prompts=8",
            "generation.max_new_tokens=12", "--no-progress"]
    runs = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if processes == 2 else []
        proc = subprocess.run([sys.executable, *launcher, *args, f"output_dir={out}"], cwd=ROOT, env=subprocess_env(),
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[processes] = {name: (out / "iter_000" / name).read_text()
                           for name in ("responses.jsonl", "generations.jsonl", "pairs.jsonl")}
    for name, text in runs[1].items():
        assert runs[2][name] == text, name
    rows = [json.loads(line) for line in runs[1]["generations.jsonl"].splitlines()]
    assert len(rows) == 24 and len({r for row in rows for r in row["responses"]}) > 24  # real samples, not copies
