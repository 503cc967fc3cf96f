"""The pack inside a real ComfyUI checkout (skipped unless COMFYUI_PATH points at one).

Run with ComfyUI's own environment (see docs/comfyui.md), e.g.:
    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest tests/test_comfy_integration.py
Loads the pack with ComfyUI's own custom-node loader from a temporary custom_nodes folder,
builds real ComfyUI CLIP (CLIP-L; SDXL's CLIP-L + CLIP-G) and MODEL (SD1.5 UNet; a tiny Flux)
objects from random weights, runs the nodes and ComfyUI's own encoder and sampler, and checks
that no node changes its inputs.
"""

import asyncio
import glob
import json
import logging
import os
import shutil
import sys

import pytest
import torch

COMFY = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(not COMFY, reason="set COMFYUI_PATH to a ComfyUI checkout to run")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODE_IDS = ["HirmTrainErasurePatch", "HirmApplyEncoderPatch", "HirmSaveErasurePatch", "HirmLoadErasurePatch",
            "HirmLoadErasurePatchFromHub", "HirmNlceGate"]
GATE = ("cat", "dog", "object", 1.0, True, 1.0, "mask", "single-pass")  # NLCE Erasure Gate's widgets after model, clip


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    """ComfyUI's ``nodes`` module with the pack loaded as ComfyUI loads it, plus the folders used."""
    sys.path.insert(0, COMFY)
    from comfy.cli_args import args

    args.cpu = True  # as `main.py --cpu --use-pytorch-cross-attention`: ComfyUI's default CPU attention asks psutil for
    args.use_pytorch_cross_attention = True  # the free memory inside the model, which torch.compile cannot trace
    import folder_paths
    import utils.extra_config  # before nodes, which puts comfy/ (with its own utils.py) first on sys.path
    import nodes

    base = tmp_path_factory.mktemp("comfy")
    folder_paths.models_dir = str(base / "models")
    shared = base / "shared" / "patches"
    shared.mkdir(parents=True)
    yaml = base / "extra_model_paths.yaml"
    yaml.write_text(f"shared:\n    base_path: {base / 'shared'}\n    erasure_patches: patches\n")
    utils.extra_config.load_extra_path_config(str(yaml))  # as main.py does before loading custom nodes
    custom = base / "custom_nodes"
    custom.mkdir()
    os.symlink(ROOT, custom / "hirm_erasure")
    records = Records()
    logging.getLogger().addHandler(records)
    try:
        assert asyncio.run(nodes.load_custom_node(str(custom / "hirm_erasure")))
    finally:
        logging.getLogger().removeHandler(records)
    # the stock TorchCompileModel node, as ComfyUI loads its built-in extra nodes
    assert asyncio.run(nodes.load_custom_node(os.path.join(COMFY, "comfy_extras", "nodes_torch_compile.py"), module_parent="comfy_extras"))
    package = nodes.NODE_CLASS_MAPPINGS["HirmTrainErasurePatch"].__module__.split(".comfy_hirm.")[0]
    return {"nodes": nodes, "load_warnings": [r.getMessage() for r in records.records], "shared": shared,
            "own": base / "models" / "erasure_patches",
            "errors": sys.modules[package + ".shared_core.errors"]}  # the pack's own copy of the core, as ComfyUI imported it


@pytest.fixture(scope="module")
def clip(pack):
    import comfy.sd

    from test_comfy_server import random_clip_sd

    return comfy.sd.load_text_encoder_state_dicts([random_clip_sd(768, 12, 3072)], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)


@pytest.fixture(scope="module")
def model(pack):
    import comfy.sd
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768)  # SD1.5 architecture
    return comfy.sd.load_diffusion_model_state_dict({k: v.half() for k, v in unet.state_dict().items()})


def node(pack, node_id):
    return pack["nodes"].NODE_CLASS_MAPPINGS[node_id]


def run(pack, node_id, *args):
    return node(pack, node_id).execute(*args).result


def encode(pack, clip, text):
    return pack["nodes"].CLIPTextEncode().encode(clip, text)[0]


