"""Every argument of ``hirm eval`` and ``hirm nlce`` is checked at the edge: a bad one is ONE line that says what is
wrong and what to do, and nothing is loaded, rendered or written before all of them are checked. A write that fails
(a full disk, an I/O error) is one line too, and leaves nothing behind.
"""

import errno
import os

import pytest
from tiny import tiny_clip
from tiny_pipeline import saved_sd1

from shared_core import pipelines
from shared_core.cli import main
from shared_core.common import check_text
from shared_core.errors import HirmError
from shared_core.files import TEMP_PREFIX, WriteRefused, atomic_folder, atomic_write
from shared_core.hirm import train_patch
from shared_core.patch import save_patch

FAST = ["--steps", "1", "--size", "16", "--suite", "target", "--quiet"]
# what a terminal acts on or a reader cannot see: ESC (colours, cursor moves), NUL, a zero-width space, a bidi
# override, a line separator, and a lone surrogate (not valid Unicode: what a byte that is not UTF-8 in argv becomes)
HOSTILE = ["cat\x1b[2J\x1b[31m", "a\x00cat", "ca\u200bt", "\u202etac", "cat\u2028dog", "\ud800", "cat\udcff"]


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return saved_sd1(tmp_path_factory.mktemp("sd1"), steps=2)


@pytest.fixture()
def never_loaded(monkeypatch):
    """The model must not be loaded: a check that comes after loading fails the test."""
    def load_pipeline(*args, **kwargs):
        raise AssertionError("the model was loaded before every argument was checked")

    monkeypatch.setattr(pipelines, "load_pipeline", load_pipeline)


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hirm: error:") and "Traceback" not in err, err
    return lines[0]


def leftovers(folder) -> list:
    return [name for name in os.listdir(folder) if name.startswith(TEMP_PREFIX)]


# ---------------------------------------------------------------------------------------------- hirm eval


def test_eval_refuses_an_out_folder_in_a_place_it_cannot_write_before_loading(sd1, tmp_path, capsys, never_loaded,
                                                                             monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.access(locked, os.W_OK):  # root, whom file modes do not stop: answered as any other user would be
        real = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: (not mode & os.W_OK and real(path, mode, **kw))
                            if os.path.abspath(path) == str(locked) else real(path, mode, **kw))
    try:
        for out in (locked / "eval", locked / "new" / "eval"):
            assert main(["eval", sd1["model"], "--concept", "cat", "--nlce", "--out", str(out), *FAST]) == 2
            line = one_line(capsys)
            assert f"--out {out}: cannot write in {locked} (a read-only place, or no permission)" in line
            assert "choose a folder you can write to" in line
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("row, says", [
    ("a cat,1e400,7.5,x", "line 2: evaluation_seed must be a whole number from 0 to 2^63-1"),
    (f"a cat,{2**70},7.5,x", "line 2: evaluation_seed must be a whole number from 0 to 2^63-1"),
    ("a cat,3.5,7.5,x", "line 2: evaluation_seed must be a whole number"),
    ("a cat,3,inf,x", "line 2: evaluation_guidance must be a number from 0 to 100"),
    ("a cat,3,nan,x", "line 2: evaluation_guidance must be a number from 0 to 100"),
    ("a cat,3,-1e6,x", "line 2: evaluation_guidance must be a number from 0 to 100"),
    ("a \x00cat,3,7.5,x", "line 2: the prompt 'a \\x00cat' holds a control character, U+0000"),
    ("a cat,3,7.5,\x1b[31mred", "line 2: the category '\\x1b[31mred' holds a control character"),
])
def test_eval_refuses_a_csv_row_it_cannot_render_while_reading_the_csv(sd1, tmp_path, capsys, never_loaded, row, says):
    csv = tmp_path / "i2p.csv"
    csv.write_text(f"prompt,evaluation_seed,evaluation_guidance,categories\n{row}\n", encoding="utf-8")
    out = tmp_path / "eval"
    assert main(["eval", sd1["model"], "--concept", "cat", "--nlce", "--prompts-csv", str(csv), "--out", str(out),
                 *FAST]) == 2
    line = one_line(capsys)
    assert says in line and "\x1b" not in line and "\x00" not in line
    assert not out.exists()


