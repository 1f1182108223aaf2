"""One online-loop run under `accelerate launch`, with its peak GPU memory: bench/gpu_checks.sh's sharded smokes.

    accelerate launch --config_file $(python -m selfalign accelerate-config fsdp2) --num_processes 1 \
        bench/sharded_smoke.py OUT [key=value ...]

Runs the quickstart recipe (SELM on the built-in task) into OUT and writes OUT.json from the
main process: exit code, wall time, accelerate's distributed type (FSDP, DEEPSPEED, ...;
accelerate selects DeepSpeed only with a GPU), the device, and the peak GPU memory of this process.
"""

from __future__ import annotations

import json
import sys
import time

import torch


def main(out: str, overrides: list[str]) -> int:
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    from selfalign.cli import main as cli

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    rc = cli(["run", "quickstart", f"output_dir={out}", *overrides, "--no-progress"])
    record = {"exit": rc, "wall_s": round(time.perf_counter() - t0, 1), "processes": PartialState().num_processes,
              "distributed_type": str(AcceleratorState().distributed_type).split(".")[-1],
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None}
    if PartialState().is_main_process:
        print(json.dumps(record))
        with open(f"{out}.json", "w") as f:
            json.dump(record, f, indent=1)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