def test_the_pack_loads_without_warnings_and_all_nodes_share_one_category(pack):
    assert pack["load_warnings"] == []
    ids = [k for k in pack["nodes"].NODE_CLASS_MAPPINGS if k.startswith("Hirm")]
    assert sorted(ids) == sorted(NODE_IDS)
    assert {node(pack, i).GET_SCHEMA().category for i in ids} == {"erasure"}


def test_train_apply_encode_changes_only_the_clone(pack, clip):
    patches_before = dict(clip.patcher.patches)
    with torch.inference_mode():
        plain = encode(pack, clip, "a photo of a cat")[0][0]
        patch, report = run(pack, "HirmTrainErasurePatch", clip, "cat", "random", "", "style", False, 2, 5e-5, 0)
        patched = run(pack, "HirmApplyEncoderPatch", clip, patch, 1.0)[0]
        erased = encode(pack, patched, "a photo of a cat")[0][0]
        plain_again = encode(pack, clip, "a photo of a cat")[0][0]
        # ComfyUI left the shared weights patched in place for the clone: training again must still see the base
        again = run(pack, "HirmTrainErasurePatch", clip, "cat", "random", "", "style", False, 2, 5e-5, 0)[0]
    assert "target displacement" in report
    assert dict(clip.patcher.patches) == patches_before and patched.patcher.patches
    assert not torch.allclose(plain, erased, atol=1e-3)
    assert torch.equal(plain, plain_again)
    assert again is patch  # same CLIP, same settings: not trained again


def test_a_cancel_stops_training_with_no_output_and_the_clip_unchanged(pack, clip):
    import comfy.model_management as mm

    patches_before = dict(clip.patcher.patches)
    mm.interrupt_current_processing(True)
    try:
        with torch.inference_mode(), pytest.raises(mm.InterruptProcessingException):
            run(pack, "HirmTrainErasurePatch", clip, "dog", "random", "", "object", False, 3, 5e-5, 0)
    finally:
        mm.interrupt_current_processing(False)
    assert dict(clip.patcher.patches) == patches_before


def test_bad_inputs_get_one_line_errors(pack, clip):
    errors = pack["errors"]
    HirmError, PatchFileError, PatchMismatchError = errors.HirmError, errors.PatchFileError, errors.PatchMismatchError

    with pytest.raises(HirmError, match="no concept"):
        run(pack, "HirmTrainErasurePatch", clip, " \n", "random", "", "style", False, 2, 5e-5, 0)
    (pack["own"] / "not-a-patch.safetensors").parent.mkdir(parents=True, exist_ok=True)
    (pack["own"] / "not-a-patch.safetensors").write_bytes(b"hello, not a safetensors file")
    with pytest.raises(PatchFileError) as e:
        run(pack, "HirmLoadErasurePatch", "not-a-patch.safetensors")
    assert "\n" not in str(e.value)
    with torch.inference_mode():
        patch = run(pack, "HirmTrainErasurePatch", clip, "cat", "random", "", "style", False, 2, 5e-5, 0)[0]
    clip_g_patch = type(patch)(patch.deltas, {**patch.metadata, "encoder": {**patch.encoder, "family": "clip-g"}})
    with pytest.raises(PatchMismatchError, match="for clip-g but this CLIP has clip_l"):
        run(pack, "HirmApplyEncoderPatch", clip, clip_g_patch, 1.0)
    with pytest.raises(HirmError) as e:
        run(pack, "HirmLoadErasurePatchFromHub", "nobody/no-such-patches", "cat", "", False, 5.0)  # offline, not cached
    assert "\n" not in str(e.value)


