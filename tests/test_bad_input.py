"""Nothing lost, nothing half-done: bad input, hostile files, killed writes, a misbehaving Hub, threads.

Each test states what must hold on bad input: one clear line, and nothing of the user's changed.
"""

import errno
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny import canonical_state_dict, same_weights, snapshot, tiny_clip

from shared_core import hub
from shared_core.cli import main
from shared_core.common import slug
from shared_core.errors import HirmError, PatchFileError
from shared_core.files import WriteRefused, atomic_write
from shared_core.hirm import make_config, train_patch
from shared_core.nlce import NlceError, build_concept_set
from shared_core.patch import apply_patch, check_strength, load_patch, patched, save_patch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained():
    model, tok = tiny_clip(seed=7)
    return model, tok, train_patch(model, tok, concepts=["cat"], steps=2, report=False)


@pytest.fixture()
def files(tmp_path, trained):
    """A tiny encoder checkpoint and a patch for it, on disk."""
    model, _, patch = trained
    ckpt = tmp_path / "model.safetensors"
    save_file(canonical_state_dict(model, "cond_stage_model.transformer."), str(ckpt))
    return ckpt, save_patch(patch, str(tmp_path / "cat.safetensors"))


def one_error_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert len(err) == 1 and err[0].startswith("hirm: error:"), err
    return err[0]


def listing(folder) -> dict:
    return {name: os.path.getsize(os.path.join(folder, name)) if os.path.isfile(os.path.join(folder, name)) else "dir"
            for name in sorted(os.listdir(folder))}


# ---------------------------------------------------------------------------------------------- never destroy


def test_apply_never_deletes_an_existing_folder_or_the_source_model(tmp_path, trained, capsys):
    model, tok, patch = trained
    diffusers_like = tmp_path / "sd"
    (diffusers_like / "text_encoder").mkdir(parents=True)
    model.save_pretrained(str(diffusers_like / "text_encoder"))
    (diffusers_like / "unet").mkdir()
    (diffusers_like / "model_index.json").write_text("{}")
    patch_file = save_patch(patch, str(tmp_path / "p.safetensors"))
    before = listing(diffusers_like)
    capsys.readouterr()
    other = tmp_path / "existing"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    for out in (str(other), str(diffusers_like), str(diffusers_like / "text_encoder")):
        assert main(["apply", str(diffusers_like), "--patch", patch_file, "--out", out]) == 2
        one_error_line(capsys)
    assert listing(diffusers_like) == before and (other / "keep.txt").read_text() == "mine"
    assert main(["apply", str(diffusers_like), "--patch", patch_file, "--out", str(tmp_path / "new")]) == 0
    assert os.path.isfile(tmp_path / "new" / "config.json")


def test_outputs_are_never_written_over_special_files_links_or_folders(tmp_path, files, capsys):
    ckpt, patch_file = files
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "link.safetensors"
    link.symlink_to(ckpt)
    (tmp_path / "folder.safetensors").mkdir()
    for out in (str(fifo), str(link), str(tmp_path / "folder.safetensors"), str(tmp_path) + "/"):
        assert main(["apply", str(ckpt), "--patch", patch_file, "--out", out, "--force"]) == 2
        one_error_line(capsys)
    assert os.path.exists(fifo) and not os.path.isfile(fifo) and os.path.islink(link)


def test_train_never_replaces_the_input_or_a_file_that_is_not_a_patch(tmp_path, files, capsys):
    ckpt, patch_file = files
    size = os.path.getsize(ckpt)
    notes = tmp_path / "notes.safetensors"
    save_file({"x": torch.zeros(3)}, str(notes))
    common = ["--concept", "cat", "--steps", "1", "--quiet"]
    for out, force in ((ckpt, True), (notes, True), (patch_file, False)):
        assert main(["train", str(ckpt), "--out", str(out), *common] + (["--force"] if force else [])) == 2
        one_error_line(capsys)
    assert os.path.getsize(ckpt) == size and set(load_file(str(notes))) == {"x"}
    assert main(["train", str(ckpt), "--out", str(patch_file), "--force", *common]) == 0  # a patch of ours, asked for
    assert load_patch(str(patch_file)).metadata["config"]["steps"] == 1


@pytest.mark.parametrize("strength", ["nan", "inf", "-inf", "1e39", "5"])
def test_non_finite_or_huge_strengths_are_refused_before_anything_is_written(tmp_path, files, capsys, strength):
    ckpt, patch_file = files
    out = tmp_path / "out.safetensors"
    assert main(["apply", str(ckpt), "--patch", f"{patch_file}:{strength}", "--out", str(out)]) == 2
    assert "strength" in one_error_line(capsys) and not out.exists()


def test_apply_patch_refuses_huge_strengths_and_leaves_the_weights(trained):
    model, _, patch = trained
    before = snapshot(model)
    for strength in (float("nan"), float("inf"), 1e39, -5, 50, "1", "0.5", True, None):
        with pytest.raises(HirmError, match=r"strength must be a number from -4 to 4, got"):
            apply_patch(model, patch, strength)
    assert same_weights(model, before)
    assert check_strength(0.5) == 0.5 and check_strength(2) == 2.0


