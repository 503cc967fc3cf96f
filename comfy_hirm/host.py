"""Every call into ComfyUI itself (folders, weights, progress, interruption, devices, logging) in one place."""

from __future__ import annotations

import logging
import os
import re

import comfy.model_management as mm
import comfy.utils
import folder_paths

from . import core

FOLDER = "erasure_patches"
log = logging.getLogger("hirm")


def register_folder() -> None:
    """``models/erasure_patches`` for .safetensors files, first (where Save writes), then any ``erasure_patches``
    folders extra_model_paths.yaml named (read before custom nodes load); each is also a ``loras`` folder, so the
    stock LoRA loaders list saved patches with no manual step."""
    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER), is_default=True)
    paths, exts = folder_paths.folder_names_and_paths[FOLDER]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(exts) | {".safetensors"})
    for path in paths:
        if path not in folder_paths.get_folder_paths("loras"):
            folder_paths.add_model_folder_path("loras", path)


def patch_files() -> list[str]:
    return folder_paths.get_filename_list(FOLDER)


def patch_path(name: str) -> str:
    return folder_paths.get_full_path_or_raise(FOLDER, name)


def save_folder() -> str:
    return folder_paths.get_folder_paths(FOLDER)[0]


def free_patch_path(folder: str, filename: str, overwrite: bool) -> str:
    """``folder/<filename>.safetensors``; a taken name gets the first free counter (``_00001``), like the stock
    savers, unless ``overwrite`` (then only an erasure patch is replaced, which ``save_patch`` checks)."""
    name = (filename or "").strip().replace("\\", "/").strip("/")
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    parts = [p for p in name.split("/") if p]
    if not parts or any(p in (".", "..") or not re.fullmatch(r"[^\x00-\x1f<>:\"|?*]+", p) for p in parts):
        raise core.HirmError(f"give the patch a plain file name (letters, digits, '-', '_', '/' for a subfolder), not {filename!r}")
    base = os.path.join(folder, *parts)
    path = base + ".safetensors"
    counter = 0
    while os.path.lexists(path) and not overwrite:
        counter += 1
        path = f"{base}_{counter:05d}.safetensors"
    return path


def clip_state_dict(clip) -> dict:
    """The CLIP's weights as it encodes, its own patches (a LoRA, an erasure patch) included.

    ComfyUI patches the weights shared by all clones of a CLIP in place, for whichever clone it
    loaded last: load this one with its patches first, as ComfyUI's own CLIPSave node does.
    """
    mm.load_models_gpu([clip.load_model()], force_patch_weights=True)
    return clip.get_sd()


def compute_device():
    return mm.get_torch_device()


def progress_callback():
    """``progress(step, total, loss)`` for the core, drawn as the node's ComfyUI progress bar (training, then the
    report) and said once in the console when the report starts."""
    bar = comfy.utils.ProgressBar(1)
    state = {"measuring": False}

    def progress(step, total, loss):
        if loss is None and not state["measuring"]:
            state["measuring"] = True
            log.info("[hirm] training done; measuring the text-level report")
        bar.update_absolute(step, total)

    return progress


def steps_callback(message: str):
    """``progress(done, total)`` for long core work outside training (building NLCE operators): ``message`` in the
    console when it starts, then the node's progress bar; a Cancel stops it between steps."""
    bar = comfy.utils.ProgressBar(1)
    log.info("%s", message)

    def progress(done, total):
        mm.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, total)

    return progress


def check_interrupted() -> bool:
    """``should_cancel`` for the core: raises ComfyUI's own interruption when the user pressed Cancel."""
    mm.throw_exception_if_processing_interrupted()
    return False
