"""A patch the diffusers way: ``hirm export`` writes a LoRA that ``load_lora_weights`` / ``set_adapters`` /
``fuse_lora`` / ``unload_lora_weights`` apply to SD1.x and SDXL pipelines exactly as ``patched()`` does."""

from pathlib import Path

import diffusers
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from packaging.version import Version
from safetensors import safe_open
from tiny import random_clip, snapshot, same_weights, tiny_config
from tiny_pipeline import tiny_pipeline, tiny_unet, tiny_vae

from shared_core.cli import main
from shared_core.errors import HirmError
from shared_core.export import to_diffusers_lora
from shared_core.hirm import train_patch
from shared_core.patch import ErasurePatch, load_patch, patched, save_patch
from shared_core.tokenizer import clip_tokenizer

pytest.importorskip("peft")
PROMPT = "a painting of a cat in the style of Van Gogh"


def load_lora_file(pipe, path, **kwargs):
    """``pipe.load_lora_weights(file)`` as the README shows it; offline (as tests run), diffusers before 0.40 asks
    for the folder and ``weight_name`` instead (its weight-name guess refuses offline mode, even for a file)."""
    path = Path(path)
    if Version(diffusers.__version__) >= Version("0.40"):
        pipe.load_lora_weights(str(path), **kwargs)
    else:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, **kwargs)


def encode(encoder, tokenizer, text=PROMPT):
    ids = tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder(ids, output_hidden_states=True).hidden_states[-2]


@pytest.fixture(scope="module")
def sd1():
    pipe = tiny_pipeline(seed=3)
    patch = train_patch(pipe.text_encoder, pipe.tokenizer, concepts=["Van Gogh"], steps=3, report=False)
    return pipe, patch


def expected(encoder, tokenizer, patch, strength=1.0):
    with patched(encoder, [(patch, strength)]):
        return encode(encoder, tokenizer)


def test_the_full_rank_export_is_exact_and_loads_unloads_and_fuses_in_a_sd1_pipeline(sd1, tmp_path, capsys):
    pipe, patch = sd1
    save_patch(patch, str(tmp_path / "vg.safetensors"), dtype=torch.float32)
    assert main(["export", str(tmp_path / "vg.safetensors")]) == 0
    out = tmp_path / "vg-diffusers-lora.safetensors"
    assert "exact" in capsys.readouterr().out
    plain, before = encode(pipe.text_encoder, pipe.tokenizer), snapshot(pipe.text_encoder)
    stored = load_patch(str(tmp_path / "vg.safetensors"))
    want, want_half = (expected(pipe.text_encoder, pipe.tokenizer, stored, s) for s in (1.0, 0.5))

    load_lora_file(pipe, out, adapter_name="erasure")
    got = encode(pipe.text_encoder, pipe.tokenizer)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    pipe.set_adapters(["erasure"], [0.5])
    torch.testing.assert_close(encode(pipe.text_encoder, pipe.tokenizer), want_half, atol=1e-5, rtol=1e-5)
    pipe.set_adapters(["erasure"], [1.0])
    pipe.fuse_lora(components=["text_encoder"])
    torch.testing.assert_close(encode(pipe.text_encoder, pipe.tokenizer), want, atol=1e-5, rtol=1e-5)
    pipe.unfuse_lora(components=["text_encoder"])
    pipe.unload_lora_weights()
    torch.testing.assert_close(encode(pipe.text_encoder, pipe.tokenizer), plain, atol=1e-7, rtol=0)
    now = pipe.text_encoder.state_dict()  # diffusers' fuse then unfuse adds and subtracts B @ A: float rounding only
    assert now.keys() == before.keys() and all(torch.allclose(now[k], before[k], rtol=0, atol=1e-9) for k in before)
    assert not any("lora" in n for n, _ in pipe.text_encoder.named_parameters())


def test_an_fp16_patch_exported_matches_patched_within_fp16_rounding(sd1, tmp_path):
    pipe, patch = sd1
    save_patch(patch, str(tmp_path / "half.safetensors"))  # the default fp16 deltas
    stored = load_patch(str(tmp_path / "half.safetensors"))
    assert main(["export", str(tmp_path / "half.safetensors"), "--dtype", "fp16", "--out", str(tmp_path / "l.safetensors")]) == 0
    want = expected(pipe.text_encoder, pipe.tokenizer, stored)
    load_lora_file(pipe, tmp_path / "l.safetensors", adapter_name="erasure16")
    try:
        torch.testing.assert_close(encode(pipe.text_encoder, pipe.tokenizer), want, atol=1e-5, rtol=1e-5)
    finally:
        pipe.unload_lora_weights()


