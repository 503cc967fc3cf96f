"""The extension inside a real AUTOMATIC1111 webui (v1.10.1), headless on CPU, through its HTTP API.

Opt-in (a few minutes, and a 2 GB SD1.5 checkpoint): set A1111_PATH to an A1111 checkout whose
``repositories/`` holds the five repositories its launch_utils.py pins, at those commits (see
docs/a1111.md), A1111_PYTHON to a Python with its requirements (torch/torchvision,
requirements_versions.txt, setuptools 69.5.1 and ``clip-anytorch``), and HIRM_SD15_CHECKPOINT to a
single-file SD1.5 checkpoint (random weights are fine), and run with the repository's own Python:
    A1111_PATH=/path/to/stable-diffusion-webui A1111_PYTHON=/path/to/a1111-venv/bin/python \\
    HIRM_SD15_CHECKPOINT=/path/to/v1-5-pruned-emaonly.safetensors python -m pytest tests/test_a1111_server.py -s
The webui is copied (tests/webui_server.py), the extension installed with ``git clone`` of this
repository's HEAD into ``extensions/`` (A1111 runs its install.py at start), an offline Hugging Face
cache with CLIP-L's config and tokenizer is laid out for the model load, and the server is
started with ``launch.py --api --use-cpu all --no-half --precision full`` on a free local port.
Random weights make A1111's default emphasis ("Original") divide by a mean near 0, so the jobs
set ``emphasis: No norm``.
"""

import json
import os
import re
import shutil
import subprocess
import time

import pytest
import webui_server as ws

A1111 = os.environ.get("A1111_PATH")
PYTHON = os.environ.get("A1111_PYTHON")
CHECKPOINT = os.environ.get("HIRM_SD15_CHECKPOINT")
if not (A1111 and PYTHON and CHECKPOINT):
    pytest.skip("set A1111_PATH (an A1111 checkout), A1111_PYTHON (a Python with its requirements) and "
                "HIRM_SD15_CHECKPOINT (an SD1.5 checkpoint file) to run the extension in a headless A1111 server",
                allow_module_level=True)

PATCH, OTHER = "cat.safetensors", "styles/dog.safetensors"
REPOSITORIES = ("stable-diffusion-stability-ai", "generative-models", "k-diffusion", "BLIP", "stable-diffusion-webui-assets")
SETTINGS = {"emphasis": "No norm", "sd_model_checkpoint": os.path.basename(CHECKPOINT)}


def erasure_args(patch="None", strength=1.0, nlce=False, concepts="", neighbors="", schedule="single-pass", patch2="None",
                 strength2=1.0, patch3="None", strength3=1.0):
    """The accordion's values in the order of a1111_extension/settings.py UI_ARGS."""
    return [True, patch, strength, patch2, strength2, patch3, strength3, nlce, concepts, neighbors, "object", 1.0, 1.0, schedule]


def job(url, kind="txt2img", erasure=None, prompt="a cat on a sofa", extra=None):
    body = {"prompt": prompt, "negative_prompt": "", "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler",
            "cfg_scale": 7, "seed": 1234, "batch_size": 1, "n_iter": 1, "override_settings": dict(SETTINGS), **(extra or {})}
    if erasure is not None:
        body["alwayson_scripts"] = {"Erasure": {"args": erasure}}
    started = time.time()
    status, out = ws.post(f"{url}/sdapi/v1/{kind}", body)
    print(f"{kind} {json.dumps(erasure)[:90] if erasure is not None else 'plain'}: HTTP {status} in {time.time() - started:.1f} s")
    return status, out


def train_through_the_tab(server, name: str, with_report: bool = False, preset: str = "object", steps: int = 2):
    """The Train button's API (the webui's own gradio_client): its status line (and the report). 0 steps: the preset's."""
    status, report = ws.train_via_api(PYTHON, server["url"], name, preset, steps)
    return (status, report) if with_report else status


