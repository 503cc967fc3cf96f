"""Online pulls against a local stub of the Hub's file endpoints (127.0.0.1, no real network)."""

import os
import re
import time
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import constants, file_download
from safetensors.torch import save as safetensors_bytes

from hub_server import HubStub
from shared_core import hub, hub_errors
from shared_core.errors import HirmError
from shared_core.hirm import train_patch
from shared_core.patch import save_patch
from tiny import patch_files, tiny_clip

SHA = "c" * 40
SHA_OLD = "d" * 40


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    d = tmp_path_factory.mktemp("patches")
    out = {}
    for concept, path in patch_files(d, ("Van Gogh", "snoopy")).items():
        with open(path, "rb") as f:
            out[concept] = f.read()
    model, tok = tiny_clip()
    many = ["snoopy", "Mickey Mouse", "Pikachu", "Garfield", "Tintin", "Popeye", "Asterix"]
    path = save_patch(train_patch(model, tok, concepts=many, steps=2), str(d / "cartoons.safetensors"))
    with open(path, "rb") as f:
        out["list"] = f.read()
    return out


@pytest.fixture()
def online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")


@pytest.fixture()
def stub(blobs, online):
    files = {
        ("org/erasers", SHA, "van-gogh.safetensors"): blobs["Van Gogh"],
        ("org/erasers", SHA, "broken.safetensors"): blobs["snoopy"],
        ("org/erasers", SHA, "gone.safetensors"): blobs["snoopy"],
        ("org/erasers", SHA_OLD, "van-gogh.safetensors"): blobs["snoopy"],
        ("org/private", SHA, "van-gogh.safetensors"): blobs["snoopy"],
        ("org/lists", SHA, "cartoons.safetensors"): blobs["list"],
        ("org/lists", SHA, "van-gogh.safetensors"): blobs["Van Gogh"],
        ("org/erasers", SHA, "model.safetensors"): safetensors_bytes({"w": torch.zeros(2)}),
    }
    with HubStub(files, {("org/erasers", "main"): SHA, ("org/private", "main"): SHA, ("org/lists", "main"): SHA},
                 faults={"broken.safetensors": "truncate", "gone.safetensors": "hangup"}, private={"org/private"}) as s:
        yield s


def test_online_pull_downloads_into_the_cache_and_records_the_commit(stub, tmp_path):
    cache = str(tmp_path / "hf")
    patch = hub.pull("org/erasers", "Van Gogh", cache_dir=cache, endpoint=stub.endpoint)
    assert patch.concepts == ["Van Gogh"]
    assert patch.metadata["source"] == {"repo": "org/erasers", "revision": SHA, "filename": "van-gogh.safetensors"}
    assert any(r.startswith("GET ") for r in stub.requests)
    # and then it works offline from that cache
    again = hub.pull("org/erasers", "Van Gogh", cache_dir=cache, local_files_only=True)
    assert again.metadata["source"]["revision"] == SHA


def test_online_pull_pins_a_revision(stub, tmp_path):
    patch = hub.pull("org/erasers", "van-gogh.safetensors", revision=SHA_OLD, cache_dir=str(tmp_path), endpoint=stub.endpoint)
    assert patch.concepts == ["snoopy"] and patch.metadata["source"]["revision"] == SHA_OLD


@pytest.mark.parametrize("repo,ask,revision,words", [
    ("org/erasers", "dali", None, "no patch for 'dali'"),
    ("org/nothing", "dali", None, "not found"),
    ("org/erasers", "Van Gogh", "e" * 40, "does not exist"),
    ("org/private", "Van Gogh", None, "log in"),
])
def test_online_errors_are_one_line(stub, tmp_path, repo, ask, revision, words):
    with pytest.raises(HirmError, match=words) as e:
        hub.pull(repo, ask, revision=revision, cache_dir=str(tmp_path), endpoint=stub.endpoint)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["broken.safetensors", "gone.safetensors"])
