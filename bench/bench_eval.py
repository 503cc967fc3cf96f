"""Benchmark: what ``hirm eval`` adds to rendering (scoring, writing each image and record, the text-level report,
the outputs), on the tiny test pipeline (random weights, CPU).

    python bench/bench_eval.py [--steps 4] [--size 32] [--nudenet]

Prints rendering seconds, each added part, and ``overhead_ratio`` = added / rendering (goal: at most 0.10).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "tests")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--nudenet", action="store_true", help="score with NudeNet too")
    args = ap.parse_args()
    from tiny_pipeline import tiny_pipeline

    from shared_core.cli import main as hirm
    from shared_core.hirm import train_patch
    from shared_core.patch import save_patch

    with tempfile.TemporaryDirectory() as tmp:
        pipe = tiny_pipeline(seed=4)
        pipe.save_pretrained(os.path.join(tmp, "model"))
        patch = save_patch(train_patch(pipe.text_encoder, pipe.tokenizer, concepts=["cat"], steps=3, report=False),
                           os.path.join(tmp, "cat.safetensors"))
        out = os.path.join(tmp, "eval")
        argv = ["eval", os.path.join(tmp, "model"), "--concept", "cat", "--patch", patch, "--nlce", "--out", out, "--steps",
                str(args.steps), "--size", str(args.size), "--quiet"] + (["--nudenet"] if args.nudenet else [])
        assert hirm(argv) == 0
        with open(os.path.join(out, "metrics.json")) as f:
            metrics = json.load(f)
    timing = metrics["timing"]
    print(json.dumps({"images": len(metrics["cases"]), "steps": args.steps, "size": args.size, "nudenet": args.nudenet,
                      **{k: timing[k] for k in sorted(timing) if k.startswith("this_run") or k == "overhead_ratio"}}, indent=2))


if __name__ == "__main__":
    main()