def test_two_threads_patching_one_model_leave_it_exactly_as_it_was(trained):
    model, _, patch = trained
    before = snapshot(model)
    errors = []

    def use():
        try:
            for _ in range(20):
                with patched(model, patch, 0.5):
                    pass
        except Exception as e:  # noqa: BLE001 (collected and asserted empty)
            errors.append(e)

    threads = [threading.Thread(target=use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and same_weights(model, before)


def test_a_pulled_patch_keeps_the_dtype_its_tensors_have_whatever_the_metadata_says(tmp_path, trained):
    from hub_cache import build_cache

    _, _, patch = trained
    src = save_patch(patch, str(tmp_path / "cat.safetensors"))
    lie = rewrite(src, str(tmp_path / "lie.safetensors"), {"hirm.delta_dtype": "int8"})
    cache = str(tmp_path / "hf")
    build_cache(cache, "org/e", {"a" * 40: {"cat.safetensors": open(lie, "rb").read()}}, {"main": "a" * 40})
    saved = hub.pull("org/e", "cat.safetensors", cache_dir=cache, local_files_only=True, dest=str(tmp_path / "out"))
    again = load_patch(str(tmp_path / "out" / "cat.safetensors"))
    assert all(torch.equal(again.deltas[k], saved.deltas[k]) for k in saved.deltas) and any(v.any() for v in again.deltas.values())


# ---------------------------------------------------------------------------------------------- damaged files


def rewrite(src, dst, meta_change=None, tensor_change=None, drop=()):
    with safe_open(src, framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(src)
    meta.update(meta_change or {})
    for k in drop:
        meta.pop(k, None)
    if tensor_change:
        tensor_change(tensors)
    save_file(tensors, dst, metadata=meta)
    return dst


def first_diff(t):
    return next(k for k in t if k.endswith(".diff"))


DAMAGED_METADATA = [
    {"hirm.concepts": "5"}, {"hirm.concepts": "null"}, {"hirm.concepts": "[1, 2]"}, {"hirm.concepts": '"cat"'},
    {"hirm.concepts": '["a\\nfake: line"]'}, {"hirm.concepts": '["\\u001b[31mred"]'},
    {"hirm.encoder": '{"hidden_size": "abc", "num_layers": 3, "intermediate_size": 64}'},
    {"hirm.config": "[]"}, {"hirm.report": "7"}, {"hirm.report": '{"neighbors": [1, 2]}'},
    {"hirm.base_signature": '["a", "b"]'}, {"hirm.format_version": "-7"}, {"hirm.format_version": "x"},
    {"hirm.method": ""}, {"hirm.train_seconds": '"soon"'}, {"hirm.source": '{"repo": 5}'},
]


@pytest.mark.parametrize("change", DAMAGED_METADATA, ids=lambda c: json.dumps(c)[:40])
def test_damaged_metadata_is_one_line_and_inspect_agrees_with_apply(tmp_path, files, capsys, change):
    ckpt, patch_file = files
    bad = rewrite(patch_file, str(tmp_path / "bad.safetensors"), change)
    with pytest.raises(PatchFileError):
        load_patch(bad)
    assert main(["inspect", bad]) == 2
    assert "damaged" in one_error_line(capsys) or "newer" in capsys.readouterr().err
    out = tmp_path / "out.safetensors"
    assert main(["apply", str(ckpt), "--patch", bad, "--out", str(out)]) == 2
    one_error_line(capsys)
    assert not out.exists()


def _tensor_damages():
    def wrong_norm(t):
        t["lora_te_text_model_final_layer_norm.diff"] = torch.zeros(5)

    def wrong_embedding(t):
        t["lora_te_text_model_embeddings_token_embedding.diff"] = torch.zeros(3, 32)

    def zero_padded_layer(t):
        t[first_diff(t).replace("layers_0_", "layers_00_")] = t[first_diff(t)].clone()

    def integers(t):
        k = first_diff(t)
        t[k] = t[k].to(torch.int32)

    def booleans(t):
        k = first_diff(t)
        t[k] = t[k] > 0

    def fp8(t):
        k = first_diff(t)
        t[k] = t[k].float().to(torch.float8_e4m3fn)

    return [wrong_norm, wrong_embedding, zero_padded_layer, integers, booleans, fp8]


@pytest.mark.parametrize("damage", _tensor_damages(), ids=lambda f: f.__name__)
def test_inspect_calls_valid_exactly_what_apply_accepts(tmp_path, files, capsys, damage):
    _, patch_file = files
    bad = rewrite(patch_file, str(tmp_path / "bad.safetensors"), tensor_change=damage)
    with pytest.raises(PatchFileError):
        load_patch(bad)
    assert main(["inspect", bad]) == 2
    one_error_line(capsys)


def test_a_header_of_thousands_of_tensors_is_refused_before_any_is_read(tmp_path, files, monkeypatch):
    _, patch_file = files
    with safe_open(patch_file, framework="pt") as f:
        meta = dict(f.metadata())
    header = {"__metadata__": meta}
    header.update({f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(20000)})
    blob = json.dumps(header).encode()
    path = tmp_path / "many.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob)
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("tensors were read"))
    start = time.monotonic()
    with pytest.raises(PatchFileError, match="far more than any erasure patch"):
        load_patch(str(path))
    assert time.monotonic() - start < 5


# ---------------------------------------------------------------------------------------------- odd input


@pytest.mark.parametrize("kwargs,words", [
    ({"templates": ["a painting by {artist}"]}, "exactly one"), ({"templates": ["{} and {}"]}, "exactly one"),
    ({"templates": ["{0.__class__}"]}, "exactly one"), ({"seed": 2**64}, "seed"), ({"seed": -1}, "seed"),
    ({"trainable_layers": [0, 0]}, "twice"), ({"lr": 1e-300}, "learning rate"), ({"target_scale": float("inf")}, "target scale"),
])
def test_odd_training_settings_are_one_line(kwargs, words):
    with pytest.raises(HirmError, match=words) as e:
        make_config(["cat"], **kwargs)
    assert "\n" not in str(e.value)


def test_the_cli_turns_odd_arguments_into_one_line(tmp_path, files, capsys):
    ckpt, patch_file = files
    pairs = tmp_path / "pairs.tsv"
    pairs.write_bytes("nu\xe9\tclothed\n".encode("latin-1"))
    base = ["train", str(ckpt), "--concept", "cat", "--steps", "1", "--quiet"]
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    for extra in (["--device", "tpu"], ["--device", "meta"], ["--device", "cuda:7"], ["--seed", str(2**64)],
                  ["--method", "safety", "--pairs", str(pairs)], ["--out", str(blocker / "x.safetensors")],
                  ["--out", str(tmp_path) + "/"], ["--layers", "0", "0"], ["--lr", "1e-300"],
                  ["--template", "{} and {}"]):
        assert main(base + extra) == 2, extra
        one_error_line(capsys)


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, trained, monkeypatch):
    _, _, patch = trained

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WriteRefused, match="No space left") as e:
        save_patch(patch, str(tmp_path / "p.safetensors"))
    assert "\n" not in str(e.value) and os.listdir(tmp_path) == []