def test_a_lower_rank_reports_its_error_and_the_error_is_what_it_says(sd1, capsys, tmp_path):
    _, patch = sd1
    tensors, _, errors = to_diffusers_lora(patch, rank=4)
    for layer, err in errors.items():
        dw = patch.deltas[layer + ".weight"].float()
        ba = tensors[f"text_encoder.{layer}.lora_B.weight"] @ tensors[f"text_encoder.{layer}.lora_A.weight"]
        assert tensors[f"text_encoder.{layer}.lora_A.weight"].shape[0] == 4
        assert float((dw - ba).norm() / dw.norm()) == pytest.approx(err, rel=1e-4) and 0 < err < 1
    save_patch(patch, str(tmp_path / "p.safetensors"))
    assert main(["export", str(tmp_path / "p.safetensors"), "--rank", "4"]) == 0
    assert "largest relative error" in capsys.readouterr().out
    assert to_diffusers_lora(patch, rank=10_000)[2] == {k: 0.0 for k in errors}


def test_export_refuses_bad_ranks_and_never_writes_over_a_file_it_did_not_make(sd1, tmp_path, capsys):
    _, patch = sd1
    save_patch(patch, str(tmp_path / "p.safetensors"))
    with pytest.raises(HirmError, match="--rank"):
        to_diffusers_lora(patch, rank=0)
    (tmp_path / "mine.safetensors").write_bytes(b"precious")
    assert main(["export", str(tmp_path / "p.safetensors"), "--out", str(tmp_path / "mine.safetensors"), "--force"]) == 2
    assert (tmp_path / "mine.safetensors").read_bytes() == b"precious"
    assert main(["export", str(tmp_path / "p.safetensors"), "--out", str(tmp_path / "p.safetensors")]) == 2
    assert main(["export", str(tmp_path / "p.safetensors"), "--out", str(tmp_path / "x.safetensors")]) == 0
    assert main(["export", str(tmp_path / "p.safetensors"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert main(["export", str(tmp_path / "p.safetensors"), "--out", str(tmp_path / "x.safetensors"), "--force"]) == 0
    err = capsys.readouterr().err
    assert "is never replaced" in err and "already exists" in err and len(err.strip().splitlines()) == 3


def tiny_sdxl(seed=0):
    torch.manual_seed(seed)
    from transformers import CLIPTextModelWithProjection

    enc2 = CLIPTextModelWithProjection(tiny_config()).eval()
    unet = tiny_unet()  # never run here: only the text encoders take the LoRA
    return StableDiffusionXLPipeline(vae=tiny_vae(seed), text_encoder=random_clip(tiny_config(), seed), text_encoder_2=enc2,
                                     tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet,
                                     scheduler=tiny_pipeline().scheduler)


def test_sdxl_takes_a_clip_l_and_a_clip_g_patch_on_its_two_encoders_and_gives_them_back(tmp_path):
    pipe = tiny_sdxl()
    tok = pipe.tokenizer
    patch_l = train_patch(pipe.text_encoder, tok, concepts=["cat"], steps=2, report=False)
    patch_g = train_patch(pipe.text_encoder_2, tok, concepts=["cat"], steps=2, report=False)
    patch_g = ErasurePatch(patch_g.deltas, {**patch_g.metadata, "encoder": {**patch_g.encoder, "family": "clip-g"}})
    want_l, want_g = expected(pipe.text_encoder, tok, patch_l), expected(pipe.text_encoder_2, tok, patch_g)
    before_l, before_g = snapshot(pipe.text_encoder), snapshot(pipe.text_encoder_2)
    for name, patch in (("l", patch_l), ("g", patch_g)):
        from shared_core.export import export_diffusers_lora

        export_diffusers_lora(patch, str(tmp_path / f"{name}.safetensors"))
    with safe_open(str(tmp_path / "g.safetensors"), "pt") as f:
        assert all(k.startswith("text_encoder_2.") for k in f.keys())
    load_lora_file(pipe, tmp_path / "l.safetensors", adapter_name="l")
    load_lora_file(pipe, tmp_path / "g.safetensors", adapter_name="g")
    torch.testing.assert_close(encode(pipe.text_encoder, tok), want_l, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(encode(pipe.text_encoder_2, tok), want_g, atol=1e-5, rtol=1e-5)
    pipe.unload_lora_weights()
    assert same_weights(pipe.text_encoder, before_l) and same_weights(pipe.text_encoder_2, before_g)