def test_interrupted_download_leaves_no_file_behind(stub, tmp_path, name):
    dest = tmp_path / "mine"
    with pytest.raises(HirmError) as e:
        hub.pull("org/erasers", name, cache_dir=str(tmp_path / "hf"), endpoint=stub.endpoint, dest=str(dest))
    assert "\n" not in str(e.value)
    assert not dest.exists() or os.listdir(dest) == []
    snapshots = tmp_path / "hf" / "models--org--erasers" / "snapshots"
    assert not snapshots.exists() or not any(p.name == name for p in snapshots.rglob("*"))


def test_network_down_falls_back_to_the_cache(stub, tmp_path, monkeypatch):
    cache = str(tmp_path / "hf")
    hub.pull("org/erasers", "Van Gogh", cache_dir=cache, endpoint=stub.endpoint)
    real = hub._download

    def network_down(repo_id, filename, revision, cache_dir, local_files_only, token, endpoint):
        if not local_files_only:  # what a dropped connection raises below huggingface_hub's own retries
            raise ConnectionError("network is unreachable")
        return real(repo_id, filename, revision, cache_dir, local_files_only, token, endpoint)

    monkeypatch.setattr(hub, "_download", network_down)
    patch = hub.pull("org/erasers", "Van Gogh", cache_dir=cache, endpoint=stub.endpoint)
    assert patch.metadata["source"]["revision"] == SHA
    with pytest.raises(HirmError, match="cannot be reached"):
        hub.pull("org/erasers", "Van Gogh", cache_dir=str(tmp_path / "empty"), endpoint=stub.endpoint)


def test_a_hub_whose_name_does_not_resolve_is_not_waited_for(stub, tmp_path, monkeypatch):
    """No network at all (the Hub's name does not resolve): the cache only, at once, not huggingface_hub's ~24 s of
    retries per request."""
    cache = str(tmp_path / "hf")
    hub.pull("org/erasers", "Van Gogh", cache_dir=cache, endpoint=stub.endpoint)
    real = hub._download

    def cache_only(repo_id, filename, revision, cache_dir, local_files_only, token, endpoint):
        assert local_files_only, "a request went out to a Hub whose name does not resolve"
        return real(repo_id, filename, revision, cache_dir, local_files_only, token, endpoint)

    monkeypatch.setattr(hub, "_download", cache_only)
    for variable in hub_errors._PROXY_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    nowhere = "http://hub.invalid"  # a reserved name: never resolves
    assert "Van Gogh" in hub.pull("org/erasers", "Van Gogh", cache_dir=cache, endpoint=nowhere).concepts
    with pytest.raises(HirmError, match=r"cannot be reached \(hub.invalid does not resolve.*no cached copy of Van Gogh"):
        hub.pull("org/erasers", "Van Gogh", cache_dir=str(tmp_path / "empty"), endpoint=nowhere)
    with pytest.raises(HirmError, match=r"cannot be reached \(hub.invalid does not resolve"):
        hub.list_patches("org/erasers", endpoint=nowhere)


def test_ls_reads_headers_only_and_skips_files_that_are_not_patches(stub, blobs):
    rows = hub.list_patches("org/erasers", endpoint=stub.endpoint)
    assert [r["filename"] for r in rows] == ["broken.safetensors", "gone.safetensors", "van-gogh.safetensors"]
    row = rows[-1]
    assert row["concepts"] == ["Van Gogh"] and row["method"] == "random" and row["base_fingerprint"]
    assert 0 < row["size"] < len(blobs["Van Gogh"])
    reads = [r for r in stub.requests if r.startswith("GET /org/erasers/resolve/")]
    assert reads and all("bytes=" in r for r in reads)  # headers only, never a whole file
    from shared_core import cli_hub

    lines = []
    assert cli_hub.run_ls("org/erasers", endpoint=stub.endpoint, out=lines.append) == 0
    assert "Van Gogh" in lines[0] and "van-gogh.safetensors" in lines[0]


