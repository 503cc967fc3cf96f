"""A1111 SDXL: the erasure patch's bigG half on the open_clip tower A1111 loads (fused q/k/v, Lora backups as tuples).

The tower stand-in mirrors open_clip's names and sgm's forward (tests/test_a1111_support.py); the first test checks it
computes what a transformers CLIPTextModel with the same weights computes, so the mapping tested here is the real one.
The real-A1111 test (tests/test_a1111_server.py) runs the same on a real SDXL checkpoint.
"""

import pytest
import torch
from test_a1111_support import OpenClipTextTower, hijacked_bigg, no_job_left  # noqa: F401
from tiny import canonical_state_dict, random_clip, tiny_config
from transformers import CLIPTextConfig

from a1111_extension.webui_model import OpenClipPatches, openclip_slots, openclip_tower, openclip_weights
from shared_core.hirm import train_patch
from shared_core.patch import patched
from shared_core.tokenizer import clip_tokenizer


def bigg_like(seed=0):
    """A tiny CLIP with bigG's activation (gelu) and the open_clip tower holding the same weights."""
    config = tiny_config(hidden=48)
    config = CLIPTextConfig(**{**config.to_dict(), "hidden_act": "gelu"})
    model = random_clip(config, seed)
    return model, OpenClipTextTower(canonical_state_dict(model))


def ids(text="a photo of a cat"):
    return clip_tokenizer("!")(text, padding="max_length", max_length=77, return_tensors="pt").input_ids


def test_the_tower_stand_in_computes_what_the_clip_with_its_weights_computes():
    model, tower = bigg_like()
    with torch.no_grad():
        want = model(ids(), output_hidden_states=True).hidden_states[-2]
        got = tower.layer_outputs(ids())[-2]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    weights = openclip_weights(tower)
    assert weights.keys() == canonical_state_dict(model).keys()
    assert all(torch.equal(weights[k], v) for k, v in canonical_state_dict(model).items())


