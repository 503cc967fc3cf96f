"""The hirm command line, end to end on tiny checkpoints written by the tests."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import canonical_state_dict, tiny_clip

from shared_core.cli import main
from shared_core.loading import load_text_encoder
from shared_core.patch import load_patch


@pytest.fixture(scope="module")
def sd1_checkpoint(tmp_path_factory):
    model, _ = tiny_clip(seed=11)
    sd = canonical_state_dict(model, "cond_stage_model.transformer.")
    sd["model.diffusion_model.out.2.weight"] = torch.randn(4, 4, 3, 3)
    path = tmp_path_factory.mktemp("ckpt") / "tiny-sd1.safetensors"
    save_file(sd, str(path), metadata={"note": "kept"})
    return str(path)


@pytest.fixture(scope="module")
def patch_file(sd1_checkpoint, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("patch") / "vangogh.safetensors")
    assert main(["train", sd1_checkpoint, "--concept", "Van Gogh", "--steps", "3", "--out", out, "--quiet"]) == 0
    return out


def test_train_prints_report_and_writes_a_valid_patch(patch_file, capsys):
    patch = load_patch(patch_file)
    assert patch.concepts == ["Van Gogh"] and patch.metadata["config"]["steps"] == 3
    assert patch.report["n_nontarget_prompts"] >= 50
    assert main(["inspect", patch_file]) == 0
    out = capsys.readouterr().out
    assert "valid erasure patch" in out and "non-target drift" in out and "Van Gogh" in out


def test_train_json_output(sd1_checkpoint, tmp_path, capsys):
    out = str(tmp_path / "p.safetensors")
    assert main(["train", sd1_checkpoint, "--concept", "cat", "--concept", "dog", "--preset", "object", "--steps", "2",
                 "--out", out, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["concepts"] == ["cat", "dog"] and data["report"]["target_cosine_mean"] <= 1.0 and os.path.isfile(out)


def test_inspect_json(patch_file, capsys):
    assert main(["inspect", patch_file, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["valid"] is True and data["method"] == "random" and data["tensors"] == 12


def test_invalid_file_one_line_on_stderr_and_nonzero(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a patch")
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a valid safetensors file" in err


def test_train_without_source_says_what_to_pass(capsys):
    assert main(["train", "--concept", "x"]) == 2
    err = capsys.readouterr().err
    assert "pass a checkpoint file" in err and "hirm demo" in err


def test_bad_inputs_write_nothing(sd1_checkpoint, tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    assert main(["train", sd1_checkpoint, "--concept", " ", "--out", str(out)]) == 2
    assert main(["train", sd1_checkpoint, "--concept", "x", "--method", "superordinate", "--out", str(out)]) == 2
    assert main(["train", str(tmp_path / "missing.safetensors"), "--concept", "x", "--out", str(out)]) == 2
    assert not out.exists()
    assert "needs an anchor" in capsys.readouterr().err


def test_apply_to_single_file_checkpoint(sd1_checkpoint, patch_file, tmp_path):
    out = str(tmp_path / "patched.safetensors")
    assert main(["apply", sd1_checkpoint, "--patch", f"{patch_file}:0.5", "--out", out]) == 0
    before, after = load_file(sd1_checkpoint), load_file(out)
    assert before.keys() == after.keys()
    key = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    delta = load_patch(patch_file).deltas["text_model.encoder.layers.0.mlp.fc1.weight"].float()
    assert torch.allclose(after[key], before[key] + 0.5 * delta, atol=1e-6)
    assert torch.equal(after["model.diffusion_model.out.2.weight"], before["model.diffusion_model.out.2.weight"])
    assert torch.equal(after["cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1.weight"],
                       before["cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1.weight"])


def test_apply_to_folder_writes_a_loadable_encoder(sd1_checkpoint, patch_file, tmp_path):
    enc = load_text_encoder(sd1_checkpoint)
    enc.model.save_pretrained(str(tmp_path / "src" / "text_encoder"))
    enc.tokenizer.save_pretrained(str(tmp_path / "src" / "tokenizer"))
    out = str(tmp_path / "patched_te")
    assert main(["apply", str(tmp_path / "src"), "--patch", patch_file, "--out", out]) == 0
    patched = load_text_encoder(out)
    w = "text_model.encoder.layers.0.self_attn.q_proj.weight"
    from shared_core.encoders import canonical_parameters

    diff = canonical_parameters(patched.model)[w] - canonical_parameters(enc.model)[w]
    assert torch.allclose(diff, load_patch(patch_file).deltas[w].float(), atol=1e-6)


def test_python_m_and_demo_run_and_draw_a_labelled_before_after_image(tmp_path):
    from PIL import Image

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    demo = [sys.executable, "-m", "shared_core", "demo", "--steps", "2"]
    out = subprocess.run(demo, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert "MEANINGLESS" in out.stdout and "bit for bit: True" in out.stdout and "wrote hirm-demo.png" in out.stdout
    with Image.open(tmp_path / "hirm-demo.png") as im:
        assert im.size == (264, 162) and "meaningless" in im.info["hirm-demo"]
    again = subprocess.run(demo, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert again.returncode == 2 and "already exists" in again.stderr and "training" not in again.stderr
    (tmp_path / "photo.png").write_bytes((tmp_path / "hirm-demo.png").read_bytes()[:50])
    refused = subprocess.run(demo + ["--image", "photo.png", "--force"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert refused.returncode == 2 and "never replaced" in refused.stderr
