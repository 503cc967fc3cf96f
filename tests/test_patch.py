"""Patch files: round trip, validation of bad files, apply/remove bit for bit, mismatches."""

import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import canonical_state_dict, random_clip, same_weights, snapshot, tiny_clip, tiny_config

from shared_core.errors import HirmError, PatchFileError, PatchMismatchError
from shared_core.hirm import train_patch
from shared_core.hirm.train import trained_parameter_names
from shared_core.hirm.config import make_config
from shared_core.patch import (
    BaseMismatchWarning, ErasurePatch, applied_patches, apply_patch, canonical_name, file_key, load_patch, patched, read_metadata,
    save_patch,
)


@pytest.fixture(scope="module")
def trained():
    model, tok = tiny_clip(seed=5)
    patch = train_patch(model, tok, concepts=["Van Gogh"], steps=3, report=False)
    return model, tok, patch


def test_file_keys_follow_the_lora_diff_convention_and_round_trip():
    for name in trained_parameter_names(make_config("x", trainable_layers=[0, 11]), 12):
        key = file_key(name, "clip-l")
        assert key.startswith("lora_te_text_model_encoder_layers_") and key.endswith((".diff", ".diff_b"))
        assert canonical_name(key) == name
    assert file_key("text_model.encoder.layers.0.mlp.fc1.weight", "clip-g").startswith("lora_te2_")


def test_round_trip_keeps_deltas_and_metadata(tmp_path, trained):
    _, _, patch = trained
    path = save_patch(patch, str(tmp_path / "p.safetensors"), dtype=torch.float32)
    loaded = load_patch(path)
    assert loaded.deltas.keys() == patch.deltas.keys()
    assert all(torch.equal(loaded.deltas[k], patch.deltas[k]) for k in patch.deltas)
    assert loaded.concepts == ["Van Gogh"] and loaded.method == "random"
    assert loaded.metadata["config"]["lr"] == 5e-5 and loaded.metadata["encoder"]["hidden_size"] == 32
    assert loaded.metadata["base_signature"] == patch.metadata["base_signature"]
    # fp16 is the default storage: half the bytes, values within fp16 rounding
    path16 = save_patch(patch, str(tmp_path / "p16.safetensors"))
    assert os.path.getsize(path16) < os.path.getsize(path)
    half = load_patch(path16)
    assert all(torch.allclose(half.deltas[k].float(), patch.deltas[k], rtol=1e-3, atol=1e-7) for k in patch.deltas)
    assert read_metadata(path16)["delta_dtype"] == "float16"


def test_save_is_atomic_and_refuses_nan(tmp_path, trained):
    _, _, patch = trained
    bad = ErasurePatch({k: v.clone() for k, v in patch.deltas.items()}, patch.metadata)
    next(iter(bad.deltas.values()))[0] = float("nan")
    with pytest.raises(HirmError, match="NaN"):
        save_patch(bad, str(tmp_path / "bad.safetensors"))
    assert os.listdir(tmp_path) == []


def test_not_safetensors(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_text("hello")
    with pytest.raises(PatchFileError, match="not a valid safetensors file"):
        load_patch(str(path))


def test_safetensors_that_is_not_a_patch(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"a": torch.zeros(2)}, str(path), metadata={"ss_network_module": "networks.lora"})
    with pytest.raises(PatchFileError, match="not an erasure patch"):
        load_patch(str(path))