def test_save_load_and_extra_model_paths(pack, clip):
    with torch.inference_mode():
        patch = run(pack, "HirmTrainErasurePatch", clip, "cat", "random", "", "style", False, 2, 5e-5, 0)[0]
    saved = run(pack, "HirmSaveErasurePatch", patch, "cat-test", False)[0]
    assert saved == str(pack["own"] / "cat-test.safetensors")  # models/erasure_patches comes first
    shutil.copy(saved, pack["shared"] / "shared-cat.safetensors")  # a folder named in extra_model_paths.yaml
    options = node(pack, "HirmLoadErasurePatch").GET_SCHEMA().inputs[0].options
    assert {"cat-test.safetensors", "shared-cat.safetensors"} <= set(options)
    loaded, text = run(pack, "HirmLoadErasurePatch", "shared-cat.safetensors")
    assert set(loaded.deltas) == set(patch.deltas) and "cat" in text


def train(pack, clip, concept="cat"):
    with torch.inference_mode():
        return run(pack, "HirmTrainErasurePatch", clip, concept, "random", "", "style", False, 2, 5e-5, 0)[0]


def test_save_adds_a_counter_overwrites_only_when_asked_and_never_a_file_of_someone_else(pack, clip):
    patch, other = train(pack, clip), train(pack, clip, "dog")
    first = run(pack, "HirmSaveErasurePatch", patch, "styles/counted", False)[0]
    second = node(pack, "HirmSaveErasurePatch").execute(other, "styles/counted", False)
    assert first == str(pack["own"] / "styles" / "counted.safetensors")
    assert second.result[0] == str(pack["own"] / "styles" / "counted_00001.safetensors")
    assert second.ui.as_dict() == {"text": ("saved erasure_patches/styles/counted_00001.safetensors",)}
    replaced = run(pack, "HirmSaveErasurePatch", other, "styles/counted", True)[0]
    assert replaced == first and "dog" in run(pack, "HirmLoadErasurePatch", "styles/counted.safetensors")[1]
    (pack["own"] / "notes.safetensors").write_bytes(b"my own notes")
    with pytest.raises(pack["errors"].HirmError) as e:
        run(pack, "HirmSaveErasurePatch", patch, "notes", True)
    assert "\n" not in str(e.value) and (pack["own"] / "notes.safetensors").read_bytes() == b"my own notes"
    for bad in ("", "../outside", "a/../../b"):
        with pytest.raises(pack["errors"].HirmError, match="plain file name"):
            run(pack, "HirmSaveErasurePatch", patch, bad, False)
    assert not list(pack["own"].parent.glob("*.safetensors")) and not list(pack["own"].rglob(".tmp-hirm-*"))


def test_the_stock_lora_loader_lists_a_saved_patch_and_gives_the_apply_nodes_conditioning(pack, clip, model):
    import folder_paths

    patch = train(pack, clip, "a red apple")
    run(pack, "HirmSaveErasurePatch", patch, "lora-apple", True)
    assert "lora-apple.safetensors" in folder_paths.get_filename_list("loras")
    assert "lora-apple.safetensors" in pack["nodes"].LoraLoader.INPUT_TYPES()["required"]["lora_name"][0]
    with torch.inference_mode():
        _, by_lora = pack["nodes"].LoraLoader().load_lora(model, clip, "lora-apple.safetensors", 0.0, 0.7)
        saved = run(pack, "HirmLoadErasurePatch", "lora-apple.safetensors")[0]  # the file's precision, as the loader reads it
        by_node = run(pack, "HirmApplyEncoderPatch", clip, saved, 0.7)[0]
        a, b = (encode(pack, c, "a red apple on a table")[0][0] for c in (by_lora, by_node))
    assert torch.equal(a, b) and not torch.equal(a, encode(pack, clip, "a red apple on a table")[0][0])


@pytest.mark.parametrize("strength", [float("nan"), float("inf"), 1e39, 5.0])
def test_the_apply_node_refuses_a_strength_out_of_range(pack, clip, strength):
    patch = train(pack, clip)
    with pytest.raises(pack["errors"].HirmError, match="strength"):
        run(pack, "HirmApplyEncoderPatch", clip, patch, strength)


