#!/usr/bin/env bash
# GPU check: the vLLM scorer, the pipeline, the embedders, the GPU index and SFT measured on one CUDA GPU in
# under 8 minutes, printed as one table (also written to benchmarks/gpu/results/check.{json,md}).
# Needs only this repository set up with `DEITA_RAY_EXTRA=gpu bash scripts/setup.sh`; no model hub.
#   bash benchmarks/gpu/check.sh                     # everything
#   bash benchmarks/gpu/check.sh --peak-tflops 989   # a GPU the peak table does not know
#   bash benchmarks/gpu/check.sh --help              # all options (sizes, sections, time budget)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
# The models are bundled: nothing may wait on a hub the machine cannot reach.
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
exec "$PY" benchmarks/gpu/check.py "$@"
