"""Trust, second round: what the Hub commands show, write and accept when a patch file, a user or a repo is hostile.

Model cards (Markdown and YAML), `hirm ls` output (terminal), file names a push would write (collisions), file names
a pull is asked for (paths, hidden files), and Hub files whose tensors do not match their checksum.
"""

import json
import os
import re
import shlex
import struct
from types import SimpleNamespace

import pytest
import yaml
from huggingface_hub import ModelCard, constants

from hub_cache import build_cache
from hub_server import HubStub
from shared_core import cli_hub, hub
from shared_core.cli import main
from shared_core.errors import HirmError, PatchFileError
from shared_core.patch import load_patch
from tiny import patch_files

SHA = "e" * 40


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """{concept: patch file} for the concepts the tests need, trained once."""
    return patch_files(tmp_path_factory.mktemp("patches"), ("Van Gogh", "cat", "cat diffusers lora"))


def read(path):
    with open(path, "rb") as f:
        return f.read()


def edit_header(data: bytes, change) -> bytes:
    """The same safetensors bytes with its JSON header changed by ``change(header)`` (tensor data untouched)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8: 8 + n])
    change(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + n:]


def relabel_to_bf16(data: bytes) -> bytes:
    def change(header):
        key = next(k for k, v in sorted(header.items()) if k != "__metadata__" and v["dtype"] == "F16")
        header[key]["dtype"] = "BF16"  # the same fp16 bytes, read as bfloat16

    return edit_header(data, change)


def flip_one_bit(data: bytes) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8: 8 + n])
    start = 8 + n + min(v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    out = bytearray(data)
    out[start] ^= 1  # the lowest mantissa bit of the first fp16 value: still a finite number
    return bytes(out)


def without_checksum(data: bytes) -> bytes:
    return edit_header(data, lambda h: h["__metadata__"].pop("hirm.checksum"))


class FakeApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id))

    def create_commit(self, repo_id, operations, *, commit_message, **kw):
        self.calls.append(("create_commit", repo_id, list(operations)))
        return SimpleNamespace(commit_url=None)


@pytest.fixture()
def online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")


# ---------------------------------------------------------------------------------- 1. model cards

HOSTILE_CONCEPTS = [
    "[click me](http://evil.example/x)", "![x](http://host/track.png)", "<img src=x onerror=alert(1)>",
    "<https://evil.example/auto>", "`code` | column", "**bold** _it_ ~~gone~~ $x^2$", "www.evil.example",
    "mail me@evil.example", "[ref]: http://evil.example/ref", "&lt;b&gt; entity", "# not a heading", "\\[escaped\\](x)",
]


def walk(tokens):
    for t in tokens:
        yield t
        yield from walk(t.children or [])


def card_for(made, concepts=None, base_model=None, name="x.safetensors", repo="me/erasers", license="openrail++"):
    p = load_patch(made["Van Gogh"])
    meta = {**p.metadata, "concepts": concepts or p.concepts}
    if base_model is not None:
        meta["base_model"] = base_model
    return hub.model_card(repo, [(name, type(p)(p.deltas, meta))], license=license)


def markdown():
    """A CommonMark parser with GFM tables and strikethrough (markdown-it-py: installed with huggingface_hub's CLI)."""
    return pytest.importorskip("markdown_it").MarkdownIt("commonmark").enable(["table", "strikethrough"])


def prose_of(card):
    body = card.split("\n---\n", 1)[1]
    return body, "".join(body.split("```")[::2])  # outside fenced code (shown as text there, never rendered)


@pytest.mark.parametrize("first", range(0, len(HOSTILE_CONCEPTS), 5))  # a card's table names a patch's first five concepts
def test_hostile_concepts_render_as_text_never_as_links_images_html_or_math(made, first):
    concepts = HOSTILE_CONCEPTS[first:first + 5]
    card = card_for(made, concepts)
    body, prose = prose_of(card)
    row = next(line for line in prose.splitlines() if line.startswith("| `x.safetensors` |"))
    # every syntax character of the concepts escaped (what CommonMark leaves to extensions too: autolinks, $math$)
    assert not re.search(r"(?<!\\)(\[|\]|\(|\)|!|<|`|\*|_|~|\$|https?:|www\.|@)", row.split(" | ")[1].replace("\\\\", ""))
    # the shell line people paste is one line, quoted
    assert f"hirm pull me/erasers {shlex.quote(concepts[0])} --out patches/" in card
    tokens = markdown().parse(body)
    kinds = {t.type for t in walk(tokens)}
    assert not kinds & {"link_open", "image", "html_inline", "html_block"}, kinds
    assert not [t for t in tokens if t.type == "heading_open" and t.tag == "h1"][1:]  # only the card's own title
    inline = [t for t in tokens if t.type == "inline"]
    cell = next(inline[i + 1] for i, t in enumerate(inline) if t.content == "`x.safetensors`").children  # the next column
    assert len(cell) == 1 and cell[0].type == "text"  # one plain text: no emphasis, strikethrough, code or column
    assert cell[0].content == ", ".join(concepts)  # every character shown as typed


def test_a_file_name_or_fingerprint_that_would_break_a_code_span_is_shown_escaped(made):
    p = load_patch(made["Van Gogh"])
    p = type(p)(p.deltas, {**p.metadata, "base_fingerprint": "`](http://evil.example) | x"})
    card = hub.model_card("me/erasers", [("a`b](http://evil.example).safetensors", p)])
    body, _ = prose_of(card)
    row = next(line for line in body.splitlines() if line.startswith("| ") and "evil" in line)
    assert len(re.findall(r"(?<!\\)\|", row)) == 7  # six cells: no column forged
    kinds = {t.type for t in walk(markdown().parse(body))}
    assert "link_open" not in kinds and "image" not in kinds


FRONT_LINE = re.compile(r"[a-z_]+:( [A-Za-z0-9+._-]+)?|- [A-Za-z0-9._/+-]+")


@pytest.mark.parametrize("base_model", ["evil/x\n---\nlicense: mit", "a/b\nextra_key: 1", "---", "a/b\x85---",
                                        "x/y\u2028z: 1", "a/b: c", "[a](http://e.example)/b", "a/b #comment", "'a/b'",
                                        "a/" + "b" * 200])
def test_a_hostile_base_model_never_reaches_the_front_matter(made, base_model):
    card = card_for(made, base_model=base_model)
    assert card.startswith("---\n")
    front = card[4:].split("\n---\n", 1)[0]
    for line in front.splitlines():
        assert FRONT_LINE.fullmatch(line), line  # each line a plain key, or a plain list item: nothing quoted, nothing extra
    data = yaml.safe_load(front)
    assert set(data) == {"library_name", "license", "tags"} and "base_model" not in data
    assert ModelCard(card).data.base_model is None


def test_a_valid_base_model_is_kept_plain(made):
    card = card_for(made, base_model="someone/sd15-finetune")
    front = card[4:].split("\n---\n", 1)[0]
    assert all(FRONT_LINE.fullmatch(line) for line in front.splitlines())
    assert yaml.safe_load(front)["base_model"] == ["someone/sd15-finetune"]


@pytest.mark.parametrize("license", ["mit\nevil: 1", "---", "a: b", "[x](http://e.example)", ""])
def test_a_license_that_is_no_licence_id_is_refused_in_one_line(made, license):
    with pytest.raises(HirmError, match="licen") as e:
        card_for(made, license=license)
    assert "\n" not in str(e.value)
    api = FakeApi()
    with pytest.raises(HirmError):
        hub.push([made["cat"]], "me/erasers", license=license, api=api)
    assert api.calls == []


@pytest.mark.parametrize("repo", ["me/[x](http://e.example)", "me/x\n---", "me/x y", "../x", "a/b/c", ""])
def test_a_repo_id_that_is_no_repo_id_is_refused_before_any_upload(made, repo):
    api = FakeApi()
    with pytest.raises(HirmError, match="repo id") as e:
        hub.push([made["cat"]], repo, api=api)
    assert "\n" not in str(e.value) and api.calls == []
    with pytest.raises(HirmError, match="repo id"):
        card_for(made, repo=repo)


# ---------------------------------------------------------------------------------- 2. hirm ls output

HOSTILE_NAMES = ["evil\x1b[2J\x1b[31m.safetensors", "x.safetensors\nforged.safetensors  Van Gogh  random  9.99 MB  000.safetensors",
                 "\u202eevil.safetensors", "bell\x07\r.safetensors"]


def test_ls_escapes_control_characters_in_everything_it_prints(online, made):
    good = read(made["Van Gogh"])
    damaged = edit_header(good, lambda h: h["__metadata__"].update({"hirm.concepts": "5"}))
    files = {("org/evil", SHA, n): good for n in HOSTILE_NAMES}
    files[("org/evil", SHA, "dam\x1b[31maged.safetensors")] = damaged
    with HubStub(files, {("org/evil", "main"): SHA}) as s:
        lines = []
        assert cli_hub.run_ls("org/evil", endpoint=s.endpoint, out=lines.append) == 0
    text = "\n".join(lines)
    assert not [c for c in text if c != "\n" and (ord(c) < 32 or 0x7F <= ord(c) < 0xA0 or c in "\u202e\u2028\u2029")]
    table = lines[-1].splitlines()
    assert len(table) == 1 + len(HOSTILE_NAMES)  # a header and one row per file: no forged row
    assert any("\\x1b[2J" in line for line in table) and any("\\u202e" in line for line in table)
    assert any(line.startswith("skipped") and "\\x1b" in line for line in lines)


def test_ls_rows_say_whether_each_file_has_a_checksum_and_the_table_notes_those_without(online, made):
    good = read(made["Van Gogh"])
    files = {("org/e", SHA, "new.safetensors"): good, ("org/e", SHA, "old.safetensors"): without_checksum(good)}
    with HubStub(files, {("org/e", "main"): SHA}) as s:
        rows = hub.list_patches("org/e", endpoint=s.endpoint)
        lines = []
        cli_hub.run_ls("org/e", endpoint=s.endpoint, out=lines.append)
    assert {r["filename"]: bool(r["checksum"]) for r in rows} == {"new.safetensors": True, "old.safetensors": False}
    note = [line for line in "\n".join(lines).splitlines() if "checksum" in line]
    assert len(note) == 1 and "old.safetensors" in note[0] and "new.safetensors" not in note[0]


# ---------------------------------------------------------------------------------- 3. push: file names that collide


def test_push_refuses_a_patch_whose_name_is_another_patchs_diffusers_companion(made):
    api = FakeApi()
    with pytest.raises(HirmError, match="cat-diffusers-lora.safetensors") as e:
        hub.push([made["cat"], made["cat diffusers lora"]], "me/erasers", api=api)
    message = str(e.value)
    assert "\n" not in message and api.calls == []
    assert made["cat"] in message and made["cat diffusers lora"] in message
    with pytest.raises(HirmError, match="cat-diffusers-lora.safetensors"):  # in either order
        hub.push([made["cat diffusers lora"], made["cat"]], "me/erasers", api=api)
    assert api.calls == []


def test_push_writes_each_file_name_once(made):
    api = FakeApi()
    hub.push([made["cat"], made["Van Gogh"]], "me/erasers", api=api)
    names = [op.path_in_repo for op in api.calls[-1][2]]
    assert len(names) == len(set(names)) == 5


def test_push_of_the_same_patch_twice_is_refused(made):
    with pytest.raises(HirmError, match="both") as e:
        hub.push([made["cat"], made["cat"]], "me/erasers", api=FakeApi())
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------- 4. pull: the requested name

BAD_NAMES = [".safetensors", ".hidden.safetensors", "sub/.safetensors", "sub/.x.safetensors", "../x.safetensors",
             "a/../x.safetensors", "./x.safetensors", "/x.safetensors", "/etc/x.safetensors", "a\\x.safetensors",
             "..\\x.safetensors", "C:\\x.safetensors", "C:x.safetensors", "a//x.safetensors", "x\x1b[2J.safetensors",
             "x\n.safetensors"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_pull_refuses_a_path_or_hidden_name_before_any_request(online, made, tmp_path, name):
    good = read(made["cat"])
    files = {("org/e", SHA, n): good for n in (".safetensors", ".hidden.safetensors", "x.safetensors", "sub/.x.safetensors")}
    dest = tmp_path / "out"
    with HubStub(files, {("org/e", "main"): SHA}) as s:
        with pytest.raises(HirmError) as e:
            hub.pull("org/e", name, cache_dir=str(tmp_path / "hf"), endpoint=s.endpoint, dest=str(dest))
        assert s.requests == []
    message = str(e.value)
    assert "\n" not in message and "cannot be reached" not in message and "\x1b" not in message
    assert re.search(r"hidden|before '\.safetensors'|path|backslash|absolute|control|folder name|cannot hold", message)
    assert not dest.exists() or os.listdir(dest) == []


def test_the_cli_says_what_is_wrong_with_a_requested_name(capsys):
    assert main(["pull", "org/e", "../x.safetensors"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'..'" in err and "cannot be reached" not in err
    assert main(["pull", "org/e", ".safetensors"]) == 2
    err = capsys.readouterr().err.strip()
    assert "before '.safetensors'" in err


def test_a_folder_file_and_a_concept_named_dot_dot_stay_inside_the_repo(made, tmp_path):
    cache = str(tmp_path / "hf")
    build_cache(cache, "org/e", {SHA: {"cat/patch.safetensors": read(made["cat"])}}, {"main": SHA})
    patch = hub.pull("org/e", "cat/patch.safetensors", cache_dir=cache, local_files_only=True, dest=str(tmp_path / "out"))
    assert patch.concepts == ["cat"] and os.listdir(tmp_path / "out") == ["cat.safetensors"]
    for concept in ("..", ".", ".hidden", "...x"):  # a concept is looked up by slug; never as a '..' or hidden folder
        assert not any(part.startswith(".") for c in hub._candidates(concept) for part in c.split("/")), concept
    with pytest.raises(HirmError, match="no patch for '..'"):
        hub.pull("org/e", "..", cache_dir=cache, local_files_only=True)


def test_pull_and_ls_refuse_a_repo_id_that_is_no_repo_id(online, tmp_path):
    with HubStub({("org/e", SHA, "x.safetensors"): b"x"}, {("org/e", "main"): SHA}) as s:
        for call in (lambda: hub.pull("org/e x", "cat", cache_dir=str(tmp_path), endpoint=s.endpoint),
                     lambda: hub.list_patches("../../x", endpoint=s.endpoint)):
            with pytest.raises(HirmError, match="repo id") as e:
                call()
            assert "\n" not in str(e.value) and "cannot be reached" not in str(e.value)
        assert s.requests == []


# ---------------------------------------------------------------------------------- 5. tampered Hub files


@pytest.mark.parametrize("tamper", [relabel_to_bf16, flip_one_bit], ids=["dtype-relabelled", "one-bit-flipped"])
def test_pull_refuses_a_tampered_file_and_leaves_nothing_behind(online, made, tmp_path, tamper):
    data = tamper(read(made["cat"]))
    cache = tmp_path / "hf"
    dest = tmp_path / "out"
    with HubStub({("org/e", SHA, "cat.safetensors"): data}, {("org/e", "main"): SHA}) as s:
        with pytest.raises(PatchFileError, match="checksum") as e:
            hub.pull("org/e", "cat", cache_dir=str(cache), endpoint=s.endpoint, dest=str(dest))
        assert "\n" not in str(e.value) and str(e.value).startswith("org/e/cat.safetensors: ")
    assert not dest.exists() or os.listdir(dest) == []
    repo = cache / "models--org--e"
    left = [p for p in repo.rglob("*") if p.is_file() or p.is_symlink()] if repo.exists() else []
    assert not [p for p in left if "snapshots" in p.parts or "blobs" in p.parts], left  # no tampered copy kept to be reused


def test_a_damaged_cached_copy_is_dropped_so_the_next_pull_downloads_it_again(online, made, tmp_path):
    good = read(made["cat"])
    cache = str(tmp_path / "hf")
    with HubStub({("org/e", SHA, "cat.safetensors"): good}, {("org/e", "main"): SHA}) as s:
        hub.pull("org/e", "cat", cache_dir=cache, endpoint=s.endpoint)
        blob = next(p for p in (tmp_path / "hf" / "models--org--e" / "blobs").iterdir())
        os.chmod(blob, 0o644)
        blob.write_bytes(flip_one_bit(good))  # the disk copy goes bad
        with pytest.raises(PatchFileError, match="checksum"):
            hub.pull("org/e", "cat", cache_dir=cache, endpoint=s.endpoint)
        assert hub.pull("org/e", "cat", cache_dir=cache, endpoint=s.endpoint).concepts == ["cat"]


def test_a_cached_file_that_is_no_patch_is_left_in_the_cache(tmp_path):
    cache = str(tmp_path / "hf")
    root = build_cache(cache, "org/junk", {SHA: {"a.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "}}, {"main": SHA})
    with pytest.raises(PatchFileError):
        hub.pull("org/junk", "a.safetensors", cache_dir=cache, local_files_only=True)
    assert os.path.exists(os.path.join(root, "snapshots", SHA, "a.safetensors"))  # not ours to delete


def test_pull_of_a_file_without_checksum_says_so(made, tmp_path, monkeypatch):
    cache = str(tmp_path / "hf")
    build_cache(cache, "org/old", {SHA: {"cat.safetensors": without_checksum(read(made["cat"]))}}, {"main": SHA})
    build_cache(cache, "org/new", {SHA: {"cat.safetensors": read(made["cat"])}}, {"main": SHA})
    assert "checksum" not in hub.pull("org/old", "cat", cache_dir=cache, local_files_only=True).metadata
    real = hub.pull
    monkeypatch.setattr(hub, "pull", lambda *a, **k: real(*a, **{**k, "cache_dir": cache, "local_files_only": True}))
    lines = []
    assert cli_hub.run_pull("org/old", "cat", out=lines.append, out_dir=str(tmp_path / "out")) == 0
    notes = [line for line in "\n".join(lines).splitlines() if "checksum" in line]
    assert len(notes) == 1 and "cat.safetensors" in notes[0]
    from a1111_extension import library  # the Erasure tab's download line says it too

    os.makedirs(tmp_path / "a1111")
    assert notes[0] in library.pull(str(tmp_path / "a1111"), "org/old", "cat")
    lines = []
    assert cli_hub.run_pull("org/new", "cat", out=lines.append) == 0
    assert "checksum" not in "\n".join(lines)  # a verified file needs no note