def test_a_concept_inside_a_patch_for_a_list_is_found_by_its_header(stub, tmp_path):
    patch = hub.pull("org/lists", "mickey mouse", cache_dir=str(tmp_path / "hf"), endpoint=stub.endpoint, dest=str(tmp_path / "out"))
    assert "Mickey Mouse" in patch.concepts and patch.metadata["source"]["filename"] == "cartoons.safetensors"
    assert os.listdir(tmp_path / "out") == ["cartoons.safetensors"]
    with pytest.raises(HirmError, match="no other of its 2 patch file") as e:
        hub.pull("org/lists", "Bugs Bunny", cache_dir=str(tmp_path / "hf"), endpoint=stub.endpoint)
    assert "\n" not in str(e.value)
    from shared_core import cli_hub

    lines = []
    cli_hub.run_ls("org/lists", endpoint=stub.endpoint, out=lines.append)
    assert "snoopy, Mickey Mouse, Pikachu, Garfield, Tintin and 2 more" in lines[0]
    card = hub.model_card("org/lists", [("cartoons.safetensors", patch)])
    assert "snoopy, Mickey Mouse, Pikachu, Garfield, Tintin and 2 more" in card and "| Asterix |" in card


def test_ls_of_a_missing_repo_is_one_line(stub):
    with pytest.raises(HirmError, match="not found") as e:
        hub.list_patches("org/nothing", endpoint=stub.endpoint)
    assert "\n" not in str(e.value)


def test_cli_pull_and_ls_with_encoder_check(stub, tmp_path, monkeypatch, capsys):
    from safetensors.torch import save_file
    from tiny import canonical_state_dict

    from shared_core.cli import main
    from shared_core.patch import load_patch

    monkeypatch.setattr(constants, "ENDPOINT", stub.endpoint)
    template = stub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(file_download, "HUGGINGFACE_CO_URL_TEMPLATE", template, raising=False)  # huggingface_hub < 0.26 copies it
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    out = tmp_path / "patches"
    assert main(["pull", "org/erasers", "Van Gogh", "--out", str(out)]) == 0
    saved = load_patch(str(out / "van-gogh.safetensors"))
    assert saved.metadata["source"] == {"repo": "org/erasers", "revision": SHA, "filename": "van-gogh.safetensors"}

    for seed, verdict in ((None, "yes"), (5, "NO")):
        model, _ = tiny_clip() if seed is None else tiny_clip(seed=seed)
        enc = tmp_path / f"enc{seed}.safetensors"
        save_file(canonical_state_dict(model, ""), str(enc))
        capsys.readouterr()
        assert main(["ls", "org/erasers", "--encoder", str(enc)]) == 0
        line = next(l for l in capsys.readouterr().out.splitlines() if "van-gogh" in l)
        assert line.split()[-1] == verdict


# ---------------------------------------------------------------------------------------------- a misbehaving Hub


def test_a_hub_that_never_answers_is_given_up_at_the_deadline(online, blobs, tmp_path):
    with HubStub({("org/erasers", SHA, "van-gogh.safetensors"): blobs["Van Gogh"]}, {}, hang=True) as s:
        start = time.monotonic()
        with pytest.raises(HirmError, match="did not answer within 3 s") as e:
            hub.pull("org/erasers", "Van Gogh", cache_dir=str(tmp_path), endpoint=s.endpoint, timeout=3)  # 3 candidate files
        assert time.monotonic() - start < 10 and "\n" not in str(e.value)
        with pytest.raises(HirmError, match="did not answer within 2 s"):
            hub.list_patches("org/erasers", endpoint=s.endpoint, timeout=2)
        assert time.monotonic() - start < 20