def test_a_patch_on_the_tower_gives_the_patched_clips_rows_and_comes_off_bit_for_bit():
    model, tower = bigg_like()
    embedder = hijacked_bigg(tower)
    assert openclip_tower(embedder) is tower and "text_model.embeddings.token_embedding.weight" in openclip_slots(tower)
    patch = train_patch(model, clip_tokenizer("!"), concepts=["cat"], steps=2, report=False)
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    with torch.no_grad(), patched(model, patch):
        want = model(ids(), output_hidden_states=True).hidden_states[-2]
    patches = OpenClipPatches(tower, [(patch, 1.0)]).apply()
    with torch.no_grad():
        torch.testing.assert_close(tower.layer_outputs(ids())[-2], want, atol=1e-5, rtol=1e-5)
    patches.remove()
    after = tower.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_the_lora_extensions_tuple_backups_carry_the_patch_and_come_back_as_they_were():
    """networks.py keeps (in_proj_weight, out_proj.weight) for a MultiheadAttention, a tensor for a Linear."""
    model, tower = bigg_like()
    attn, fc = tower.transformer.resblocks[0].attn, tower.transformer.resblocks[0].mlp.c_fc
    backup = (attn.in_proj_weight.detach().clone(), attn.out_proj.weight.detach().clone())
    attn.network_weights_backup, fc.network_weights_backup = backup, fc.weight.detach().clone()
    original_fc = fc.network_weights_backup
    patch = train_patch(model, clip_tokenizer("!"), concepts=["cat"], steps=2, report=False)
    patches = OpenClipPatches(tower, [(patch, 0.5)]).apply()
    width = attn.out_proj.weight.shape[0]
    dk = patch.deltas["text_model.encoder.layers.0.self_attn.k_proj.weight"]
    torch.testing.assert_close(attn.network_weights_backup[0][width:2 * width], backup[0][width:2 * width] + 0.5 * dk)
    torch.testing.assert_close(attn.network_weights_backup[0][:width], backup[0][:width]
                               + 0.5 * patch.deltas["text_model.encoder.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(fc.network_weights_backup, original_fc)
    assert openclip_weights(tower).keys() == openclip_slots(tower).keys()
    patches.remove()
    assert attn.network_weights_backup is backup and fc.network_weights_backup is original_fc


# ---------------------------------------------------------------------------------------------- whole jobs on an SDXL model

from test_a1111_support import (Processing, ScriptHooks, SdxlModel, call_hook, run_job, same, script_args,  # noqa: E402
                                sdxl_text_model, snapshot)

from a1111_extension import jobs, training  # noqa: E402
from a1111_extension.webui_model import text_encoders  # noqa: E402
from shared_core import nlce  # noqa: E402
from shared_core.encoders import canonical_parameters  # noqa: E402
from shared_core.hirm import train_model_patch  # noqa: E402
from shared_core.hosting import concept_set_for  # noqa: E402
from shared_core.patch import load_patch, save_patch  # noqa: E402
from shared_core.tokenizer import clip_tokenizer as tokenizer  # noqa: E402


def sdxl_patch(model, folder, name="cat.safetensors"):
    """An SDXL patch (both halves) trained on the stand-in's own encoders, saved in the patch folder."""
    from shared_core.encoders import build_text_model

    encoders = text_encoders(model)
    twin_g = build_text_model(openclip_weights(encoders["clip_g"]))  # a transformers CLIP holding the tower's weights
    patch = train_model_patch({"clip_l": (encoders["clip_l"], tokenizer()), "clip_g": (twin_g, tokenizer("!"))},
                              concepts=["cat"], steps=2, report=False)
    save_patch(patch, str(folder / name))
    return name


def test_an_sdxl_patch_job_changes_both_encoders_while_sampling_and_then_leaves_the_model_bit_identical(tmp_path):
    model = SdxlModel()
    name = sdxl_patch(model, tmp_path)
    patch = load_patch(str(tmp_path / name))
    encoders = text_encoders(model)
    now = {"clip_l": lambda: canonical_parameters(encoders["clip_l"]), "clip_g": lambda: openclip_weights(encoders["clip_g"])}
    want = {c: {k: v.detach() + patch.part(c).deltas[k].float() if k in patch.part(c).deltas else v.detach().clone()
                for k, v in now[c]().items()} for c in now}
    seen = {}
    before = snapshot(model)
    run_job(ScriptHooks(jobs.Env(str(tmp_path))), Processing(model), script_args(patches=[(name, 1.0)]),
            before_sample=lambda p: seen.update({c: {k: v.detach().clone() for k, v in f().items()} for c, f in now.items()}))
    assert not call_hook.reported
    for c in now:
        assert all(torch.allclose(seen[c][k], want[c][k], atol=1e-6) for k in want[c]), c
    assert same(snapshot(model), before)


def test_nlce_on_the_sdxl_model_reads_its_2048_style_rows_erases_and_restores(tmp_path):
    model = SdxlModel()
    encoders = text_encoders(model)
    weights = {"clip_l": canonical_parameters(encoders["clip_l"]), "clip_g": openclip_weights(encoders["clip_g"])}
    cs = concept_set_for(weights, ["cat"], None, nlce.make_nlce_config(live_floor=0.1))
    assert cs.family == "sdxl" and cs.width == 80
    rows = nlce.sdxl_row_encoder(*[m for c in ("clip_l", "clip_g") for m in (
        __import__("shared_core.encoders", fromlist=["x"]).build_text_model(weights[c]), tokenizer("!" if c == "clip_g" else "<|endoftext|>"))])
    conditioning = model.get_learned_conditioning(["a cat"])["crossattn"][0]
    torch.testing.assert_close(rows(["a cat"])[0], conditioning[:4], atol=1e-4, rtol=1e-4)  # the rows the UNet reads
    before = snapshot(model)
    plain = run_job(ScriptHooks(jobs.Env(str(tmp_path))), Processing(model), script_args()).samples[0]
    p = run_job(ScriptHooks(jobs.Env(str(tmp_path))), Processing(model),
                script_args(nlce=True, concepts="cat", neighbors="dog", beta=1.0, gamma=1.0))
    assert not call_hook.reported
    assert not torch.equal(p.samples[0], plain) and p.extra_generation_params.get("Erasure NLCE") == "cat"
    assert same(snapshot(model), before)


def test_the_training_tab_trains_both_sdxl_encoders_in_one_patch(tmp_path):
    model = SdxlModel()
    path, report = training.train(model, concepts="cat", method="random", anchor="", preset="object", steps=2, seed=42,
                                  name="xl-cat", overwrite=False, folder=str(tmp_path))
    patch = load_patch(path)
    assert patch.components == ["clip_l", "clip_g"] and "pooled (CLIP-G)" in report


def test_on_an_sdxl_refiner_a_clip_l_patch_and_nlce_are_refused_in_one_line(tmp_path):
    from shared_core.errors import HirmError

    refiner = SdxlModel()
    refiner.conditioner.embedders = torch.nn.ModuleList([refiner.conditioner.embedders[1]])
    refiner.cond_stage_model = refiner.conditioner.embedders[0]  # sd_hijack: one text model
    assert list(text_encoders(refiner)) == ["clip_g"]
    from test_a1111_support import make_patch

    save_patch(make_patch(sdxl_text_model(SdxlModel())), str(tmp_path / "l.safetensors"))
    for args, message in ((script_args(patches=[("l.safetensors", 1.0)]), "is for .* but the loaded checkpoint .* has clip_g"),
                          (script_args(nlce=True, concepts="cat"), "accordion supports SD1.x and SDXL; .* is an SDXL refiner")):
        before = snapshot(refiner)
        with pytest.raises(HirmError, match=message) as raised:
            run_job(ScriptHooks(jobs.Env(str(tmp_path))), Processing(refiner), args)
        assert "\n" not in str(raised.value) and same(snapshot(refiner), before)