def _rewrite(src, dst, meta_change=None, tensor_change=None):
    from safetensors import safe_open

    with safe_open(src, framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(src)
    meta.update(meta_change or {})
    if tensor_change:
        tensor_change(tensors)
    save_file(tensors, dst, metadata=meta)
    return dst


def test_newer_format_version_is_refused(tmp_path, trained):
    src = save_patch(trained[2], str(tmp_path / "p.safetensors"))
    dst = _rewrite(src, str(tmp_path / "new.safetensors"), {"hirm.format_version": "99"})
    with pytest.raises(PatchFileError, match="newer than this tool reads"):
        load_patch(dst)


def test_truncated_file_is_refused(tmp_path, trained):
    src = save_patch(trained[2], str(tmp_path / "p.safetensors"))
    data = open(src, "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(PatchFileError, match="truncated"):
        load_patch(str(cut))


def test_nan_and_wrong_shape_in_file_are_refused(tmp_path, trained):
    src = save_patch(trained[2], str(tmp_path / "p.safetensors"))

    def nan(t):
        next(iter(t.values()))[0] = float("inf")

    with pytest.raises(PatchFileError, match="NaN or Inf"):
        load_patch(_rewrite(src, str(tmp_path / "nan.safetensors"), tensor_change=nan))

    def reshape(t):
        k = next(k for k in t if k.endswith(".diff"))
        t[k] = torch.zeros(3, 3, dtype=t[k].dtype)

    with pytest.raises(PatchFileError, match="expected"):
        load_patch(_rewrite(src, str(tmp_path / "shape.safetensors"), tensor_change=reshape))


def test_apply_remove_restores_every_weight_bit_for_bit(trained):
    model, _, patch = trained
    before = snapshot(model)
    handle = apply_patch(model, patch, 0.7)
    assert not same_weights(model, before)
    handle.remove()
    assert same_weights(model, before)


def test_apply_then_remove_on_fp16_model_is_exact():
    model = random_clip(tiny_config(), seed=5).half()
    model_fp32, tok = tiny_clip(seed=5)
    patch = train_patch(model_fp32, tok, concepts=["dog"], steps=2, report=False)
    before = snapshot(model)
    with patched(model, patch, 1.0):
        assert not same_weights(model, before)
    assert same_weights(model, before)


def test_stacking_and_order(trained):
    model, tok, patch = trained
    other = train_patch(model, tok, concepts=["church"], preset="object", steps=2, report=False)
    before, weights = canonical_state_dict(model), snapshot(model)
    with patched(model, [(patch, 1.0), (other, 0.5)]):
        combined = canonical_state_dict(model)
        name = next(iter(patch.deltas))
        expected = (before[name].float() + patch.deltas[name] + 0.5 * other.deltas[name])
        got = combined[name]
        assert torch.allclose(got, expected, atol=1e-6)
    assert same_weights(model, weights)
    only_other = apply_patch(model, other, 0.5)
    alone = snapshot(model)
    only_other.remove()
    first = apply_patch(model, patch)
    second = apply_patch(model, other, 0.5)
    first.remove()  # out of order: the weights are those of the other patch alone, bit for bit
    assert same_weights(model, alone) and applied_patches(model) == [second]
    second.remove()
    first.remove()  # already off: nothing happens
    assert same_weights(model, weights) and applied_patches(model) == []


def test_patch_for_another_base_warns(trained):
    _, _, patch = trained
    other_base = random_clip(tiny_config(), seed=99)
    with pytest.warns(BaseMismatchWarning, match="other base weights"):
        handle = apply_patch(other_base, patch)
    assert handle.base_matches is False
    handle.remove()


def test_patch_for_another_architecture_is_refused_untouched(trained):
    _, _, patch = trained
    wider = random_clip(tiny_config(hidden=64, intermediate=128), seed=1)
    before = snapshot(wider)
    with pytest.raises(PatchMismatchError, match="use a patch trained on this encoder"):
        apply_patch(wider, patch)
    assert same_weights(wider, before)


def test_same_base_does_not_warn(trained):
    model, _, patch = trained
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_patch(model, patch).remove()


def test_a_checksum_over_names_dtypes_shapes_and_bytes_is_written_and_verified(tmp_path, trained, capsys):
    """A flipped bit, or a header that declares another dtype over the same bytes, is refused; a file written before
    checksums still loads, and ``inspect`` says it has none."""
    import json

    from shared_core.cli import main

    src = save_patch(trained[2], str(tmp_path / "p.safetensors"))
    assert read_metadata(src)["checksum"].startswith("sha256:")

    def flip(t):
        k = next(iter(t))
        t[k] = t[k].clone()
        t[k].view(torch.int16).view(-1)[0] ^= 1  # one bit of one value: still finite, still the same shape

    def relabel(t):  # the same bytes declared as bfloat16 (what a tampered Hub file did)
        for k in t:
            t[k] = t[k].view(torch.bfloat16)

    for change in (flip, relabel):
        with pytest.raises(PatchFileError, match="do not match the patch's checksum"):
            load_patch(_rewrite(src, str(tmp_path / f"{change.__name__}.safetensors"), tensor_change=change))
    old = _rewrite(src, str(tmp_path / "old.safetensors"))
    from safetensors import safe_open
    from safetensors.torch import save_file as write

    with safe_open(old, framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "hirm.checksum"}
    write(load_file(old), old, metadata=meta)
    assert load_patch(old).concepts == trained[2].concepts
    assert main(["inspect", old]) == 0 and "written before checksums" in capsys.readouterr().out
    assert main(["inspect", src, "--json"]) == 0 and json.loads(capsys.readouterr().out)["checksum_verified"] is True


def test_the_base_mismatch_note_names_the_fingerprints_of_the_signatures_it_compared(trained):
    """A patch whose stored fingerprint disagrees with its signature (SDXL halves swapped) is described by its signature."""
    from shared_core.encoders import model_signature, signature_id
    from shared_core.patch import base_mismatch_note

    model, _, patch = trained
    other = random_clip(tiny_config(), seed=7)
    relabelled = patch.with_metadata(base_signature=model_signature(other))  # the fingerprint label still says this model's
    note = base_mismatch_note(relabelled, model_signature(model), "this checkpoint")
    assert f"({signature_id(model_signature(other))}) than this checkpoint ({signature_id(model_signature(model))})" in note
    assert base_mismatch_note(patch, model_signature(model)) is None