@pytest.mark.parametrize("fault", ["drip", "stall"])
def test_a_hub_that_drips_or_stalls_mid_body_is_given_up_and_leaves_no_partial_blob(online, blobs, tmp_path, fault):
    files = {("org/erasers", SHA, "van-gogh.safetensors"): blobs["Van Gogh"]}
    with HubStub(files, {("org/erasers", "main"): SHA}, faults={"van-gogh.safetensors": fault}, drip_seconds=1.0) as s:
        start = time.monotonic()
        with pytest.raises(HirmError, match="did not answer|cannot be reached"):
            hub.pull("org/erasers", "van-gogh.safetensors", cache_dir=str(tmp_path / "hf"), endpoint=s.endpoint, timeout=4,
                     dest=str(tmp_path / "out"))
        assert time.monotonic() - start < 15
    blobs_dir = tmp_path / "hf" / "models--org--erasers" / "blobs"
    assert not blobs_dir.exists() or not [p for p in blobs_dir.iterdir() if p.name.endswith(".incomplete")]
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_a_server_error_is_one_line_without_retry_chatter(online, blobs, tmp_path, capsys):
    files = {("org/erasers", SHA, "van-gogh.safetensors"): blobs["Van Gogh"]}
    with HubStub(files, {("org/erasers", "main"): SHA}, faults={"van-gogh.safetensors": 500}) as s:
        with pytest.raises(HirmError, match="server error \\(500\\)") as e:  # after huggingface_hub's own retries (~23 s)
            hub.pull("org/erasers", "Van Gogh", cache_dir=str(tmp_path), endpoint=s.endpoint, timeout=60)
    assert "\n" not in str(e.value) and "cannot be reached" not in str(e.value)
    captured = capsys.readouterr()
    assert "Retry" not in captured.err + captured.out


@pytest.mark.parametrize("status,words", [(503, "server error \\(503\\)"), (429, "rate-limiting"), (401, "access denied"),
                                          (403, "access denied")])
def test_each_http_failure_has_its_own_line(status, words):
    from huggingface_hub import errors as he

    inner = SimpleNamespace(response=SimpleNamespace(status_code=status))
    try:
        try:
            raise RuntimeError("HTTP error")
        except RuntimeError as cause:
            cause.response = inner.response
            raise he.LocalEntryNotFoundError("not in the cache") from cause
    except he.LocalEntryNotFoundError as e:
        message = str(hub.hub_error(e, "org/x", "a.safetensors"))
    assert re.search(words, message) and "\n" not in message


def test_a_bad_entry_in_a_repo_is_skipped_and_reported_not_fatal(stub):
    skipped = []
    rows = hub.list_patches("org/erasers", endpoint=stub.endpoint, skipped=skipped)
    assert [r["filename"] for r in rows] == ["broken.safetensors", "gone.safetensors", "van-gogh.safetensors"]
    from unittest import mock

    real = hub.decode_metadata

    def one_bad(raw, where):
        if where.endswith("gone.safetensors"):
            return real({**raw, "hirm.concepts": "5"}, where)
        return real(raw, where)

    with mock.patch.object(hub, "decode_metadata", one_bad):
        rows = hub.list_patches("org/erasers", endpoint=stub.endpoint, skipped=skipped)
    assert [r["filename"] for r in rows] == ["broken.safetensors", "van-gogh.safetensors"]
    assert skipped and skipped[0][0] == "gone.safetensors" and "damaged" in skipped[0][1]


def test_the_a1111_download_box_saves_a_validated_patch_into_the_patch_folder(stub, tmp_path, monkeypatch):
    from a1111_extension import library

    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    folder = tmp_path / "webui" / "models" / "erasure_patches"
    folder.mkdir(parents=True)
    line = library.pull(str(folder), " org/erasers ", "Van Gogh", endpoint=stub.endpoint)
    assert line.startswith(f"saved models/erasure_patches/van-gogh.safetensors (Van Gogh; from org/erasers/van-gogh.safetensors "
                           f"at {SHA[:12]})")
    assert library.list_patch_files(str(folder)) == ["van-gogh.safetensors"]
    assert library.load(str(folder), "van-gogh.safetensors").concepts == ["Van Gogh"]
    with pytest.raises(HirmError, match="exists") as again:
        library.pull(str(folder), "org/erasers", "Van Gogh", endpoint=stub.endpoint)
    assert str(tmp_path) not in str(again.value)
    assert library.pull(str(folder), "org/erasers", "Van Gogh", overwrite=True, endpoint=stub.endpoint).startswith("saved ")
    with pytest.raises(HirmError, match="not found"):
        library.pull(str(folder), "org/nothing", "Van Gogh", endpoint=stub.endpoint)
    with pytest.raises(HirmError, match="Hub repository"):
        library.pull(str(folder), "  ", "Van Gogh")
