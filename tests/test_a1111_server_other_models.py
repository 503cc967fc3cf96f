"""The extension in a real AUTOMATIC1111 v1.10.1 serving checkpoints it cannot fully serve (opt-in, like
tests/test_a1111_server.py): an SD2.x checkpoint (OpenCLIP-H; set HIRM_SD2_CHECKPOINT) and an SDXL refiner (bigG alone;
set HIRM_SDXL_REFINER_CHECKPOINT and HIRM_SDXL_CHECKPOINT, whose both-encoder patch the refiner takes half of). Random
weights are fine. Each gets a fresh server; what cannot be done is said in one line naming the checkpoint."""

import os

import pytest
from test_a1111_server import CHECKPOINT, PATCH, SETTINGS, job, pixels, start_server, train_through_the_tab, ws

SDXL = os.environ.get("HIRM_SDXL_CHECKPOINT")
NLCE = [True, "None", 1.0, "None", 1.0, "None", 1.0, True, "cat", "", "object", 1.0, 1.0, "single-pass"]


@pytest.fixture(scope="module", params=["HIRM_SD2_CHECKPOINT", "HIRM_SDXL_REFINER_CHECKPOINT"])
def server(request, tmp_path_factory):
    checkpoint = os.environ.get(request.param)
    if not checkpoint or (request.param == "HIRM_SDXL_REFINER_CHECKPOINT" and not SDXL):
        pytest.skip(f"set {request.param} (and HIRM_SDXL_CHECKPOINT for the refiner) to single-file checkpoints of that kind")
    patches = ((PATCH, CHECKPOINT, "cat"),) + ((("xl-cat.safetensors", SDXL, "cat"),) if "REFINER" in request.param else ())
    # served after the SD1.5 checkpoint: A1111 v1.10.1 on CPU fails an SD2.x model's jobs when that model is the first it
    # loads ("Input type (float) and bias type (c10::Half)", with or without this extension); switched to, it runs
    for served in start_server(tmp_path_factory, CHECKPOINT, patches):
        name = os.path.basename(checkpoint)
        os.symlink(os.path.abspath(checkpoint), served["webui"] / "models" / "Stable-diffusion" / name)
        assert ws.post(served["url"] + "/sdapi/v1/refresh-checkpoints", {})[0] == 200
        assert job(served["url"])[0] == 200  # SD1.5 loaded
        status, out = ws.post(served["url"] + "/sdapi/v1/options", {"sd_model_checkpoint": name})
        assert status == 200, out
        SETTINGS["sd_model_checkpoint"] = name
        yield {**served, "kind": request.param, "name": name}


def refused(url, args, *expected):
    status, out = job(url, erasure=args)
    message = out.get("errors") or out.get("message") or ""
    print(f"HTTP {status}: {message}")
    assert status != 200 and "\n" not in message and "Traceback" not in message, out
    assert all(e in message for e in expected), message


def test_what_cannot_be_done_is_one_line_naming_the_checkpoint_and_plain_jobs_are_untouched(server):
    url, name = server["url"], server["name"]
    status, plain = job(url)
    assert status == 200, plain
    if server["kind"] == "HIRM_SD2_CHECKPOINT":
        for args in ([True, PATCH, 1.0], NLCE):
            refused(url, args, "is an SD2.x model", name, "'Stable Diffusion checkpoint' menu")
        line = train_through_the_tab(server, "nothing")
        assert "is an SD2.x model" in line and name in line and "'Stable Diffusion checkpoint' menu" in line, line
        assert not (server["webui"] / "models" / "erasure_patches" / "nothing.safetensors").exists()
    else:  # the refiner: a CLIP-L patch and NLCE cannot act on it; an SDXL patch's CLIP-G half can, and the tab trains CLIP-G
        refused(url, [True, PATCH, 1.0], "has clip_g", name)
        refused(url, NLCE, "is an SDXL refiner", name)
        status, out = job(url, erasure=[True, "xl-cat.safetensors", 1.0])
        assert status == 200 and pixels(out) != pixels(plain), out
        assert train_through_the_tab(server, "refiner-tiger") == "saved models/erasure_patches/refiner-tiger.safetensors"
        from shared_core.patch import load_patch

        assert load_patch(str(server["webui"] / "models" / "erasure_patches" / "refiner-tiger.safetensors")).components == ["clip_g"]
    _, again = job(url)
    assert ws.image_bytes(again) == ws.image_bytes(plain)
