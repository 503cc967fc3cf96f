"""The A1111/Forge extension inside a real Stable Diffusion WebUI Forge server, headless on CPU.

Opt-in (a minute or two, and a 2 GB SD1.5 checkpoint): set FORGE_PATH to a Forge checkout that
has been prepared once (its ``repositories/`` holds huggingface_guess, stable-diffusion-webui-assets
and BLIP at the commits its launch_utils.py pins), FORGE_PYTHON to a Python with Forge's
requirements (requirements_versions.txt, torch/torchvision, and the ``clip`` module Forge's
launcher checks for), and HIRM_SD15_CHECKPOINT to a single-file SD1.5 checkpoint (random
weights are fine), and run with the repository's own Python, e.g.:
    FORGE_PATH=/path/to/stable-diffusion-webui-forge FORGE_PYTHON=/path/to/forge-venv/bin/python \\
    HIRM_SD15_CHECKPOINT=/tmp/hirm-comfy-models/checkpoints/v1-5-pruned-emaonly.safetensors \\
        python -m pytest tests/test_forge_server.py -s
Nothing is written into FORGE_PATH: its code is copied into a temporary folder (without .git,
venv, models, outputs, extensions or settings), the checkpoint is linked into the copy's
models/Stable-diffusion, and the extension is installed as a user does, with a plain
``git clone`` of this repository (its committed HEAD) into the copy's ``extensions/``.
The server is started with ``launch.py --always-cpu --api`` on a free local port (no
--skip-prepare-environment: Forge runs the extensions' install.py as at any start). Forge's
ControlNet and legacy-preprocessor extensions are turned off in the copy's config.json: their
installers pip-install unpinned packages (mediapipe, onnxruntime, ...) into FORGE_PYTHON and from
GitHub release URLs. A patch for "cat" is trained on the checkpoint's CLIP-L with the project's
own API (two steps) and put in models/erasure_patches. Then, through /sdapi/v1/txt2img
(64 px, 2 steps, Euler): a plain job; the patch at strength 1; NLCE; a missing patch (the job
fails with the one-line message); and the plain job again, whose image must be byte-identical
to the first (the model was restored exactly).
"""

import json
import os
import re
import time

import pytest
import webui_server as ws

FORGE = os.environ.get("FORGE_PATH")
FORGE_PYTHON = os.environ.get("FORGE_PYTHON")
CHECKPOINT = os.environ.get("HIRM_SD15_CHECKPOINT")
if not (FORGE and FORGE_PYTHON and CHECKPOINT):
    pytest.skip("set FORGE_PATH (a Forge checkout), FORGE_PYTHON (a Python with Forge's requirements) and "
                "HIRM_SD15_CHECKPOINT (an SD1.5 checkpoint file) to run the extension in a headless Forge server",
                allow_module_level=True)

PATCH = "cat.safetensors"
# builtin extensions whose installers pip-install unpinned packages and GitHub release wheels
DISABLED = ["forge_legacy_preprocessors", "sd_forge_controlnet"]
REPOSITORIES = ("huggingface_guess", "stable-diffusion-webui-assets", "BLIP")


def erasure_args(patch="None", strength=1.0, nlce=False, concepts="", neighbors="", schedule="single-pass"):
    """The accordion's values in the order of a1111_extension/settings.py UI_ARGS."""
    return [True, patch, strength, "None", 1.0, "None", 1.0, nlce, concepts, neighbors, "object", 1.0, 1.0, schedule]


MODEL = {"sd_model_checkpoint": os.path.basename(CHECKPOINT)}  # the SDXL cases, run last, switch it


def _txt2img(url: str, erasure=None, seed=1234, prompt="a cat on a sofa") -> tuple[int, dict]:
    body = {"prompt": prompt, "negative_prompt": "", "steps": 2, "width": 64, "height": 64,
            "sampler_name": "Euler", "scheduler": "Automatic", "cfg_scale": 7, "seed": seed, "batch_size": 1, "n_iter": 1,
            "override_settings": dict(MODEL)}
    if erasure is not None:
        body["alwayson_scripts"] = {"Erasure": {"args": erasure}}
    return ws.post(url + "/sdapi/v1/txt2img", body)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    missing = [r for r in REPOSITORIES if not os.path.isdir(os.path.join(FORGE, "repositories", r))]
    if missing:
        pytest.skip(f"{FORGE}/repositories lacks {', '.join(missing)}: start this Forge once with network access "
                    "(its launcher clones them), or clone them at the commits modules/launch_utils.py pins")
    assert os.path.isfile(CHECKPOINT), f"HIRM_SD15_CHECKPOINT={CHECKPOINT} is not a file"
    base = tmp_path_factory.mktemp("forge-server")
    webui = ws.prepare(FORGE, base, CHECKPOINT, {"disabled_extensions": DISABLED, "live_previews_enable": False})  # (SDXL previews: a download)
    ws.train_patch(CHECKPOINT, str(webui / "models" / "erasure_patches" / PATCH))
    args = ["--always-cpu", "--api", "--server-name", "127.0.0.1", "--skip-python-version-check", "--skip-torch-cuda-test",
            "--skip-version-check", "--log-startup"]
    with ws.running(FORGE_PYTHON, webui, args, {"HF_HUB_OFFLINE": "1", "HF_HOME": str(base / "hf-home")}, "Forge",
                    ws.free_port()) as (url, log_path):
        yield {"url": url, "log": log_path, "startup": log_path.read_text(), "webui": webui}