def test_train_shows_its_report_on_the_node(pack, clip):
    with torch.inference_mode():
        out = node(pack, "HirmTrainErasurePatch").execute(clip, "cat", "random", "", "style", False, 2, 5e-5, 0)
    (text,) = out.ui.as_dict()["text"]
    assert text == out.result[1] and "target displacement" in text and "cat" in text


def test_a_clip_l_patch_goes_to_the_clip_l_of_an_sdxl_clip(pack, clip):
    import comfy.sd
    from test_comfy_server import random_clip_sd

    sdxl = comfy.sd.load_text_encoder_state_dicts([random_clip_sd(768, 12, 3072), random_clip_sd(1280, 32, 5120, "gelu", 1)],
                                                  clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
    with torch.inference_mode():
        patch = run(pack, "HirmTrainErasurePatch", clip, "cat", "random", "", "style", False, 2, 5e-5, 0)[0]
        patched = run(pack, "HirmApplyEncoderPatch", sdxl, patch, 0.8)[0]
    assert set(patched.patcher.patches) == {"clip_l.transformer." + n for n in patch.deltas}
    assert all(p[0] == 0.8 for ps in patched.patcher.patches.values() for p in ps)
    assert not sdxl.patcher.patches


def sample_at_t500(pack, model, clip, prompt, seed=0):
    """One Euler step of ComfyUI's sampler from the noise level of timestep 500 (inside NLCE's window) to 0."""
    import comfy.sample

    pos, neg = encode(pack, clip, prompt), encode(pack, clip, "")
    sigma = model.get_model_object("model_sampling").sigma(torch.tensor(500.0))
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample(model, noise, 1, 7.0, "euler", "normal", pos, neg, torch.zeros(1, 4, 16, 16),
                               sigmas=torch.stack([sigma, torch.zeros(())]), seed=seed)


@pytest.mark.parametrize("schedule", ["single-pass", "faithful"])
def test_nlce_gate_samples_and_leaves_the_input_model_unchanged(pack, clip, model, schedule):
    options_before = repr(model.model_options)
    with torch.inference_mode():
        # random weights: only the concept's own rows score as live tokens, so the prompt is the concept itself
        vanilla = sample_at_t500(pack, model, clip, "cat")
        gated, used = run(pack, "HirmNlceGate", model, clip, "cat", "dog\ntiger", "object", 1.0, True, 1.0, "mask", schedule)
        erased = sample_at_t500(pack, gated, clip, "cat")
        vanilla_again = sample_at_t500(pack, model, clip, "cat")
    assert torch.isfinite(erased).all() and used == "cat: dog, tiger"
    assert (erased - vanilla).norm() > 0.01 * vanilla.norm()
    assert torch.equal(vanilla, vanilla_again) and repr(model.model_options) == options_before
    state = gated.model_options["model_function_wrapper"].__self__
    passes = state.session.diagnostics
    assert [(p["dry"], p["intervened"]) for p in passes] == ([(True, False)] if schedule == "faithful" else []) + [(False, True)]
    cond = 1 if passes[-1]["active"][0] == [] else 0  # the conditional half of the CFG batch
    assert passes[-1]["active"][cond] == ["cat"] and passes[-1]["live_tokens"][1 - cond] == []
    assert passes[-1]["gate"]["shape"] == [4, 4]  # read at input block 8: 1/32 of the 128 px image


def test_nlce_gate_keeps_another_packs_attention_replace_and_says_so(pack, clip, model, caplog):
    import comfy.ldm.modules.attention as attention

    calls = []

    def foreign(q, k, v, extra_options):  # what an IP-Adapter-like pack registers: plain attention, counted
        calls.append(extra_options["block"])
        return attention.optimized_attention(q, k, v, extra_options["n_heads"])

    other = model.clone()
    other.set_model_attn2_replace(foreign, "input", 7, 0)
    with torch.inference_mode():
        plain = sample_at_t500(pack, other, clip, "cat")
        calls.clear()
        with caplog.at_level(logging.WARNING):
            gated = run(pack, "HirmNlceGate", other, clip, "cat", "dog", "object", 1.0, True, 1.0, "mask", "single-pass")[0]
        erased = sample_at_t500(pack, gated, clip, "cat")
    assert calls and set(calls) == {("input", 7)}  # the other pack's attention still runs, at its block only
    assert (erased - plain).norm() > 0.01 * plain.norm()
    assert "another node's or extension's attention already replaces cross-attention at 1 of 16 blocks" in caplog.text
    assert other.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 7, 0)] is foreign