def test_files_follow_the_umask(tmp_path, trained):
    old = os.umask(0o022)
    try:
        path = save_patch(trained[2], str(tmp_path / "p.safetensors"))
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644


def test_a_write_killed_midway_leaves_nothing_behind(tmp_path):
    script = (
        "import sys, time\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "from shared_core.files import atomic_write\n"
        "def write(f):\n"
        "    f.write(b'x' * 1_000_000); f.flush(); print('writing', flush=True); time.sleep(60)\n"
        f"atomic_write({str(tmp_path / 'out.safetensors')!r}, write)\n")
    for sig in (signal.SIGKILL, signal.SIGTERM):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(sig)
        proc.wait(10)
        assert os.listdir(tmp_path) == [], sig


def test_a_75_token_concept_trains_and_is_reported(trained):
    model, tok, _ = trained
    concept = " ".join(["cat"] * 75)
    patch = train_patch(model, tok, concepts=[concept], steps=1)
    assert patch.report["n_target_prompts"] >= 1


def test_non_text_nlce_concepts_are_one_line():
    encode = lambda texts: [torch.ones(3, 4) for _ in texts]  # noqa: E731
    for bad in ([5], [None], [["a", 3]]):
        with pytest.raises(NlceError, match="a text or a list") as e:
            build_concept_set(encode, bad)
        assert "\n" not in str(e.value)


def test_atomic_write_refuses_an_existing_file_unless_asked_and_ours(tmp_path):
    path = tmp_path / "a.bin"
    atomic_write(str(path), lambda f: f.write(b"1"))
    with pytest.raises(WriteRefused, match="already exists"):
        atomic_write(str(path), lambda f: f.write(b"2"))
    with pytest.raises(WriteRefused, match="not a file written by this tool"):
        atomic_write(str(path), lambda f: f.write(b"2"), overwrite=True, is_ours=lambda p: False)
    atomic_write(str(path), lambda f: f.write(b"3"), overwrite=True, is_ours=lambda p: True)
    assert path.read_bytes() == b"3" and os.listdir(tmp_path) == ["a.bin"]


# ---------------------------------------------------------------------------------------------- names


def test_file_names_are_safe_bounded_and_unique_for_any_concept():
    names = {slug(c) for c in ("猫", "犬", "кошка", "Van Gogh", "van-gogh2", "ÉCOLE", "a" * 1_000_000, "a" * 70 + "b")}
    assert len(names) == 8
    for n in names:
        assert 0 < len(n) <= 69 and n.replace("-", "").isalnum() and n.isascii() and not n.startswith(".")
    assert slug("Van Gogh") == "van-gogh"  # plain names stay readable
    assert hub.concept_slug("猫") != hub.concept_slug("犬")
