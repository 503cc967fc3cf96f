"""HiRM on lists of concepts: training time, the whole command, peak memory and the report, at 1 / 10 / 100 / 1000.

    python bench/bench_scale.py [--sizes 1,10,100,1000] [--steps 5] [--preset style] [--device cpu|cuda]
                                [--preservation auto|0] [--batch-prompts 8] [--step-prompts 16] [--rss-log FILE]

Each size runs ``hirm train`` on a random-weight CLIP-L (the real architecture, written once as a single-file
checkpoint) in its own process, as a user would, with ``--concepts FILE`` (words of CLIP's vocabulary, one per line);
the process's own peak memory (max RSS) is read back with ``os.wait4``, and its anonymous and file-backed resident
memory is sampled every second (Linux), to tell the heap from the mapped checkpoint. Random weights: the report's numbers show the
format and the cost, not what the patch erases; bench/bench_proxy.py measures that on a pretrained encoder.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_checkpoint(path: str) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, ROOT)
    from shared_core.encoders import canonical_parameters

    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"))
    tensors = {"cond_stage_model.transformer." + k: v.detach().contiguous() for k, v in canonical_parameters(model).items()}
    save_file(tensors, path)


def concepts(n: int) -> list[str]:
    sys.path.insert(0, ROOT)
    from shared_core.nlce.mining import vocabulary_words

    words = vocabulary_words()
    step = max(1, len(words) // n)
    return words[::step][:n]


def run(checkpoint: str, folder: str, n: int, args) -> dict:
    listing = os.path.join(folder, f"concepts-{n}.txt")
    with open(listing, "w", encoding="utf-8") as f:
        f.write("\n".join(concepts(n)) + "\n")
    out = os.path.join(folder, f"patch-{n}.safetensors")
    cmd = [sys.executable, "-m", "shared_core", "train", checkpoint, "--concepts", listing, "--preset", args.preset, "--steps",
           str(args.steps), "--device", args.device, "--batch-prompts", str(args.batch_prompts), "--step-prompts",
           str(args.step_prompts), "--out", out, "--force", "--json"]
    if args.preservation != "auto":
        cmd += ["--preservation", args.preservation]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = {"RssAnon": 0.0, "RssFile": 0.0}
    sampler = threading.Thread(target=sample_rss, args=(proc.pid, peaks, start, args.rss_log and f"{args.rss_log}.{n}"),
                               daemon=True)
    sampler.start()
    stdout = proc.stdout.read()
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    sampler.join()
    if status != 0:
        raise SystemExit(f"n={n}: hirm train failed: {stderr.strip().splitlines()[-1] if stderr.strip() else status}")
    result = json.loads(stdout)
    return {"n": n, "train": result["train_seconds"], "command": seconds, "rss_gb": usage.ru_maxrss / 1e6,
            "anon_gb": peaks["RssAnon"], "file_gb": peaks["RssFile"], "report": result["report"]}


def sample_rss(pid: int, peaks: dict, start: float, log_path: str | None) -> None:
    """Every second until ``pid`` ends: its anonymous (heap, tensors) and file-backed (mapped files) resident memory, the
    peaks kept in ``peaks`` (GB) and, with ``--rss-log``, every sample written (seconds, RssAnon, RssFile). Linux only:
    elsewhere the peaks stay 0."""
    log = open(log_path, "w") if log_path else None
    try:
        while True:
            try:
                with open(f"/proc/{pid}/status") as f:
                    now = {ln.split(":")[0]: int(ln.split()[1]) / 1e6 for ln in f if ln.startswith(tuple(peaks))}
            except (OSError, ValueError, IndexError):
                return
            if not now:
                return
            for key, value in now.items():
                peaks[key] = max(peaks[key], value)
            if log:
                log.write(f"{time.perf_counter() - start:.0f} {now.get('RssAnon', 0):.3f} {now.get('RssFile', 0):.3f}\n")
                log.flush()
            time.sleep(1)
    finally:
        if log:
            log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,10,100,1000")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--preset", default="style")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preservation", default="auto", help="auto (off for one concept, on for several), or a weight")
    ap.add_argument("--rss-log", help="write each run's memory samples (seconds, RssAnon GB, RssFile GB) to FILE.<size>")
    ap.add_argument("--batch-prompts", type=int, default=8)
    ap.add_argument("--step-prompts", type=int, default=16, help="prompts of the list a step trains (0: all, every step)")
    args = ap.parse_args()
    import torch

    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU, {os.cpu_count()} cores"
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = os.path.join(folder, "clip-l.safetensors")
        write_checkpoint(checkpoint)
        rows = [run(checkpoint, folder, int(n), args) for n in args.sizes.split(",")]
    print(f"hirm train --concepts FILE, CLIP-L architecture with random weights, {args.preset} preset, {args.steps} steps, "
          f"{args.batch_prompts} prompts per batch, {args.step_prompts or 'all'} per step, preservation {args.preservation}; "
          f"{device}, torch {torch.__version__}")
    first = rows[0]["train"]
    print(f"{'concepts':>8} {'training':>10} {'x one':>7} {'command':>9} {'peak RSS':>9} {'anon':>6} {'file':>6}  "
          f"{'target cos':>10} {'worst':>7} {'non-target':>10} {'neighbour':>9}  least erased")
    for r in rows:
        rep = r["report"]
        worst = ", ".join(f"{c} {v:.3f}" for c, v, _ in (rep.get("per_concept") or [])[:3])
        print(f"{r['n']:>8} {r['train']:>9.1f}s {r['train'] / first:>6.1f}x {r['command']:>8.1f}s {r['rss_gb']:>8.2f}G "
              f"{r['anon_gb']:>5.2f}G {r['file_gb']:>5.2f}G  "
              f"{rep['target_cosine_mean']:>10.4f} {rep['target_cosine_max']:>7.4f} {rep['nontarget_drift_mean'] or 0:>10.4f} "
              f"{rep['neighbor_drift_mean'] or 0:>9.4f}  {worst}")


if __name__ == "__main__":
    main()