TINY_FLUX = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 768,
             "context_in_dim": 64, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2,
             "axes_dim": [8, 12, 12], "theta": 10000, "qkv_bias": True, "guidance_embed": True}
TINY_T5 = {"d_model": 64, "d_ff": 128, "num_heads": 4, "d_kv": 16, "num_layers": 2}  # ComfyUI's t5xxl_model_config option


def patcher_for(model_class, config):
    import comfy.model_management as mm
    import comfy.model_patcher

    model = model_class(config).get_model({})  # ComfyUI leaves the weights uninitialised: random ones, seeded
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # buffers too: SD3's pos_embed is one, and uninitialised memory made the test flaky
        for p in [*model.diffusion_model.parameters(), *model.diffusion_model.buffers()]:
            if p.is_floating_point():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


@pytest.fixture(scope="module")
def flux(pack):
    """A Flux MODEL (2 double + 2 single blocks, 64 wide) and its CLIP (CLIP-L; a T5 64 wide through ComfyUI's own
    ``t5xxl_model_config`` option, with ComfyUI's T5 tokenizer), as ComfyUI's loaders build them."""
    import comfy.sd
    import comfy.supported_models
    from transformers import T5Config, T5EncoderModel

    from test_comfy_server import random_clip_sd

    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=32128, feed_forward_proj="gated-gelu", **TINY_T5)).state_dict()
    clip = comfy.sd.load_text_encoder_state_dicts([random_clip_sd(768, 12, 3072), t5], clip_type=comfy.sd.CLIPType.FLUX,
                                                  model_options={"t5xxl_model_config": TINY_T5})
    return patcher_for(comfy.supported_models.Flux, TINY_FLUX), clip


def sample_flux(pack, model, clip, prompt, seed=0):
    """One Euler step of ComfyUI's sampler from sigma 0.5 (timestep 500, inside NLCE's window) to 0, guidance 3.5."""
    import comfy.sample

    pos = pack["nodes"].CLIPTextEncode().encode(clip, prompt)[0]
    pos = [[c, {**o, "guidance": 3.5}] for c, o in pos]
    noise = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample(model, noise, 1, 1.0, "euler", "simple", pos, encode(pack, clip, ""),
                               torch.zeros(1, 16, 16, 16), sigmas=torch.tensor([0.5, 0.0]), seed=seed)


@pytest.mark.parametrize("schedule", ["single-pass", "faithful"])
def test_nlce_gate_on_flux_erases_in_the_joint_attention_and_leaves_the_input_model_unchanged(pack, flux, schedule):
    model, clip = flux
    options_before = repr(model.model_options)
    with torch.inference_mode():
        vanilla = sample_flux(pack, model, clip, "a photo of a cat")
        gated, used = run(pack, "HirmNlceGate", model, clip, "cat", "dog\ntiger", "object", 1.0, True, 1.0, "mask", schedule)
        erased = sample_flux(pack, gated, clip, "a photo of a cat")
        vanilla_again = sample_flux(pack, model, clip, "a photo of a cat")
    assert torch.isfinite(erased).all() and used == "cat: dog, tiger"
    assert (erased - vanilla).norm() > 0.001 * vanilla.norm()
    assert torch.equal(vanilla, vanilla_again) and repr(model.model_options) == options_before
    state = gated.model_options["model_function_wrapper"].__self__
    assert state.session.concepts.family == "flux" and state.gating == ("double_block", 1)
    passes = state.session.diagnostics
    assert [(p["dry"], p["intervened"]) for p in passes] == ([(True, False)] if schedule == "faithful" else []) + [(False, True)]
    assert passes[-1]["active"] == [["cat"]] and passes[-1]["gate"]["shape"] == [8, 8]  # 16x16 latent in 2x2 patches


