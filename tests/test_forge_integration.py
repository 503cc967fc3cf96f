"""Forge: the extension's Forge path against the real Forge backend (a checkout named by FORGE_PATH).

Real, imported from the checkout: the SD1.5 engine class (backend/diffusion_engine/sd15.py) with
its CLIP patcher, ClassicTextProcessingEngine and ForgeObjects; IntegratedCLIP,
IntegratedUNet2DConditionModel and IntegratedAutoencoderKL built with Forge's operations and
loaded as backend/loader.py does; UnetPatcher / KModel / the k-prediction from a diffusers
scheduler; ModelPatcher clone / add_patches / attention patches; LoraLoader;
memory_management.load_model_gpu; sampling_prepare / sampling_function / sampling_cleanup; the
kohya LoRA key mapping (backend/patcher/lora.py). Weights are random: a 2-layer encoder of
CLIP-L's width and a small UNet with SD1.x's block layout and 768-wide context.

Stood in (the webui around the backend, which needs gradio): ``modules.shared.opts`` (only
``emphasis`` is read), ``huggingface_guess`` when not installed (sd15.py only names
``model_list.SD15``), the order of modules/processing.py (process_images_inner, txt2img
``sample``), a one-step Euler sampler that calls ``sampling_function`` as CFGDenoiser does, and
``p`` (test_a1111_support.Processing); with transformers 5.x, the 4.x ``CLIPTextModel`` layout
(``text_model.*``) that Forge pins and its text engine reads.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import sys
import types
from contextlib import closing
from types import SimpleNamespace

import pytest
import torch

FORGE_PATH = os.environ.get("FORGE_PATH")
if not FORGE_PATH:
    pytest.skip("FORGE_PATH is not set (point it at a stable-diffusion-webui-forge checkout)", allow_module_level=True)


def _import_forge(root: str) -> SimpleNamespace:
    """Forge's backend, imported with ``--always-cpu`` (Forge parses sys.argv at import)."""
    root = os.path.abspath(root)
    path_before, modules_before = list(sys.path), set(sys.modules)
    for path in (os.path.join(root, "packages_3rdparty"), root):  # root first, then packages_3rdparty
        if path in sys.path:
            sys.path.remove(path)
        sys.path.insert(0, path)
    shared = types.ModuleType("modules.shared")
    shared.opts = SimpleNamespace(emphasis="Original")  # the webui's default emphasis mode
    stand_ins = {"modules.shared": shared}
    if importlib.util.find_spec("huggingface_guess") is None:
        guess = types.ModuleType("huggingface_guess")
        guess.model_list = SimpleNamespace(SD15=None)
        stand_ins["huggingface_guess"] = guess
    saved = {name: sys.modules.get(name) for name in [*stand_ins, "modules"]}
    argv = sys.argv
    sys.argv = [argv[0], "--always-cpu"]
    sys.modules.update(stand_ins)
    try:
        from backend import memory_management
        from backend.diffusion_engine.sd15 import StableDiffusion
        from backend.nn.clip import IntegratedCLIP
        from backend.nn.unet import IntegratedUNet2DConditionModel
        from backend.nn.vae import IntegratedAutoencoderKL
        from backend.operations import using_forge_operations
        from backend.patcher.lora import load_lora, model_lora_keys_clip
        from backend.sampling.sampling_function import sampling_cleanup, sampling_function, sampling_prepare
        from backend.state_dict import load_state_dict
        from backend.text_processing.classic_engine import ClassicTextProcessingEngine
    except BaseException:  # leave no half-imported Forge behind
        sys.path[:] = path_before
        for name in set(sys.modules) - modules_before:
            if (getattr(sys.modules[name], "__file__", None) or "").startswith(root + os.sep):
                del sys.modules[name]
        raise
    finally:
        sys.argv = argv
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return SimpleNamespace(
        memory_management=memory_management, StableDiffusion=StableDiffusion,
        IntegratedCLIP=IntegratedCLIP, IntegratedUNet2DConditionModel=IntegratedUNet2DConditionModel,
        IntegratedAutoencoderKL=IntegratedAutoencoderKL, using_forge_operations=using_forge_operations, load_lora=load_lora,
        model_lora_keys_clip=model_lora_keys_clip, sampling_prepare=sampling_prepare, sampling_function=sampling_function,
        sampling_cleanup=sampling_cleanup, load_state_dict=load_state_dict, ClassicTextProcessingEngine=ClassicTextProcessingEngine)


