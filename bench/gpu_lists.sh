#!/usr/bin/env bash
# Issue #33's GPU figures in one run (docs/hirm-lists.md): HiRM training time for 1 / 100 concepts on a random-weight
# CLIP-L (goal: 100 concepts in <= 5 s of training), at the issue's 5 steps and the style preset's 40, and NLCE sampling
# with 1 / 10 / 100 concepts on the full-size SD1.5 UNet (goal: <= 1.05x one concept), with the operators dispatched.
# Every row has a time limit (about 5 minutes in all with the start). PYTHON picks the interpreter (default: python).
set -uo pipefail
cd "$(dirname "$0")"
py="${PYTHON:-python}"
start=$SECONDS
row() {  # row LIMIT SCRIPT ARGS...: one benchmark, at most LIMIT seconds
    local limit=$1; shift
    echo "### $* (limit ${limit}s, at $((SECONDS - start))s)"
    timeout "$limit" "$py" "$@" 2>&1 | grep -v '^\[transformers\]\|There are modules' || echo "### (row ended: status ${PIPESTATUS[0]})"
}
"$py" -c "import torch; print('###', torch.cuda.get_device_name(0), 'torch', torch.__version__, 'CUDA', torch.version.cuda)"
row 90 bench_scale.py --device cuda --sizes 1,100 --steps 5
row 90 bench_scale.py --device cuda --sizes 1,100 --steps 40
row 110 bench_nlce.py --device cuda --dtype float16 --latent 64 --steps 10 --repeats 3 --lists 1,10,100
echo "### done in $((SECONDS - start))s"
