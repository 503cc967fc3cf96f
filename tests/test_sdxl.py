"""SDXL: one HiRM patch for both text encoders, applied wherever SDXL runs, on a tiny SDXL-shaped pipeline."""

import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny import canonical_state_dict, grid_record, openclip_state_dict, random_clip, same_weights, snapshot, tiny_config
from tiny_pipeline import G_WIDTH, L_WIDTH, sdxl_encoders, tiny_pipeline, tiny_sdxl_pipeline

from shared_core.adapters import patcher
from shared_core.cli import main
from shared_core.encoders import PATCHER_LAYOUTS, host_key
from shared_core.loading import load_text_encoders
from shared_core.errors import PatchMismatchError
from shared_core.export import to_diffusers_lora
from shared_core.hirm import train_model_patch, train_patch
from shared_core.patch import PatchNote, load_patch, patched, patched_pipeline, read_metadata, save_patch
from shared_core.report import TextView, encode_sdxl

PROMPT = "a painting of a cat on a sofa"


@pytest.fixture(scope="module")
def sdxl():
    pipe = tiny_sdxl_pipeline()
    patch = train_model_patch(sdxl_encoders(pipe), concepts=["cat"], steps=3)
    return pipe, patch


def context(pipe, prompt=PROMPT):
    """What the SDXL UNet reads: both encoders' penultimate rows side by side, and CLIP-G's projected pooled vector."""
    view = TextView(sdxl_encoders(pipe))
    with torch.no_grad():
        return encode_sdxl(view.encoders, view.tokenize([prompt]))


