"""The accordion's values, the infotext round trip, the patch folder and install.py."""

import os
import runpy
import subprocess
import sys
import types
from pathlib import Path

import pytest
from test_a1111_support import make_patch, script_args, text_encoder, write_patch

from a1111_extension import library
from a1111_extension.settings import (NLCE_KEY, PATCHES_KEY, UI_ARGS, ErasureSettings, paste_values, parse_patch_list)
from shared_core.errors import HirmError, NlceError, PatchFileError
from shared_core.patch import save_patch

INSTALL = str(Path(__file__).parents[1] / "install.py")


def test_widget_values_become_settings_and_a_closed_accordion_is_off():
    s = ErasureSettings.from_args(script_args(patches=[("a.safetensors", 1.0), ("None", 1.0), ("b.safetensors", 0.0)],
                                              nlce=True, concepts="Van Gogh\n, Monet ,", neighbors=" Auto ", preset="artist",
                                              beta=0.9, gamma=1.2, schedule="faithful"))
    assert s.patches == (("a.safetensors", 1.0),)  # 'None' and strength 0 are no patch
    assert s.concepts == ("Van Gogh", "Monet") and s.neighbors == "auto"
    assert s.nlce_config().gamma == 1.2 and s.nlce_config().schedule == "faithful"
    assert not ErasureSettings.from_args(script_args(patches=[("a.safetensors", 1.0)], enabled=False)).active
    off = ErasureSettings.from_args(script_args(nlce=False, concepts="", gamma=9.0))  # NLCE widgets ignored while off
    assert not off.active and len(UI_ARGS) == 14


@pytest.mark.parametrize("args, message", [
    (script_args(nlce=True, concepts=""), "no concept is given"),
    (script_args(nlce=True, concepts="cat", beta=2.0), "beta = 2 is out of range"),
    (script_args(nlce=True, concepts="cat", preset="dogs"), "unknown NLCE preset"),
    (script_args(patches=[("a.safetensors", "x")]), "must be a number"),
    (script_args() + [None], "takes at most 14 arguments"),
    ([{"patch_1": "a.safetensors", "strenght_1": 0.5}], "no argument 'strenght_1'; its names are enabled, patch_1"),
])
def test_bad_widget_values_are_one_line_errors(args, message):
    with pytest.raises(HirmError, match=message) as raised:
        ErasureSettings.from_args(args)
    assert "\n" not in str(raised.value)


def test_api_callers_may_pass_fewer_arguments_nulls_or_one_object_of_names():
    # what Forge hands over for [True, "cat.safetensors", 1.0]: the rest from the widgets, None where one has no default
    forge = [True, "cat.safetensors", 1.0, None, None, None, None, False, None, None, None, None, None, None]
    short = ErasureSettings.from_args([True, "cat.safetensors", 1.0])  # A1111 itself fills in the UI defaults
    assert ErasureSettings.from_args(forge) == short and short.patches == (("cat.safetensors", 1.0),) and not short.nlce
    named = ErasureSettings.from_args([{"patch_1": "cat.safetensors", "strength_1": 0.8, "nlce": True, "concepts": "dog"},
                                       *script_args()[1:]])  # the webui appends the widgets' values: ignored
    assert named.patches == (("cat.safetensors", 0.8),) and named.concepts == ("dog",) and named.neighbors == "auto"
    assert named.nlce_config().gamma == ErasureSettings.build(nlce=True, concepts="dog").nlce_config().gamma  # the preset's
    assert not ErasureSettings.from_args([{"enabled": False, "patch_1": "cat.safetensors"}]).active
    assert not ErasureSettings.from_args([]).active


def test_the_infotext_reproduces_the_settings_through_paste():
    s = ErasureSettings.from_args(script_args(patches=[("sub/a b.safetensors", 0.75), ("c.safetensors", 1.0)], nlce=True,
                                              concepts="Van Gogh\nMonet", neighbors="painting, sketch", preset="celebrity",
                                              beta=1.0, gamma=0.9, schedule="single-pass"))
    text = s.infotext()
    assert text[PATCHES_KEY] == "sub/a b.safetensors:0.75, c.safetensors:1" and text[NLCE_KEY] == "Van Gogh, Monet"
    assert ErasureSettings.from_infotext(text) == s
    values = paste_values(text)
    assert ErasureSettings.from_args([values[k] for k in UI_ARGS]) == s
    assert paste_values({"Steps": "20"}) is None
    only_patch = paste_values({PATCHES_KEY: "a.safetensors:1"})
    assert only_patch["nlce"] is False and only_patch["patch_2"] == "None"


