"""Every call into ComfyUI itself (folders, progress, interruption, devices, logging) in one place."""

from __future__ import annotations

import logging
import os

import comfy.model_management as mm
import comfy.utils
import folder_paths

FOLDER = "erasure_patches"
log = logging.getLogger("hirm")


def register_folder() -> None:
    """``models/erasure_patches`` (plus any paths from extra_model_paths.yaml), .safetensors files."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER in folder_paths.folder_names_and_paths:
        paths, exts = folder_paths.folder_names_and_paths[FOLDER]
        if default not in paths:
            paths.append(default)
        folder_paths.folder_names_and_paths[FOLDER] = (paths, set(exts) | {".safetensors"})
    else:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], {".safetensors"})


def patch_files() -> list[str]:
    return folder_paths.get_filename_list(FOLDER)


def patch_path(name: str) -> str:
    return folder_paths.get_full_path_or_raise(FOLDER, name)


def save_folder() -> str:
    return folder_paths.get_folder_paths(FOLDER)[0]


def training_device():
    return mm.get_torch_device()


def progress(total: int):
    bar = comfy.utils.ProgressBar(total)
    return lambda step, total_, loss: bar.update_absolute(step, total_)


def check_interrupted() -> bool:
    mm.throw_exception_if_processing_interrupted()  # raises ComfyUI's own interruption: the run stops cleanly
    return False