def test_eval_reads_line_breaks_inside_a_quoted_csv_prompt_as_spaces(tmp_path):
    from shared_core.evaluation.suites import read_csv

    csv = tmp_path / "i2p.csv"
    csv.write_text('prompt,evaluation_seed,evaluation_guidance\n"a cat\r\non a\troof",3.0,0\n', encoding="utf-8")
    assert [(p.text, p.seed, p.guidance) for p in read_csv(str(csv))] == [("a cat on a roof", 3, 0.0)]


@pytest.mark.parametrize("args, says", [
    (["--seeds", f"0,{2**70}"], "--seeds: each seed must be a whole number from 0 to 2^63-1"),
    (["--seeds", "-1"], "--seeds: each seed must be a whole number from 0 to 2^63-1"),
    (["--guidance", "nan"], "--guidance must be a number from 0 to 100"),
    (["--guidance=-1e6"], "--guidance must be a number from 0 to 100"),
    (["--strengths", "nan"], "--strengths 'nan': give finite numbers"),
    (["--strengths", "0.5,inf"], "give finite numbers"),
    (["--strengths", "5"], "the strength must be a number from -4 to 4"),
    (["--suite", "target,everything"], "unknown suite 'everything'"),
    (["--attack", "text", "--attack-seed", str(2**70)], "--attack-seed must be a whole number from 0 to 2^63-1"),
    (["--attack", "text", "--attack-population", "0"], "must be at least 1"),
    (["--negative-prompt", "blurry\x1b]0;owned\x07"], "--negative-prompt 'blurry\\x1b]0;owned\\x07' holds a control"),
])
def test_eval_refuses_numbers_and_texts_it_cannot_use_before_loading(sd1, tmp_path, capsys, never_loaded, args, says):
    out = tmp_path / "eval"
    assert main(["eval", sd1["model"], "--concept", "cat", "--patch", sd1["patch"], "--out", str(out), *FAST, *args]) == 2
    line = one_line(capsys)
    assert says in line and "\x1b" not in line
    assert not out.exists()


def test_eval_refuses_a_csv_limit_below_one_instead_of_dropping_rows(sd1, tmp_path, capsys, never_loaded):
    csv = tmp_path / "i2p.csv"
    csv.write_text("prompt\na cat\na dog\na bird\n", encoding="utf-8")
    out = tmp_path / "eval"
    assert main(["eval", sd1["model"], "--concept", "cat", "--nlce", "--prompts-csv", str(csv), "--csv-limit", "-2",
                 "--out", str(out), *FAST]) == 2
    assert "--csv-limit -2: give at least 1" in one_line(capsys) and not out.exists()


def test_eval_with_the_nudenet_extra_missing_or_a_nan_threshold_is_refused_before_loading(sd1, tmp_path, capsys,
                                                                                          never_loaded):
    from importlib.util import find_spec

    out = tmp_path / "eval"
    assert main(["eval", sd1["model"], "--concept", "cat", "--nlce", "--nudenet", "--nudenet-threshold", "nan",
                 "--out", str(out), *FAST]) == 2
    says = "--nudenet needs the nudenet package" if find_spec("nudenet") is None else "--nudenet-threshold nan: give a score"
    assert says in one_line(capsys) and not out.exists()


@pytest.mark.parametrize("concept", HOSTILE)
def test_eval_refuses_concepts_with_control_or_invisible_characters_in_one_line_that_echoes_none(
        sd1, tmp_path, capsys, never_loaded, concept):
    out = tmp_path / "eval"
    assert main(["eval", sd1["model"], "--concept", concept, "--nlce", "--out", str(out), *FAST]) == 2
    line = one_line(capsys)
    assert line.startswith("hirm: error: --concept '") and "remove it (type plain text)" in line
    assert line.isprintable() and line.encode("utf-8")  # nothing a terminal acts on, valid Unicode
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- hirm nlce


def nlce(sd1, tmp_path, *args):
    return main(["nlce", sd1["model"], "--steps", "1", "--size", "16", *args])


