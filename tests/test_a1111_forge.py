"""Forge: erasure through forge_objects (clone, keyword-only add_patches, attention patches, assign back);
the objects the webui keeps, and the text encoder's weights after the job, are as before."""

import copy

import pytest
import torch
from test_a1111_support import (no_job_left,  # noqa: F401 (an autouse fixture)
                                ForgeSd1, HijackedClip, Processing, forge_text_encoder, ScriptHooks, call_hook, make_patch, run_forge_job, same,
                                script_args, snapshot, write_patch)

from a1111_extension import jobs
from shared_core.encoders import canonical_parameters
from shared_core.errors import HirmError
from shared_core.patch import apply_patch, load_patch


@pytest.fixture()
def model():
    return ForgeSd1()


@pytest.fixture()
def env(tmp_path):
    return jobs.Env(str(tmp_path))


def modules(model):
    """The webui's own modules: the UNet and the text encoders (the engine's forge_objects are swapped by Forge itself)."""
    return snapshot(model.unet_model, model.forge_objects_original.clip.cond_stage_model)


def clip_transformer(model):
    return forge_text_encoder(model.forge_objects_original.clip)


def test_a_patch_reaches_the_conditioning_through_a_clip_clone_and_the_encoder_is_restored_after(model, env, tmp_path):
    name = write_patch(tmp_path, "cat.safetensors", clip_transformer(model))
    original = model.forge_objects_original.clip
    before = modules(model)
    twin = copy.deepcopy(clip_transformer(model))
    apply_patch(twin, load_patch(str(tmp_path / name)), 0.7)
    p = run_forge_job(ScriptHooks(env), Processing(model), script_args(patches=[(name, 0.7)]))
    assert not call_hook.reported
    with torch.no_grad():
        expected = HijackedClip(twin)(["a photo of a cat"])
    assert torch.allclose(p.c, expected, atol=1e-6)
    assert model.forge_objects_original.clip is original and original.patcher.lora_patches == {}
    assert same(modules(model), before)  # the shared encoder module: weights back (LoraLoader refreshed)
    assert original.cond_stage_model.lora_loader.loaded_hash == str([])
    assert p.extra_generation_params["Erasure patches"] == "cat.safetensors:0.7"


def test_a_users_lora_in_forge_stays_and_the_patch_goes_on_top(model, env, tmp_path):
    te = clip_transformer(model)
    name = write_patch(tmp_path, "cat.safetensors", te)
    lora_clip = model.forge_objects_original.clip.clone()  # what sd_forge_lora's load_networks builds
    key = "clip_l.transformer.text_model.encoder.layers.1.mlp.fc1.weight"
    lora_clip.add_patches(filename="style.safetensors", patches={key: (torch.full_like(dict(lora_clip.cond_stage_model.named_parameters())[key], 0.01),)},
                          strength_patch=1.0)
    model.forge_objects_after_applying_lora.clip = lora_clip
    lora_clip.patcher.refresh_loras()
    with_lora = {k: v.clone() for k, v in canonical_parameters(te).items()}
    run_forge_job(ScriptHooks(env), Processing(model), script_args(patches=[(name, 1.0)]))
    assert model.forge_objects_after_applying_lora.clip is lora_clip
    assert all(torch.equal(v, with_lora[k]) for k, v in canonical_parameters(te).items())


def test_nlce_runs_on_a_unet_clone_and_the_webuis_unet_is_untouched(model, env):
    unet = model.forge_objects_original.unet
    options = copy.deepcopy(unet.model_options)
    before = modules(model)
    vanilla = run_forge_job(ScriptHooks(env), Processing(model), script_args(enabled=False)).samples[0]
    p = run_forge_job(ScriptHooks(env), Processing(model), script_args(nlce=True, concepts="cat", neighbors="dog"))
    assert not call_hook.reported
    assert not torch.allclose(p.samples[0], vanilla, atol=1e-4)
    assert unet.model_options == options and model.forge_objects_after_applying_lora.unet is unet
    assert same(modules(model), before)