try:
    forge = _import_forge(FORGE_PATH)
except Exception as error:  # noqa: BLE001 - any failure means: no usable Forge here
    reason = (str(error).strip().splitlines() or [""])[0]
    pytest.skip(f"Forge's backend cannot be imported from {FORGE_PATH}: {type(error).__name__}: {reason}", allow_module_level=True)

import diffusers  # noqa: E402
from test_a1111_support import (no_job_left,  # noqa: F401, E402 (an autouse fixture)
                                Processing, ScriptHooks, call_hook, make_patch, same, script_args, snapshot,  # noqa: E402
                                write_patch)
from tiny import random_clip, tiny_config  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, modeling_utils  # noqa: E402

from a1111_extension import jobs  # noqa: E402
from shared_core import hosting  # noqa: E402
from shared_core.adapters.patcher import cross_attention_blocks  # noqa: E402
from shared_core.encoders import canonical_parameters  # noqa: E402
from shared_core.errors import HirmError  # noqa: E402
from shared_core.patch import BaseMismatchWarning, apply_patch, load_patch, save_patch  # noqa: E402
from shared_core.tokenizer import clip_tokenizer  # noqa: E402

PROMPT = "a photo of a cat"
CLIP_L = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=12,
                        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
                        pad_token_id=1)
# SD1.5's UNet configuration (huggingface_guess model_list.SD15) with 32 instead of 320 channels
UNET = dict(in_channels=4, model_channels=32, out_channels=4, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4], num_heads=8,
            num_head_channels=-1, use_spatial_transformer=True, transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
            transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1, context_dim=768,
            use_linear_in_transformer=False, adm_in_channels=None)
LATENT = 16  # a 128x128 image
LORA_KEY = "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"  # a weight the erasure patches change too


