"""FSDP2 through accelerate on CPU: `accelerate launch --config_file <shipped fsdp2.yaml>`, gloo, 2 processes.

accelerate never selects FSDP without a GPU; selfalign.distributed.make_accelerator switches a
CPU job's state to FSDP with the plugin accelerate builds from the launch environment, so
these runs take the code path of a GPU run: accelerator.prepare(model, optimizer) ->
fully_shard, clip_grad_norm_ on DTensors, save_state / load_state with sharded DCP files.
The 1-process run they are compared with is the plain (unsharded) update on the same global
batch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selfalign.distributed import SHIPPED_CONFIGS, config_path
from tests.conftest import ROOT, subprocess_env

pytestmark = pytest.mark.slow  # accelerate-launched child processes


def launch(out: Path, processes: int, micro_batch_size: int, checkpoint_every: int = 0, stop_after: int = 0,
           **env: str) -> subprocess.CompletedProcess:
    worker = ["-m", "tests.fsdp_worker", str(out), str(micro_batch_size), str(checkpoint_every), str(stop_after)]
    if processes == 1:
        cmd = [sys.executable, *worker]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path("fsdp2")),
               "--num_processes", str(processes), *worker]
    return subprocess.run(cmd, cwd=ROOT, env=subprocess_env(**env), capture_output=True, text=True, timeout=600)


def result(out: Path) -> dict:
    return json.loads(Path(f"{out}.json").read_text())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "one.pt"
    proc = launch(out, 1, micro_batch_size=8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert result(out)["sharding"] == "none"
    return out


def assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=name)


def test_fsdp2_update_equals_one_process_and_saves_a_loadable_iterate(one_process, tmp_path):
    out = tmp_path / "two.pt"
    proc = launch(out, 2, micro_batch_size=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = result(one_process), result(out)
    # Really sharded: FSDP2 through accelerate, parameters are DTensors.
    assert (two["processes"], two["sharding"], two["dtensor"]) == (2, "fsdp2", "DTensor")
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-5)
    assert_same_params(torch.load(one_process), torch.load(out))
    # The iterate is an ordinary directory: from_pretrained loads the gathered weights.
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(f"{out}.policy")
    assert_same_params(torch.load(one_process), {n: p.detach() for n, p in loaded.named_parameters()})


def test_fsdp2_update_killed_mid_checkpoint_resumes(one_process, tmp_path):
    """SIGKILL on the main process after step 2's checkpoint is written but before it is renamed
    into place: an unsharded resume is refused; a sharded one starts from step 1's checkpoint and ends
    where one process ends."""
    out = tmp_path / "killed.pt"
    killed = launch(out, 2, micro_batch_size=2, checkpoint_every=1,
                    SELFALIGN_KILL_AFTER_WRITE="2", SELFALIGN_KILL_BEFORE_RENAME="1")
    assert killed.returncode != 0 and not Path(f"{out}.json").exists()
    ckpt = Path(f"{out}.ckpt")
    assert sorted(p.name for p in ckpt.iterdir()) == ["sharded_000001", "sharded_000002", "update_state.pt",
                                                       "update_state.pt.tmp"]
    unsharded = launch(out, 1, micro_batch_size=2, checkpoint_every=1)
    assert unsharded.returncode != 0
    assert "written with FSDP2/DeepSpeed sharding; resume it under the same accelerate launch config" in unsharded.stderr
    resumed = launch(out, 2, micro_batch_size=2, checkpoint_every=1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert result(out)["resumed_from"] == 1
    assert result(out)["losses"] == pytest.approx(result(one_process)["losses"], abs=1e-5)
    assert_same_params(torch.load(one_process), torch.load(out))
    assert not (ckpt / "update_state.pt").exists() and not list(ckpt.glob("sharded_*"))


def test_shipped_configs_are_accelerate_configs():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {"ddp": "MULTI_GPU", "fsdp2": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}
    for name in SHIPPED_CONFIGS:
        config = load_config_from_file(str(config_path(name)))
        assert str(config.distributed_type).split(".")[-1] == kinds[name]
    assert load_config_from_file(str(config_path("fsdp2"))).fsdp_config["fsdp_version"] == 2
    assert load_config_from_file(str(config_path("zero3"))).deepspeed_config["zero_stage"] == 3


def test_fsdp2_online_loop_matches_ddp(tmp_path):
    """The quickstart recipe (SELM: y_ref from the reference) on 2 processes, FSDP2 against DDP:
    generation from gathered replicas of the sharded policy and reference gives the same
    responses, the update the same losses, and the iterate is an ordinary from_pretrained directory.
    Judging (2 prompts a chunk) is shared by both processes."""
    args = ["-m", "selfalign", "run", "quickstart", "iterations=1", "prompts_per_iteration=8", "eval.prompts=4",
            "generation.max_new_tokens=8", "judge.noise=0", "judge.chunk_size=2",
            "judge.function=tests.judge_fns:pid_logging_gold", "--no-progress"]
    runs = {}
    for name, launcher in (("fsdp2", ["-m", "accelerate.commands.launch", "--config_file", str(config_path("fsdp2")),
                                      "--num_processes", "2"]),
                           ("ddp", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"])):
        out = tmp_path / name
        env = subprocess_env(SELFALIGN_TEST_JUDGE_PIDS=str(tmp_path / f"{name}.pids"))
        proc = subprocess.run([sys.executable, *launcher, *args, f"output_dir={out}"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        # The memory estimate sizes the launch's sharding (accelerate's state), not the recipe's (none).
        assert f"2 process(es), sharding {name}" in proc.stdout
        runs[name] = out
    it = "iter_000"
    fsdp, ddp = runs["fsdp2"] / it, runs["ddp"] / it
    assert (fsdp / "responses.jsonl").read_text() == (ddp / "responses.jsonl").read_text()
    steps = [json.loads((d / "train.json").read_text())["steps"] for d in (fsdp, ddp)]
    assert [s["loss"] for s in steps[0]] == pytest.approx([s["loss"] for s in steps[1]], abs=1e-5)
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(fsdp / "policy").state_dict()
    b = AutoModelForCausalLM.from_pretrained(ddp / "policy").state_dict()
    assert_same_params(a, b)
    # Judging is dealt across both processes, chunk by chunk, each label paid once and journaled in order.
    judged = [line.split("\t") for line in (tmp_path / "fsdp2.pids").read_text().splitlines()]
    assert len({pid for pid, _ in judged}) == 2 and sum(int(n) for _, n in judged) == 32
    journal = [json.loads(line) for line in (fsdp / "judge_journal.jsonl").read_text().splitlines()]
    assert [sorted(map(int, e["scores"])) for e in journal if "scores" in e] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    # Each round's pending lines (both processes' calls) come before the round's answers.
    assert [sorted(e)[0] for e in journal] == ["pending", "pending", "labels", "labels"] * 2
    assert json.loads((fsdp / "metrics.json").read_text())["labels"] == 32
    assert (fsdp / "generations.jsonl").read_text() == (ddp / "generations.jsonl").read_text()
