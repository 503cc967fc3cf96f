"""Loading a CLIP text encoder from every layout people have, offline."""


import pytest
import torch
from safetensors.torch import save_file
from tiny import canonical_state_dict, openclip_state_dict, random_clip, tiny_clip, tiny_config

from shared_core.encoders import base_signature, build_text_model, canonical_parameters, encoder_architecture, model_signature, signatures_match
from shared_core.loading import load_text_encoder
from shared_core.errors import EncoderSourceError
from shared_core.textenc import encode, tokenize


@pytest.fixture(scope="module")
def reference():
    model, tok = tiny_clip(seed=3)
    ids = tokenize(tok, ["a painting by Van Gogh", "a cat"])
    return model, tok, ids, encode(model, ids)[0]


def _same_outputs(loaded, reference):
    _, _, ids, expected = reference
    assert torch.allclose(encode(loaded.model, ids)[0], expected, atol=1e-5)


def _unet_noise():
    return {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}


@pytest.mark.parametrize("prefix", [
    "cond_stage_model.transformer.",          # SD1.x single file
    "conditioner.embedders.0.transformer.",   # SDXL single file (CLIP-L)
    "clip_l.transformer.",                    # ComfyUI state dict
    "",                                       # standalone clip_l.safetensors (Flux/SD3)
])
def test_single_file_layouts_load_the_same_encoder(tmp_path, reference, prefix):
    sd = canonical_state_dict(reference[0], prefix) | _unet_noise()
    if prefix.startswith("conditioner"):  # SDXL also carries bigG in OpenCLIP layout: must be ignored
        sd["conditioner.embedders.1.model.token_embedding.weight"] = torch.zeros(10, 1280)
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    loaded = load_text_encoder(str(path))
    assert loaded.prefix == prefix
    _same_outputs(loaded, reference)


def test_transformers5_flat_names_and_ckpt_pickle(tmp_path, reference):
    flat = {k[len("text_model."):]: v for k, v in canonical_state_dict(reference[0]).items()}
    path = tmp_path / "clip.ckpt"
    torch.save({"state_dict": flat}, str(path))
    _same_outputs(load_text_encoder(str(path)), reference)


def test_diffusers_folder_with_its_tokenizer(tmp_path, reference):
    model, tok = reference[0], reference[1]
    model.save_pretrained(str(tmp_path / "text_encoder"))
    tok.save_pretrained(str(tmp_path / "tokenizer"))
    (tmp_path / "model_index.json").write_text("{}")
    loaded = load_text_encoder(str(tmp_path))
    _same_outputs(loaded, reference)
    assert loaded.tokenizer("a cat")["input_ids"] == tok("a cat")["input_ids"]


def test_transformers_model_folder(tmp_path, reference):
    reference[0].save_pretrained(str(tmp_path))
    _same_outputs(load_text_encoder(str(tmp_path)), reference)


def test_missing_path_says_so(tmp_path):
    with pytest.raises(EncoderSourceError, match="no such file or folder"):
        load_text_encoder(str(tmp_path / "nope.safetensors"))


def test_hub_id_without_network_is_a_clear_error():
    with pytest.raises(EncoderSourceError, match="cannot be reached|no cached copy"):
        load_text_encoder("some-org/some-model-that-is-not-cached")


def test_checkpoint_without_clip_l(tmp_path):
    path = tmp_path / "unet_only.safetensors"
    save_file(_unet_noise(), str(path))
    with pytest.raises(EncoderSourceError, match="holds no CLIP-L"):
        load_text_encoder(str(path))


def test_sd2_checkpoint_is_refused_by_name(tmp_path):
    path = tmp_path / "sd2.safetensors"
    save_file({"cond_stage_model.model.token_embedding.weight": torch.zeros(10, 1024)}, str(path))
    with pytest.raises(EncoderSourceError, match="SD2"):
        load_text_encoder(str(path))


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(EncoderSourceError, match="not a readable safetensors"):
        load_text_encoder(str(path))


def test_signature_survives_fp16_and_bf16_copies_but_not_another_model():
    model = random_clip(tiny_config(), seed=1)
    sig = model_signature(model)
    for dtype in (torch.float16, torch.bfloat16):
        copy = {k: v.to(dtype) for k, v in canonical_parameters(model).items()}
        assert signatures_match(sig, base_signature(copy, 3))
    other = random_clip(tiny_config(), seed=2)
    assert not signatures_match(sig, model_signature(other))
    # a light fine-tune (1% relative noise) is a different base
    tuned = {k: v + 0.01 * v.abs().mean() * torch.randn_like(v) for k, v in canonical_parameters(model).items()}
    assert not signatures_match(sig, base_signature(tuned, 3))


def test_architecture_of_clip_l():
    from tiny import clip_l_config
    from transformers import CLIPTextModel

    with torch.device("meta"):
        model = CLIPTextModel(clip_l_config())
    assert encoder_architecture(model)["family"] == "clip-l"


def test_sdxl_bigg_in_openclip_layout_loads_as_clip_g(tmp_path, reference):
    """SDXL single files hold bigG as an OpenCLIP tower (fused in_proj); --component clip_g reads it."""
    out = openclip_state_dict(canonical_state_dict(reference[0]), "conditioner.embedders.1.model.")
    path = tmp_path / "sdxl.safetensors"
    save_file(out | canonical_state_dict(random_clip(tiny_config(), seed=9), "conditioner.embedders.0.transformer."), str(path))
    loaded = load_text_encoder(str(path), component="clip_g")
    assert loaded.tokenizer.pad_token == "!"  # bigG's tokenizer pads with "!"
    _, _, ids, expected = reference
    assert torch.allclose(encode(loaded.model, ids)[0], expected, atol=1e-5)


def test_a_model_built_from_a_hosts_inference_tensors_is_a_normal_model(reference):
    """Hosts (ComfyUI, Forge) hand over weights made under inference mode; the model built from them
    must run and train outside it, and must not write into the host's tensors."""
    model, _, ids, expected = reference
    with torch.inference_mode():
        host = {k: v.clone() for k, v in canonical_state_dict(model, "").items()}
        built_inside = build_text_model(host)
    built = build_text_model(host)
    for m in (built, built_inside):
        first = next(m.parameters())
        assert not first.is_inference()
        assert torch.allclose(encode(m, ids)[0], expected, atol=1e-5)
    before = {k: v.clone() for k, v in host.items()}
    with torch.no_grad():
        for p in built.parameters():
            p.add_(1.0)  # would raise on an inference tensor; must not reach the host's tensors
    assert all(torch.equal(host[k], before[k]) for k in host)
