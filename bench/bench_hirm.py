"""Benchmark: HiRM training time on the real CLIP-L architecture (random weights), against the floor.

The floor is measured in the same run: ``steps`` x one forward + backward of the bare
transformers CLIPTextModel with only layer 0 trainable (loss on the final output), no
optimiser. Each part runs in a fresh subprocess so that its peak memory (max RSS) is its own.
The whole ``hirm train`` command (imports, loading a CLIP-L file, training, the text-level
report, writing) is timed twice: with an empty encoding cache (the first run on a model) and
with the cache the first run left (every later run on the same model). Two more floors say what the
whole command cannot go below while it keeps an fp32 text-level report: the imports (Python, torch,
transformers) and one forward pass over the report's prompts (``report_floor_seconds``).

    python bench/bench_hirm.py            # table
    python bench/bench_hirm.py --json     # machine-readable
    python bench/bench_hirm.py --family sdxl   # both SDXL encoders (CLIP-L + OpenCLIP bigG), one patch

SDXL: the floor is the sum of both encoders' floors (each ``steps`` x forward+backward with its
layer 0 trainable). Then, on the text SDXL's UNet reads (both encoders' penultimate rows, 2048
wide, and CLIP-G's projected pooled vector), the same training is compared three ways: the patch
on both encoders, its CLIP-L half alone, its CLIP-G half alone: which moves the target most and
the non-targets least (random weights: read it as the mechanics, not a quality claim).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def clip_l():
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    return CLIPTextModel(config).eval().requires_grad_(False)


def clip_g():
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(1)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                            num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    return CLIPTextModelWithProjection(config).eval().requires_grad_(False)


def floor_seconds(model, steps: int) -> float:
    import torch

    from shared_core.encoders import encoder_layers, text_module
    from shared_core.textenc import tokenize
    from shared_core.tokenizer import clip_tokenizer

    ids = tokenize(clip_tokenizer(), ["Van Gogh"])
    for p in encoder_layers(model)[0].parameters():
        p.requires_grad_(True)
    run = text_module(model) if hasattr(model, "text_projection") else model
    with torch.enable_grad():
        run(input_ids=ids).last_hidden_state.square().mean().backward()  # warm-up
        start = time.perf_counter()
        for _ in range(steps):
            model.zero_grad(set_to_none=True)
            run(input_ids=ids).last_hidden_state.square().mean().backward()
        seconds = time.perf_counter() - start
    for p in encoder_layers(model)[0].parameters():
        p.requires_grad_(False)
    return seconds


def sdxl(steps: int) -> dict:
    """Both SDXL encoders: training against the floor; both halves vs CLIP-L alone vs CLIP-G alone on what the UNet reads."""
    import torch

    from shared_core.hirm import train_model_patch
    from shared_core.report import TextView, view_report
    from shared_core.tokenizer import clip_tokenizer

    l_model, g_model = clip_l(), clip_g()
    floor = floor_seconds(l_model, steps) + floor_seconds(g_model, steps)
    encoders = {"clip_l": (l_model, clip_tokenizer()), "clip_g": (g_model, clip_tokenizer("!"), g_model.text_projection.weight.detach())}
    start = time.perf_counter()
    patch = train_model_patch(encoders, concepts=["Van Gogh"], preset="style", steps=steps, report=False)
    train = time.perf_counter() - start
    view = TextView(encoders)
    keys = ("target_cosine_mean", "target_pooled_cosine_mean", "nontarget_drift_mean", "neighbor_drift_mean")
    compared = {}
    for label, part in (("both", patch), ("clip_l only", patch.part("clip_l")), ("clip_g only", patch.part("clip_g"))):
        report = view_report(view, part.with_deltas(lambda d: d.to(torch.float16)), neighbors=None)
        compared[label] = {k: report[k] for k in keys}
    return {"floor_seconds": round(floor, 2), "train_seconds": round(train, 2), "ratio": round(train / floor, 3),
            "peak_mb": round(peak_mb()), "patch_tensors": patch.tensor_count(), "compared": compared}


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def part_floor(steps: int) -> dict:
    from shared_core.report import BATCH, report_prompt_count
    from shared_core.textenc import encode, tokenize
    from shared_core.tokenizer import clip_tokenizer

    model = clip_l()
    seconds = floor_seconds(model, steps)
    # the report's own floor: one forward pass (batches of report.BATCH) over as many 77-token prompts as it measures
    ids = tokenize(clip_tokenizer(), ["Van Gogh"])

    n = sum(report_prompt_count(clip_tokenizer(), ["Van Gogh"], None, "style"))
    many = ids.expand(n, -1).clone()
    start = time.perf_counter()
    encode(model, many, batch_size=BATCH)
    report_floor = time.perf_counter() - start
    return {"seconds": seconds, "peak_mb": peak_mb(), "report_floor_seconds": report_floor, "report_prompts": n}


def part_imports(steps: int) -> dict:
    """What any run of the command pays before its first tensor: the Python, torch and transformers imports."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import shared_core.cli; from transformers import CLIPTextModel"], check=True,
                   env={**os.environ, "PYTHONPATH": os.path.dirname(HERE)})
    return {"seconds": time.perf_counter() - start}


