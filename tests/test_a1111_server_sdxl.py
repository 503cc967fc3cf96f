"""The extension in a real AUTOMATIC1111 v1.10.1 serving an SDXL base checkpoint (opt-in, like tests/test_a1111_server.py).

Set what that test needs plus HIRM_SDXL_CHECKPOINT (a single-file SDXL base checkpoint; random weights are fine; the
webui needs about 14 GB of memory for it in fp32). A fresh server serves the SDXL checkpoint alone, with a patch
trained on both of its encoders and one trained on the SD1.5 checkpoint's CLIP-L.
"""

import json
import os

import pytest
from test_a1111_server import CHECKPOINT, PATCH, erasure_args, job, pixels, start_server, train_through_the_tab, ws

SDXL = os.environ.get("HIRM_SDXL_CHECKPOINT")
if not SDXL:
    pytest.skip("set HIRM_SDXL_CHECKPOINT (a single-file SDXL base checkpoint) for the SDXL cases", allow_module_level=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from start_server(tmp_path_factory, SDXL, patches=(("xl-cat.safetensors", SDXL, "cat"), (PATCH, CHECKPOINT, "cat")))


def test_sdxl_a_both_encoder_patch_nlce_and_both_change_the_picture_and_the_model_comes_back_byte_identical(server):
    url = server["url"]
    _, plain = job(url)
    seen = {pixels(plain)}
    for label, args in (("patch", [True, "xl-cat.safetensors", 1.0]),
                        ("clip-l patch", [True, PATCH, 1.0]),  # trained on SD1.5's CLIP-L: SDXL's CLIP-L half only, said so
                        ("nlce", erasure_args(nlce=True, concepts="cat", neighbors="dog")),
                        ("nlce faithful", erasure_args(nlce=True, concepts="cat", neighbors="dog", schedule="faithful")),
                        ("patch + nlce", erasure_args("xl-cat.safetensors", 1.0, nlce=True, concepts="cat", neighbors="dog"))):
        status, out = job(url, erasure=args)
        assert status == 200, (label, out)
        assert pixels(out) != pixels(plain), label  # NLCE's stage 1 acts on every prompt inside its window
        if "patch" in label:
            assert pixels(out) not in seen, label
            seen.add(pixels(out))
        _, again = job(url)
        assert ws.image_bytes(again) == ws.image_bytes(plain), f"the model was not restored after {label}"
    status, out = job(url, erasure=[True, "xl-cat.safetensors", 1.0])
    assert 'Erasure patches: "xl-cat.safetensors:1"' in json.loads(out["info"])["infotexts"][0]
    status, out = job(url, kind="img2img", erasure=erasure_args("xl-cat.safetensors", 1.0, nlce=True, concepts="cat"),
                      extra={"init_images": [plain["images"][0]], "denoising_strength": 0.6})
    assert status == 200, out
    assert "changes clip_l only" in server["log"].read_text()  # the CLIP-L patch's note, in the webui's console


def test_sdxl_the_training_tab_trains_both_encoders_of_the_loaded_checkpoint(server):
    from shared_core.encoders import model_signature, signatures_match
    from shared_core.loading import load_text_encoders
    from shared_core.patch import load_patch

    status = train_through_the_tab(server, "xl-tiger")
    print(f"SDXL train via gradio api: {status}")
    assert status == "saved models/erasure_patches/xl-tiger.safetensors", status
    trained = load_patch(str(server["webui"] / "models" / "erasure_patches" / "xl-tiger.safetensors"))
    assert trained.components == ["clip_l", "clip_g"]
    encoders = load_text_encoders(SDXL)
    for c in ("clip_l", "clip_g"):  # trained on the weights the webui loaded: the file's own
        assert signatures_match(trained.part(c).metadata["base_signature"], model_signature(encoders[c].model)), c
    del encoders
    _, plain = job(server["url"], prompt="a tiger")
    status, erased = job(server["url"], prompt="a tiger", erasure=[True, "xl-tiger.safetensors", 1.0])
    assert status == 200 and pixels(erased) != pixels(plain)
