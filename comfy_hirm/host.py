"""Every call into ComfyUI itself (folders, weights, progress, interruption, devices, logging) in one place."""

from __future__ import annotations

import logging
import os

import comfy.model_management as mm
import comfy.utils
import folder_paths

FOLDER = "erasure_patches"
log = logging.getLogger("hirm")


def register_folder() -> None:
    """``models/erasure_patches`` for .safetensors files, first (where Save writes), then any
    ``erasure_patches`` folders extra_model_paths.yaml named (read before custom nodes load)."""
    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER), is_default=True)
    paths, exts = folder_paths.folder_names_and_paths[FOLDER]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(exts) | {".safetensors"})


def patch_files() -> list[str]:
    return folder_paths.get_filename_list(FOLDER)


def patch_path(name: str) -> str:
    return folder_paths.get_full_path_or_raise(FOLDER, name)


def save_folder() -> str:
    return folder_paths.get_folder_paths(FOLDER)[0]


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
    """``progress(step, total, loss)`` for the core, drawn as the node's ComfyUI progress bar."""
    bar = comfy.utils.ProgressBar(1)
    return lambda step, total, loss: bar.update_absolute(step, total)


def check_interrupted() -> bool:
    """``should_cancel`` for the core: raises ComfyUI's own interruption when the user pressed Cancel."""
    mm.throw_exception_if_processing_interrupted()
    return False
