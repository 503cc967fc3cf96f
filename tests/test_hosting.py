"""The middle layer every host calls: training on a host's weights, patch keys, NLCE on a ModelPatcher-style host.

Everything here is reached by ComfyUI and Forge through ``shared_core.adapters.patcher`` and by
A1111 through ``shared_core.hosting``; the real hosts run the same calls in the opt-in tests
(test_comfy_integration.py, test_forge_integration.py).
"""

import copy
from types import SimpleNamespace

import pytest
import torch
from tiny import canonical_state_dict, tiny_clip

from shared_core import hirm, nlce
from shared_core.adapters import patcher
from shared_core.encoders import PATCHER_LAYOUTS, KeyLayout, canonical_from_host, canonical_parameters, host_key
from shared_core.errors import HirmError, NlceError, PatchMismatchError
from shared_core.hosting import concept_set_for, patch_differences, train_on_encoders


def train_on_weights(weights, config, **kw):
    """One CLIP-L's canonical weights, as the hosts hand them to ``train_on_encoders``."""
    return train_on_encoders({"clip_l": (weights, None)}, config, **kw)
from shared_core.patch import ErasurePatch


def comfy_sd(seed=0, prefix="clip_l.transformer."):
    model, _ = tiny_clip(seed=seed)
    return {**canonical_state_dict(model, prefix), "clip_l.logit_scale": torch.tensor(4.6)}


def cat_config(steps=3, **kw):
    return hirm.make_config(["cat"], steps=steps, **kw)


# ---------------------------------------------------------------------------------------------- names

def test_canonical_names_become_host_keys_in_one_place_and_back():
    name = "text_model.encoder.layers.0.mlp.fc1.weight"
    assert host_key(name, PATCHER_LAYOUTS["clip_l"]) == "clip_l.transformer." + name
    assert host_key(name, KeyLayout("conditioner.embedders.0.transformer.", nested=False)) == \
        "conditioner.embedders.0.transformer.encoder.layers.0.mlp.fc1.weight"
    sd = comfy_sd()
    assert set(canonical_from_host(sd, PATCHER_LAYOUTS["clip_l"])) == {k[len("clip_l.transformer."):] for k in sd
                                                                          if k.startswith("clip_l.transformer.")}
    with pytest.raises(HirmError):
        host_key("encoder.layers.0.mlp.fc1.weight", PATCHER_LAYOUTS["clip_l"])


def test_a1111_s_wrapped_token_embedding_keeps_its_canonical_name():
    """A1111's sd_hijack puts EmbeddingsWithFixes around CLIP's token embedding (``.wrapped``)."""
    model, _ = tiny_clip()

    class EmbeddingsWithFixes(torch.nn.Module):  # what A1111 installs: the original embedding held as .wrapped
        def __init__(self, wrapped):
            super().__init__()
            self.wrapped = wrapped

        def forward(self, input_ids):
            return self.wrapped(input_ids)

    before = set(canonical_parameters(model))
    embeddings = model.text_model.embeddings if hasattr(model, "text_model") else model.embeddings
    embeddings.token_embedding = EmbeddingsWithFixes(embeddings.token_embedding)
    assert set(canonical_parameters(model)) == before


# ---------------------------------------------------------------------------------------------- training

def test_training_under_inference_mode_leaves_the_weights_alone_and_same_inputs_do_not_retrain():
    weights = patcher.encoder_weights(comfy_sd())
    before = {k: v.clone() for k, v in weights.items()}
    with torch.inference_mode():  # how ComfyUI runs every node
        frozen = {k: v.clone() for k, v in weights.items()}
        patch = train_on_weights(frozen, cat_config())
        again = train_on_weights({k: v.clone() for k, v in frozen.items()}, cat_config())
        other_seed = train_on_weights(frozen, cat_config(seed=1))
    assert again is patch and other_seed is not patch
    assert all(torch.equal(frozen[k], before[k]) for k in weights)
    assert set(patch.deltas) and all(".layers.0." in n for n in patch.deltas)
    assert patch.report["n_nontarget_prompts"] >= 50