def part_train(steps: int) -> dict:
    import torch

    from shared_core.hirm import train_patch
    from shared_core.patch import save_patch
    from shared_core.tokenizer import clip_tokenizer

    model, tok = clip_l(), clip_tokenizer()
    train_patch(model, tok, concepts=["Van Gogh"], preset="style", steps=1, report=False)  # warm-up
    start = time.perf_counter()
    patch = train_patch(model, tok, concepts=["Van Gogh"], preset="style", steps=steps, report=False)
    seconds = time.perf_counter() - start
    peak = peak_mb()
    with tempfile.TemporaryDirectory() as tmp:
        size16 = os.path.getsize(save_patch(patch, os.path.join(tmp, "p16.safetensors")))
        size32 = os.path.getsize(save_patch(patch, os.path.join(tmp, "p32.safetensors"), dtype=torch.float32))
    from shared_core.report import text_report

    start = time.perf_counter()
    report32 = text_report(model, tok, patch)
    report_seconds = time.perf_counter() - start
    # does fp16 storage change what the patch does? compare the report with fp16-rounded deltas
    from shared_core.patch import ErasurePatch

    report16 = text_report(model, tok, ErasurePatch({k: v.half() for k, v in patch.deltas.items()}, patch.metadata))
    fp16_change = max(abs(report16[k] - report32[k]) for k in report32 if k.endswith(("_mean", "_max")) and report32[k] is not None)
    return {"seconds": seconds, "peak_mb": peak, "patch_bytes_fp16": size16, "patch_bytes_fp32": size32,
            "report_seconds": report_seconds, "fp16_report_change": fp16_change}


def part_command(steps: int) -> dict:
    """The whole ``hirm train`` command on a CLIP-L file, cold and warm encoding cache (fresh processes)."""
    from safetensors.torch import save_file

    from shared_core.encoders import canonical_parameters

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "clip_l.safetensors")
        save_file({k: v.detach().half().contiguous() for k, v in canonical_parameters(clip_l()).items()}, path)
        env = {**os.environ, "HIRM_CACHE": os.path.join(tmp, "cache"), "PYTHONPATH": os.path.dirname(HERE)}
        for run in ("cold", "warm"):
            target = os.path.join(tmp, f"{run}.safetensors")
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "shared_core.cli", "train", path, "--concept", "Van Gogh", "--preset",
                                   "style", "--steps", str(steps), "--quiet", "--json", "--out", target],
                                  env=env, check=True, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            reported = json.loads(done.stdout)
            out[run] = {"seconds": seconds, "train_seconds": reported["train_seconds"]}
        out["peak_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return out


def run_part(name: str, steps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--part", name, "--steps", str(steps)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40, help="style preset, random method: 40")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--part", choices=("floor", "train", "command", "imports"), help=argparse.SUPPRESS)
    ap.add_argument("--family", choices=("clip-l", "sdxl"), default="clip-l")
    args = ap.parse_args()
    if args.family == "sdxl":
        import torch

        result = sdxl(args.steps) | {"threads": torch.get_num_threads()}
        print(json.dumps(result, indent=2))
        return
    if args.part:
        import torch

        part = {"floor": part_floor, "train": part_train, "command": part_command, "imports": part_imports}[args.part]
        print(json.dumps(part(args.steps) | {"threads": torch.get_num_threads()}))
        return
    floor, train, command = run_part("floor", args.steps), run_part("train", args.steps), run_part("command", args.steps)
    imports = run_part("imports", args.steps)
    result = {"steps": args.steps, "floor_seconds": round(floor["seconds"], 2), "train_seconds": round(train["seconds"], 2),
              "ratio": round(train["seconds"] / floor["seconds"], 3), "train_peak_mb": round(train["peak_mb"]),
              "floor_peak_mb": round(floor["peak_mb"]), "patch_mb_fp16": round(train["patch_bytes_fp16"] / 1e6, 2),
              "patch_mb_fp32": round(train["patch_bytes_fp32"] / 1e6, 2), "report_seconds": round(train["report_seconds"], 2),
              "fp16_vs_fp32_report_max_abs_change": train["fp16_report_change"],
              "command_cold_seconds": round(command["cold"]["seconds"], 2),
              "command_warm_seconds": round(command["warm"]["seconds"], 2),
              "command_cold_ratio": round(command["cold"]["seconds"] / floor["seconds"], 3),
              "command_warm_ratio": round(command["warm"]["seconds"] / floor["seconds"], 3),
              "command_train_seconds": command["warm"]["train_seconds"],
              "command_peak_mb": round(command["peak_mb"]),
              "report_floor_seconds": round(floor["report_floor_seconds"], 2), "report_prompts": floor["report_prompts"],
              "imports_seconds": round(imports["seconds"], 2),
              # the least the whole command can take while it keeps an fp32 report: imports + training + one patched pass
              "command_floor_ratio": round((imports["seconds"] + floor["seconds"] + floor["report_floor_seconds"]) / floor["seconds"], 3),
              "threads": train["threads"]}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"HiRM style preset ({args.steps} steps) on CLIP-L architecture, random weights, CPU, {result['threads']} threads")
    for k, v in result.items():
        print(f"  {k:<16} {v}")


if __name__ == "__main__":
    main()
