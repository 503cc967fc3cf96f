"""Starting a real AUTOMATIC1111 or Forge webui headless for the opt-in server tests, and talking to its API.

Nothing is written into the user's checkout: its code is copied into a temporary folder (without
.git, venv, models, outputs, extensions or settings), the checkpoint is linked into the copy's
models/Stable-diffusion, and the extension is installed as a user does, with a plain ``git clone``
of this repository (its committed HEAD) into the copy's ``extensions/``.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what a user's checkout holds besides the webui's code: never copied (and the checkout is never written)
NOT_COPIED = {".git", "venv", "models", "outputs", "extensions", "log", "tmp", "cache", "config_states", "config.json",
              "ui-config.json", "cache.json", "params.txt", "styles.csv"}


def get(url: str, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def post(url: str, body: dict, timeout=600) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        text = e.read().decode()
        try:
            return e.code, json.loads(text)
        except ValueError:
            return e.code, {"message": text}


def image_bytes(out: dict, i: int = 0) -> bytes:
    return base64.b64decode(out["images"][i])


def copy_webui(source: str, dest) -> None:
    """The webui's code (and its prepared repositories/) without what belongs to the user; the shipped small models."""
    shutil.copytree(source, dest, symlinks=True, ignore=lambda folder, names: [
        n for n in names if os.path.samefile(folder, source) and n in NOT_COPIED])
    models = os.path.join(source, "models")
    for folder, _, files in os.walk(models):
        for f in files:  # VAE-approx/model.pt and the placeholders; no user checkpoints
            src = os.path.join(folder, f)
            if not os.path.islink(src) and os.path.getsize(src) < 10_000_000:
                target = os.path.join(dest, "models", os.path.relpath(src, models))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copy2(src, target)


def prepare(source: str, base, checkpoint: str, config: dict | None = None):
    """A copy of the webui in ``base/webui`` with the checkpoint linked and the extension cloned in."""
    webui = base / "webui"
    copy_webui(source, webui)
    for folder in ("Stable-diffusion", "erasure_patches", "Lora"):
        (webui / "models" / folder).mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.abspath(checkpoint), webui / "models" / "Stable-diffusion" / os.path.basename(checkpoint))
    (webui / "extensions").mkdir()
    subprocess.run(["git", "clone", "-q", ROOT, str(webui / "extensions" / "hirm-erasure")], check=True)
    (webui / "config.json").write_text(json.dumps(config or {}))
    return webui


def train_patch(checkpoint: str, path: str, concept: str = "cat", every_encoder: bool = False) -> None:
    """A HiRM patch trained (2 steps) with the project's own API on the checkpoint's CLIP-L, or on every text encoder it
    has (SDXL: CLIP-L and CLIP-G, one patch)."""
    from shared_core.loading import load_text_encoders
    from shared_core.hirm import train_model_patch
    from shared_core.patch import save_patch

    encoders = load_text_encoders(checkpoint, None if every_encoder else ["clip_l"])
    patch = train_model_patch({c: (e.model, e.tokenizer, e.projection) for c, e in encoders.items()}, concepts=[concept],
                              steps=2, report=False)
    save_patch(patch, path)


def train_via_api(python: str, url: str, name: str, preset: str = "object", steps: int = 2, concept: str = "tiger"):
    """The Erasure tab's Train button through the webui's own gradio_client (api_name hirm_erasure_train), run with the
    webui's Python: (status line, report). 0 steps: the preset's."""
    import subprocess

    client = ("import json, sys\nfrom gradio_client import Client\n"
              f"out = Client(sys.argv[1], verbose=False).predict({concept!r}, 'random', '', {preset!r}, {steps}, 42, {name!r}, "
              "False, api_name='/hirm_erasure_train')\nprint(json.dumps(out))")
    done = subprocess.run([python, "-c", client, url + "/"], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    status, report = json.loads(done.stdout.strip().splitlines()[-1])
    return status, report


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(python: str, webui, args: list[str], env: dict, name: str, port: int):
    """Start ``launch.py`` and yield the base URL once the API answers and startup is complete; stop it after."""
    log_path = webui.parent / f"{name}.log"
    log = open(log_path, "w")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", "GRADIO_ANALYTICS_ENABLED": "False", **env}
    env.pop("COMMANDLINE_ARGS", None)  # the launchers append it to sys.argv
    proc = subprocess.Popen([python, "launch.py", *args, "--port", str(port)], cwd=webui, stdout=log,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    started = time.time()
    try:
        while True:
            try:
                get(url + "/sdapi/v1/sd-models")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                assert proc.poll() is None, f"{name} exited ({proc.returncode}):\n" + log_path.read_text()[-5000:]
                assert time.time() - started < 600, f"{name} did not start in 10 minutes:\n" + log_path.read_text()[-3000:]
                time.sleep(2)
        while "Startup time:" not in log_path.read_text() and time.time() - started < 600:
            time.sleep(1)  # the API answers just before the launcher prints its summary
        print(f"{name} started in {time.time() - started:.0f} s")
        yield url, log_path
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(30)
        log.close()
        print(f"\n{name} log: {log_path}")


CLIP_L_CONFIG = {  # openai/clip-vit-large-patch14's text and vision shapes (public); no weights are read from it
    "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 768, "logit_scale_init_value": 2.6592,
    "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
                    "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu", "projection_dim": 768,
                    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "model_type": "clip_text_model"},
    "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
                      "image_size": 224, "patch_size": 14, "hidden_act": "quick_gelu", "projection_dim": 768,
                      "model_type": "clip_vision_model"},
}


def clip_l_hf_cache(hf_home) -> None:
    """An offline Hugging Face cache holding openai/clip-vit-large-patch14's config and tokenizer (what A1111's SD1
    text encoder reads at model load), laid out as huggingface_hub does, from the project's own tokenizer files."""
    from shared_core.tokenizer import write_tokenizer_files

    repo = os.path.join(str(hf_home), "hub", "models--openai--clip-vit-large-patch14")
    revision = "0" * 40
    snapshot = os.path.join(repo, "snapshots", revision)
    os.makedirs(snapshot, exist_ok=True)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(revision)
    with open(os.path.join(snapshot, "config.json"), "w") as f:
        json.dump(CLIP_L_CONFIG, f)
    write_tokenizer_files(snapshot)
