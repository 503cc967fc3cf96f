"""The pack inside a real ComfyUI checkout (skipped unless COMFYUI_PATH points at one).

Run with ComfyUI's own environment, e.g.:
    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest tests/test_comfy_integration.py
Builds real ComfyUI CLIP (CLIP-L architecture) and MODEL (SD1.5 UNet architecture) objects from
random weights, loads the pack through ComfyUI's custom-node loader, and runs the nodes.
"""

import asyncio
import os
import sys

import pytest
import torch

COMFY = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(not COMFY, reason="set COMFYUI_PATH to a ComfyUI checkout to run")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def comfy_nodes(tmp_path_factory):
    sys.path.insert(0, COMFY)
    from comfy.cli_args import args

    args.cpu = True  # as `main.py --cpu`
    import folder_paths
    import nodes

    base = tmp_path_factory.mktemp("comfy")
    folder_paths.models_dir = str(base / "models")
    custom = base / "custom_nodes"
    custom.mkdir()
    os.symlink(ROOT, custom / "hirm_erasure")
    assert asyncio.run(nodes.load_custom_node(str(custom / "hirm_erasure")))
    return nodes


@pytest.fixture(scope="module")
def clip():
    import comfy.sd
    from tiny import clip_l_config, random_clip

    model = random_clip(clip_l_config())  # CLIP-L size
    sd = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in model.state_dict().items()}
    return comfy.sd.load_text_encoder_state_dicts([sd], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)


@pytest.fixture(scope="module")
def model():
    import comfy.sd
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768)  # SD1.5 architecture
    return comfy.sd.load_diffusion_model_state_dict({k: v.half() for k, v in unet.state_dict().items()})


def node(nodes, node_id):
    return nodes.NODE_CLASS_MAPPINGS[node_id]


def test_all_nodes_are_registered_in_one_category(comfy_nodes):
    ids = [k for k in comfy_nodes.NODE_CLASS_MAPPINGS if k.startswith("Hirm")]
    assert sorted(ids) == sorted(["HirmTrainErasurePatch", "HirmApplyEncoderPatch", "HirmSaveErasurePatch",
                                  "HirmLoadErasurePatch", "HirmLoadErasurePatchFromHub", "HirmNlceGate"])
    assert {node(comfy_nodes, i).GET_SCHEMA().category for i in ids} == {"erasure"}


def test_train_apply_encode_leaves_the_input_clip_unchanged(comfy_nodes, clip, tmp_path):
    before_patches = dict(clip.patcher.patches)
    with torch.inference_mode():
        patch, report = node(comfy_nodes, "HirmTrainErasurePatch").execute(clip, "cat", "random", "", "style", 2, 0.0, 0).result
        patched = node(comfy_nodes, "HirmApplyEncoderPatch").execute(clip, patch, 1.0).result[0]
        plain = comfy_nodes.CLIPTextEncode().encode(clip, "a photo of a cat")[0][0][0]
        erased = comfy_nodes.CLIPTextEncode().encode(patched, "a photo of a cat")[0][0][0]
    assert "target displacement" in report
    assert dict(clip.patcher.patches) == before_patches and patched.patcher.patches
    assert not torch.allclose(plain, erased)
    saved = node(comfy_nodes, "HirmSaveErasurePatch").execute(patch, "cat-test").result[0]
    assert os.path.isfile(saved)
    assert "cat-test.safetensors" in node(comfy_nodes, "HirmLoadErasurePatch").GET_SCHEMA().inputs[0].options


def test_nlce_gate_samples_one_step_and_leaves_the_input_model_unchanged(comfy_nodes, clip, model):
    import comfy.sample

    options_before = repr(model.model_options)
    with torch.inference_mode():
        gated, used = node(comfy_nodes, "HirmNlceGate").execute(model, clip, "cat", "dog\ntiger", "object", 1.0, -1.0, "mask",
                                                           "single-pass").result
        pos = comfy_nodes.CLIPTextEncode().encode(clip, "a photo of a cat")[0]
        neg = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
        latent = torch.zeros(1, 4, 16, 16)
        noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        out = comfy.sample.sample(gated, noise, 1, 7.0, "euler", "normal", pos, neg, latent, denoise=1.0, seed=0)
    assert torch.isfinite(out).all() and "dog" in used
    assert repr(model.model_options) == options_before


def test_example_workflows_use_known_nodes_with_matching_widgets(comfy_nodes):
    import glob
    import json

    asyncio.run(comfy_nodes.init_builtin_extra_nodes())  # FluxGuidance, EmptySD3LatentImage, ...
    for path in glob.glob(os.path.join(ROOT, "example_workflows", "*.json")):
        for n in json.load(open(path))["nodes"]:
            if n["type"] == "Note":
                continue
            assert n["type"] in comfy_nodes.NODE_CLASS_MAPPINGS, (path, n["type"])
            if n["type"].startswith("Hirm"):
                schema = node(comfy_nodes, n["type"]).GET_SCHEMA()
                widgets = [i for i in schema.inputs if i.get_io_type() not in ("CLIP", "MODEL", "ERASURE_PATCH")]
                assert len(widgets) == len(n["widgets_values"]), (path, n["type"])