def test_forge_installs_and_loads_the_extension_without_errors(server):
    text = server["startup"]
    assert "Startup time:" in text, text[-3000:]
    installers = text.split("run extensions installers:")[1].split("run extensions_builtin installers:")[0]
    assert re.search(r"hirm-erasure: done in", installers), text[:3000]  # install.py ran
    assert re.search(r"hirm_erasure\.py: done in", text), text[-3000:]  # scripts/hirm_erasure.py loaded
    assert "for the hirm-erasure extension" not in text  # install.py had nothing to install: Forge brings both packages
    pack = re.compile(r"hirm|a1111_extension|shared_core|comfy_hirm", re.I)
    assert not [line for line in text.splitlines() if pack.search(line) and re.search(r"Traceback|Error|Warning", line, re.I)]
    tracebacks = [t.split("\n\n")[0].split("\n---")[0] for t in text.split("Traceback (most recent call last):")[1:]]
    assert not [t for t in tracebacks if pack.search(t)], "\n".join(t for t in tracebacks if pack.search(t))[-3000:]
    scripts = ws.get(server["url"] + "/sdapi/v1/scripts")
    assert "erasure" in scripts["txt2img"] and "erasure" in scripts["img2img"], scripts
    info = [s for s in ws.get(server["url"] + "/sdapi/v1/script-info") if s["name"] == "erasure"]
    assert sorted(s["is_img2img"] for s in info) == [False, True] and all(s["is_alwayson"] for s in info), info
    assert all(len(s["args"]) == 14 for s in info), info  # UI_ARGS
    config = ws.get(server["url"] + "/config")
    tabs = [c["props"].get("label") for c in config["components"] if c.get("type") == "tabitem"]
    assert "Erasure" in tabs, tabs  # the training tab was built


def test_jobs_through_the_api(server):
    url, results = server["url"], {}

    def run(name, erasure=None):
        started = time.time()
        status, out = _txt2img(url, erasure)
        print(f"{name}: HTTP {status} in {time.time() - started:.1f} s")
        results[name] = (status, out)
        return status, out

    # a: plain
    status, plain = run("a plain")
    assert status == 200, plain
    plain_image = ws.image_bytes(plain)
    assert json.loads(plain["info"])["seed"] == 1234

    # b: the patch at strength 1
    status, out = run("b patch", erasure_args(PATCH, 1.0))
    assert status == 200, out
    info = json.loads(out["info"])
    assert info["extra_generation_params"].get("Erasure patches") == f"{PATCH}:1", info["extra_generation_params"]
    assert f'Erasure patches: "{PATCH}:1"' in info["infotexts"][0], info["infotexts"][0]  # quoted: it holds a colon
    assert ws.image_bytes(out) != plain_image

    # c: NLCE
    status, out = run("c nlce", erasure_args(nlce=True, concepts="cat", neighbors="dog"))
    assert status == 200, out
    params = json.loads(out["info"])["extra_generation_params"]
    assert params.get("Erasure NLCE") == "cat" and params.get("Erasure NLCE neighbors") == "dog", params
    assert params.get("Erasure NLCE schedule") == "single-pass", params
    assert ws.image_bytes(out) != plain_image

    # d: a patch that is not there: the job fails with one line naming it, nothing is generated
    status, out = run("d missing patch", erasure_args("missing.safetensors", 1.0))
    assert status == 500 and "images" not in out, out
    assert out.get("error") == "HirmError", out
    assert "missing.safetensors" in out["message"] and "\n" not in out["message"], out

    # e: plain again: the model was restored exactly
    status, again = run("e plain again")
    assert status == 200, again
    assert ws.image_bytes(again) == plain_image


def _pixels(out: dict) -> bytes:
    import io

    from PIL import Image

    return Image.open(io.BytesIO(ws.image_bytes(out))).convert("RGB").tobytes()


