"""A1111 jobs with erasure: during the job the model carries exactly the erasure; after any job, failed,
interrupted or fine, its weights and attention modules are exactly as before."""

import copy

import pytest
import torch
from test_a1111_support import (no_job_left,  # noqa: F401 (an autouse fixture)
                                LoraStandIn, Processing, ScriptHooks, Sd1Model, call_hook, make_patch, run_job, same,
                                script_args, snapshot, text_model, write_patch)

from a1111_extension import jobs
from shared_core.adapters.a1111 import A1111Nlce, Patched, prompt_rows_mask, uncond_tensors
from a1111_extension.webui_model import TextEncoderPatches
from shared_core import nlce
from shared_core.encoders import canonical_parameters, encoder_layers
from shared_core.errors import HirmError
from shared_core.hosting import concept_set_for
from shared_core.patch import apply_patch, load_patch


@pytest.fixture()
def model():
    return Sd1Model()


@pytest.fixture()
def env(tmp_path):
    return jobs.Env(str(tmp_path))


def expected_weights(model, patch_file, strength):
    twin = copy.deepcopy(text_model(model))
    apply_patch(twin, load_patch(patch_file), strength)
    return {k: v.clone() for k, v in canonical_parameters(twin).items()}


def current_weights(model):
    return {k: v.detach().clone() for k, v in canonical_parameters(text_model(model)).items()}


def test_the_stand_in_text_encoder_is_wrapped_as_in_the_real_webui_and_a_patch_still_applies(model):
    names = [n for n, _ in text_model(model).named_parameters()]
    assert any(n.endswith("token_embedding.wrapped.weight") for n in names)  # sd_hijack's EmbeddingsWithFixes
    before = snapshot(text_model(model))
    patches = TextEncoderPatches(text_model(model), [(make_patch(text_model(model)), 1.0)]).apply()
    assert not same(snapshot(text_model(model)), before)
    patches.remove()
    assert same(snapshot(text_model(model)), before)


def test_a_patch_job_applies_exactly_the_patch_while_sampling_and_then_leaves_the_model_bit_identical(model, env, tmp_path):
    name = write_patch(tmp_path, "cat.safetensors", text_model(model))
    expected = expected_weights(model, tmp_path / name, 0.8)
    before = snapshot(model)
    seen = {}
    p = run_job(ScriptHooks(env), Processing(model), script_args(patches=[(name, 0.8)]),
                before_sample=lambda p: seen.update(current_weights(model)))
    assert not call_hook.reported
    assert seen.keys() == expected.keys() and all(torch.equal(seen[k], expected[k]) for k in seen)
    assert same(snapshot(model), before)
    assert p.extra_generation_params == {"Erasure patches": "cat.safetensors:0.8"}
    assert p.closed and "sample" not in p.__dict__ and "close" not in p.__dict__  # the job's guards are gone too


def test_conditioning_made_with_a_patch_is_fresh_and_never_lands_in_the_shared_cache(model, env, tmp_path):
    name = write_patch(tmp_path, "cat.safetensors", text_model(model), scale=0.5)
    plain = run_job(ScriptHooks(env), Processing(model), script_args(enabled=False)).c
    erased = run_job(ScriptHooks(env), Processing(model), script_args(patches=[(name, 1.0)])).c
    again = run_job(ScriptHooks(env), Processing(model), script_args(enabled=False)).c
    assert not torch.allclose(plain, erased, atol=1e-3)  # the webui's cache key (prompts, model) did not stop it
    assert torch.equal(again, plain)


def test_nlce_replaces_every_cross_attention_during_the_job_and_puts_everything_back(model, env):
    dm = model.model.diffusion_model
    attn2 = [m for n, m in dm.named_modules() if n.endswith("attn2")]
    before = snapshot(model)
    vanilla = run_job(ScriptHooks(env), Processing(model), script_args(enabled=False)).samples[0]
    wrapped = []
    p = run_job(ScriptHooks(env), Processing(model), script_args(nlce=True, concepts="cat", neighbors="dog, animal"),
                before_sample=lambda p: wrapped.append(all("forward" in m.__dict__ for m in attn2 + [dm])))
    assert not call_hook.reported and wrapped == [True] and len(attn2) == 16
    assert not torch.allclose(p.samples[0], vanilla, atol=1e-4)
    assert same(snapshot(model), before)
    assert p.extra_generation_params["Erasure NLCE"] == "cat"
    assert p.extra_generation_params["Erasure NLCE neighbors"] == "dog, animal"