class TransformersV4CLIPTextModel(torch.nn.Module):
    """transformers 4.x's CLIPTextModel layout (``text_model.embeddings`` ...) over 5.x's flat model."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextModel(config)

    def forward(self, *args, **kwargs):
        return self.text_model(*args, **kwargs)


def clip_class():
    """The class Forge's loader passes to IntegratedCLIP: transformers' CLIPTextModel where it has the 4.x layout."""
    probe = CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1, vocab_size=8,
                                         max_position_embeddings=4))
    return CLIPTextModel if hasattr(probe, "text_model") else TransformersV4CLIPTextModel


# ---------------------------------------------------------------------------------------------- Forge objects


@pytest.fixture(scope="module")
def source():
    """The random weights every engine is loaded with: a CLIP-L-shaped encoder and a UNet state dict."""
    encoder = random_clip(CLIP_L, seed=0)
    norm = canonical_parameters(encoder)
    with torch.no_grad():  # like a trained encoder's: rows whose mean is not 0 (Forge's emphasis divides by it), and
        norm["text_model.final_layer_norm.weight"].normal_(2.0, 0.2)  # long enough for NLCE's live-token floor
        norm["text_model.final_layer_norm.bias"].normal_(0.0, 0.2)
    torch.manual_seed(0)
    unet = forge.IntegratedUNet2DConditionModel.from_config(UNET)
    return SimpleNamespace(encoder=encoder, unet={k: v.detach().clone() for k, v in unet.state_dict().items()})


def build_engine(source):
    """Forge's SD1.5 engine as backend/loader.py builds its components (load_huggingface_component)."""
    mm = forge.memory_management
    to_args = dict(device=mm.cpu, dtype=mm.text_encoder_dtype())
    with getattr(modeling_utils, "no_init_weights", contextlib.nullcontext)():
        with forge.using_forge_operations(**to_args, manual_cast_enabled=True):
            text_encoder = forge.IntegratedCLIP(clip_class(), CLIP_L, add_text_projection=True).to(**to_args)
    forge.load_state_dict(text_encoder, {"transformer." + k: v.detach().clone() for k, v in canonical_parameters(source.encoder).items()},
                          ignore_errors=["transformer.text_projection.weight", "transformer.text_model.embeddings.position_ids",
                                         "logit_scale"], log_name="CLIPTextModel")

    parameters = sum(v.numel() for v in source.unet.values())
    storage = mm.unet_dtype(model_params=parameters, supported_dtypes=[torch.float16, torch.float32])
    load_device = mm.get_torch_device()
    computation = mm.get_computation_dtype(load_device, parameters=parameters, supported_dtypes=[torch.float16, torch.float32])
    initial = mm.unet_inital_load_device(parameters=parameters, dtype=storage)
    with forge.using_forge_operations(device=initial, dtype=storage, manual_cast_enabled=storage != computation):
        unet = forge.IntegratedUNet2DConditionModel.from_config(UNET).to(device=initial, dtype=storage)
    forge.load_state_dict(unet, {k: v.clone() for k, v in source.unet.items()})
    unet.storage_dtype, unet.computation_dtype = storage, computation
    unet.load_device, unet.initial_device, unet.offload_device = load_device, initial, mm.unet_offload_device()

    with forge.using_forge_operations(device=mm.cpu, dtype=mm.vae_dtype()):
        vae = forge.IntegratedAutoencoderKL.from_config(dict(block_out_channels=[32], down_block_types=["DownEncoderBlock2D"],
                                                              up_block_types=["UpDecoderBlock2D"], latent_channels=4))
    scheduler = diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                                        skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)  # SD1.5's scheduler config
    components = dict(text_encoder=text_encoder, tokenizer=clip_tokenizer(), vae=vae, unet=unet, scheduler=scheduler)
    return forge.StableDiffusion(SimpleNamespace(inpaint_model=lambda: False), components)


@pytest.fixture()
def engine(source):
    yield build_engine(source)
    forge.memory_management.unload_all_models()  # what Forge does before it loads another model


@pytest.fixture(autouse=True)
def fresh_concept_sets(monkeypatch):
    """The extension caches NLCE concept sets per process: each test builds its own."""
    monkeypatch.setattr(hosting, "_OPERATORS", type(hosting._OPERATORS)())


@pytest.fixture()
def env(tmp_path):
    return jobs.Env(str(tmp_path))


def weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- the webui's order


class Txt2Img(Processing):
    """``p`` for Forge's txt2img: the conditioning cache is the engine's (the webui's is class-level), and
    ``sample`` does what StableDiffusionProcessingTxt2Img.sample does before and around the sampler."""

    def __init__(self, engine, script, caches, **kwargs):
        super().__init__(engine, size=LATENT, **kwargs)
        self.scripts, self.cfg_scale, self.seeds = script, 7.0, [self.seed]
        self.cached_c, self.cached_uc = caches

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        x = torch.randn(1, 4, self.size, self.size, generator=torch.Generator().manual_seed(self.seed))
        self.sd_model.forge_objects = self.sd_model.forge_objects_after_applying_lora.shallow_copy()
        call_hook(self.scripts.process_before_every_sampling, self, x=x, noise=x, c=conditioning, uc=unconditional_conditioning)
        self.sampled_with = self.sd_model.forge_objects.unet
        return euler(self, x, conditioning, unconditional_conditioning)


