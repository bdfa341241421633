#!/usr/bin/env bash
# The one prepared benchmark for a lent GPU (one H100/H200, under 8 minutes): SD2-base's architecture with
# random weights at 512 px bf16 through cxrdiff's own prepare, finetune step, sample and ground; peak GPU
# memory for each. Writes $OUT/gpu_bench.json and $OUT/gpu_bench.md (OUT defaults to bench/results).
#
#   bash bench/gpu.sh            # on the GPU machine
#   bash bench/gpu.sh --quick    # the same code on the tiny model at 64 px: a check that runs on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# 470 s hard stop; training configurations stop starting after 400 s so that the results are written in time
timeout --signal=INT --kill-after=20 470 "$PYTHON" bench/gpu_bench.py --out "$OUT" --budget-s 400 "$@"