def test_the_faithful_schedule_adds_a_dry_unet_pass_for_every_step(model, env):
    def passes(schedule):
        job_passes = []
        def count(p):
            job_passes.append(jobs.active_job().nlce.session)
        run_job(ScriptHooks(env), Processing(model), script_args(nlce=True, concepts="cat", schedule=schedule), before_sample=count)
        return [d["dry"] for d in job_passes[0].diagnostics]
    # timesteps 950 (outside t <= 900: the dry pass runs too, its gate is not applied there), 600, 200
    assert passes("single-pass") == [False, False, False]
    assert passes("faithful") == [True, False, True, False, True, False]


@pytest.mark.parametrize("how", ["error", "interrupt"])
def test_a_failed_or_interrupted_job_leaves_nothing_behind(model, env, tmp_path, how):
    name = write_patch(tmp_path, "cat.safetensors", text_model(model))
    before = snapshot(model)
    p = Processing(model, **({"fail_at_step": 1} if how == "error" else {"interrupt_at_step": 1}))
    args = script_args(patches=[(name, 1.0)], nlce=True, concepts="cat")
    if how == "error":
        with pytest.raises(RuntimeError, match="out of memory"):
            run_job(ScriptHooks(env), p, args)
    else:
        run_job(ScriptHooks(env), p, args)
    assert jobs.active_job() is None
    assert same(snapshot(model), before)


def test_state_left_by_a_job_that_never_finished_is_undone_when_the_next_job_starts(model, env, tmp_path):
    name = write_patch(tmp_path, "cat.safetensors", text_model(model))
    before = snapshot(model)
    stray = Processing(model)
    jobs.begin(stray, script_args(patches=[(name, 1.0)], nlce=True, concepts="cat"), env)  # no postprocess, no close
    assert not same(snapshot(model), before)
    at_sampling = []
    run_job(ScriptHooks(env), Processing(model), script_args(enabled=False), before_sample=lambda p: at_sampling.append(snapshot(model)))
    assert same(at_sampling[0], before)


def test_weights_reloaded_during_a_job_are_never_overwritten_and_the_next_batch_refuses(model, env, tmp_path):
    name = write_patch(tmp_path, "cat.safetensors", text_model(model))
    p = Processing(model, n_iter=2)
    jobs.begin(p, script_args(patches=[(name, 1.0)]), env)
    fresh = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in text_model(model).state_dict().items()}
    text_model(model).load_state_dict(fresh)  # sd_models.load_model_weights ...
    jobs.model_loaded(model)  # ... then script_callbacks.model_loaded_callback
    jobs.batch(p)
    with pytest.raises(HirmError, match="reloaded during the job"):
        p.sample(None, None, [0], [0], 0.0, p.prompts)
    assert all(torch.equal(text_model(model).state_dict()[k], v) for k, v in fresh.items())
    assert jobs.active_job() is None and not getattr(text_model(model), "_hirm_applied", None)


# ---------------------------------------------------------------------------------------------- bad input


def sd2(model):
    model.is_sd1, model.is_sd2 = False, True
    return model


