"""The Erasure tab's work: train a HiRM patch on the loaded model's text encoders (SDXL: both, one patch) and save it.

Training runs on a copy built from the encoder's weights as loaded from the checkpoint (LoRAs
merged by the webui are taken out first), so the loaded model is never touched.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
from typing import Callable, Iterator

from shared_core.adapters import patcher
from shared_core.common import split_list
from shared_core.errors import HirmError
from shared_core.hirm import make_config
from shared_core.hosting import train_on_encoders
from shared_core.patch import save_patch
from shared_core.report import format_report

from . import library
from .webui_model import (PICK_ANOTHER, check_model, checkpoint_name, clean_weights, forge_clip_state, is_forge, openclip_projection,
                          openclip_weights, text_encoders)

log = logging.getLogger("hirm-erasure")
_NAME = re.compile(r"[\w][\w .()+-]*")


def output_path(folder: str, name: str, overwrite: bool) -> str:
    """``folder/name.safetensors`` for a plain file name; refuses odd names and (unless ``overwrite``) existing files."""
    name = (name or "").strip()
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")].strip()
    if not _NAME.fullmatch(name):
        raise HirmError(f"output name {name!r} is not a plain file name; use letters, digits, spaces, '.', '-', '_'")
    path = os.path.join(folder, name + ".safetensors")
    if os.path.exists(path) and not overwrite:
        raise HirmError(f"{name}.safetensors already exists in {library.shown(folder)}; choose another name or tick 'overwrite'")
    return path


def model_encoders(sd_model) -> dict:
    """{component: (canonical weights as loaded from the file, pooled projection or None)} of the loaded model's text
    encoders (SD1.x: CLIP-L; SDXL: CLIP-L and bigG; a refiner: bigG), LoRAs merged by the webui taken out."""
    check_model(sd_model)
    if is_forge(sd_model):
        objects = getattr(sd_model, "forge_objects_original", None) or sd_model.forge_objects
        state = forge_clip_state(objects.clip)
        if not any(k.startswith(("clip_l.", "clip_g.")) for k in state):
            raise HirmError(f"{checkpoint_name(sd_model)} has no CLIP-L or CLIP-G text encoder, which HiRM trains; "
                            f"{PICK_ANOTHER} (or Flux)")
        return patcher.model_encoders(state)
    encoders = text_encoders(sd_model)
    if not encoders:
        raise HirmError(f"{checkpoint_name(sd_model)} has no CLIP text encoder HiRM can train; {PICK_ANOTHER}")
    return {c: (clean_weights(m), None) if c == "clip_l" else (openclip_weights(m), openclip_projection(m))
            for c, m in encoders.items()}


def train(sd_model, *, concepts: str, method: str, anchor: str, preset: str, steps: int, seed: int, name: str,
          overwrite: bool, folder: str, device="cpu", progress: Callable | None = None,
          should_cancel: Callable | None = None) -> tuple[str, str]:
    """(path of the saved patch, text-level report). 0 steps: the preset's."""
    path = output_path(folder, name, overwrite)
    concept_list = split_list(concepts)
    if not concept_list:
        raise HirmError("no concept given: type the concepts to erase (one per line)")
    config = make_config(concept_list, method=method, anchor=(anchor or "").strip() or None, preset=preset,
                         steps=int(steps or 0) or None, seed=42 if seed in (None, "") else int(seed))
    patch = train_on_encoders(model_encoders(sd_model), config, device=device, progress=progress, should_cancel=should_cancel)
    save_patch(patch, path)
    return path, format_report(patch.report)


def run_in_background(work: Callable[[Callable], tuple[str, str]], poll: float = 0.25) -> Iterator[tuple[str, str]]:
    """Run ``work(progress)`` in a thread; yield (status line, report) while it runs and once at the end.

    ``progress(step, total, loss)`` updates the status line; a HirmError (including a cancel)
    becomes the final status, any other error is logged with its traceback.
    """
    updates: queue.Queue = queue.Queue()
    result: dict = {}

    def target():
        try:
            result["value"] = work(lambda step, total, loss: updates.put(
                f"step {step}/{total}, loss {loss:.4g}" if loss is not None else f"measuring the text-level report ({step}/{total})"))
        except HirmError as e:
            result["error"] = str(e)
        except Exception as e:  # a bug or a host failure: the user gets one line, the console the details
            log.exception("training failed")
            result["error"] = f"training failed ({type(e).__name__}: {e}); see the console"

    thread = threading.Thread(target=target, name="hirm-erasure-training", daemon=True)
    thread.start()
    status = "starting (waits for a running generation to finish)"
    while thread.is_alive():
        try:
            status = updates.get(timeout=poll)
        except queue.Empty:
            pass
        yield status, ""
    thread.join()
    if "error" in result:
        yield result["error"], ""
    else:
        path, report = result["value"]
        yield f"saved {library.shown_file(path)}", report  # never the server's path
