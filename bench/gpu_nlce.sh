#!/usr/bin/env bash
# NLCE's cost on a GPU for every architecture in one run: the figures of docs/nlce.md ("Schedules and their cost")
# and docs/nlce-joint-attention.md ("Cost"). Real architectures at full size and depth, random weights (full-depth
# Flux needs about 30 GB of GPU memory in bf16). PYTHON picks the interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")"
py="${PYTHON:-python}"
run() { echo "### bench_nlce.py $*"; "$py" bench_nlce.py --device cuda --repeats 3 "$@" 2>&1 | grep -v '^\[transformers\]'; }
run --family sd1 --latent 64 --steps 10 --dtype float16
run --family sd1 --latent 64 --steps 10 --dtype float16 --suppression scale
run --family sdxl --latent 128 --steps 10 --dtype float16
run --family flux --depth 19 --single 38 --latent 64 --text-len 512 --steps 8 --dtype bfloat16
run --family sd3 --depth 24 --latent 64 --text-len 256 --steps 8 --dtype bfloat16
echo "### profile_nlce.py (host reads and GPU time)"
"$py" profile_nlce.py --family sd1 --latent 64 --steps 4 --dtype float16 --top 8 2>&1 | grep -v '^\[transformers\]'
"$py" profile_nlce.py --family flux --depth 19 --single 38 --latent 64 --text-len 512 --steps 2 --dtype bfloat16 --top 8 \
    2>&1 | grep -v '^\[transformers\]'