def test_the_api_forms_the_settings_the_xyz_axes_and_the_train_button(server):
    """What issue 12 asked of Forge too: a shorter list or names (missing arguments take their defaults: Forge fills
    them with nulls), errors without the server's path, the Settings section, the X/Y/Z axes, the Train API."""
    url = server["url"]
    results = [_txt2img(url, args) for args in (erasure_args(PATCH, 0.8), [True, PATCH, 0.8],
                                                [{"patch_1": PATCH, "strength_1": 0.8}])]
    assert all(status == 200 for status, _ in results), results
    assert len({_pixels(out) for _, out in results}) == 1
    status, out = _txt2img(url, [True, "gone.safetensors", 1.0])
    print(f"missing patch: HTTP {status}: {json.dumps(out)[:300]}")
    assert status == 500 and "erasure patch 'gone.safetensors' is not in models/erasure_patches" in out["message"]
    assert str(server["webui"]) not in json.dumps(out)
    options = ws.get(url + "/sdapi/v1/options")
    assert {"erasure_patch_folder", "erasure_default_strength", "erasure_nlce_preset", "erasure_nlce_schedule"} <= set(options)
    config = ws.get(url + "/config", timeout=60)
    x_type = [c for c in config["components"] if c.get("props", {}).get("elem_id") == "script_txt2img_xyz_plot_x_type"]
    choices = [c[0] if isinstance(c, list) else c for c in x_type[0]["props"]["choices"]]
    assert {"[Erasure] patch 1 strength", "[Erasure] NLCE", "[Erasure] NLCE beta", "[Erasure] NLCE gamma"} <= set(choices)
    status_line, report = ws.train_via_api(FORGE_PYTHON, url, "api-tiger")
    print(f"train via gradio api: {status_line}")
    assert status_line == "saved models/erasure_patches/api-tiger.safetensors" and "target displacement" in report
    status, out = _txt2img(url, [True, "api-tiger.safetensors", 1.0])
    assert status == 200, out


# ---------------------------------------------------------------------------------------------- SDXL (runs last)

SDXL = os.environ.get("HIRM_SDXL_CHECKPOINT")


def test_sdxl_a_both_encoder_patch_and_nlce_in_forge_and_the_plain_image_after_each(server):
    """An SDXL checkpoint (random weights): a patch trained on it changes both encoders, NLCE reads its 2048-wide rows;
    the plain image is byte-identical after each job."""
    if not SDXL:
        pytest.skip("set HIRM_SDXL_CHECKPOINT (a single-file SDXL base checkpoint) for the SDXL cases")
    from shared_core.loading import load_text_encoders
    from shared_core.hirm import train_model_patch
    from shared_core.patch import save_patch

    url, webui = server["url"], server["webui"]
    name = os.path.basename(SDXL)
    os.symlink(os.path.abspath(SDXL), webui / "models" / "Stable-diffusion" / name)
    encoders = load_text_encoders(SDXL)
    patch = train_model_patch({c: (e.model, e.tokenizer, e.projection) for c, e in encoders.items()}, concepts=["cat"], steps=1,
                              report=False)
    save_patch(patch, str(webui / "models" / "erasure_patches" / "xl-cat.safetensors"))
    del encoders
    assert ws.post(url + "/sdapi/v1/refresh-checkpoints", {})[0] == 200
    MODEL["sd_model_checkpoint"] = name
    assert ws.post(url + "/sdapi/v1/options", MODEL)[0] == 200  # the server's model from now on (the Train tab uses it)
    status, plain = _txt2img(url)
    assert status == 200, plain
    for label, args in (("patch", [True, "xl-cat.safetensors", 1.0]),
                        ("nlce", erasure_args(nlce=True, concepts="cat", neighbors="dog")),
                        ("both", [{"patch_1": "xl-cat.safetensors", "nlce": True, "concepts": "cat"}])):
        started = time.time()
        status, out = _txt2img(url, args)
        print(f"SDXL {label}: HTTP {status} in {time.time() - started:.1f} s {out.get('message', '')}")
        assert status == 200, out
        if label == "patch":
            assert ws.image_bytes(out) != ws.image_bytes(plain)
        status, again = _txt2img(url)
        assert status == 200 and ws.image_bytes(again) == ws.image_bytes(plain), label
    from shared_core.patch import load_patch

    status_line, report = ws.train_via_api(FORGE_PYTHON, url, "xl-tiger", steps=1)  # the Train tab on SDXL: both encoders
    assert status_line == "saved models/erasure_patches/xl-tiger.safetensors" and "pooled (CLIP-G)" in report, status_line
    assert load_patch(str(webui / "models" / "erasure_patches" / "xl-tiger.safetensors")).components == ["clip_l", "clip_g"]
