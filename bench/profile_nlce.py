"""Where NLCE's time goes: torch.profiler over one vanilla and one single-pass sampling run.

    python bench/profile_nlce.py --family sd1|sdxl|flux|sd3 [bench_nlce.py's model options] [--device cpu]

Prints, for each run, the wall time, the count of host synchronisations (``aten::item``, ``aten::is_nonzero``,
``aten::nonzero``, ``cudaStreamSynchronize``, ``cudaMemcpy*`` to the host), how many operators were dispatched (what a
launch-bound GPU pays for) and the operators with the most GPU (or, on ``--device cpu``, CPU) time. Random weights.
On a CPU nothing waits at a "sync", but the counts are the same as on a GPU: a way to check them without one.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from bench_nlce import TEXT_LEN, build, sample

SYNCS = ("aten::item", "aten::is_nonzero", "aten::nonzero", "aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaMemcpyAsync",
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
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--narrow", action="store_true", help="every block and layer at a tiny width (as bench_nlce.py)")
    args = ap.parse_args()
    TEXT_LEN[0] = args.text_len
    torch.set_grad_enabled(False)
    from torch.profiler import ProfilerActivity, profile

    from shared_core.adapters import apply_nlce

    joint = args.family in ("flux", "sd3")
    with torch.device(args.device) if joint else contextlib.nullcontext():
        pipe = build(args.device, args.latent, args.family, args.depth, args.single, args.narrow)
    pipe.to(dtype=getattr(torch, args.dtype))
    sample(pipe, 1, args.latent)  # warm-up
    for mode in ("vanilla", "single-pass"):
        with contextlib.ExitStack() as stack:
            if mode != "vanilla":
                stack.enter_context(apply_nlce(pipe, ["cat"], ["dog", "tiger"], live_floor=1.0))
                sample(pipe, 1, args.latent)  # warm the operators
            start = time.perf_counter()
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
            with profile(activities=activities) as prof:
                sample(pipe, args.steps, args.latent)
            wall = time.perf_counter() - start
        events = prof.key_averages()
        syncs = {e.key: e.count for e in events if e.key in SYNCS}
        ops = sum(e.count for e in events if e.key.startswith("aten::"))
        print(f"== {mode}: {wall:.2f} s for {args.steps} steps (profiled); aten operators: {ops}; host syncs: {syncs}")
        sort = "self_device_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
        print(events.table(sort_by=sort, row_limit=args.top, max_name_column_width=48))


if __name__ == "__main__":
    main()