def start_server(tmp_path_factory, checkpoint: str, patches=((PATCH, CHECKPOINT, "cat"), (OTHER, CHECKPOINT, "dog"))):
    """A copy of the A1111 checkout serving ``checkpoint``, with patches (file, trained on, concept) in its patch folder;
    yields what the tests read. The jobs' ``SETTINGS`` name the checkpoint."""
    missing = [r for r in REPOSITORIES if not os.path.isdir(os.path.join(A1111, "repositories", r))]
    if missing:
        pytest.skip(f"{A1111}/repositories lacks {', '.join(missing)}: see docs/a1111.md for preparing an A1111 checkout")
    assert os.path.isfile(checkpoint), f"{checkpoint} is not a file"
    base = tmp_path_factory.mktemp("a1111-server")
    # live previews would fetch the SDXL preview decoder (vaeapprox-sdxl.pt) from GitHub at the first SDXL job
    webui = ws.prepare(A1111, base, checkpoint, config={"live_previews_enable": False,
                                                       "sd_model_checkpoint": os.path.basename(checkpoint)})
    for name, trained_on, concept in patches:
        (webui / "models" / "erasure_patches" / name).parent.mkdir(parents=True, exist_ok=True)
        ws.train_patch(trained_on, str(webui / "models" / "erasure_patches" / name), concept=concept,
                       every_encoder=trained_on != CHECKPOINT)
    ws.clip_l_hf_cache(base / "hf-home")
    args = ["--skip-torch-cuda-test", "--use-cpu", "all", "--no-half", "--precision", "full", "--api", "--skip-version-check",
            "--skip-python-version-check", "--log-startup"]
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(base / "hf-home"), "TRANSFORMERS_OFFLINE": "1"}
    SETTINGS["sd_model_checkpoint"] = os.path.basename(checkpoint)
    with ws.running(PYTHON, webui, args, env, "A1111", ws.free_port()) as (url, log_path):
        yield {"url": url, "log": log_path, "startup": log_path.read_text(), "webui": webui, "hf_home": base / "hf-home",
               "name": os.path.basename(checkpoint)}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from start_server(tmp_path_factory, CHECKPOINT)


def test_a1111_installs_and_loads_the_extension_without_errors(server):
    text = server["startup"]
    assert "Startup time:" in text, text[-3000:]
    pack = re.compile(r"hirm|a1111_extension|shared_core|comfy_hirm", re.IGNORECASE)
    tracebacks = [t.split("\n\n")[0] for t in text.split("Traceback (most recent call last):")[1:]]
    assert not [t for t in tracebacks if pack.search(t)], "\n".join(t for t in tracebacks if pack.search(t))[-3000:]
    assert not [ln for ln in text.splitlines() if pack.search(ln) and re.search(r"error|warning", ln, re.IGNORECASE)]
    scripts = ws.get(server["url"] + "/sdapi/v1/scripts")
    assert "erasure" in scripts["txt2img"] and "erasure" in scripts["img2img"], scripts


def test_txt2img_plain_patch_nlce_both_then_plain_again_is_byte_identical(server):
    url = server["url"]
    status, plain = job(url)
    assert status == 200, plain
    first = ws.image_bytes(plain)
    seen = {first}
    for name, args in (("patch", erasure_args(PATCH, 1.0)), ("half patch", erasure_args(PATCH, 0.5)),
                       ("three slots", erasure_args(PATCH, 1.0, patch2=OTHER, strength2=0.7)),
                       ("nlce", erasure_args(nlce=True, concepts="cat", neighbors="dog")),
                       ("nlce faithful", erasure_args(nlce=True, concepts="cat", neighbors="dog", schedule="faithful")),
                       ("both", erasure_args(PATCH, 1.0, nlce=True, concepts="cat", neighbors="dog"))):
        status, out = job(url, erasure=args)
        assert status == 200, (name, out)
        image = ws.image_bytes(out)
        assert image not in seen, name  # every defence changes the picture, each differently
        seen.add(image)
        status, again = job(url)
        assert status == 200 and ws.image_bytes(again) == first, f"the model was not restored after {name}"


def pixels(out: dict, i: int = 0) -> bytes:
    """The image's pixels (the PNG's text chunks hold the infotext, which differs between an X/Y/Z cell and a job)."""
    import io

    from PIL import Image

    return Image.open(io.BytesIO(ws.image_bytes(out, i))).convert("RGB").tobytes()


def test_the_api_takes_a_short_list_or_names_and_a_missing_patch_is_one_line_without_the_servers_path(server):
    url = server["url"]
    results = [job(url, erasure=args) for args in (erasure_args(PATCH, 0.8), [True, PATCH, 0.8],
                                                   [{"patch_1": PATCH, "strength_1": 0.8}])]
    assert all(status == 200 for status, _ in results), results
    assert len({pixels(out) for _, out in results}) == 1  # the same job, three ways of asking
    status, out = job(url, erasure=[True, "gone.safetensors", 1.0])
    text = json.dumps(out)
    print(f"missing patch: HTTP {status}: {text[:300]}")
    assert status != 200 and "erasure patch 'gone.safetensors' is not in models/erasure_patches" in text
    assert str(server["webui"]) not in text


