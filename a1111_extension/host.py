"""Every call into AUTOMATIC1111 / Forge itself (``modules.*``), in one place.

Names read from the webuis' sources (A1111 1.7-1.10, Forge): ``modules.scripts.Script`` /
``AlwaysVisible``, ``modules.script_callbacks.on_ui_tabs`` / ``on_model_loaded``,
``modules.paths.models_path``, ``modules.devices.device``, ``modules.shared.sd_model`` /
``.loaded_hypernetworks`` / ``.opts``, ``modules.call_queue.queue_lock``, ``modules.ui_components.InputAccordion``,
``script_callbacks.on_before_ui`` and ``scripts.scripts_data`` (to find the built-in ``xyz_grid.py``),
``script_callbacks.on_ui_settings``, ``shared.opts.add_option`` and ``shared.OptionInfo`` (the Settings section).
"""

from __future__ import annotations

import os

from modules import call_queue, devices, paths, script_callbacks, scripts, shared

from . import library
from .jobs import Env

Script = scripts.Script
AlwaysVisible = scripts.AlwaysVisible


SETTINGS_SECTION = ("erasure", "Erasure")


def option(name: str, default):
    """A value from the webui's Settings (the Erasure section), or ``default`` before they are registered."""
    try:
        value = getattr(shared.opts, name)
    except AttributeError:
        return default
    return default if value is None else value


def add_settings(settings) -> None:
    """``settings``: (key, default, label, gradio component or None, component args or None) for the Erasure section."""
    for key, default, label, component, args in settings:
        shared.opts.add_option(key, shared.OptionInfo(default, label, component, args, section=SETTINGS_SECTION))


def patch_folder() -> str:
    """The patch folder: Settings -> Erasure, else ``models/erasure_patches`` of the webui (created on first use)."""
    chosen = str(option("erasure_patch_folder", "") or "").strip()
    folder = os.path.abspath(os.path.expanduser(chosen)) if chosen else os.path.join(paths.models_path, library.FOLDER_NAME)
    os.makedirs(folder, exist_ok=True)
    return folder


def env() -> Env:
    return Env(patch_folder(), devices.device, hypernetworks_loaded=lambda: bool(getattr(shared, "loaded_hypernetworks", None)),
               hires_uses_firstpass_conds=lambda: bool(getattr(shared.opts, "hires_fix_use_firstpass_conds", False)))


def sd_model():
    return shared.sd_model


def queue_lock():
    """The lock every generation holds: training waits for a running job and blocks new ones."""
    return call_queue.queue_lock


def register(on_ui_tabs, on_model_loaded, on_xyz_grid, on_ui_settings) -> None:
    """``on_xyz_grid(module)`` runs before the UI is built, when the webui's X/Y/Z plot script is loaded."""
    script_callbacks.on_ui_tabs(on_ui_tabs)
    script_callbacks.on_ui_settings(on_ui_settings)
    script_callbacks.on_model_loaded(on_model_loaded)
    script_callbacks.on_before_ui(lambda: [on_xyz_grid(m) for m in _xyz_grid_modules()])


def _xyz_grid_modules():
    """The loaded ``scripts/xyz_grid.py`` module (the webui loads each script file as a module named after it)."""
    return [d.module for d in scripts.scripts_data if d.script_class.__module__ == "xyz_grid.py"][:1]


def input_accordion(value: bool, label: str, elem_id: str):
    """A1111's accordion with an on/off checkbox in its header (1.7+ and Forge)."""
    from modules.ui_components import InputAccordion

    return InputAccordion(value, label=label, elem_id=elem_id)
