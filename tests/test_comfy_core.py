"""The ComfyUI pack's logic without ComfyUI: training from a CLIP state dict, patch keys, NLCE wiring."""

from types import SimpleNamespace

import pytest
import torch
from tiny import canonical_state_dict, tiny_clip

from comfy_hirm import core
from shared_core import nlce
from shared_core.errors import HirmError, NlceError, PatchMismatchError


def comfy_sd(seed=0, prefix="clip_l.transformer."):
    model, _ = tiny_clip(seed=seed)
    return {**canonical_state_dict(model, prefix), "clip_l.logit_scale": torch.tensor(4.6)}


def test_lists_are_split_on_lines_and_commas_and_empty_is_refused():
    assert core.parse_list("Van Gogh\n cat, dog ,\n") == ["Van Gogh", "cat", "dog"]
    with pytest.raises(HirmError, match="no concept"):
        core.parse_list(" \n , ")


def test_training_under_inference_mode_leaves_the_clip_alone_and_same_inputs_do_not_retrain():
    sd = comfy_sd()
    before = {k: v.clone() for k, v in sd.items()}
    with torch.inference_mode():  # how ComfyUI runs every node
        frozen = {k: v.clone() for k, v in sd.items()}
        patch, text = core.train(frozen, ["cat"], steps=3)
        again, _ = core.train({k: v.clone() for k, v in frozen.items()}, ["cat"], steps=3)
        other_seed, _ = core.train(frozen, ["cat"], steps=3, seed=1)
    assert again is patch and other_seed is not patch
    assert all(torch.equal(frozen[k], before[k]) for k in sd)
    assert set(patch.deltas) and all(".layers.0." in n for n in patch.deltas)
    assert "target displacement" in text


def test_a_change_anywhere_in_the_weights_retrains():
    # e.g. a LoRA on a middle layer: the base fingerprint (a few sampled tensors) does not see it, the cache must
    sd = comfy_sd()
    patch, _ = core.train(sd, ["cat"], steps=2)
    key = "clip_l.transformer.text_model.encoder.layers.1.mlp.fc2.bias"
    changed = {**sd, key: sd[key] + 1e-3}
    assert core.train(changed, ["cat"], steps=2)[0] is not patch
    assert core.train(sd, ["cat"], steps=2)[0] is patch


def test_a_cancel_from_the_host_stops_training_and_caches_nothing():
    class Interrupted(Exception):
        pass

    def cancel():
        raise Interrupted()

    sd = comfy_sd(seed=3)
    with pytest.raises(Interrupted):
        core.train(sd, ["cat"], steps=3, should_cancel=cancel)
    steps = []
    core.train(sd, ["cat"], steps=3, progress=lambda step, total, loss: steps.append((step, total)))
    assert steps[-1] == (3, 3)  # trained afresh, not a cached partial result