def test_nlce_gate_on_flux_with_every_stage_off_samples_bit_identically(pack, flux):
    import dataclasses

    model, clip = flux
    with torch.inference_mode():
        vanilla = sample_flux(pack, model, clip, "a photo of a cat")
        gated = run(pack, "HirmNlceGate", model, clip, "cat", "dog", "object", 1.0, True, 1.0, "mask", "single-pass")[0]
        state = gated.model_options["model_function_wrapper"].__self__
        state.session.config = dataclasses.replace(state.session.config, stage1=False, stage2=False, stage3=False)
        assert torch.equal(sample_flux(pack, gated, clip, "a photo of a cat"), vanilla)


@pytest.fixture(scope="module")
def sd3(pack):
    """An SD3.5-style MODEL (2 joint blocks 128 wide, the second with its own image self-attention) and a CLIP of
    CLIP-L and T5 (4096 wide, as ComfyUI pads SD3's rows to, and 24 layers, as its loader detects T5-XXL by, but one
    head and a small feed-forward through ``t5xxl_model_config``), as DualCLIPLoader (type sd3) builds it."""
    import comfy.sd
    import comfy.supported_models
    from transformers import T5Config, T5EncoderModel

    from test_comfy_server import random_clip_sd

    t5_config = {"d_model": 4096, "d_ff": 64, "num_heads": 1, "d_kv": 64, "num_layers": 24}
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=32128, feed_forward_proj="gated-gelu", **t5_config)).state_dict()
    clip = comfy.sd.load_text_encoder_state_dicts([random_clip_sd(768, 12, 3072), t5], clip_type=comfy.sd.CLIPType.SD3,
                                                  model_options={"t5xxl_model_config": t5_config})
    config = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "input_size": None, "adm_in_channels": 2048,
              "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
              "num_patches": 256, "pos_embed_max_size": 16, "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [1]}
    return patcher_for(comfy.supported_models.SD3, config), clip


def test_nlce_gate_on_sd3_erases_in_the_conditional_half_and_leaves_the_input_model_unchanged(pack, sd3):
    import comfy.sample

    model, clip = sd3

    def sample(m):
        noise = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
        return comfy.sample.sample(m, noise, 1, 4.0, "euler", "simple", encode(pack, clip, "a photo of a cat"),
                                   encode(pack, clip, ""), torch.zeros(1, 16, 16, 16), sigmas=torch.tensor([0.5, 0.0]), seed=0)

    options_before = repr(model.model_options)
    with torch.inference_mode():
        vanilla = sample(model)
        gated, used = run(pack, "HirmNlceGate", model, clip, "cat", "dog", "object", 1.0, True, 1.0, "mask", "single-pass")
        erased = sample(gated)
        vanilla_again = sample(model)
    assert torch.isfinite(erased).all() and (erased - vanilla).norm() > 0.001 * vanilla.norm()
    assert torch.equal(vanilla, vanilla_again) and repr(model.model_options) == options_before
    state = gated.model_options["model_function_wrapper"].__self__
    assert state.session.concepts.family == "sd3" and state.gating == ("double_block", 1)
    last = state.session.diagnostics[-1]
    cond = 1 if last["active"][0] == [] else 0
    assert last["active"][cond] == ["cat"] and last["live_tokens"][1 - cond] == [] and last["gate"]["shape"] == [8, 8]


def test_nlce_gate_refuses_a_model_without_text_attention_it_knows_and_a_clip_without_t5(pack, clip, flux):
    import comfy.supported_models

    chroma = patcher_for(comfy.supported_models.Chroma, {
        **{k: v for k, v in TINY_FLUX.items() if k not in ("vec_in_dim", "guidance_embed")}, "image_model": "chroma",
        "in_channels": 64, "out_channels": 64, "in_dim": 64, "out_dim": 64, "hidden_dim": 32, "n_layers": 1})
    with pytest.raises(pack["errors"].NlceError, match="no UNet cross-attention"):
        run(pack, "HirmNlceGate", chroma, clip, "cat", "auto", "object", 1.0, True, 1.0, "mask", "single-pass")
    with pytest.raises(pack["errors"].NlceError, match="no T5 tokenizer"):
        run(pack, "HirmNlceGate", flux[0], clip, "cat", "dog", "object", 1.0, True, 1.0, "mask", "single-pass")