@pytest.mark.parametrize("args, says", [
    (["--concept", "cat", "--seed", str(2**70)], "--seed must be a whole number from 0 to 2^63-1"),
    (["--concept", "cat", "--seed", "-3"], "--seed must be a whole number from 0 to 2^63-1"),
    (["--concept", "cat", "--guidance", "nan"], "--guidance must be a number from 0 to 100, got nan"),
    (["--concept", "cat", "--guidance", "inf"], "--guidance must be a number from 0 to 100, got inf"),
    (["--concept", "cat", "--prompt", "a \x1b[31mcat"], "--prompt 'a \\x1b[31mcat' holds a control character"),
    (["--concept", "cat", "--neighbor", "d\u200bog"], "--neighbor 'd\\u200bog' holds an invisible format character"),
])
def test_nlce_refuses_seeds_guidance_and_texts_it_cannot_use_before_loading(sd1, tmp_path, capsys, never_loaded,
                                                                             args, says):
    out = tmp_path / "grid.png"
    assert nlce(sd1, tmp_path, "--out", str(out), *args) == 2
    line = one_line(capsys)
    assert says in line and "\x1b" not in line
    assert os.listdir(tmp_path) == []


def test_nlce_refuses_one_path_for_both_the_grid_and_the_operators_before_any_work(sd1, tmp_path, capsys,
                                                                                    never_loaded):
    same = tmp_path / "out.png"
    assert nlce(sd1, tmp_path, "--concept", "cat", "--out", str(same), "--save-operators", str(same)) == 2
    assert "--out and --save-operators both name" in one_line(capsys)
    assert nlce(sd1, tmp_path, "--concept", "cat", "--out", str(same),  # the same file, written another way
                "--save-operators", str(tmp_path / "." / "out.png")) == 2
    assert "different names" in one_line(capsys)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("concept", HOSTILE)
def test_nlce_refuses_concepts_with_control_or_invisible_characters_in_one_line_that_echoes_none(
        sd1, tmp_path, capsys, never_loaded, concept):
    assert nlce(sd1, tmp_path, "--concept", concept, "--out", str(tmp_path / "grid.png")) == 2
    line = one_line(capsys)
    assert line.startswith("hirm: error: --concept '") and line.isprintable() and line.encode("utf-8")
    assert os.listdir(tmp_path) == []


def test_nlce_refuses_a_concept_terms_line_with_a_control_character(sd1, tmp_path, capsys, never_loaded):
    terms = tmp_path / "terms.txt"
    terms.write_text("naked\nnu\x1b[8mde\n", encoding="utf-8")
    assert nlce(sd1, tmp_path, "--concept-terms", str(terms), "--out", str(tmp_path / "grid.png")) == 2
    line = one_line(capsys)
    assert f"--concept-terms {terms}, line 2:" in line and "\\x1b[8m" in line and "\x1b" not in line
    assert not (tmp_path / "grid.png").exists()


def test_nlce_reads_a_list_of_concepts_and_refuses_a_repeated_one_before_loading(sd1, tmp_path, capsys, never_loaded):
    listing = tmp_path / "concepts.txt"
    listing.write_text("# artists\ncat\n\ndog\nCat\n", encoding="utf-8")
    assert nlce(sd1, tmp_path, "--concepts", str(listing), "--out", str(tmp_path / "grid.png")) == 2
    line = one_line(capsys)
    assert f"{listing} line 5:" in line and "given twice (first on line 2)" in line
    assert not (tmp_path / "grid.png").exists()


def test_nlce_with_good_arguments_still_renders_its_grid(sd1, tmp_path):
    """The checks refuse only what cannot be used: plain text in any script, a large seed, guidance 0."""
    out = tmp_path / "grid.png"
    assert nlce(sd1, tmp_path, "--concept", "chat noir, Café", "--prompt", "猫の絵 — ein Bild", "--seed", str(2**63 - 1),
                "--guidance", "0", "--out", str(out)) == 0
    assert out.is_file()


# ---------------------------------------------------------------------------------------------- the text rule


