"""The shipped DeepSpeed configs on a CPU: refused in one line, not run as plain data parallel.

accelerate only starts a DeepSpeed launch where deepspeed is installed; it then runs torchrun with
the environment `prepare_deepspeed_cmd_env` builds from the config file. The test builds that
environment with accelerate's own functions and runs the same torchrun command, so it needs no
deepspeed: on a CPU the Accelerator would ignore ACCELERATE_USE_DEEPSPEED and train as DDP.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from selfalign.distributed import config_path
from tests.conftest import ROOT, subprocess_env

pytestmark = pytest.mark.slow  # torchrun child processes


def deepspeed_env(config: str) -> dict[str, str]:
    """The environment `accelerate launch --config_file <shipped config>` gives its processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = launch_command_parser().parse_args(
        ["--config_file", str(config_path(config)), "--num_processes", "2", "-m", "selfalign"])
    args, defaults, _ = _validate_launch_command(args)
    assert args.use_deepspeed  # accelerate's deepspeed_launcher would start it
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    _, env = prepare_deepspeed_cmd_env(args)
    return {**env, **subprocess_env()}


@pytest.mark.parametrize("config, stage", [("zero2", 2), ("zero3", 3)])
def test_deepspeed_config_on_cpu_is_refused(tmp_path, config, stage):
    out = tmp_path / "run"
    env = deepspeed_env(config)
    assert (env["ACCELERATE_USE_DEEPSPEED"], env["ACCELERATE_DEEPSPEED_ZERO_STAGE"]) == ("true", str(stage))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "selfalign", "run", "quickstart", "iterations=1", "prompts_per_iteration=8", "eval.prompts=0",
           "generation.max_new_tokens=4", f"output_dir={out}", "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("selfalign: error:")]
    assert errors and all(f"asks for DeepSpeed ZeRO-{stage}, which needs a GPU (CUDA)" in e for e in errors), \
        proc.stderr[-3000:]
    assert "fsdp2" in errors[0]
    assert not out.exists()  # refused before the run touched anything
