"""Benchmark: what the hosts add to the core's training call (the main job inside ComfyUI and A1111).

The core's own time is what the trained patch records (``train_seconds`` + ``report_seconds``); the
host's overhead is the wall time of the host's call minus that: for ComfyUI the Train Erasure Patch
node's ``execute`` on a real ComfyUI CLIP (reading the CLIP's weights, building the training model,
the weights digest, progress), for A1111 the Erasure tab's Train button through the webui's API
(HTTP and queue, reading the loaded model's weights, building the training model, saving). CLIP-L
architecture, random weights, style preset (40 steps), report on, cold encoding cache.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python bench/bench_hosts.py comfy
    A1111_PATH=... A1111_PYTHON=... HIRM_SD15_CHECKPOINT=... python bench/bench_hosts.py a1111
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]


def comfy(steps: int) -> dict:
    comfy_path = os.environ["COMFYUI_PATH"]
    sys.path.insert(0, comfy_path)
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.sd

    from comfy_hirm.nodes_train import TrainErasurePatch
    from test_comfy_server import random_clip_sd

    clip = comfy.sd.load_text_encoder_state_dicts([random_clip_sd(768, 12, 3072)], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
    started = time.perf_counter()
    patch = TrainErasurePatch.execute(clip, "Van Gogh", "random", "", "style", steps == 40, steps, 5e-5, 42).result[0]
    return _overhead(time.perf_counter() - started, patch.metadata)


def a1111(steps: int) -> dict:
    import webui_server as ws
    from pathlib import Path

    from shared_core.patch import read_metadata

    webui_path, python, checkpoint = os.environ["A1111_PATH"], os.environ["A1111_PYTHON"], os.environ["HIRM_SD15_CHECKPOINT"]
    from test_a1111_server import train_through_the_tab  # the Train API call the real-A1111 test makes (needs the variables)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        webui = ws.prepare(webui_path, base, checkpoint, config={"live_previews_enable": False})
        ws.clip_l_hf_cache(base / "hf-home")
        args = ["--skip-torch-cuda-test", "--use-cpu", "all", "--no-half", "--precision", "full", "--api", "--skip-version-check",
                "--skip-python-version-check"]
        env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(base / "hf-home"), "TRANSFORMERS_OFFLINE": "1", "HIRM_CACHE": "off"}
        with ws.running(python, webui, args, env, "A1111", ws.free_port()) as (url, _):
            body = {"prompt": "x", "steps": 1, "width": 64, "height": 64, "override_settings": {"emphasis": "No norm"}}
            ws.post(url + "/sdapi/v1/txt2img", body)  # the model is loaded before the clock starts
            server = {"url": url, "webui": webui}
            started = time.perf_counter()
            status = train_through_the_tab(server, "bench", preset="style", steps=0 if steps == 40 else steps)
            seconds = time.perf_counter() - started
        assert status.startswith("saved"), status
        return _overhead(seconds, read_metadata(str(webui / "models" / "erasure_patches" / "bench.safetensors")))


def _overhead(seconds: float, meta: dict) -> dict:
    core = meta["train_seconds"] + meta["report_seconds"]
    return {"host_seconds": round(seconds, 2), "core_seconds": round(core, 2), "overhead_seconds": round(seconds - core, 2),
            "overhead_ratio": round(seconds / core, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("host", choices=("comfy", "a1111"))
    ap.add_argument("--steps", type=int, default=40, help="style preset: 40")
    args = ap.parse_args()
    os.environ.setdefault("HIRM_CACHE", "off")  # a cold report, as on a model's first run
    result = {"comfy": comfy, "a1111": a1111}[args.host](args.steps)
    print(json.dumps({"host": args.host, "steps": args.steps, **result}, indent=2))


if __name__ == "__main__":
    main()
