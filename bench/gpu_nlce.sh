#!/usr/bin/env bash
# NLCE's cost on a GPU for every architecture in one run: the figures of docs/nlce.md ("Schedules and their cost",
# "Compiled") and docs/nlce-joint-attention.md ("Cost"). Real architectures at full size and depth, random weights
# (full-depth Flux needs about 30 GB of GPU memory in bf16). PYTHON picks the interpreter (default: python).
# Eager rows first, then torch.compile rows for SD1.5 (inductor, and CUDA graphs through mode reduce-overhead: vanilla
# and single-pass; compiling a larger denoiser takes minutes); every row has a time limit (550 s in all, under ten
# minutes with the start), so that a slow row costs only itself.
set -uo pipefail
cd "$(dirname "$0")"
py="${PYTHON:-python}"
start=$SECONDS
run() {  # run LIMIT ARGS...: one bench_nlce.py row, at most LIMIT seconds
    local limit=$1; shift
    echo "### bench_nlce.py $* (limit ${limit}s, at $((SECONDS - start))s)"
    timeout "$limit" "$py" bench_nlce.py --device cuda "$@" 2>&1 | grep -v '^\[transformers\]\|There are modules' \
        || echo "### (row ended: status ${PIPESTATUS[0]})"
}
"$py" -c "import torch; print('###', torch.cuda.get_device_name(0), 'torch', torch.__version__, 'CUDA', torch.version.cuda)"
run 45 --family sd1 --latent 64 --steps 10 --repeats 3 --dtype float16
run 45 --family sd1 --latent 64 --steps 10 --repeats 3 --dtype float16 --suppression scale
run 60 --family sdxl --latent 128 --steps 10 --repeats 3 --dtype float16
run 100 --family flux --depth 19 --single 38 --latent 64 --text-len 512 --steps 8 --repeats 3 --dtype bfloat16
run 50 --family sd3 --depth 24 --latent 64 --text-len 256 --steps 8 --repeats 3 --dtype bfloat16
run 120 --family sd1 --latent 64 --steps 10 --repeats 3 --dtype float16 --compile --schedules vanilla,single-pass
run 100 --family sd1 --latent 64 --steps 10 --repeats 3 --dtype float16 --compile --schedules vanilla,single-pass \
    --mode reduce-overhead
echo "### profile_nlce.py (host reads and GPU time, at $((SECONDS - start))s)"
timeout 30 "$py" profile_nlce.py --family sd1 --latent 64 --steps 4 --dtype float16 --top 8 2>&1 | grep -v '^\[transformers\]'
echo "### done in $((SECONDS - start))s"