def test_a_malformed_patch_list_is_refused():
    assert parse_patch_list("x.safetensors:0.5,") == [("x.safetensors", 0.5)]
    with pytest.raises(HirmError, match="expected file:strength"):
        parse_patch_list("x.safetensors")
    with pytest.raises(NlceError):
        ErasureSettings.from_infotext({NLCE_KEY: "cat", "Erasure NLCE gamma": "7"})


def test_the_patch_folder_lists_patches_in_subfolders_and_keeps_names_inside_it(tmp_path):
    model = text_encoder()
    (tmp_path / "artists").mkdir()
    write_patch(tmp_path, "b.safetensors", model)
    write_patch(tmp_path / "artists", "A.safetensors", model)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".tmp-hirm-123.safetensors").write_text("half written")
    (tmp_path / "broken.safetensors").write_bytes(b"not a patch")  # a damaged file, or a LoRA: not offered
    assert library.list_patch_files(str(tmp_path)) == ["artists/A.safetensors", "b.safetensors"]
    assert library.load(str(tmp_path), "artists/A.safetensors").concepts == ["cat"]
    with pytest.raises(PatchFileError, match="outside"):
        library.patch_path(str(tmp_path), "../escape.safetensors")
    with pytest.raises(PatchFileError, match="press the refresh button"):
        library.patch_path(str(tmp_path), "gone.safetensors")
    folder = tmp_path / "webui" / "models" / "erasure_patches"
    folder.mkdir(parents=True)
    with pytest.raises(PatchFileError) as missing:  # API clients see the folder as the webui names it, not the server's path
        library.patch_path(str(folder), "gone.safetensors")
    assert str(missing.value) == ("erasure patch 'gone.safetensors' is not in models/erasure_patches; put it there and press "
                                  "the refresh button")
    (folder / "bad.safetensors").write_bytes(b"not a patch")
    with pytest.raises(PatchFileError) as bad:  # a damaged file picked by name over the API: its shown name only
        library.load(str(folder), "bad.safetensors")
    assert str(bad.value).startswith("models/erasure_patches/bad.safetensors: ") and str(tmp_path) not in str(bad.value)


def test_a_patch_file_rewritten_in_place_is_read_again(tmp_path):
    model = text_encoder()
    write_patch(tmp_path, "p.safetensors", model, concept="cat")
    assert library.load(str(tmp_path), "p.safetensors").concepts == ["cat"]
    save_patch(make_patch(model, concept="dog"), str(tmp_path / "p.safetensors"), overwrite=True)
    assert library.load(str(tmp_path), "p.safetensors").concepts == ["dog"]


def test_install_py_installs_only_missing_packages_with_the_webuis_pip_and_never_torch(monkeypatch):
    calls = []
    launch = types.ModuleType("launch")
    launch.is_installed = lambda name: name != "safetensors"
    launch.run_pip = lambda command, desc=None, live=False: calls.append(command)
    monkeypatch.setitem(sys.modules, "launch", launch)
    runpy.run_path(INSTALL, run_name="__main__")
    assert calls == ['install "safetensors>=0.3"']
    launch.is_installed = lambda name: False
    calls.clear()
    runpy.run_path(INSTALL, run_name="__main__")
    assert calls and not any("torch" in c for c in calls)


def test_install_py_does_nothing_and_succeeds_where_comfyui_manager_runs_it():
    # ComfyUI Manager runs the root install.py with ComfyUI's Python after requirements.txt: no `launch` module there
    result = subprocess.run([sys.executable, "-I", INSTALL], capture_output=True, text=True, timeout=60, cwd=os.path.dirname(INSTALL))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