@pytest.mark.parametrize("text", HOSTILE + ["tab\there", "soft\u00adhyphen", "bom\ufeff"])
def test_texts_with_control_format_or_surrogate_characters_are_one_line_refusals(text):
    with pytest.raises(HirmError) as e:
        check_text(text, "--concept")
    message = str(e.value)
    assert "\n" not in message and message.isprintable() and message.encode("utf-8")


@pytest.mark.parametrize("text", ["Van Gogh", "Café au lait", "猫", "Ünïcödé ✓", "emoji 🐈", "  spaced  "])
def test_plain_text_in_any_script_passes_the_text_rule_unchanged(text):
    assert check_text(text, "--concept") == text


# ---------------------------------------------------------------------------------------------- full disks


def full_disk(path):
    return OSError(errno.ENOSPC, "No space left on device")


def safetensors_full_disk(path):
    from safetensors import SafetensorError

    return SafetensorError(f'Error while serializing: I/O error: No space left on device (os error 28) at path "{path}"')


@pytest.mark.parametrize("error", [full_disk, safetensors_full_disk])
def test_apply_to_a_folder_on_a_full_disk_is_one_line_naming_it_and_leaves_nothing(tmp_path, capsys, monkeypatch, error):
    import transformers.modeling_utils

    model, tok = tiny_clip(seed=3)
    source = tmp_path / "sd"
    model.save_pretrained(str(source / "text_encoder"))
    tok.save_pretrained(str(source / "tokenizer"))
    patch = save_patch(train_patch(model, tok, concepts=["cat"], steps=1, report=False), str(tmp_path / "p.safetensors"))

    def save_file(tensors, filename, metadata=None):
        raise error(filename)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)
    out = tmp_path / "patched"
    assert main(["apply", str(source), "--patch", patch, "--out", str(out)]) == 2
    line = one_line(capsys)
    assert f"cannot write {out} (No space left on device); nothing was written" in line
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [full_disk, safetensors_full_disk])
def test_a_folder_or_file_write_that_fails_is_one_write_refusal_and_leaves_nothing(tmp_path, error):
    def folder(tmp):
        with open(os.path.join(tmp, "half.bin"), "wb") as f:
            f.write(b"x" * 1000)
        raise error(tmp)

    with pytest.raises(WriteRefused, match=r"No space left on device\); nothing was written$"):
        atomic_folder(str(tmp_path / "out"), folder)

    def file(f):
        f.write(b"x" * 1000)
        raise error(str(tmp_path / "out.bin"))

    with pytest.raises(WriteRefused, match=r"No space left on device\); nothing was written$"):
        atomic_write(str(tmp_path / "out.bin"), file)
    assert os.listdir(tmp_path) == []


def test_eval_on_a_full_disk_is_one_line_naming_the_file_and_leaves_no_temporaries(sd1, tmp_path, capsys, monkeypatch):
    from PIL import Image

    def save(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", save)
    out = tmp_path / "eval"
    assert main(["eval", sd1["model"], "--concept", "cat", "--nlce", "--out", str(out), *FAST]) == 2
    line = one_line(capsys)
    assert f"cannot write {out / 'cases'}" in line and "(No space left on device); nothing was written" in line
    assert leftovers(out / "cases") == [] and not [f for f in os.listdir(out / "cases") if f.endswith(".json")]


def test_eval_that_cannot_make_its_folder_after_the_checks_is_one_line(sd1, tmp_path, capsys, monkeypatch):
    from shared_core.evaluation import cases

    real = os.makedirs

    def makedirs(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "eval")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(cases.os, "makedirs", makedirs)
    assert main(["eval", sd1["model"], "--concept", "cat", "--nlce", "--out", str(tmp_path / "eval"), *FAST]) == 2
    line = one_line(capsys)
    assert f"--out {tmp_path / 'eval'}: cannot make it (No space left on device)" in line


def test_the_text_rule_as_a_test_agrees_with_the_refusals():
    from shared_core.common import is_plain_text

    assert not any(is_plain_text(t) for t in HOSTILE) and is_plain_text("Café 猫 🐈") and not is_plain_text(b"cat")
