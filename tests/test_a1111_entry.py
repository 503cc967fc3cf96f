"""Loading the extension the way the webui does, from a plain clone: scripts/hirm_erasure.py with the
repository root on sys.path only while it loads; the script class and callbacks it registers; a job
through the real ErasureScript hooks. ``modules.*`` are minimal stand-ins with the real names."""

import importlib.util
import os
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest
import torch
from test_a1111_support import Processing, Sd1Model, call_hook, run_job, same, script_args, snapshot, text_model, write_patch

from a1111_extension import jobs

ROOT = Path(__file__).parents[1]


@pytest.fixture()
def webui(tmp_path, monkeypatch):
    """A fake ``modules`` package: scripts, script_callbacks, paths, devices, shared, call_queue, ui_components."""
    callbacks = {"ui_tabs": [], "model_loaded": [], "before_ui": [], "ui_settings": []}

    class OptionInfo:  # modules/options.py: (default, label, component, component_args, ..., section=)
        def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None):
            self.default, self.label, self.component, self.component_args, self.section = (default, label, component,
                                                                                           component_args, section)

    class Options:  # modules/options.py Options: saved values, else the registered default, else AttributeError
        def __init__(self):
            self.__dict__.update(data={}, data_labels={})

        def add_option(self, key, info):
            self.data_labels[key] = info
            self.data.setdefault(key, info.default)

        def __getattr__(self, item):
            if item in self.data:
                return self.data[item]
            if item in self.data_labels:
                return self.data_labels[item].default
            raise AttributeError(item)

    class Script:  # modules.scripts.Script (the parts the extension uses)
        infotext_fields = paste_field_names = None
        is_img2img = False

        def elem_id(self, item_id):
            return f"script_{'img2img' if self.is_img2img else 'txt2img'}_erasure_{item_id}"

    fake = {
        "modules": types.ModuleType("modules"),
        "modules.scripts": types.SimpleNamespace(Script=Script, AlwaysVisible=object(), scripts_data=[]),
        "modules.script_callbacks": types.SimpleNamespace(on_ui_tabs=callbacks["ui_tabs"].append,
                                                          on_model_loaded=callbacks["model_loaded"].append,
                                                          on_before_ui=callbacks["before_ui"].append,
                                                          on_ui_settings=callbacks["ui_settings"].append),
        "modules.paths": types.SimpleNamespace(models_path=str(tmp_path / "models")),
        "modules.devices": types.SimpleNamespace(device=torch.device("cpu")),
        "modules.shared": types.SimpleNamespace(sd_model=None, loaded_hypernetworks=[], opts=Options(), OptionInfo=OptionInfo),
        "modules.call_queue": types.SimpleNamespace(queue_lock=threading.Lock()),
    }
    for name, module in fake.items():
        monkeypatch.setitem(sys.modules, name, module)
        if "." in name:
            setattr(fake["modules"], name.split(".")[1], module)
    for name in ("a1111_extension.host", "a1111_extension.script", "a1111_extension.ui"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield types.SimpleNamespace(callbacks=callbacks, Script=Script, modules=fake, models=tmp_path / "models")
    jobs.finish()
    for name in ("a1111_extension.host", "a1111_extension.script", "a1111_extension.ui"):
        sys.modules.pop(name, None)
        if hasattr(sys.modules["a1111_extension"], name.rsplit(".", 1)[1]):
            delattr(sys.modules["a1111_extension"], name.rsplit(".", 1)[1])


def load_entry():
    """modules/scripts.py load_scripts + script_loading.load_module for one extension script."""
    path = str(ROOT / "scripts" / "hirm_erasure.py")
    saved = sys.path
    try:
        sys.path = [str(ROOT)] + sys.path
        spec = importlib.util.spec_from_file_location(os.path.basename(path), path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path = saved
    return module


def test_the_entry_registers_one_always_visible_script_the_tab_and_the_model_watch(webui):
    module = load_entry()
    classes = [c for c in module.__dict__.values() if isinstance(c, type) and issubclass(c, webui.Script)]
    assert [c.__name__ for c in classes] == ["ErasureScript"]
    script = classes[0]()
    assert script.title() == "Erasure" and script.show(False) is webui.modules["modules.scripts"].AlwaysVisible
    assert len(webui.callbacks["ui_tabs"]) == 1 and webui.callbacks["model_loaded"] == [jobs.model_loaded]
    assert len(webui.callbacks["before_ui"]) == 1


def xyz_grid_module():
    """scripts/xyz_grid.py as the webui loads it: a module named "xyz_grid.py" with AxisOption and axis_options."""
    module = types.ModuleType("xyz_grid.py")

    class AxisOption:
        def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
            self.label, self.type, self.apply, self.choices = label, type, apply, choices

    class Script:
        pass

    Script.__module__ = "xyz_grid.py"
    module.AxisOption, module.Script = AxisOption, Script
    module.axis_options = [AxisOption("Nothing", str, lambda p, x, xs: None), AxisOption("Seed", int, lambda p, x, xs: None)]
    return module


def test_the_xyz_plot_gets_erasure_axes_once_and_an_axis_value_goes_over_the_accordion(webui):
    from a1111_extension.settings import ErasureSettings
    from a1111_extension import xyz
    from test_a1111_support import script_args

    xyz_grid = xyz_grid_module()
    webui.modules["modules.scripts"].scripts_data.append(types.SimpleNamespace(script_class=xyz_grid.Script, module=xyz_grid))
    load_entry()
    for run_before_ui in webui.callbacks["before_ui"] * 2:  # a UI reload runs it again: no second set of axes
        run_before_ui()
    labels = [o.label for o in xyz_grid.axis_options]
    assert labels == ["Nothing", "Seed", "[Erasure] patch 1 strength", "[Erasure] patch 2 strength",
                      "[Erasure] patch 3 strength", "[Erasure] NLCE", "[Erasure] NLCE beta", "[Erasure] NLCE gamma"]
    options = {o.label: o for o in xyz_grid.axis_options}
    assert options["[Erasure] NLCE"].choices() == ["on", "off"]

    p = types.SimpleNamespace()  # one cell of the grid: the axes' apply functions, then the job with the accordion's values
    options["[Erasure] patch 1 strength"].apply(p, 0.25, [0.25, 1.0])
    options["[Erasure] NLCE"].apply(p, "on", ["on", "off"])
    options["[Erasure] NLCE beta"].apply(p, 0.5, [0.5])
    closed = script_args(patches=[("cat.safetensors", 1.0)], concepts="dog", enabled=False)
    s = ErasureSettings.from_args(closed, xyz.overrides(p))
    assert s.patches == (("cat.safetensors", 0.25),) and s.nlce and s.beta == 0.5 and s.concepts == ("dog",)
    assert not ErasureSettings.from_args(closed, xyz.overrides(types.SimpleNamespace())).active
    with pytest.raises(ValueError, match="'on' or 'off'"):
        options["[Erasure] NLCE"].apply(p, "maybe", [])


FAKE_MODULES = {
    "__init__": "",
    "scripts": "AlwaysVisible = object()\nclass Script:\n    pass\n",
    "script_callbacks": ("registered = []\ndef on_ui_tabs(f): registered.append(f)\ndef on_model_loaded(f): registered.append(f)\n"
                         "def on_before_ui(f): registered.append(f)\ndef on_ui_settings(f): registered.append(f)\n"),
    "paths": "import os\nmodels_path = os.environ['FAKE_MODELS']\n",
    "devices": "import torch\ndevice = torch.device('cpu')\n",
    "shared": "sd_model = None\nloaded_hypernetworks = []\n",
    "call_queue": "import threading\nqueue_lock = threading.Lock()\n",
}

PLAIN_CLONE = """
import importlib.util, os, sys
sys.path = [p for p in sys.path if "__editable__" not in p and p not in ("", os.getcwd())]  # no pip install of the project
sys.meta_path = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path_importer_cache.clear()
sys.path.insert(0, os.environ["FAKE_WEBUI"])
root, entry = os.environ["REPO"], os.path.join(os.environ["REPO"], "scripts", "hirm_erasure.py")
assert importlib.util.find_spec("shared_core") is None and importlib.util.find_spec("a1111_extension") is None
saved = sys.path
sys.path = [root] + sys.path  # modules/scripts.py load_scripts: the extension root only while loading
spec = importlib.util.spec_from_file_location(os.path.basename(entry), entry)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sys.path = saved
assert importlib.util.find_spec("shared_core") is not None or "shared_core" in sys.modules
sys.path.append(os.path.join(root, "tests"))  # the stand-ins only; everything of the extension is already loaded
import test_a1111_support as s
from contextlib import closing
model = s.Sd1Model()
folder = os.path.join(os.environ["FAKE_MODELS"], "erasure_patches")
os.makedirs(folder)
s.write_patch(__import__("pathlib").Path(folder), "cat.safetensors", s.text_model(model))
p = s.run_job(module.ErasureScript(), s.Processing(model), s.script_args(patches=[("cat.safetensors", 1.0)], nlce=True,
              concepts="cat", neighbors="auto"))
assert not s.call_hook.reported, s.call_hook.reported
from a1111_extension import training
path, report = training.train(model, concepts="cat", method="random", anchor="", preset="object", steps=1, seed=0,
                              name="trained", overwrite=False, folder=folder)
print("OK", sorted(os.listdir(folder)))
"""


def test_a_plain_clone_loads_and_works_with_only_the_webuis_sys_path(tmp_path):
    webui_root = tmp_path / "webui"
    (webui_root / "modules").mkdir(parents=True)
    for name, text in FAKE_MODULES.items():
        (webui_root / "modules" / f"{name}.py").write_text(text)
    env = {**os.environ, "FAKE_WEBUI": str(webui_root), "FAKE_MODELS": str(tmp_path / "models"), "REPO": str(ROOT),
           "PYTHONPATH": ""}
    out = subprocess.run([sys.executable, "-c", PLAIN_CLONE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK ['cat.safetensors', 'trained.safetensors']" in out.stdout


def test_a_job_through_the_real_script_hooks_uses_models_erasure_patches(webui):
    module = load_entry()
    script = module.ErasureScript()
    model = Sd1Model()
    folder = webui.models / "erasure_patches"
    folder.mkdir(parents=True)
    name = write_patch(folder, "cat.safetensors", text_model(model))
    before = snapshot(model)
    seen = []
    call_hook.reported.clear()
    p = run_job(script, Processing(model), script_args(patches=[(name, 1.0)], nlce=True, concepts="cat"),
                before_sample=lambda p: seen.append(jobs.active_job() is not None))
    assert seen == [True] and not call_hook.reported and p.extra_generation_params["Erasure patches"] == "cat.safetensors:1"
    assert same(snapshot(model), before)


def real_gradio() -> bool:
    """gradio itself is installed (not a stray 'gradio' folder on the path, such as the temp folder gradio makes in /tmp)."""
    spec = importlib.util.find_spec("gradio")
    return spec is not None and spec.origin is not None


def test_the_ui_builds_with_gradio_and_pastes_an_infotext(webui, monkeypatch):
    if not real_gradio():
        pytest.skip("gradio is not installed (A1111 pins gradio 3.41)")
    import gradio as gr

    class InputAccordion(gr.Checkbox):  # modules.ui_components.InputAccordion: a checkbox driving an accordion
        def __init__(self, value, **kwargs):
            super().__init__(value, visible=False, **{k: v for k, v in kwargs.items() if k != "label"})
            self.accordion = gr.Accordion(label=kwargs.get("label", ""), open=value)

        def __enter__(self):
            self.accordion.__enter__()
            return self

        def __exit__(self, *exc):
            self.accordion.__exit__(*exc)

    monkeypatch.setitem(sys.modules, "modules.ui_components", types.SimpleNamespace(InputAccordion=InputAccordion))
    module = load_entry()
    script = module.ErasureScript()
    with gr.Blocks():
        components = script.ui(False)
    assert len(components) == 14
    fields = dict((id(c), f) for c, f in script.infotext_fields)
    params = {"Erasure patches": "cat.safetensors:0.5", "Erasure NLCE": "cat, dog", "Erasure NLCE gamma": "0.5"}
    values = [fields[id(c)](params) for c in components]
    assert values[:3] == [True, "cat.safetensors", 0.5] and values[8] == "cat\ndog" and values[12] == 0.5
    assert fields[id(components[0])]({"Steps": "20"}) is False
    tabs = webui.callbacks["ui_tabs"][0]()
    assert tabs[0][1:] == ("Erasure", "hirm_erasure")


def test_the_settings_section_sets_the_patch_folder_and_the_accordions_starting_values(webui, monkeypatch, tmp_path):
    fake_gradio = types.SimpleNamespace(Slider="Slider", Dropdown="Dropdown")  # ui.settings() only names the components
    if not real_gradio():
        monkeypatch.setitem(sys.modules, "gradio", fake_gradio)
    load_entry()
    from a1111_extension import host, ui

    shared = webui.modules["modules.shared"]
    webui.callbacks["ui_settings"][0]()
    labels = shared.opts.data_labels
    assert list(labels) == ["erasure_patch_folder", "erasure_default_strength", "erasure_nlce_preset", "erasure_nlce_schedule"]
    assert {info.section for info in labels.values()} == {("erasure", "Erasure")}
    assert ui.starting_values()["strength_3"] == 1.0 and host.patch_folder() == str(webui.models / "erasure_patches")
    shared.opts.data.update(erasure_patch_folder=str(tmp_path / "mine"), erasure_default_strength=0.6,
                            erasure_nlce_preset="artist", erasure_nlce_schedule="faithful")
    start = ui.starting_values()
    assert [start[k] for k in ("strength_1", "strength_3", "preset", "schedule")] == [0.6, 0.6, "artist", "faithful"]
    assert host.patch_folder() == str(tmp_path / "mine") and (tmp_path / "mine").is_dir()
