"""Where NLCE's time goes on a GPU: torch.profiler over one vanilla and one single-pass sampling run.

    python bench/profile_nlce.py --family sd1|sdxl|flux|sd3 [bench_nlce.py's model options]

Prints, for each run, the wall time, the count of host synchronisations (``aten::item``, ``aten::is_nonzero``,
``cudaStreamSynchronize``, ``cudaMemcpy*`` to the host) and the operators with the most GPU time. Random weights.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from bench_nlce import TEXT_LEN, build, sample

SYNCS = ("aten::item", "aten::is_nonzero", "aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaMemcpyAsync",
         "cudaDeviceSynchronize")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=("sd1", "sdxl", "flux", "sd3"), default="sd1")
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--single", type=int, default=None)
    ap.add_argument("--text-len", type=int, default=128)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    TEXT_LEN[0] = args.text_len
    torch.set_grad_enabled(False)
    from torch.profiler import ProfilerActivity, profile

    from shared_core.nlce import apply_nlce

    joint = args.family in ("flux", "sd3")
    with torch.device("cuda") if joint else contextlib.nullcontext():
        pipe = build("cuda", args.latent, args.family, args.depth, args.single)
    pipe.to(dtype=getattr(torch, args.dtype))
    sample(pipe, 1, args.latent)  # warm-up
    for mode in ("vanilla", "single-pass"):
        with contextlib.ExitStack() as stack:
            if mode != "vanilla":
                stack.enter_context(apply_nlce(pipe, ["cat"], ["dog", "tiger"], live_floor=1.0))
                sample(pipe, 1, args.latent)  # warm the operators
            start = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                sample(pipe, args.steps, args.latent)
            wall = time.perf_counter() - start
        events = prof.key_averages()
        syncs = {e.key: e.count for e in events if e.key in SYNCS}
        print(f"== {mode}: {wall:.2f} s for {args.steps} steps (profiled); host syncs: {syncs}")
        print(events.table(sort_by="self_device_time_total", row_limit=args.top, max_name_column_width=48))


if __name__ == "__main__":
    main()
