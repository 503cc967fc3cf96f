"""The ComfyUI pack's logic without ComfyUI: training from a CLIP state dict, patch keys, NLCE wiring."""

import warnings

import pytest
import torch
from tiny import canonical_state_dict, tiny_clip

from comfy_hirm import core
from shared_core.errors import HirmError, NlceError, PatchMismatchError


def comfy_sd(seed=0, prefix="clip_l.transformer."):
    model, _ = tiny_clip(seed=seed)
    return {**canonical_state_dict(model, prefix), "clip_l.logit_scale": torch.tensor(4.6)}


def test_concepts_are_split_on_lines_and_commas_and_empty_is_refused():
    assert core.parse_concepts("Van Gogh\n cat, dog ,\n") == ["Van Gogh", "cat", "dog"]
    with pytest.raises(HirmError, match="no concept"):
        core.parse_concepts(" \n , ")


def test_training_under_inference_mode_leaves_the_clip_alone_and_is_cached():
    sd = comfy_sd()
    before = {k: v.clone() for k, v in sd.items()}
    with torch.inference_mode():  # how ComfyUI runs every node
        frozen = {k: v.clone() for k, v in sd.items()}
        patch, text = core.train(frozen, ["cat"], steps=3)
        again, _ = core.train(frozen, ["cat"], steps=3)
    assert again is patch  # same base weights and settings: not trained twice
    assert all(torch.equal(sd[k], before[k]) for k in sd)
    assert set(patch.deltas) and all(".layers.0." in n for n in patch.deltas)
    assert "target displacement" in text


def test_a_cancel_from_the_host_stops_training_without_a_patch():
    class Interrupted(Exception):
        pass

    def cancel():
        raise Interrupted()

    with pytest.raises(Interrupted):
        core.train(comfy_sd(seed=3), ["cat"], steps=3, should_cancel=cancel)


def test_patch_keys_follow_comfyui_names_and_wrong_encoders_are_refused():
    sd = comfy_sd()
    patch, _ = core.train(sd, ["cat"], steps=2)
    patches, warning = core.encoder_patches(sd, patch)
    assert warning is None
    assert all(k.startswith("clip_l.transformer.text_model.encoder.layers.0.") for k in patches)
    kind, (delta,) = next(iter(patches.values()))
    assert kind == "diff" and delta.ndim in (1, 2)
    with pytest.raises(PatchMismatchError, match="clip_g"):  # a CLIP-G patch on a CLIP with only clip_l
        core.encoder_patches(sd, core.patches.ErasurePatch(patch.deltas, {**patch.metadata, "encoder": {**patch.encoder, "family": "clip-g"}}))
    wide = {k: torch.zeros(*(s * 2 for s in v.shape)) if v.ndim else v for k, v in sd.items()}
    with pytest.raises(PatchMismatchError, match="does not fit"):
        core.encoder_patches(wide, patch)
    _, warning = core.encoder_patches(comfy_sd(seed=9), patch)
    assert "other base weights" in warning


def test_nlce_finds_live_tokens_only_in_the_conditional_chunk():
    model, tok = tiny_clip()
    from shared_core import nlce

    cs = nlce.build_concept_set(nlce.clip_row_encoder(model, tok), ["cat"])
    state = core.ComfyNlce(cs, nlce.make_nlce_config(live_floor=0.1), lambda s: s * 100, ("input", 8, 0))
    state.session.begin_pass(500.0)
    context = torch.randn(4, 77, 32)
    extra = {"cond_or_uncond": [1, 0], "n_heads": 2, "original_shape": [4, 4, 8, 8], "block": ("input", 8), "block_index": 0}
    n, k_ctx, v_ctx = state.context_patch(torch.randn(4, 16, 8), context, context, extra)
    live = state.session._prepared[next(iter(state.session._prepared))].live
    assert not live[:2].any() and live[2:].any()  # uncond chunk first, as ComfyUI tells
    out = state.attention(torch.randn(4, 16, 8), torch.randn(4, 77, 8), torch.randn(4, 77, 8), extra)
    assert out.shape == (4, 16, 8) and state.session.diagnostics[-1]["gate"]["shape"] == [4, 4]


def test_nlce_blocks_of_an_ldm_unet_and_the_gating_block():
    blocks = [("input", 1, 0), ("input", 2, 0), ("input", 4, 0), ("input", 5, 0), ("input", 7, 0), ("input", 8, 0), ("middle", 0, 0)]
    assert core.gating_block(blocks) == ("input", 8, 0)
    with pytest.raises(NlceError, match="SD1.x"):
        core.gating_block([("middle", 0, 0)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert core._module_name(("output", 3, 0)) == "output_blocks.3.1.transformer_blocks.0.attn2"