BAD = {
    "no model": (lambda m, d: (None, script_args(patches=[("cat.safetensors", 1.0)])), "no Stable Diffusion model is loaded"),
    "SD2.x": (lambda m, d: (sd2(m), script_args(patches=[("cat.safetensors", 1.0)])), "SD2.x model"),
    "missing file": (lambda m, d: (m, script_args(patches=[("nope.safetensors", 1.0)])), "not in"),
    "CLIP-G patch": (lambda m, d: (m, script_args(patches=[(write_patch(d, "g.safetensors", text_model(m), family="clip-g"), 1.0)])),
                     "is for clip-g but the loaded checkpoint .* has clip_l"),
    "other encoder": (lambda m, d: (m, script_args(patches=[(write_patch(d, "w.safetensors", text_model(Sd1Model(text_width=64))), 1.0)])),
                      "use a patch trained on this encoder"),
    "NLCE without concepts": (lambda m, d: (m, script_args(nlce=True, concepts=" \n, ")), "no concept is given"),
    "gamma out of range": (lambda m, d: (m, script_args(nlce=True, concepts="cat", gamma=3.0)), "out of range"),
    "unknown schedule": (lambda m, d: (m, script_args(nlce=True, concepts="cat", schedule="fast")), "unknown NLCE schedule"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_fails_the_job_with_one_line_and_changes_nothing(model, env, tmp_path, case):
    make, message = BAD[case]
    write_patch(tmp_path, "cat.safetensors", text_model(model))
    sd_model, args = make(model, tmp_path)
    before = snapshot(model)
    p = Processing(sd_model)
    with pytest.raises(HirmError, match=message) as raised:
        if sd_model is None:  # the webui itself fails early without a model; the script's refusal comes first
            ScriptHooks(env).process(p, *args)
            p.sample(None, None, [0], [0], 0.0, p.prompts)
        run_job(ScriptHooks(env), p, args)
    assert "\n" not in str(raised.value)
    assert p.samples == [] and jobs.active_job() is None and "sample" not in p.__dict__
    assert same(snapshot(model), before)


def test_an_unexpected_error_also_fails_the_job_with_one_line(model, env, monkeypatch):
    def broken(folder, name):
        raise ValueError("first line\nsecond line")
    monkeypatch.setattr(jobs.library, "load", broken)
    with pytest.raises(HirmError) as raised:
        run_job(ScriptHooks(env), Processing(model), script_args(patches=[("cat.safetensors", 1.0)]))
    assert str(raised.value) == "erasure could not start (ValueError: first line)"


def test_a_refiner_or_a_hires_checkpoint_is_refused(model, env):
    for attrs in ({"refiner_checkpoint": "sd_xl_refiner"}, {"enable_hr": True, "hr_checkpoint_name": "other.safetensors"}):
        p = Processing(model)
        p.__dict__.update(attrs)
        with pytest.raises(HirmError, match="refiner|Hires"):
            run_job(ScriptHooks(env), p, script_args(nlce=True, concepts="cat"))


# ---------------------------------------------------------------------------------------------- the Lora extension


def test_a_lora_switched_during_the_job_keeps_the_erasure_and_the_next_job_gets_exactly_its_lora(model, env, tmp_path):
    te = text_model(model)
    lora = LoraStandIn(te)
    lora.add("style", te, seed=1)
    lora.add("detail", te, seed=2)
    name = write_patch(tmp_path, "cat.safetensors", te)
    base = current_weights(model)
    layer0 = encoder_layers(te)[0]

    lora.wanted = ("style",)  # a previous job with <lora:style:1>: merged, with backups
    run_job(ScriptHooks(env), Processing(model), script_args(enabled=False))
    before = snapshot(layer0)

    lora.wanted = ("detail",)  # this job switches LoRA: Lora restores its backups, which must carry the patch
    seen = {}
    run_job(ScriptHooks(env), Processing(model), script_args(patches=[(name, 1.0)]),
            before_sample=lambda p: seen.update(current_weights(model)))
    with_lora = lambda twin: [m.weight.data.add_(lora.deltas["detail"][n]) for n, m in twin.named_modules()  # noqa: E731
                              if isinstance(m, torch.nn.Linear)]
    twin = copy.deepcopy(te)
    for k, v in canonical_parameters(twin).items():
        v.data.copy_(base[k])
    apply_patch(twin, load_patch(str(tmp_path / name)), 1.0)
    with_lora(twin)
    want = canonical_parameters(twin)
    assert all(torch.allclose(seen[k], want[k], atol=1e-6) for k in seen)  # base + patch + the new LoRA
    assert same(snapshot(layer0), before)  # the patched layer: weights and Lora's bookkeeping as before the job

    seen.clear()  # the next job, same LoRA, no erasure: exactly base + LoRA, as if erasure had never run
    def text_forward_then_weights(p):  # Lora applies at forward time; the webui's cache may skip the encoder
        model.get_learned_conditioning(["a probe"])
        seen.update(current_weights(model))
    run_job(ScriptHooks(env), Processing(model), script_args(enabled=False), before_sample=text_forward_then_weights)
    twin = copy.deepcopy(te)
    for k, v in canonical_parameters(twin).items():
        v.data.copy_(base[k])
    with_lora(twin)
    assert all(torch.equal(seen[k], v) for k, v in canonical_parameters(twin).items())

    lora.wanted = ()  # and without LoRA: the pure base weights
    seen.clear()
    run_job(ScriptHooks(env), Processing(model), script_args(enabled=False), before_sample=text_forward_then_weights)
    assert all(torch.equal(seen[k], base[k]) for k in base)


def test_a_lora_first_used_during_the_job_leaves_no_trace_of_the_patch(model, env, tmp_path):
    te = text_model(model)
    lora = LoraStandIn(te)
    lora.add("style", te)
    name = write_patch(tmp_path, "cat.safetensors", te)
    base = current_weights(model)
    layer0 = encoder_layers(te)[0]
    before = snapshot(layer0)
    lora.wanted = ("style",)  # Lora backs the patched weights up during the job
    run_job(ScriptHooks(env), Processing(model), script_args(patches=[(name, 1.0)]))
    assert same(snapshot(layer0), before)  # no backup holding the patch survives the job
    model.get_learned_conditioning(["a probe"])  # the same LoRA next time (Lora applies at forward time)
    with_style = {n: m.weight.detach().clone() for n, m in te.named_modules() if isinstance(m, torch.nn.Linear)}
    lora.wanted = ()
    model.get_learned_conditioning(["a probe"])
    assert all(torch.equal(current_weights(model)[k], base[k]) for k in base)
    for n, w in with_style.items():
        assert torch.equal(w, dict(te.named_modules())[n].weight + lora.deltas["style"][n])


def test_patches_refuse_an_fp8_text_encoder(model):
    te = text_model(model)
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no fp8 in this torch")
    patch = make_patch(te)
    fc1 = encoder_layers(te)[1].mlp.fc1
    fc1.weight.data = fc1.weight.data.to(torch.float8_e4m3fn)
    with pytest.raises(HirmError, match="fp8"):
        TextEncoderPatches(te, [(patch, 1.0)])


# ---------------------------------------------------------------------------------------------- NLCE rows


def test_prompt_rows_mask_marks_the_words_of_every_chunk_from_the_webuis_tokenisation(model):
    enc = model.cond_stage_model
    mask = prompt_rows_mask(enc, "a photo of a cat", 77)
    assert mask.tolist() == [False] + [True] * 5 + [False] * 71
    long = " ".join(["cat"] * 80)  # 80 tokens: two chunks of 77 rows
    m2 = prompt_rows_mask(enc, long, 154)
    assert m2[:77].sum() == 75 and m2[77:].sum() == 5 and not m2[0] and not m2[77]
    assert prompt_rows_mask(object(), "cat", 77) is None


def test_rows_tell_the_negative_prompt_from_the_prompt_and_find_its_words(model):
    p = Processing(model, prompt="a photo of a cat", negative_prompt="blurry")
    cs = concept_set_for(canonical_parameters(text_model(model)), ["cat"], None, nlce.make_nlce_config())
    runtime = A1111Nlce(model, cs, nlce.make_nlce_config(), lambda: uncond_tensors(p)).install()
    try:
        p.setup_conds()
        uc = uncond_tensors(p)[0]
        context = torch.cat([p.c, uc[None], p.c])
        cond, words = runtime.rows(context)
        assert cond.tolist() == [True, False, True]
        assert words[0].tolist() == [False] + [True] * 5 + [False] * 71 and not words[1].any()
        foreign = torch.randn(1, 154, 32)  # conditioning the job never saw: every row but the chunk starts
        _, w = runtime.rows(foreign)
        assert w.sum() == 152 and not w[0, 0] and not w[0, 77]
    finally:
        runtime.remove()


def test_an_extension_wrapping_after_nlce_keeps_working_and_nlce_becomes_a_pass_through():
    layer = torch.nn.Linear(3, 3)
    x = torch.randn(2, 3)
    plain = layer(x)
    ours = Patched(layer, "forward", lambda original: (lambda t: original(t) * 0))
    theirs = ours.call
    layer.forward = lambda t: theirs(t) + 1  # e.g. another extension wraps on top
    assert torch.equal(layer(x), torch.ones_like(plain))
    ours.restore()
    assert torch.allclose(layer(x), plain + 1)  # theirs still runs, ours no longer changes anything
    del layer.forward
    solo = Patched(layer, "forward", lambda original: (lambda t: original(t) * 0))
    solo.restore()
    assert "forward" not in layer.__dict__ and torch.equal(layer(x), plain)