def test_a_clip_without_clip_l_is_refused_in_one_line():
    sd = {"clip_g.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(4, 4), "t5xxl.transformer.x": torch.zeros(1)}
    with pytest.raises(HirmError, match=r"no clip_l text encoder \(it has clip_g, t5xxl\)"):
        core.train(sd, ["cat"], steps=1)


def test_patch_keys_follow_comfyui_names_and_wrong_encoders_are_refused():
    sd = comfy_sd()
    patch, _ = core.train(sd, ["cat"], steps=2)
    patches, warning = core.encoder_patches(sd, patch)
    assert warning is None
    assert set(patches) == {"clip_l.transformer." + n for n in patch.deltas}
    kind, (delta,) = next(iter(patches.values()))
    assert kind == "diff" and delta.ndim in (1, 2)
    sdxl = {**sd, **{k.replace("clip_l.", "clip_g."): v for k, v in sd.items()}}
    assert set(core.encoder_patches(sdxl, patch)[0]) == set(patches)  # SDXL: a CLIP-L patch goes to clip_l
    clip_g_patch = core.patches.ErasurePatch(patch.deltas, {**patch.metadata, "encoder": {**patch.encoder, "family": "clip-g"}})
    assert all(k.startswith("clip_g.") for k in core.encoder_patches(sdxl, clip_g_patch)[0])
    with pytest.raises(PatchMismatchError, match="clip_g"):  # a CLIP-G patch on a CLIP with only clip_l
        core.encoder_patches(sd, clip_g_patch)
    wide = {k: torch.zeros(*(s * 2 for s in v.shape)) if v.ndim else v for k, v in sd.items()}
    with pytest.raises(PatchMismatchError, match="does not fit"):
        core.encoder_patches(wide, patch)
    _, warning = core.encoder_patches(comfy_sd(seed=9), patch)
    assert "other base weights" in warning


# ---------------------------------------------------------------------------------------------- NLCE

def ldm_unet(names, width=32, inner=8):
    """A module tree with LDM names (``input_blocks.8.1.transformer_blocks.0.attn2``), each attn2 with to_k."""
    root = torch.nn.Module()
    for name in names:
        parent = root
        for part in name.split("."):
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module("to_k", torch.nn.Linear(width, inner, bias=False))
    return root


SD1_ATTN2 = ([f"input_blocks.{i}.1.transformer_blocks.0.attn2" for i in (1, 2, 4, 5, 7, 8)]
             + ["middle_block.1.transformer_blocks.0.attn2"]
             + [f"output_blocks.{i}.1.transformer_blocks.0.attn2" for i in range(3, 12)])


def test_every_cross_attention_of_an_sd1_unet_is_found_and_input_8_gates():
    blocks = core.cross_attention_blocks(ldm_unet(SD1_ATTN2))
    assert len(blocks) == 16 and ("middle", 0, 0) in blocks and ("output", 11, 0) in blocks
    assert core.gating_block(blocks) == nlce.GATING_LAYERS["sd1"]["comfy"] == ("input", 8, 0)
    with pytest.raises(NlceError, match="SD1.x"):
        core.gating_block([("middle", 0, 0)])


def fake_model(diffusion_model):
    return SimpleNamespace(model=SimpleNamespace(diffusion_model=diffusion_model))


def test_nlce_refuses_models_without_cross_attention_or_with_other_text_widths():
    flux = torch.nn.Module()
    flux.add_module("double_blocks", torch.nn.ModuleList([torch.nn.Linear(4, 4)]))
    with pytest.raises(NlceError, match="no UNet cross-attention .*Flux"):
        core.nlce_model(fake_model(flux), comfy_sd(), ["cat"], "")
    with pytest.raises(NlceError, match="2048-wide .*SDXL"):
        core.nlce_model(fake_model(ldm_unet(SD1_ATTN2, width=2048)), comfy_sd(), ["cat"], "")


@pytest.fixture(scope="module")
def session_parts():
    model, tok = tiny_clip()
    encode = nlce.clip_row_encoder(model, tok)
    return encode, nlce.build_concept_set(encode, ["cat"])


def test_auto_neighbours_never_include_another_erased_concept(session_parts):
    encode, _ = session_parts
    table = core.neighbour_table(encode, ["cat", "dog"], "auto")
    assert set(table) == {"cat", "dog"} and all(table.values())
    assert "dog" not in table["cat"] and "cat" not in table["dog"]
    assert core.neighbour_table(encode, ["cat"], "tiger\nlion, ") == {"cat": ["tiger", "lion"]}


def nlce_state(cs, to_k):
    return core.ComfyNlce(cs, nlce.make_nlce_config(live_floor=0.1), lambda sigma: sigma * 100, ("input", 8, 0), to_k)


def test_nlce_stage1_live_tokens_and_gate_keys_in_a_pass(session_parts):
    _, cs = session_parts
    project = torch.nn.Linear(32, 8, bias=False)  # the layer's to_k / to_v as ComfyUI applies them
    gating_to_k = torch.nn.Linear(32, 8, bias=False)
    gate_inputs = []
    gating_to_k.register_forward_hook(lambda m, args, out: gate_inputs.append(args[0]))
    state = nlce_state(cs, gating_to_k)
    context = torch.randn(4, 77, 32)
    extra = {"cond_or_uncond": [1, 0], "n_heads": 2, "original_shape": [4, 4, 8, 8], "activations_shape": [4, 320, 2, 2],
             "block": ("input", 8), "block_index": 0}
    seen = {}

    def apply_model(x, sigma, **c):  # stands for ComfyUI's UNet: one attn2 layer, the gating one
        n, k_ctx, v_ctx = state.context_patch(torch.randn(4, 4, 8), context, context, extra)
        seen["context"], seen["prepared"] = k_ctx, state._prepared
        return state.attention(torch.randn(4, 4, 8), project(k_ctx), project(v_ctx), extra)

    with torch.inference_mode():
        out = state.unet_wrapper(apply_model, {"input": None, "timestep": torch.tensor([5.0]), "c": {}})
    live = seen["prepared"].live
    assert not live[:2].any() and live[2:].any()  # uncond chunk first, as ComfyUI tells
    assert out.shape == (4, 4, 8)
    gate = state.session.diagnostics[-1]["gate"]
    assert gate["shape"] == [2, 2] and gate["source"] == "this pass"  # the layer's own h x w from activations_shape
    assert state.session.diagnostics[-1]["timestep"] == 500.0  # sigma converted by the model's own sampling
    assert not torch.equal(seen["context"][2:], context[2:])  # stage 1 on the prompt rows
    assert len(gate_inputs) == 1 and gate_inputs[0] is context  # the gate reads the keys of the unmodified context
    assert state._incoming is None and state._prepared is None  # nothing carried between passes


def test_nlce_refuses_to_run_when_its_unet_wrapper_was_replaced(session_parts):
    _, cs = session_parts
    state = nlce_state(cs, torch.nn.Linear(32, 8, bias=False))
    with pytest.raises(NlceError, match="apply NLCE Gate last"):
        state.context_patch(torch.randn(2, 4, 8), torch.randn(2, 77, 32), None, {"cond_or_uncond": [0]})