@pytest.mark.parametrize("layer", [0, -1])
def test_training_shares_a_hosts_frozen_weights_copies_what_it_trains_and_gives_the_same_patch(layer):
    from shared_core import hosting
    from shared_core.encoders import build_text_model, text_module

    weights = patcher.encoder_weights(comfy_sd(seed=5))  # plain tensors, as A1111 and Forge hand them over
    before = {k: v.clone() for k, v in weights.items()}
    config = cat_config(2, trainable_layers=(layer,))
    trained = hosting._trained_names(weights, config)
    model = build_text_model(weights, own=trained.__contains__)
    last = model.config.num_hidden_layers - 1
    assert trained and all(f".layers.{0 if layer == 0 else last}." in n for n in trained)
    shared = {"text_model." + n for n, p in text_module(model).named_parameters()  # text_model.* in any transformers
              if p.data_ptr() == weights["text_model." + n].data_ptr()}
    assert shared == set(weights) - trained - {"text_model.embeddings.position_ids"}
    patch = train_on_weights(weights, config)
    assert all(torch.equal(weights[k], before[k]) for k in weights)
    hosting._TRAINED.clear()
    with torch.inference_mode():  # inference tensors are always copied: the same training on copies
        copied = train_on_weights({k: v.clone() for k, v in weights.items()}, config)
    assert copied is not patch and all(torch.equal(copied.deltas[n], patch.deltas[n]) for n in patch.deltas)


def test_a_change_anywhere_in_the_weights_retrains():
    # e.g. a LoRA on a middle layer: the base fingerprint (a few sampled tensors) does not see it, the cache must
    weights = patcher.encoder_weights(comfy_sd())
    patch = train_on_weights(weights, cat_config(2))
    key = "text_model.encoder.layers.1.mlp.fc2.bias"
    assert train_on_weights({**weights, key: weights[key] + 1e-3}, cat_config(2)) is not patch
    assert train_on_weights(weights, cat_config(2)) is patch


def test_a_cancel_from_the_host_stops_training_and_caches_nothing():
    class Interrupted(Exception):
        pass

    def cancel():
        raise Interrupted()

    weights = patcher.encoder_weights(comfy_sd(seed=3))
    with pytest.raises(Interrupted):
        train_on_weights(weights, cat_config(), should_cancel=cancel)
    calls = []
    train_on_weights(weights, cat_config(), progress=lambda step, total, loss: calls.append((step, total, loss)))
    training = [c for c in calls if c[2] is not None]
    assert [c[0] for c in training] == [1, 2, 3]  # trained afresh, not a cached partial result
    assert calls[-1][0] == calls[-1][1] and calls[-1][2] is None  # then the report's batches, to the end of the bar