def euler(p, noise, conditioning, unconditional_conditioning, timesteps=(500,)):
    """modules/sd_samplers_kdiffusion.py sample + sd_samplers_cfg_denoiser.py forward: Euler, one step per timestep,
    each a call of Forge's sampling_function (cond and uncond batched through apply_model / model_function_wrapper)."""
    engine = p.sd_model
    unet = engine.forge_objects.unet
    forge.sampling_prepare(unet, x=noise)
    predictor = unet.model.predictor
    sigmas = torch.cat([predictor.sigmas[list(timesteps)].flip(0), torch.zeros(1)]).float()
    x = noise * sigmas[0]
    uncond = torch.stack([schedule[0].cond for schedule in unconditional_conditioning])
    denoiser = SimpleNamespace(inner_model=SimpleNamespace(inner_model=engine), p=p)
    for sigma, following in zip(sigmas[:-1], sigmas[1:]):
        params = SimpleNamespace(x=x, sigma=sigma.expand(x.shape[0]), text_cond=conditioning, text_uncond=uncond, image_cond=None)
        denoised, _, _ = forge.sampling_function(denoiser, denoiser_params=params, cond_scale=p.cfg_scale,
                                                 cond_composition=[[(0, 1.0)]])
        x = x + (x - denoised) / sigma * (following - sigma)
    forge.sampling_cleanup(unet)
    p.samples.append(x)
    return x


def run_forge_job(engine, env, args, caches=None, **kwargs):
    """modules/processing.py process_images_inner for one job (n_iter batches; the batches in inference mode), in
    ``with closing(p)``."""
    script = ScriptHooks(env)
    p = Txt2Img(engine, script, caches or ([None, None, None], [None, None, None]), **kwargs)
    with closing(p):
        call_hook(script.process, p, *args)
        with torch.inference_mode():
            for n in range(p.n_iter):
                engine.forge_objects = engine.forge_objects_original.shallow_copy()
                # extra_networks.activate: sd_forge_lora sets forge_objects_after_applying_lora (see lora_on)
                engine.forge_objects = engine.forge_objects_after_applying_lora.shallow_copy()
                call_hook(script.process_batch, p, *args, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.seeds)
                p.setup_conds()
                p.sample(conditioning=p.c, unconditional_conditioning=p.uc, seeds=p.seeds, subseeds=p.seeds,
                         subseed_strength=0.0, prompts=p.prompts)
        call_hook(script.postprocess, p, SimpleNamespace(images=[]), *args)
    return p


def lora_on(engine, strength=0.8, rank=4, seed=3):
    """sd_forge_lora's load_networks / load_lora_for_models for one kohya LoRA on the text encoder: Forge's key
    mapping and conversion, a clone of the original CLIP with add_patches, assigned to the engine's objects."""
    g = torch.Generator().manual_seed(seed)
    weight = dict(engine.forge_objects_original.clip.cond_stage_model.named_parameters())[LORA_KEY]
    name = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    lora = {f"{name}.lora_up.weight": torch.randn(weight.shape[0], rank, generator=g) * 0.1,
            f"{name}.lora_down.weight": torch.randn(rank, weight.shape[1], generator=g) * 0.1,
            f"{name}.alpha": torch.tensor(float(rank))}
    patches, unmatched = forge.load_lora(lora, forge.model_lora_keys_clip(engine.forge_objects_original.clip.cond_stage_model, {}))
    assert list(patches) == [LORA_KEY] and not unmatched
    engine.forge_objects.unet = engine.forge_objects_original.unet
    engine.forge_objects.clip = engine.forge_objects_original.clip.clone()
    loaded = engine.forge_objects.clip.add_patches(filename="style.safetensors", patches=patches, strength_patch=strength,
                                                   online_mode=False)
    assert loaded == {LORA_KEY}
    engine.forge_objects_after_applying_lora = engine.forge_objects.shallow_copy()
    return engine.forge_objects.clip