def test_example_workflows_validate_in_comfyui(pack, tmp_path):
    import execution
    import folder_paths
    from test_comfy_server import ui_to_api

    nodes = pack["nodes"]
    asyncio.run(nodes.init_builtin_extra_nodes())  # FluxGuidance, EmptySD3LatentImage, ...
    for path in glob.glob(os.path.join(ROOT, "example_workflows", "*.json")):
        graph = json.load(open(path))
        prompt = ui_to_api(graph, {t: c.INPUT_TYPES() for t, c in nodes.NODE_CLASS_MAPPINGS.items()})
        for entry in prompt.values():  # the model files the graph names, as empty stand-ins
            for key, folder in (("ckpt_name", "checkpoints"), ("unet_name", "diffusion_models"), ("clip_name1", "text_encoders"),
                                ("clip_name2", "text_encoders"), ("vae_name", "vae"), ("patch_name", "erasure_patches")):
                if key in entry["inputs"]:
                    (tmp_path / folder).mkdir(exist_ok=True)
                    (tmp_path / folder / entry["inputs"][key]).touch()
                    folder_paths.add_model_folder_path(folder, str(tmp_path / folder))
        valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("test", prompt, None))
        assert valid, (os.path.basename(path), error, node_errors)
        assert outputs


# ---------------------------------------------------------------------------------------------- SDXL

SDXL = os.environ.get("HIRM_SDXL_CHECKPOINT")


@pytest.fixture(scope="module")
def sdxl(pack):
    """An SDXL base checkpoint (random weights are fine) as ComfyUI's CheckpointLoaderSimple loads it: MODEL, CLIP."""
    if not SDXL:
        pytest.skip("set HIRM_SDXL_CHECKPOINT (a single-file SDXL base checkpoint) for the SDXL cases")
    import comfy.sd

    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(SDXL, output_vae=False, output_clipvision=False)
    return model, clip


def test_sdxl_train_gives_one_patch_for_both_encoders_and_apply_changes_both_halves_of_the_conditioning(pack, sdxl):
    _, clip = sdxl
    with torch.inference_mode():
        plain = encode(pack, clip, "a photo of a cat")[0]
        patch, report = run(pack, "HirmTrainErasurePatch", clip, "cat", "random", "", "style", False, 1, 5e-5, 0)
        patched = run(pack, "HirmApplyEncoderPatch", clip, patch, 1.0)[0]
        erased = encode(pack, patched, "a photo of a cat")[0]
    assert patch.components == ["clip_l", "clip_g"] and "pooled (CLIP-G)" in report
    keys = set(patched.patcher.patches)
    assert any(k.startswith("clip_l.") for k in keys) and any(k.startswith("clip_g.") for k in keys)
    rows, erased_rows = plain[0], erased[0]
    assert rows.shape[-1] == 2048
    assert not torch.allclose(rows[..., :768], erased_rows[..., :768], atol=1e-3)  # CLIP-L's half
    assert not torch.allclose(rows[..., 768:], erased_rows[..., 768:], atol=1e-3)  # CLIP-G's half
    assert not torch.allclose(plain[1]["pooled_output"], erased[1]["pooled_output"], atol=1e-4)
    assert not clip.patcher.patches
    # saved, the SDXL patch is also a LoRA the stock loader applies to both encoders (keys lora_te1_ / lora_te2_)
    model, _ = sdxl
    run(pack, "HirmSaveErasurePatch", patch, "xl-cat", True)
    with torch.inference_mode():
        _, by_lora = pack["nodes"].LoraLoader().load_lora(model, clip, "xl-cat.safetensors", 0.0, 1.0)
        saved = run(pack, "HirmLoadErasurePatch", "xl-cat.safetensors")[0]
        by_node = run(pack, "HirmApplyEncoderPatch", clip, saved, 1.0)[0]
        a, b = (encode(pack, c, "a photo of a cat")[0][0] for c in (by_lora, by_node))
    assert torch.equal(a, b) and not torch.equal(a, rows)