def test_the_xyz_plot_sweeps_a_patch_strength_cell_by_cell(server):
    url = server["url"]
    config = ws.get(url + "/config", timeout=60)
    x_type = [c for c in config["components"] if c.get("props", {}).get("elem_id") == "script_txt2img_xyz_plot_x_type"]
    choices = [c[0] if isinstance(c, list) else c for c in x_type[0]["props"]["choices"]]
    assert "[Erasure] patch 1 strength" in choices and "[Erasure] NLCE beta" in choices, choices
    _, plain = job(url)
    _, patched = job(url, erasure=erasure_args(PATCH, 1.0))
    # X = patch 1 strength over 0 and 1 (the accordion holds the patch); no Y/Z; lone images after the grid
    xyz = [choices.index("[Erasure] patch 1 strength"), "0, 1", [], 0, "", [], 0, "", [], True, True, False, False,
           False, False, False, 0, False]
    status, out = job(url, erasure=erasure_args(PATCH, 1.0), extra={"script_name": "x/y/z plot", "script_args": xyz})
    assert status == 200, out
    assert len(out["images"]) == 3  # the grid, then the two cells
    assert pixels(out, 1) == pixels(plain) and pixels(out, 2) == pixels(patched)
    _, again = job(url)
    assert pixels(again) == pixels(plain)


def test_the_training_tab_trains_a_patch_through_its_gradio_api_and_the_patch_then_erases(server):
    """The Erasure tab's Train button (api_name hirm_erasure_train) driven by the webui's own gradio_client."""
    started = time.time()
    status, report = train_through_the_tab(server, "api-tiger", with_report=True)
    print(f"train via gradio api in {time.time() - started:.1f} s: {status}")
    assert status == "saved models/erasure_patches/api-tiger.safetensors" and "target displacement" in report
    assert (server["webui"] / "models" / "erasure_patches" / "api-tiger.safetensors").is_file()
    _, plain = job(server["url"], prompt="a tiger")
    status, erased = job(server["url"], prompt="a tiger", erasure=[True, "api-tiger.safetensors", 1.0])
    assert status == 200 and pixels(erased) != pixels(plain)