def encoder_copy(engine):
    """A deep copy of the webui's CLIP-L (an IntegratedCLIP), without the text engine's textual-inversion wrapper."""
    database = engine.text_processing_engine.embeddings
    twin = copy.deepcopy(engine.forge_objects_original.clip.cond_stage_model.clip_l, memo={id(database): database})
    embeddings = twin.transformer.text_model.embeddings
    embeddings.token_embedding = embeddings.token_embedding.wrapped
    return twin


def reference_conditioning(engine, encoder, texts):
    """Conditioning of ``texts`` by Forge's text engine, set up as sd15.py does, on ``encoder`` (an IntegratedCLIP)."""
    text = forge.ClassicTextProcessingEngine(text_encoder=encoder, tokenizer=engine.forge_objects.clip.tokenizer.clip_l,
                                             embedding_dir=None, embedding_key="clip_l", embedding_expected_shape=768,
                                             emphasis_name="Original", text_projection=False, minimal_clip_skip=1, clip_skip=1,
                                             return_pooled=False, final_layer_norm=True)
    with torch.inference_mode():
        return text(texts)


# ---------------------------------------------------------------------------------------------- tests


def test_a_clip_l_patch_reaches_forges_conditioning_and_the_shared_encoder_is_restored_after(engine, env, source, tmp_path):
    name = write_patch(tmp_path, "cat.safetensors", source.encoder)
    original = engine.forge_objects_original.clip
    caches = ([None, None, None], [None, None, None])  # the webui's conditioning cache (class-level there)
    plain = run_forge_job(engine, env, script_args(enabled=False), caches).c  # an earlier job, cached
    encoder = original.cond_stage_model
    before, parameters = weights(encoder), dict(encoder.named_parameters())
    twin = encoder_copy(engine)
    apply_patch(twin.transformer, load_patch(str(tmp_path / name)), 0.7)
    expected = reference_conditioning(engine, twin, [PROMPT])

    p = run_forge_job(engine, env, script_args(patches=[(name, 0.7)]), caches, n_iter=2)

    assert not call_hook.reported and not p.comments  # no base-mismatch note: the patch was made on these weights
    assert torch.allclose(p.c, expected, atol=1e-6)
    assert not torch.allclose(p.c, plain, atol=1e-3)  # the cached conditioning of the earlier job was not reused
    assert len(p.samples) == 2 and p.extra_generation_params["Erasure patches"] == "cat.safetensors:0.7"
    assert engine.forge_objects_original.clip is original and original.patcher.lora_patches == {}
    assert engine.forge_objects_after_applying_lora.clip is original
    assert equal(weights(encoder), before)  # bit for bit, and the very parameters Forge's LoraLoader backed up
    assert all(parameter is parameters[k] for k, parameter in encoder.named_parameters())
    assert original.patcher.lora_loader.loaded_hash == str([]) and original.patcher.lora_loader.backup == {}
    assert torch.equal(engine.get_learned_conditioning([PROMPT]), plain)  # Forge's next conditioning: no erasure