def test_nlce_gate_on_an_sdxl_model_erases_in_the_conditional_half_and_leaves_the_model_unchanged(pack, sdxl):
    model, clip = sdxl
    options_before = repr(model.model_options)
    with torch.inference_mode():
        vanilla = sample_at_t500(pack, model, clip, "cat")
        gated, used = run(pack, "HirmNlceGate", model, clip, "cat", "dog", "object", 1.0, True, 1.0, "mask", "single-pass")
        erased = sample_at_t500(pack, gated, clip, "cat")
        vanilla_again = sample_at_t500(pack, model, clip, "cat")
    state = gated.model_options["model_function_wrapper"].__self__
    assert state.session.concepts.family == "sdxl" and state.gating == ("input", 8, 0)
    assert torch.isfinite(erased).all() and (erased - vanilla).norm() > 0
    assert torch.equal(vanilla, vanilla_again) and repr(model.model_options) == options_before
    last = state.session.diagnostics[-1]
    cond = 1 if last["active"][0] == [] else 0
    assert last["live_tokens"][1 - cond] == []  # nothing is live in the unconditional half


# ---------------------------------------------------------------------------------------------- torch.compile


def compiled_against_eager(pack, model, clip, sample, order):
    """(|compiled - eager| of vanilla, of NLCE, NLCE's graph breaks, graphs NLCE compiled, |second run - first|): the
    stock TorchCompileModel node (inductor) chained with NLCE Erasure Gate in ``order``."""
    from torch._dynamo.utils import counters

    def compile_node(m):
        return run(pack, "TorchCompileModel", m, "inductor")[0]

    with torch.inference_mode():
        torch._dynamo.reset()
        vanilla_gap = (sample(compile_node(model)) - sample(model)).abs().max()
        eager = sample(run(pack, "HirmNlceGate", model, clip, *GATE)[0])
        torch._dynamo.reset()
        counters.clear()
        chained = compile_node(run(pack, "HirmNlceGate", model, clip, *GATE)[0]) if order == "gate-then-compile" else \
            run(pack, "HirmNlceGate", compile_node(model), clip, *GATE)[0]
        compiled, again = sample(chained), sample(chained)
    return vanilla_gap, (compiled - eager).abs().max(), dict(counters["graph_break"]), counters["stats"]["unique_graphs"], \
        (again - compiled).abs().max()


def check_compiled(result):
    vanilla_gap, gap, breaks, graphs, rerun = result
    assert breaks == {} and graphs == 1  # one graph per denoiser call: NLCE adds no break, and nothing recompiles
    assert rerun == 0 and gap <= max(4 * vanilla_gap, 1e-5)  # as close to eager as compiling vanilla ComfyUI is


@pytest.mark.parametrize("order", ["gate-then-compile", "compile-then-gate"])
def test_nlce_gate_with_the_stock_torch_compile_node_on_sd15(pack, clip, model, order):
    check_compiled(compiled_against_eager(pack, model, clip, lambda m: sample_at_t500(pack, m, clip, "cat"), order))


def test_nlce_gate_with_the_stock_torch_compile_node_on_flux(pack, flux):
    model, clip = flux
    check_compiled(compiled_against_eager(pack, model, clip, lambda m: sample_flux(pack, m, clip, "a photo of a cat"),
                                          "gate-then-compile"))


def test_nlce_gate_with_the_stock_torch_compile_node_on_sdxl(pack, sdxl):
    model, clip = sdxl
    check_compiled(compiled_against_eager(pack, model, clip, lambda m: sample_at_t500(pack, m, clip, "cat"), "gate-then-compile"))
