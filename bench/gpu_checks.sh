#!/usr/bin/env bash
# Every GPU check the issues ask for, in one script for a lent GPU machine (bench/README section "GPU").
#
#   bash bench/gpu_checks.sh            # on the GPU machine; writes bench/results/gpu/ (and $OUT/ when set)
#   bash bench/gpu_checks.sh --cpu-dry  # here, on CPU: the same steps at smoke sizes, to test the script
#
# Steps (each logged with its wall time; a failing step is recorded and the next one still runs):
#   1. environment: GPU name, driver, torch / transformers / accelerate / trl versions
#   2. bench/train_step.py --device cuda: selfalign's DPO update vs TRL's DPOTrainer on a
#      Qwen2-0.5B-shaped model, sequence 1024, bf16; tokens/s, MFU and peak GPU memory, as ratios
#   3. the online loop on CUDA: the built-in quickstart (SELM) and iterative DPO, 2 iterations each,
#      with the peak GPU memory of each run
#   4. bench/memory.py --device cuda: peak GPU memory of two DPO steps at the Qwen2-0.5B shape (full
#      fine-tune auto / bf16 weights, gradient checkpointing, LoRA) beside selfalign's memory estimate
#      (memory_cuda.md; ~40-60 s on an H100)
# Python packages missing on the GPU image (trl, datasets and theirs) travel as wheels in .whl/
# (the device tool copies .whl when `carry` names it); PYTHONPATH puts this checkout's selfalign first.
set -uo pipefail
cd "$(dirname "$0")/.."
mode="${1:-gpu}"
# Results go straight to $OUT on the device machine (so a timed-out call still returns what finished).
res="${OUT:-bench/results/gpu}"
[ "$mode" = "--cpu-dry" ] && res="$(mktemp -d)/gpu"
mkdir -p "$res"
log="$res/gpu_checks.log"
: > "$log"
PY="${PYTHON:-python3}"
if [ -d .whl ] && [ "$mode" != "--cpu-dry" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$log" 2>&1 && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

step() {  # step NAME COMMAND...: run, log, time; never abort the script
  local name="$1"; shift
  local t0=$SECONDS
  echo "=== $name: $*" | tee -a "$log"
  "$@" >>"$log" 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$log"
}

step env $PY -c "
import torch, transformers, accelerate, importlib.util as u
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)
print('transformers', transformers.__version__, 'accelerate', accelerate.__version__)
print('trl', __import__('trl').__version__ if u.find_spec('trl') else None)
"
if [ "$mode" = "--cpu-dry" ]; then
  [ -n "${SKIP_TRAIN_STEP:-}" ] || step train_step $PY bench/train_step.py --quick --out-prefix "$res/train_step_cpu_dry"
  loop_sizes=(iterations=1 prompts_per_iteration=16 eval.prompts=8 eval.samples=2)
else
  nvidia-smi >>"$log" 2>&1
  # 128 pairs x 4 configs x 1 repeat: the default 256 x 2 ran past a 450 s limit on an H100 (2026-11-27).
  step train_step $PY bench/train_step.py --device cuda --repeats 1 --pairs 128 --out-prefix "$res/train_step_cuda"
  loop_sizes=(iterations=2)
fi
for method in selm iterative_dpo; do
  step "loop_$method" $PY - "$res/loop_$method" "$method" "${loop_sizes[@]}" <<'EOF'
import json, sys, time
import torch
from selfalign.cli import main
out, method, *sizes = sys.argv[1:]
if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
rc = main(["run", "quickstart", f"method={method}", f"output_dir={out}", *sizes, "--no-progress"])
record = {"method": method, "exit": rc, "wall_s": round(time.perf_counter() - t0, 1),
          "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
          "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None}
print(json.dumps(record))
with open(f"{out}.json", "w") as f:
    json.dump(record, f, indent=1)
EOF
done
if [ "$mode" = "--cpu-dry" ]; then
  step memory $PY bench/memory.py --device cpu --shape cpu-tiny --cases 1 --out-prefix "$res/memory_cpu_dry"
else
  step memory $PY bench/memory.py --device cuda --shape qwen2-0.5b --out-prefix "$res/memory_cuda"
fi
echo "results in $res"
