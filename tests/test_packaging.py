"""The pack as the Comfy Registry and ComfyUI Manager see it, checked offline against their published rules
(docs.comfy.org/registry/specifications), and the dependency lists against what the code imports."""

import os
import re
import subprocess
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))


def requirement_names(lines):
    return {re.split(r"[<>=!~\[ ;]", ln.strip(), maxsplit=1)[0].lower().replace("_", "-")
            for ln in lines if ln.strip() and not ln.strip().startswith("#")}


def test_the_registry_fields_follow_its_rules():
    project, comfy = PROJECT["project"], PROJECT["tool"]["comfy"]
    name = project["name"]
    assert len(name) < 100 and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", name) and "comfyui" not in name.lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["license"] == {"file": "LICENSE"} and "Apache License" in open(os.path.join(ROOT, "LICENSE")).read()
    assert project["description"] and re.fullmatch(r"https://\S+", project["urls"]["Repository"])
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", comfy["PublisherId"]) and comfy["DisplayName"]
    assert "Icon" not in comfy or re.fullmatch(r"https://\S+\.(png|jpg|jpeg|gif|webp|svg)", comfy["Icon"])
    assert re.fullmatch(r">=\d+\.\d+\.\d+", comfy["requires-comfyui"])


def test_comfyui_manager_installs_what_the_nodes_import_and_never_torch():
    manager = requirement_names(open(os.path.join(ROOT, "requirements.txt")).read().splitlines())
    core = requirement_names(PROJECT["project"]["dependencies"])
    assert manager == {"transformers", "safetensors", "huggingface-hub"} and manager <= core
    assert "diffusers" not in core and "diffusers" in requirement_names(PROJECT["project"]["optional-dependencies"]["diffusers"])
    lines = [ln.strip() for ln in open(os.path.join(ROOT, "requirements.txt")) if ln.strip() and not ln.startswith("#")]
    assert set(lines) <= set(PROJECT["project"]["dependencies"])  # the same (tested) lower bounds as pyproject's


def test_every_dependency_has_the_plain_lower_bound_the_minimum_versions_job_pins():
    out = subprocess.run([sys.executable, os.path.join(ROOT, ".ci", "min_constraints.py"), "test", "diffusers"],
                         capture_output=True, text=True)
    pins = dict(line.split("==") for line in out.stdout.split())
    assert out.returncode == 0 and pins["transformers"] == "4.43" and pins["diffusers"] == "0.32.2" and pins["torch"] == "2.1"


def test_the_host_side_of_the_core_imports_without_diffusers_pillow_or_numpy_packages_of_its_own():
    code = ("import sys\nfor m in ('diffusers', 'PIL', 'peft'): sys.modules[m] = None\n"
            "import shared_core.hosting, shared_core.adapters.patcher, shared_core.hub, shared_core.export, shared_core.cli\n"
            "import a1111_extension.jobs, a1111_extension.training\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_the_registry_package_leaves_out_development_files():
    ignored = [ln.strip() for ln in open(os.path.join(ROOT, ".comfyignore")) if ln.strip() and not ln.startswith("#")]
    assert {"tests/", "bench/"} <= set(ignored)
    for kept in ("__init__.py", "comfy_hirm/", "shared_core/", "example_workflows/", "requirements.txt", "LICENSE"):
        assert not any(kept.startswith(i) for i in ignored)