def test_one_patch_holds_both_encoders_with_a_fingerprint_each_and_a_report_of_what_the_unet_reads(sdxl, tmp_path):
    pipe, patch = sdxl
    assert patch.components == ["clip_l", "clip_g"]
    assert patch.part("clip_l").encoder["hidden_size"] == L_WIDTH and patch.part("clip_g").encoder["hidden_size"] == G_WIDTH
    assert patch.report["measured_on"] == "sdxl" and patch.report["target_cosine_mean"] < 1.0
    path = save_patch(patch, str(tmp_path / "cat.safetensors"))
    with safe_open(path, "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert {k.split("_text_model")[0] for k in keys} == {"lora_te1", "lora_te2"}  # the stock SDXL LoRA names
    assert meta["hirm.format_version"] == "3" and "hirm.components" in meta
    header = read_metadata(path)
    fingerprints = {c: own["base_fingerprint"] for c, own in header["components"].items()}
    assert fingerprints == {c: patch.part(c).metadata["base_fingerprint"] for c in ("clip_l", "clip_g")}
    loaded = load_patch(path)
    assert loaded.components == patch.components and loaded.tensor_count() == patch.tensor_count() == 24
    assert all(torch.equal(loaded.part(c).deltas[n], patch.part(c).deltas[n].half()) for c in patch.components
               for n in patch.part(c).deltas)


def test_applying_the_patch_to_an_sdxl_pipeline_changes_both_encoders_and_removing_it_is_bit_exact(sdxl):
    pipe, patch = sdxl
    before = snapshot(pipe.text_encoder), snapshot(pipe.text_encoder_2)
    plain_rows, plain_pooled = context(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PatchNote)  # both halves fit: nothing to say
        with patched_pipeline(pipe, patch):
            rows, pooled = context(pipe)
            assert not same_weights(pipe.text_encoder, before[0]) and not same_weights(pipe.text_encoder_2, before[1])
    assert same_weights(pipe.text_encoder, before[0]) and same_weights(pipe.text_encoder_2, before[1])
    assert not torch.equal(rows[..., :L_WIDTH], plain_rows[..., :L_WIDTH])  # CLIP-L's half of the context moved
    assert not torch.equal(rows[..., L_WIDTH:], plain_rows[..., L_WIDTH:])  # and CLIP-G's
    assert not torch.equal(pooled, plain_pooled)
    with patched(pipe.text_encoder_2, patch):  # one encoder alone takes its own half
        assert not same_weights(pipe.text_encoder_2, before[1]) and same_weights(pipe.text_encoder, before[0])
    assert same_weights(pipe.text_encoder_2, before[1])


def test_a_clip_l_patch_on_sdxl_says_clip_g_keeps_the_concept_and_an_sdxl_patch_on_sd1_applies_its_clip_l_half(sdxl):
    pipe, patch = sdxl
    clip_l_only = train_patch(pipe.text_encoder, pipe.tokenizer, concepts=["cat"], steps=2, report=False)
    with pytest.warns(PatchNote, match="changes clip_l only; this pipeline's clip_g still carries the concept"):
        with patched_pipeline(pipe, clip_l_only):
            pass
    sd1 = tiny_pipeline(seed=0, text_width=L_WIDTH)  # an SD1-shaped pipeline whose CLIP-L is the SDXL one's twin
    with pytest.warns(PatchNote, match="has no clip_g: the clip_g half of erasure patch 'cat' is left out"):
        with patched_pipeline(sd1, patch):
            assert not same_weights(sd1.text_encoder, snapshot(tiny_pipeline(seed=0, text_width=L_WIDTH).text_encoder))


def test_the_patch_takes_a_patcher_clips_two_encoders(sdxl):
    """ComfyUI / Forge SDXL CLIP: clip_l.transformer.* and clip_g.transformer.* keys."""
    pipe, patch = sdxl
    state = {**canonical_state_dict(pipe.text_encoder, "clip_l.transformer."),
             **canonical_state_dict(pipe.text_encoder_2, "clip_g.transformer.")}
    patches, notes = patcher.clip_patches(state, patch)
    assert notes == []
    assert set(patches) == {host_key(n, PATCHER_LAYOUTS[c]) for c in ("clip_l", "clip_g") for n in patch.part(c).deltas}
    encoders = patcher.model_encoders(state)
    assert list(encoders) == ["clip_l", "clip_g"] and encoders["clip_g"][1] is None  # this state holds no projection
    with pytest.raises(PatchMismatchError, match="erasure patch 'cat' is for .* but this CLIP has t5xxl"):
        patcher.clip_patches({"t5xxl.transformer.shared.weight": torch.zeros(1)}, patch)


def test_the_diffusers_lora_of_an_sdxl_patch_targets_both_encoders(sdxl):
    _, patch = sdxl
    tensors, meta, errors = to_diffusers_lora(patch)
    assert {k.split(".")[0] for k in tensors} == {"text_encoder", "text_encoder_2"}
    assert all(v == 0.0 for v in errors.values()) and '"text_encoder+text_encoder_2"' in meta["hirm.source"]


def sdxl_single_file(pipe, path):
    """An SDXL single file as people have them: CLIP-L under conditioner.embedders.0.transformer, bigG as an OpenCLIP
    tower (fused q/k/v) under conditioner.embedders.1.model with its text_projection (applied as x @ P)."""
    sd = canonical_state_dict(pipe.text_encoder, "conditioner.embedders.0.transformer.")
    sd.update(openclip_state_dict(canonical_state_dict(pipe.text_encoder_2), "conditioner.embedders.1.model."))
    sd["conditioner.embedders.1.model.text_projection"] = pipe.text_encoder_2.text_projection.weight.detach().T.contiguous()
    sd["model.diffusion_model.out.0.weight"] = torch.ones(3)  # a UNet tensor, carried over untouched
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def test_hirm_train_on_an_sdxl_file_trains_both_encoders_and_hirm_apply_writes_both_halves(sdxl, tmp_path, capsys):
    pipe, _ = sdxl
    source = sdxl_single_file(pipe, tmp_path / "sdxl.safetensors")
    out = tmp_path / "cat.safetensors"
    assert main(["train", str(source), "--concept", "cat", "--steps", "2", "--quiet", "--out", str(out)]) == 0
    assert "pooled (CLIP-G)" in capsys.readouterr().out
    patch = load_patch(str(out))
    assert patch.components == ["clip_l", "clip_g"]
    loaded = load_text_encoders(str(source))
    assert torch.equal(loaded["clip_g"].projection, pipe.text_encoder_2.text_projection.weight)
    patched_file = tmp_path / "sdxl-no-cat.safetensors"
    assert main(["apply", str(source), "--patch", str(out), "--out", str(patched_file)]) == 0
    written = load_text_encoders(str(patched_file))
    for component, model in (("clip_l", pipe.text_encoder), ("clip_g", pipe.text_encoder_2)):
        with patched(model, patch.part(component)):
            want = canonical_state_dict(model)
        got = canonical_state_dict(written[component].model)
        assert all(torch.equal(got[k], want[k]) for k in want), component
    with safe_open(str(patched_file), "pt") as f:
        assert torch.equal(f.get_tensor("model.diffusion_model.out.0.weight"), torch.ones(3))
    assert main(["train", str(source), "--concept", "cat", "--steps", "1", "--quiet", "--component", "clip_g",
                 "--out", str(tmp_path / "g.safetensors")]) == 0
    assert load_patch(str(tmp_path / "g.safetensors")).encoder["hidden_size"] == G_WIDTH


def test_an_sdxl_refiner_file_trains_a_clip_g_patch_and_says_so(sdxl, tmp_path, capsys):
    pipe, _ = sdxl
    full = sdxl_single_file(pipe, tmp_path / "sdxl.safetensors")
    with safe_open(str(full), "pt") as f:  # a refiner: bigG alone, at embedders.0
        refiner = {k.replace("embedders.1.", "embedders.0."): f.get_tensor(k) for k in f.keys() if "embedders.1." in k}
    save_file(refiner, str(tmp_path / "refiner.safetensors"))
    assert main(["train", str(tmp_path / "refiner.safetensors"), "--concept", "cat", "--steps", "1", "--quiet",
                 "--out", str(tmp_path / "r.safetensors")]) == 0
    assert "only an OpenCLIP bigG text encoder" in capsys.readouterr().out
    assert load_patch(str(tmp_path / "r.safetensors")).encoder["hidden_size"] == G_WIDTH
    assert main(["train", str(tmp_path / "refiner.safetensors"), "--concept", "cat", "--component", "clip_l"]) == 2
    assert "has no clip_l text encoder (it has clip_g)" in capsys.readouterr().err


def test_a_multi_encoder_patch_file_with_a_missing_half_or_an_unknown_component_is_refused(sdxl, tmp_path):
    _, patch = sdxl
    path = save_patch(patch, str(tmp_path / "cat.safetensors"))
    with safe_open(path, "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file({k: v for k, v in tensors.items() if k.startswith("lora_te1_")}, str(tmp_path / "half.safetensors"), meta)
    with pytest.raises(Exception, match="declares clip_l, clip_g but holds no tensors for some"):
        load_patch(str(tmp_path / "half.safetensors"))
    save_file(tensors, str(tmp_path / "odd.safetensors"), {**meta, "hirm.components": meta["hirm.components"].replace("clip_g", "t5")})
    with pytest.raises(Exception, match="components must map"):
        load_patch(str(tmp_path / "odd.safetensors"))


def test_training_an_sd1_clip_alone_is_unchanged_by_the_multi_encoder_path():
    model, tok = random_clip(tiny_config(), 5), __import__("shared_core.tokenizer", fromlist=["x"]).clip_tokenizer()
    one = train_patch(model, tok, concepts=["cat"], steps=2, report=False)
    two = train_model_patch({"clip_l": (model, tok)}, concepts=["cat"], steps=2, report=False)
    assert not one.parts and one.deltas.keys() == two.deltas.keys()
    assert all(torch.equal(one.deltas[k], two.deltas[k]) for k in one.deltas)


# ---------------------------------------------------------------------------------------------- NLCE on SDXL

LOW = {"live_floor": 0.1}  # tiny random encoders give small rows; let the ratio rule decide
SDXL_GATING = "down_blocks.2.attentions.1.transformer_blocks.0.attn2"


def render_xl(pipe, prompt="a photo of a cat", steps=3, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, height=16, width=16, generator=g, output_type="pt", **kw).images


@pytest.fixture(scope="module")
def xl():
    return tiny_sdxl_pipeline(seed=2)


def test_nlce_operators_live_in_the_rows_the_sdxl_unet_reads(xl):
    from shared_core.adapters import apply_nlce
    from shared_core.nlce import sdxl_row_encoder

    with apply_nlce(xl, ["cat"], ["dog"], **LOW) as h:
        cs = h.concept_set
    assert cs.family == "sdxl" and cs.width == L_WIDTH + G_WIDTH and cs.live_floor_scale > 0
    encode = sdxl_row_encoder(xl.text_encoder, xl.tokenizer, xl.text_encoder_2, xl.tokenizer_2)
    rows = encode(["a cat"])[0]  # start, two words, end
    embeds = xl.encode_prompt("a cat", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0]
    torch.testing.assert_close(rows, embeds[0, :4], atol=1e-5, rtol=1e-5)  # exactly what the pipeline feeds its UNet


def test_nlce_on_sdxl_erases_in_the_conditional_half_leaves_the_added_conditioning_and_comes_off_bit_exact(xl):
    from shared_core.adapters import apply_nlce

    seen = []
    hook = xl.unet.add_embedding.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        before = render_xl(xl)
        with apply_nlce(xl, ["cat"], ["dog"], **LOW) as h:
            erased = render_xl(xl)
            passes = [d for d in h.diagnostics if d["live_tokens"] is not None]
        after = render_xl(xl)
    finally:
        hook.remove()
    assert not torch.equal(before, erased) and torch.equal(before, after)
    assert all(d["live_tokens"][0] == [] and d["live_tokens"][1] for d in passes)  # [negative, prompt]: the prompt only
    assert all(d["gate"] is not None for d in passes[1:])
    steps = len(seen) // 3
    assert all(torch.equal(seen[i], seen[steps + i]) for i in range(steps))  # SDXL's added conditioning: untouched


def test_both_schedules_sample_sdxl_and_agree_on_the_first_gate_without_stage_one(xl):
    from shared_core.adapters import apply_nlce

    gates = {}
    for schedule in ("single-pass", "faithful"):
        with apply_nlce(xl, ["cat"], schedule=schedule, stage1=False, record_maps=True, **LOW) as h:
            assert torch.isfinite(render_xl(xl, steps=2)).all()
        gates[schedule] = next(d["gate_map"] for d in h.diagnostics if d["gate"] is not None)
    assert torch.allclose(gates["single-pass"], gates["faithful"], atol=1e-6)


def test_operator_files_say_their_family_and_refuse_another(xl, tmp_path):
    from shared_core.adapters import apply_nlce
    from shared_core.nlce import ConceptSet, NlceError

    with apply_nlce(xl, ["cat"], **LOW) as h:
        path = h.concept_set.save(str(tmp_path / "xl.nlce.safetensors"))
        erased = render_xl(xl)
    loaded = ConceptSet.load(path)
    assert loaded.family == "sdxl" and loaded.live_floor_scale == h.concept_set.live_floor_scale
    with apply_nlce(xl, concept_set=loaded):
        assert torch.equal(render_xl(xl), erased)
    sd1 = tiny_pipeline(text_width=L_WIDTH + G_WIDTH, unet_width=L_WIDTH + G_WIDTH)  # as wide as SDXL's context: still refused
    with pytest.raises(NlceError, match="built for SDXL .* but this pipeline is SD1.x"):
        apply_nlce(sd1, concept_set=loaded)
    with apply_nlce(tiny_pipeline(), ["cat"], **LOW) as h:
        sd1_ops = h.concept_set
    with pytest.raises(NlceError, match="built for SD1.x .* but this pipeline is SDXL"):
        apply_nlce(xl, concept_set=sd1_ops)


def test_the_default_gating_layer_of_the_sdxl_unet_is_at_one_32nd_of_the_image():
    """SDXL's deepest cross-attention level works at 1/32 of the image (32 x 32 at 1024 px), like SD1.x's gating layer."""
    from diffusers import UNet2DConditionModel

    from shared_core.nlce import gating_layer
    from shared_core.adapters.diffusers_unet import cross_attention_names

    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=128, cross_attention_dim=2048, block_out_channels=(320, 640, 1280),
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                                    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                                    projection_class_embeddings_input_dim=2816)
    assert gating_layer(cross_attention_names(unet)) == SDXL_GATING + ".processor"


def test_nlce_refuses_an_sdxl_refiner_pipeline(xl):
    from types import SimpleNamespace

    from shared_core.adapters import apply_nlce
    from shared_core.nlce import NlceError

    refiner = SimpleNamespace(unet=xl.unet, text_encoder=None, text_encoder_2=xl.text_encoder_2, tokenizer=None,
                              tokenizer_2=xl.tokenizer_2)
    with pytest.raises(NlceError, match="does not support an SDXL refiner"):
        apply_nlce(refiner, ["cat"])


def test_hirm_nlce_renders_an_sdxl_folder_with_its_both_encoder_patch(xl, tmp_path):
    xl.save_pretrained(str(tmp_path / "sdxl"))
    patch = save_patch(train_model_patch(sdxl_encoders(xl), concepts=["cat"], steps=2, report=False), str(tmp_path / "p.safetensors"))
    out = tmp_path / "grid.png"
    assert main(["nlce", str(tmp_path / "sdxl"), "--concept", "cat", "--prompt", "a cat", "--patch", patch, "--steps", "2",
                 "--size", "16", "--out", str(out)]) == 0
    record, size = grid_record(out)
    assert record["concepts"] == ["cat"] and size == (32, 16)


def test_pony_style_score_tags_are_concepts_like_any_other_text(xl):
    from shared_core.adapters import apply_nlce

    tags = "score_9, score_8_up, score_7_up"
    patch = train_model_patch(sdxl_encoders(xl), concepts=[tags], steps=1, report=False)
    assert patch.concepts == [tags] and patch.components == ["clip_l", "clip_g"]
    with apply_nlce(xl, ["score_9", "score_8_up"], **LOW) as h:
        assert h.concept_set.concepts == ["score_9", "score_8_up"]
        assert torch.isfinite(render_xl(xl, "score_9, a photo of a cat", steps=1)).all()
