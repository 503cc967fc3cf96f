"""Hub sharing: push (fake HfApi), pull from a hand-built cache and from a local stub server, ls."""

import os
from types import SimpleNamespace

import pytest
import torch

from shared_core import hub
from shared_core.errors import HirmError, PatchFileError
from shared_core.hirm import train_patch
from shared_core.patch import load_patch, read_metadata, save_patch
from hub_cache import build_cache
from tiny import tiny_clip

SHA = "a" * 40
SHA_OLD = "b" * 40


@pytest.fixture(scope="module")
def patch_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("patches")
    model, tok = tiny_clip()
    paths = []
    for concept in ("Van Gogh", "snoopy"):
        p = train_patch(model, tok, concepts=[concept], steps=2)
        paths.append(save_patch(p, str(d / f"{hub.concept_slug(concept)}.safetensors")))
    return paths


def read(path):
    with open(path, "rb") as f:
        return f.read()


# ---------------------------------------------------------------------------------- push


class FakeApi:
    """Records calls; signatures mirror HfApi.create_repo / create_commit / get_safetensors_metadata."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, *, token=None, private=None, visibility=None, repo_type=None, exist_ok=False, **kw):
        self.calls.append(("create_repo", repo_id, {"private": private, "exist_ok": exist_ok, "token": token}))
        return f"https://hub/{repo_id}"

    def create_commit(self, repo_id, operations, *, commit_message, commit_description=None, token=None,
                      repo_type=None, revision=None, create_pr=None, num_threads=5, parent_commit=None, run_as_future=False):
        ops = list(operations)
        self.calls.append(("create_commit", repo_id, ops, commit_message))
        return SimpleNamespace(commit_url=f"https://hub/{repo_id}/commit/{SHA}", oid=SHA)


def test_push_uploads_all_patches_and_card_in_one_commit(patch_files):
    api = FakeApi()
    result = hub.push(patch_files, "me/erasers", private=True, token="t", api=api)
    assert [c[0] for c in api.calls] == ["create_repo", "create_commit"]
    assert api.calls[0][2] == {"private": True, "exist_ok": True, "token": "t"}
    ops = api.calls[1][2]
    assert sorted(op.path_in_repo for op in ops) == ["README.md", "snoopy-diffusers-lora.safetensors", "snoopy.safetensors",
                                                     "van-gogh-diffusers-lora.safetensors", "van-gogh.safetensors"]
    assert result["files"] == ["van-gogh.safetensors", "snoopy.safetensors"]
    card = next(op.path_or_fileobj for op in ops if op.path_in_repo == "README.md").decode()
    for needle in ("- hirm", "- concept-erasure", "- safety-patch", "- stable-diffusion", "Van Gogh", "snoopy",
                   "Flux", "pooled", "target displacement", "non-target drift", "hirm pull me/erasers",
                   "ComfyUI", "A1111", "license:", read_metadata(patch_files[0])["base_fingerprint"]):
        assert needle in card, needle


def test_the_card_is_a_hub_model_card_with_true_front_matter_and_escaped_text(patch_files):
    from huggingface_hub import ModelCard

    p = load_patch(patch_files[0])
    p = type(p)(p.deltas, {**p.metadata, "concepts": ["<script>x</script> | a"], "base_model": "someone/sd15-finetune"})
    card = ModelCard(hub.model_card("me/erasers", [("x.safetensors", p)]))
    assert card.data.library_name == "diffusers" and card.data.license == "openrail++"
    assert card.data.base_model == ["someone/sd15-finetune"] and card.data.base_model_relation == "adapter"
    assert {"lora", "text-to-image", "concept-erasure"} <= set(card.data.tags)
    prose = "".join(card.text.split("```")[::2])  # outside code blocks (where text is shown, not rendered)
    assert "<script>" not in prose and "hirm pull me/erasers '<script>x</script> | a'" in card.text and "&lt;script&gt;x&lt;/script&gt; \\| a" in prose
    assert 'weight_name="x-diffusers-lora.safetensors"' in card.text
    plain = ModelCard(hub.model_card("me/erasers", [("y.safetensors", load_patch(patch_files[0]))]))
    assert plain.data.base_model is None  # a patch trained on a local file names no Hub model


def test_a_pushed_diffusers_companion_loads_as_the_patch(patch_files):
    from safetensors.torch import load as load_bytes

    from shared_core.export import to_diffusers_lora

    api = FakeApi()
    hub.push(patch_files[:1], "me/erasers", api=api)
    op = next(op for op in api.calls[1][2] if op.path_in_repo.endswith("-diffusers-lora.safetensors"))
    pushed = load_bytes(op.path_or_fileobj)
    expected = to_diffusers_lora(load_patch(patch_files[0]), dtype=torch.float16)[0]
    assert pushed.keys() == expected.keys() and all(torch.equal(pushed[k], expected[k]) for k in expected)


def test_card_names_the_model_families_a_clip_l_patch_serves(patch_files):
    p = load_patch(patch_files[0])
    p = type(p)(p.deltas, {**p.metadata, "encoder": {**p.metadata["encoder"], "family": "clip-l"}})
    card = hub.model_card("me/erasers", [("van-gogh.safetensors", p)])
    row = next(line for line in card.splitlines() if line.startswith("| `van-gogh"))
    assert "SD 1.x" in row and "SDXL" in row and "Flux" in row and "pooled" in row


def test_push_refuses_a_non_patch_before_contacting_the_hub(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a patch")
    api = FakeApi()
    with pytest.raises(PatchFileError):
        hub.push([str(bad)], "me/erasers", api=api)
    assert api.calls == []


def test_push_failure_is_one_line_hirm_error(patch_files):
    class Refusing(FakeApi):
        def create_commit(self, *a, **k):
            raise RuntimeError("403 Forbidden\nlong body")

    with pytest.raises(HirmError) as e:
        hub.push(patch_files[:1], "me/erasers", api=Refusing())
    assert "\n" not in str(e.value) and "token" in str(e.value)


# ---------------------------------------------------------------------------------- pull offline


@pytest.fixture()
def cache(tmp_path, patch_files):
    cache_dir = str(tmp_path / "hf")
    new, old = read(patch_files[0]), read(patch_files[1])
    build_cache(cache_dir, "org/erasers", {
        SHA: {"van-gogh.safetensors": new, "snoopy/patch.safetensors": old, "README.md": b"# card"},
        SHA_OLD: {"van-gogh.safetensors": old},
    }, {"main": SHA})
    return cache_dir


@pytest.mark.parametrize("ask,expect", [("Van Gogh", "van-gogh.safetensors"), ("van-gogh.safetensors", "van-gogh.safetensors"),
                                        ("snoopy", "snoopy/patch.safetensors")])
def test_offline_pull_finds_file_by_concept_folder_or_name(cache, ask, expect):
    patch = hub.pull("org/erasers", ask, cache_dir=cache, local_files_only=True)
    assert patch.metadata["source"] == {"repo": "org/erasers", "revision": SHA, "filename": expect}


def test_offline_pull_honours_pinned_revision(cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    patch = hub.pull("org/erasers", "van-gogh.safetensors", revision=SHA_OLD, cache_dir=cache)
    assert patch.concepts == ["snoopy"] and patch.metadata["source"]["revision"] == SHA_OLD


def test_a_concept_name_never_returns_a_file_holding_another_concept(cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # at SHA_OLD, van-gogh.safetensors holds the snoopy patch
    with pytest.raises(HirmError, match=r"no patch for 'van gogh'.*van-gogh.safetensors \(snoopy\)") as e:
        hub.pull("org/erasers", "van gogh", revision=SHA_OLD, cache_dir=cache)
    assert "\n" not in str(e.value)


def test_pull_with_dest_saves_validated_patch_recording_its_source(cache, tmp_path):
    dest = tmp_path / "mine"
    patch = hub.pull("org/erasers", "Van Gogh", cache_dir=cache, local_files_only=True, dest=str(dest))
    assert os.listdir(dest) == ["van-gogh.safetensors"]
    saved = load_patch(str(dest / "van-gogh.safetensors"))
    assert saved.metadata["source"] == {"repo": "org/erasers", "revision": SHA, "filename": "van-gogh.safetensors"}
    assert saved.concepts == patch.concepts
    assert all((saved.deltas[k] == v).all() for k, v in patch.deltas.items())


def test_offline_pull_of_missing_file_or_repo_is_one_line_error(cache, tmp_path):
    with pytest.raises(HirmError, match="no patch for 'dali'") as e:
        hub.pull("org/erasers", "dali", cache_dir=cache, local_files_only=True)
    assert "\n" not in str(e.value)
    with pytest.raises(HirmError):
        hub.pull("org/nothing", "dali", cache_dir=cache, local_files_only=True)


def test_non_patch_file_in_repo_is_refused_and_nothing_written(tmp_path):
    cache_dir = str(tmp_path / "hf")
    build_cache(cache_dir, "org/junk", {SHA: {"a.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "}}, {"main": SHA})
    dest = tmp_path / "mine"
    with pytest.raises(PatchFileError, match="org/junk/a.safetensors") as e:
        hub.pull("org/junk", "a.safetensors", cache_dir=cache_dir, local_files_only=True, dest=str(dest))
    assert "\n" not in str(e.value)
    assert not dest.exists() or os.listdir(dest) == []


# ---------------------------------------------------------------------------------- ls