def test_a_clip_without_clip_l_is_refused_in_one_line():
    sd = {"clip_g.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(4, 4), "t5xxl.transformer.x": torch.zeros(1)}
    with pytest.raises(HirmError, match=r"no clip_l text encoder \(it has clip_g, t5xxl\)"):
        patcher.encoder_weights(sd)


# ---------------------------------------------------------------------------------------------- patch keys

def test_patch_keys_follow_patcher_names_and_wrong_encoders_are_refused():
    sd = comfy_sd()
    patch = train_on_weights(patcher.encoder_weights(sd), cat_config(2))
    patches, notes = patcher.clip_patches(sd, patch)
    assert notes == []
    assert set(patches) == {"clip_l.transformer." + n for n in patch.deltas}
    kind, (delta,) = next(iter(patches.values()))
    assert kind == "diff" and delta.ndim in (1, 2)
    sdxl = {**sd, **{k.replace("clip_l.", "clip_g."): v for k, v in sd.items()}}
    on_sdxl, notes = patcher.clip_patches(sdxl, patch)
    assert set(on_sdxl) == set(patches)  # SDXL: a CLIP-L patch goes to clip_l, said so
    assert len(notes) == 1 and "changes clip_l only; this CLIP's clip_g still carries the concept" in notes[0]
    clip_g_patch = ErasurePatch(patch.deltas, {**patch.metadata, "encoder": {**patch.encoder, "family": "clip-g"}})
    assert all(k.startswith("clip_g.") for k in patcher.clip_patches(sdxl, clip_g_patch)[0])
    with pytest.raises(PatchMismatchError, match="clip_g"):  # a CLIP-G patch on a CLIP with only clip_l
        patcher.clip_patches(sd, clip_g_patch)
    wide = {k: torch.zeros(*(s * 2 for s in v.shape)) if v.ndim else v for k, v in sd.items()}
    with pytest.raises(PatchMismatchError, match="does not fit"):
        patcher.clip_patches(wide, patch)
    _, notes = patcher.clip_patches(comfy_sd(seed=9), patch)
    assert len(notes) == 1 and "other base weights" in notes[0]
    if hasattr(torch, "float8_e4m3fn"):  # ComfyUI's --fp8_e4m3fn-text-enc: the same base, stored in fp8, is the same base
        fp8 = {k: v.to(torch.float8_e4m3fn) if v.is_floating_point() and v.ndim else v for k, v in sd.items()}
        assert patcher.clip_patches(fp8, patch)[1] == []
        other = {k: v.to(torch.float8_e4m3fn) if v.is_floating_point() and v.ndim else v for k, v in comfy_sd(seed=9).items()}
        assert "other base weights" in patcher.clip_patches(other, patch)[1][0]
    diffs, _ = patch_differences(sd, patch, PATCHER_LAYOUTS["clip_l"])
    assert {k: v for k, (_, (v,)) in patches.items()}.keys() == diffs.keys()


# ---------------------------------------------------------------------------------------------- NLCE

class Downsample(torch.nn.Module):
    """Stands for the LDM UNets' stride-2 block (its class name is what tells the level of a block)."""


def ldm_unet(names, width=32, inner=8):
    """A module tree with LDM names (``input_blocks.8.1.transformer_blocks.0.attn2``), each attn2 with to_k, and the
    downsampling blocks of SD1.x's ``input_blocks`` (3, 6, 9)."""
    root = torch.nn.Module()
    for name in names + [f"input_blocks.{i}" for i in (3, 6, 9)]:
        parent = root
        for part in name.split("."):
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        if name.endswith("attn2"):
            parent.add_module("to_k", torch.nn.Linear(width, inner, bias=False))
        else:
            parent.add_module("0", Downsample())
    return root


SD1_ATTN2 = ([f"input_blocks.{i}.1.transformer_blocks.0.attn2" for i in (1, 2, 4, 5, 7, 8)]
             + ["middle_block.1.transformer_blocks.0.attn2"]
             + [f"output_blocks.{i}.1.transformer_blocks.0.attn2" for i in range(3, 12)])


def test_every_cross_attention_is_found_and_one_rule_picks_the_gating_layer_in_every_naming():
    blocks = patcher.cross_attention_blocks(ldm_unet(SD1_ATTN2))
    assert len(blocks) == 16 and ("middle", 0, 0) in blocks and ("output", 11, 0) in blocks
    assert nlce.gating_layer(blocks) == ("input", 8, 0)
    assert nlce.gating_layer(SD1_ATTN2) == "input_blocks.8.1.transformer_blocks.0.attn2"
    diffusers = [f"down_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2.processor" for b in range(3) for a in range(2)]
    assert nlce.gating_layer(diffusers) == "down_blocks.2.attentions.1.transformer_blocks.0.attn2.processor"
    with pytest.raises(NlceError, match="SD1.x"):
        nlce.gating_layer([("middle", 0, 0)])


class Patcher:
    """The part of ComfyUI's ModelPatcher that NLCE uses, as comfy/model_patcher.py implements it."""

    def __init__(self, diffusion_model):
        self.model = SimpleNamespace(diffusion_model=diffusion_model)
        self.model_options = {"transformer_options": {}}

    def clone(self):
        c = Patcher(self.model.diffusion_model)
        c.model_options = copy.deepcopy(self.model_options)
        return c

    def set_model_attn2_patch(self, patch):
        to = self.model_options["transformer_options"].setdefault("patches", {})
        to["attn2_patch"] = to.get("attn2_patch", []) + [patch]

    def set_model_attn2_replace(self, patch, block, number, index=None):
        to = self.model_options["transformer_options"].setdefault("patches_replace", {})
        to.setdefault("attn2", {})[(block, number) if index is None else (block, number, index)] = patch

    def set_model_unet_function_wrapper(self, fn):
        self.model_options["model_function_wrapper"] = fn


@pytest.fixture(scope="module")
def session_parts():
    model, tok = tiny_clip()
    encode = nlce.clip_row_encoder(model, tok)
    return encode, nlce.build_concept_set(encode, ["cat"])


def test_nlce_refuses_models_without_cross_attention_or_with_other_text_widths(session_parts):
    _, cs = session_parts
    flux = torch.nn.Module()
    flux.add_module("double_blocks", torch.nn.ModuleList([torch.nn.Linear(4, 4)]))
    with pytest.raises(NlceError, match=r"no UNet cross-attention.*supports SD1.x, SDXL, Flux \(experimental\)"):
        patcher.install_nlce(Patcher(flux), cs, cs.config, lambda s: s)
    with pytest.raises(NlceError, match="2048-wide"):
        patcher.install_nlce(Patcher(ldm_unet(SD1_ATTN2, width=2048)), cs, cs.config, lambda s: s)


def test_installing_nlce_never_changes_the_input_model(session_parts):
    _, cs = session_parts
    model = Patcher(ldm_unet(SD1_ATTN2))
    before = copy.deepcopy(model.model_options)
    clone, _ = patcher.install_nlce(model, cs, cs.config, lambda s: s)
    assert model.model_options == before and len(clone.model_options["transformer_options"]["patches_replace"]["attn2"]) == 16


def test_operators_for_a_host_encoder_are_cached_and_auto_never_mines_another_concept():
    weights = patcher.encoder_weights(comfy_sd())
    config = nlce.make_nlce_config()
    cs = concept_set_for(weights, ["cat", "dog"], "auto", config)
    assert concept_set_for({k: v.clone() for k, v in weights.items()}, ["cat", "dog"], "auto", config) is cs
    assert set(cs.neighbors) == {"cat", "dog"} and all(cs.neighbors.values())
    assert "dog" not in cs.neighbors["cat"] and "cat" not in cs.neighbors["dog"]
    shared = concept_set_for(weights, ["cat"], "tiger\nlion, ", config)
    assert shared.neighbors == {"cat": ["tiger", "lion"]}


def nlce_state(cs, to_k):
    return patcher.PatcherNlce(cs, nlce.make_nlce_config(live_floor=0.1), lambda sigma: sigma * 100, ("input", 8, 0), to_k, 2)


LATENT = torch.zeros(4, 4, 8, 8)  # the UNet's input: 8 x 8, the gating layer at 2 x 2 (two downsamplings)


EXTRA = {"cond_or_uncond": [1, 0], "n_heads": 2, "original_shape": [4, 4, 8, 8], "activations_shape": [4, 320, 2, 2],
         "block": ("input", 8), "block_index": 0}


def test_nlce_stage1_live_tokens_and_gate_keys_in_a_pass(session_parts):
    _, cs = session_parts
    project = torch.nn.Linear(32, 8, bias=False)  # the layer's to_k / to_v as ComfyUI applies them
    gating_to_k = torch.nn.Linear(32, 8, bias=False)
    gate_inputs = []
    gating_to_k.register_forward_hook(lambda m, args, out: gate_inputs.append(args[0]))
    state = nlce_state(cs, gating_to_k)
    context = torch.randn(4, 77, 32)
    seen = {}

    def apply_model(x, sigma, **c):  # stands for ComfyUI's UNet: one attn2 layer, the gating one
        n, k_ctx, v_ctx = state.context_patch(torch.randn(4, 4, 8), context, context, EXTRA)
        seen["context"], seen["prepared"] = k_ctx, state.session.current.prepared
        return state.attention(torch.randn(4, 4, 8), project(k_ctx), project(v_ctx), EXTRA)

    with torch.inference_mode():
        out = state.unet_wrapper(apply_model, {"input": LATENT, "timestep": torch.tensor([5.0]), "c": {}, "cond_or_uncond": [1, 0]})
    live = seen["prepared"].live
    assert not live[:2].any() and live[2:].any()  # uncond chunk first, as ComfyUI tells
    assert out.shape == (4, 4, 8)
    gate = state.session.diagnostics[-1]["gate"]
    assert gate["shape"] == [2, 2] and gate["source"] == "this pass"  # the layer's own h x w from activations_shape
    assert state.session.diagnostics[-1]["timestep"] == 500.0  # sigma converted by the model's own sampling
    assert not torch.equal(seen["context"][2:], context[2:])  # stage 1 on the prompt rows
    assert len(gate_inputs) == 1 and gate_inputs[0] is context  # the gate reads the keys of the unmodified context
    assert state.session.current is None  # no context tensors carried between passes


def test_another_nodes_attention_replace_is_called_through_not_overwritten(session_parts):
    _, cs = session_parts
    model = Patcher(ldm_unet(SD1_ATTN2, width=32))
    calls = []

    def ip_adapter(q, k, v, extra):  # e.g. IP-Adapter: attention plus something of its own
        calls.append(extra["block"])
        return torch.ones_like(q)

    model.set_model_attn2_replace(ip_adapter, "input", 8, 0)
    clone, state = patcher.install_nlce(model, cs, nlce.make_nlce_config(live_floor=0.1), lambda s: s * 100)
    assert state.foreign == {("input", 8, 0): ip_adapter}
    context = torch.randn(4, 77, 32)
    project = torch.nn.Linear(32, 8, bias=False)

    def apply_model(x, sigma, **c):
        replace = clone.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 8, 0)]
        n, k_ctx, v_ctx = clone.model_options["transformer_options"]["patches"]["attn2_patch"][0](None, context, context, EXTRA)
        return replace(torch.randn(4, 4, 8), project(k_ctx), project(v_ctx), EXTRA)

    out = state.unet_wrapper(apply_model, {"input": LATENT, "timestep": torch.tensor([5.0]), "c": {}, "cond_or_uncond": [1, 0]})
    assert calls == [("input", 8)]  # its function ran
    assert torch.equal(out[:2], torch.ones(2, 4, 8)) and (out[2:] < 1).any()  # its output, scrubbed where the gate is high


def test_nlce_refuses_to_run_when_a_later_node_replaced_its_wrapper_or_its_attention(session_parts):
    _, cs = session_parts
    state = nlce_state(cs, torch.nn.Linear(32, 8, bias=False))
    with pytest.raises(NlceError, match="apply NLCE Erasure Gate last"):
        state.context_patch(torch.randn(2, 4, 8), torch.randn(2, 77, 32), None, {"cond_or_uncond": [0]})

    def attention_replaced(x, sigma, **c):  # the context patch runs, NLCE's attention never does
        state.context_patch(None, torch.randn(4, 77, 32), None, EXTRA)
        return torch.zeros(1)

    with pytest.raises(NlceError, match="apply NLCE Erasure Gate last"):
        state.unet_wrapper(attention_replaced, {"input": LATENT, "timestep": torch.tensor([5.0]), "c": {}, "cond_or_uncond": [1, 0]})