def test_a_users_lora_stays_during_the_job_with_the_erasure_on_top_and_alone_after(engine, env, source, tmp_path):
    name = write_patch(tmp_path, "cat.safetensors", source.encoder)
    engine.get_learned_conditioning([PROMPT])  # the webui generated before: Forge's text engine set its dtypes
    encoder = engine.forge_objects_original.clip.cond_stage_model
    clean = weights(encoder)
    twin = encoder_copy(engine)
    apply_patch(twin.transformer, load_patch(str(tmp_path / name)), 1.0)
    expected_without_lora = reference_conditioning(engine, twin, [PROMPT])
    lora_clip = lora_on(engine)
    lora_patches = dict(lora_clip.patcher.lora_patches)
    engine.get_learned_conditioning([PROMPT])  # Forge loads the LoRA'd CLIP: the LoRA is merged into the shared weights
    merged = weights(encoder)
    assert [k for k in clean if not torch.equal(clean[k], merged[k])] == [LORA_KEY]
    twin = encoder_copy(engine)  # the encoder with the user's LoRA, as Forge merged it
    only_lora = reference_conditioning(engine, copy.deepcopy(twin), [PROMPT])
    with pytest.warns(BaseMismatchWarning):  # the LoRA changed the weights the patch's signature samples
        apply_patch(twin.transformer, load_patch(str(tmp_path / name)), 1.0)
    expected = reference_conditioning(engine, twin, [PROMPT])

    p = run_forge_job(engine, env, script_args(patches=[(name, 1.0)]))

    assert not call_hook.reported and not p.comments  # the base check read the weights without the user's LoRA
    # fp16 weights: Forge merges LoRA and patch in one go, the reference adds the patch to the merged LoRA (two roundings)
    assert torch.allclose(p.c, expected, atol=1e-2)
    assert not torch.allclose(p.c, only_lora, atol=0.5) and not torch.allclose(p.c, expected_without_lora, atol=0.5)
    assert engine.forge_objects_after_applying_lora.clip is lora_clip and lora_clip.patcher.lora_patches == lora_patches
    assert engine.forge_objects_original.clip.patcher.lora_patches == {}
    assert equal(weights(encoder), merged)  # only the user's LoRA
    assert lora_clip.patcher.lora_loader.loaded_hash == str(list(lora_patches))


@contextlib.contextmanager
def attention_calls(diffusion_model):
    """Per attn2 block: how often its own attention ran (``forward``) and how often its output projection ran
    (also when Forge's attn2 replace patch computes the attention between the projections)."""
    blocks = cross_attention_blocks(diffusion_model)
    plain, projected = dict.fromkeys(blocks, 0), dict.fromkeys(blocks, 0)

    def counter(counts, key):
        return lambda *_: counts.__setitem__(key, counts[key] + 1)

    handles = [h for key, attn in blocks.items() for h in (attn.register_forward_hook(counter(plain, key)),
                                                            attn.to_out.register_forward_hook(counter(projected, key)))]
    try:
        yield plain, projected
    finally:
        for handle in handles:
            handle.remove()


def test_nlce_samples_through_forges_sampling_function_on_a_unet_clone_and_leaves_the_webuis_unet_as_it_was(engine, env):
    unet = engine.forge_objects_original.unet
    blocks = cross_attention_blocks(unet.model.diffusion_model)
    assert len(blocks) == 16 and ("input", 8, 0) in blocks  # SD1.x's cross-attention layout
    forge.memory_management.load_model_gpu(unet)  # loaded before, as for an earlier generation (Forge marks it gguf_baked)
    options = copy.deepcopy(unet.model_options)
    before = snapshot(unet.model)
    # the first job after the model loaded (see the next test for a job after an earlier generation)
    with attention_calls(unet.model.diffusion_model) as (plain, projected):
        p = run_forge_job(engine, env, script_args(nlce=True, concepts="cat", neighbors="dog"))
    nlce_plain, nlce_projected = dict(plain), dict(projected)
    with attention_calls(unet.model.diffusion_model) as (plain, projected):
        vanilla = run_forge_job(engine, env, script_args(enabled=False))

    assert not call_hook.reported and p.extra_generation_params.get("Erasure NLCE") == "cat"
    clone = p.sampled_with
    assert clone is not unet and clone.model is unet.model
    assert set(clone.model_options["transformer_options"]["patches_replace"]["attn2"]) == set(blocks)
    assert set(plain.values()) == {1} and projected == plain  # without NLCE: one batched cond/uncond pass, plain attention
    assert set(nlce_plain.values()) == {0} and set(nlce_projected.values()) == {1}  # NLCE's attention ran in every attn2 block
    assert not torch.allclose(p.samples[0], vanilla.samples[0], atol=1e-4)
    assert unet.model_options == options and engine.forge_objects_after_applying_lora.unet is unet
    assert engine.forge_objects_original.unet is unet and engine.forge_objects.unet is unet  # the job put its clone back
    assert same(snapshot(unet.model), before)  # the UNet's weights and attributes