def test_nlce_patches_every_cross_attention_block_and_chains_an_existing_wrapper(model, env):
    calls = []
    model.forge_objects_after_applying_lora.unet = unet = model.forge_objects_original.unet.clone()
    unet.set_model_unet_function_wrapper(lambda apply, args: calls.append(1) or apply(args["input"], args["timestep"], **args["c"]))
    p = Processing(model)
    seen = {}

    def sample(p):
        clone = p.sd_model.forge_objects.unet
        seen["replace"] = sorted(clone.model_options["transformer_options"]["patches_replace"]["attn2"])
        seen["own"] = clone is not unet

    script = ScriptHooks(env)
    script.process(p, *script_args(nlce=True, concepts="cat"))
    model.forge_objects = model.forge_objects_after_applying_lora.shallow_copy()
    script.process_batch(p)
    p.setup_conds()
    script.process_before_every_sampling(p)
    sample(p)
    from test_a1111_support import forge_sample
    forge_sample(p)
    script.postprocess(p, None)
    assert seen["own"] and len(seen["replace"]) == 16 and ("input", 8, 0) in seen["replace"]
    assert len(calls) == 3  # the earlier wrapper still runs once per step


def test_sd2_in_forge_is_refused(env, tmp_path):
    model = ForgeSd1(key="clip_h")
    model.is_sd1 = False
    name = write_patch(tmp_path, "cat.safetensors", make_patch_model())
    p = Processing(model)
    ScriptHooks(env).process(p, *script_args(patches=[(name, 1.0)]))
    with pytest.raises(HirmError, match="SD2.x"):
        p.sample(None, None, [0], [0], 0.0, p.prompts)


def make_patch_model():
    return forge_text_encoder(ForgeSd1().forge_objects.clip)


def test_a_patch_for_another_encoder_is_refused_in_forge(model, env, tmp_path):
    from test_a1111_support import text_encoder
    name = write_patch(tmp_path, "wide.safetensors", text_encoder(hidden=64))
    p = Processing(model)
    ScriptHooks(env).process(p, *script_args(patches=[(name, 1.0)]))
    with pytest.raises(HirmError, match="does not fit"):
        p.sample(None, None, [0], [0], 0.0, p.prompts)
    assert make_patch(clip_transformer(model)).deltas  # the encoder itself is fine


@pytest.mark.parametrize("hires_loras, firstpass_conds, refused", [
    ("other", False, True),   # Forge rebuilds its CLIP for the hires prompt's LoRAs: the patches would be lost
    ("same", False, False),
    ("other", True, False),   # hires conds are made with the first pass's CLIP (our clone)
])
def test_hires_fix_with_other_loras_is_refused_unless_its_conds_keep_the_patches(model, tmp_path, hires_loras, firstpass_conds,
                                                                                 refused):
    name = write_patch(tmp_path, "cat.safetensors", clip_transformer(model))
    env = jobs.Env(str(tmp_path), hires_uses_firstpass_conds=lambda: firstpass_conds)
    before = modules(model)
    p = Processing(model)
    p.enable_hr, p.extra_network_data = True, {"lora": ["style"]}
    p.hr_extra_network_data = {"lora": ["detail"]} if hires_loras == "other" else {"lora": ["style"]}
    hooks = ScriptHooks(env)
    hooks.process(p, *script_args(patches=[(name, 1.0)]))
    hooks.process_batch(p)
    assert (jobs.active_job() is None) == refused
    if refused:
        with pytest.raises(HirmError, match="Hires. fix prompt with other LoRAs"):
            p.sample(None, None, [0], [0], 0.0, p.prompts)
        assert model.forge_objects.clip is model.forge_objects_after_applying_lora.clip
    else:
        assert model.forge_objects.clip is not model.forge_objects_after_applying_lora.clip  # the clone with the patch
    jobs.finish(p)
    assert same(modules(model), before)