def test_img2img_hires_fix_and_the_infotext_with_a_patch_and_the_plain_images_after_are_unchanged(server):
    url = server["url"]
    _, source = job(url)
    init = {"init_images": [source["images"][0]], "denoising_strength": 0.6}
    hires = {"enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 1, "denoising_strength": 0.5}
    for kind, extra in (("img2img", init), ("txt2img", hires)):
        _, plain = job(url, kind, extra=extra)
        status, erased = job(url, kind, erasure=erasure_args(PATCH, 1.0), extra=extra)
        assert status == 200, erased
        _, again = job(url, kind, extra=extra)
        assert pixels(erased) != pixels(plain) and ws.image_bytes(again) == ws.image_bytes(plain), kind
        assert 'Erasure patches: "cat.safetensors:1"' in json.loads(erased["info"])["infotexts"][0], kind
    status, info = ws.post(url + "/sdapi/v1/png-info", {"image": "data:image/png;base64," + erased["images"][0]})
    assert status == 200 and info["parameters"].get("Erasure patches") == "cat.safetensors:1", info


def test_the_lora_extension_applies_an_fp32_patch_as_the_erasure_does_and_works_beside_it(server):
    """README's claim: A1111's Lora extension rounds layer 0 to the file's dtype, so an fp32 copy of a patch in
    models/Lora gives the erasure's own image, pixel for pixel; and a LoRA in the prompt works together with a patch."""
    import torch

    from shared_core.patch import load_patch, save_patch

    url, models = server["url"], server["webui"] / "models"
    patch = load_patch(str(models / "erasure_patches" / PATCH))
    for folder in ("Lora", "erasure_patches"):
        save_patch(patch, str(models / folder / "cat32.safetensors"), dtype=torch.float32, overwrite=True)
    assert ws.post(url + "/sdapi/v1/refresh-loras", {})[0] == 200
    _, plain = job(url)
    status, by_lora = job(url, prompt="a cat on a sofa <lora:cat32:1>")
    assert status == 200, by_lora
    _, by_erasure = job(url, erasure=erasure_args("cat32.safetensors", 1.0))
    assert pixels(by_lora) == pixels(by_erasure) and pixels(by_lora) != pixels(plain)
    status, both = job(url, prompt="a cat on a sofa <lora:cat32:1>", erasure=erasure_args(OTHER, 1.0))
    assert status == 200 and pixels(both) not in (pixels(by_lora), pixels(plain)), both.get("errors")
    _, again = job(url)
    assert ws.image_bytes(again) == ws.image_bytes(plain)


def test_the_erasure_tabs_hub_box_takes_a_patch_from_the_hub_cache_offline(server):
    """The download box through gradio_client, with the server offline: a repo laid out in its Hugging Face cache."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = server["hf_home"] / "hub" / "models--org--erasers"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    (repo / "snapshots" / sha).mkdir(parents=True)
    shutil.copyfile(server["webui"] / "models" / "erasure_patches" / PATCH, repo / "snapshots" / sha / "hub-cat.safetensors")
    client = ("import json, sys\nfrom gradio_client import Client\nc = Client(sys.argv[1], verbose=False)\n"
              "print(json.dumps([c.predict('org/erasers', 'hub-cat.safetensors', flag, api_name='/hirm_erasure_pull')"
              " for flag in (False, False, True)]))")
    done = subprocess.run([PYTHON, "-c", client, server["url"] + "/"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    print(f"hub box: rc {done.returncode}: {done.stdout.strip()[-600:]}")
    assert done.returncode == 0, done.stderr[-3000:]
    first, second, replaced = json.loads(done.stdout.strip().splitlines()[-1])
    assert first.startswith("saved models/erasure_patches/hub-cat.safetensors (cat; from org/erasers/hub-cat.safetensors at "
                            "0123456789ab)")
    assert second == "models/erasure_patches/hub-cat.safetensors already exists; tick 'overwrite' to replace it"
    assert replaced.startswith("saved ")
    status, erased = job(server["url"], erasure=[True, "hub-cat.safetensors", 1.0])
    assert status == 200, erased


def test_an_interrupted_job_a_failing_job_and_two_jobs_at_once_leave_the_model_as_it_was(server):
    import threading

    url = server["url"]
    _, plain = job(url)
    _, patched = job(url, erasure=erasure_args(PATCH, 1.0))
    # interrupted in the middle of sampling (a long job, /sdapi/v1/interrupt after a second)
    done = {}
    worker = threading.Thread(target=lambda: done.update(out=job(url, erasure=erasure_args(PATCH, 1.0), extra={"steps": 150})))
    worker.start()
    time.sleep(3)
    assert ws.post(url + "/sdapi/v1/interrupt", {})[0] == 200
    worker.join(600)
    assert done["out"][0] == 200, done
    _, again = job(url)
    assert ws.image_bytes(again) == ws.image_bytes(plain), "the model was not restored after an interrupt"
    # failing after the patches are on: an unknown Hires. fix upscaler raises in p.init, after the scripts' process
    status, failed = job(url, erasure=erasure_args(PATCH, 1.0), extra={"enable_hr": True, "hr_upscaler": "no such upscaler"})
    print(f"failing job: HTTP {status}: {json.dumps(failed)[:200]}")
    assert status != 200
    _, again = job(url)
    assert ws.image_bytes(again) == ws.image_bytes(plain), "the model was not restored after a failing job"
    # a patched and a plain job posted at once: the webui's queue runs them one after the other, each gets its own picture
    results = {}
    threads = [threading.Thread(target=lambda k=k, a=a: results.update({k: job(url, erasure=a)}))
               for k, a in (("patched", erasure_args(PATCH, 1.0)), ("plain", None))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert pixels(results["patched"][1]) == pixels(patched) and pixels(results["plain"][1]) == pixels(plain)


def test_an_fp8_model_refuses_patches_in_one_line_and_the_model_is_unchanged_after(server):
    """Settings > FP8 weight: the loaded model's Linear weights become float8 at its next load (with --no-half A1111
    turns them back to fp32 only on a first load, so the model is loaded first)."""
    url = server["url"]
    job(url)
    try:
        assert ws.post(url + "/sdapi/v1/options", {"fp8_storage": "Enable"})[0] == 200
        for attempt in (1, 2):  # the first job reloads the weights as fp8, the second finds them so
            status, out = job(url, erasure=erasure_args(PATCH, 1.0))
            text = json.dumps(out)
            print(f"fp8 model with a patch: HTTP {status}: {text[:300]}")
            assert status != 200 and "the text encoder is stored in fp8" in text and "Traceback" not in text
            if attempt == 1:
                _, plain = job(url)  # the fp8 model's own picture
        _, again = job(url)
        assert ws.image_bytes(again) == ws.image_bytes(plain)
    finally:
        assert ws.post(url + "/sdapi/v1/options", {"fp8_storage": "Disable"})[0] == 200