def test_nlce_calls_through_another_extensions_attention_replace_and_leaves_it_in_place(engine, env, caplog):
    from backend.attention import attention_function  # Forge's attention, what an IP-Adapter-like replace calls

    calls = []

    def foreign(q, k, v, extra_options):
        calls.append(extra_options["block"])
        return attention_function(q, k, v, extra_options["n_heads"])

    # an extension earlier in the script order (e.g. an IP-Adapter) put its attn2 replace on the UNet for this job
    other = engine.forge_objects_original.unet.clone()
    other.set_model_attn2_replace(foreign, "input", 7, 0)
    engine.forge_objects_after_applying_lora.unet = other
    with_foreign = run_forge_job(engine, env, script_args(enabled=False))
    assert set(calls) == {("input", 7)}
    calls.clear()
    with caplog.at_level("WARNING", logger="hirm"):
        p = run_forge_job(engine, env, script_args(nlce=True, concepts="cat", neighbors="dog"))

    assert not call_hook.reported and p.extra_generation_params.get("Erasure NLCE") == "cat"
    assert calls and set(calls) == {("input", 7)}  # the other extension's attention still ran, at its block only
    assert "another node's or extension's attention already replaces cross-attention at 1 of 16 blocks" in caplog.text
    assert not torch.allclose(p.samples[0], with_foreign.samples[0], atol=1e-4)
    assert engine.forge_objects_after_applying_lora.unet is other  # put back as it was, its replace untouched
    assert other.model_options["transformer_options"]["patches_replace"]["attn2"] == {("input", 7, 0): foreign}


def test_nlce_starts_after_an_earlier_generation(engine, env):
    run_forge_job(engine, env, script_args(enabled=False))  # Forge's text engine casts the fp16 embeddings in inference mode
    p = run_forge_job(engine, env, script_args(nlce=True, concepts="cat", neighbors="dog"))
    assert not call_hook.reported and p.extra_generation_params.get("Erasure NLCE") == "cat"
    assert set(p.sampled_with.model_options["transformer_options"]["patches_replace"]["attn2"]) == \
        set(cross_attention_blocks(engine.forge_objects_original.unet.model.diffusion_model))


@pytest.mark.parametrize("kind", ["clip-g", "another width"])
def test_a_patch_for_another_encoder_is_refused_when_the_job_samples_and_nothing_changes(engine, env, tmp_path, kind):
    encoder = random_clip(tiny_config(hidden=64), seed=1)
    save_patch(make_patch(encoder, family="clip-g" if kind == "clip-g" else None), str(tmp_path / "other.safetensors"))
    engine.get_learned_conditioning([PROMPT])  # an earlier generation: the text encoder and the UNet were loaded
    clip, unet = engine.forge_objects_original.clip, engine.forge_objects_original.unet
    forge.memory_management.load_model_gpu(unet)
    text_weights, options = weights(clip.cond_stage_model), copy.deepcopy(unet.model_options)
    unet_before = snapshot(unet.model)

    with pytest.raises(HirmError) as refused:
        run_forge_job(engine, env, script_args(patches=[("other.safetensors", 1.0)]))

    message = str(refused.value)
    assert "\n" not in message and ("clip-g" in message if kind == "clip-g" else "does not fit" in message)
    assert jobs.active_job() is None and not call_hook.reported
    assert engine.forge_objects_after_applying_lora.clip is clip and clip.patcher.lora_patches == {}
    assert engine.forge_objects.clip is clip and engine.forge_objects.unet is unet
    assert equal(weights(clip.cond_stage_model), text_weights) and clip.patcher.lora_loader.loaded_hash == str([])
    assert unet.model_options == options and same(snapshot(unet.model), unet_before)
