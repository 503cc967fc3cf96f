"""Patches merged into a user's model files: a single-file checkpoint (streamed, atomically) or a text-encoder folder.

What ``hirm apply`` writes; hosts and scripts can call the same functions (the diffusers LoRA is ``export.py``).
"""

from __future__ import annotations

import json
import os
import warnings

import torch

from .encoders import KeyLayout, base_signature, canonical_to_openclip, extract_text_encoder, host_key, openclip_g_prefix, text_components
from .loading import SafetensorsFile, load_state_dict_file, load_text_encoder, source_components
from .errors import HirmError
from .files import atomic_folder, atomic_write, check_target, write_safetensors
from .patch import BaseMismatchWarning, apply_patch, base_mismatch_note, merged_state_dict, route_parts


def is_patched_checkpoint(path: str) -> bool:
    """A checkpoint this tool wrote (``hirm apply`` records its patches in the header)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return "hirm_patches" in (f.metadata() or {})
    except Exception:
        return False


def merge_into_checkpoint(source: str, patches, out: str, overwrite: bool = False) -> list[str]:
    """Write to ``out`` a copy of a single-file checkpoint with the patches ([(patch, strength)]) merged into its text
    encoders (safetensors, atomically; an existing ``out`` only with ``overwrite`` and only one this tool wrote). The copy
    is streamed tensor by tensor: the checkpoint is never held in memory whole. Returns the notes to show (a part left
    out, ``patch.route_parts``); a base mismatch is a ``BaseMismatchWarning``.
    """
    if not out.endswith(".safetensors"):
        raise HirmError(f"{out}: a patched single-file checkpoint is written as .safetensors; give a name ending in .safetensors")
    check_target(out, overwrite, is_patched_checkpoint, "checkpoint", "pass --force to replace a checkpoint this tool wrote")
    sd = load_state_dict_file(source)
    found = text_components(sd.keys())
    changed = {}
    by_component, notes = _parts_by_component(patches, found, source)
    for component, pairs in by_component.items():
        prefix, canon = extract_text_encoder(sd, component, source=source)
        if prefix == openclip_g_prefix(sd):  # SDXL's bigG in OpenCLIP layout: q/k/v go back into the fused in_proj
            changed.update(canonical_to_openclip(merged_state_dict(canon, pairs), sd, prefix))
        else:
            layout = KeyLayout(prefix, nested=prefix + "text_model.embeddings.token_embedding.weight" in sd)
            changed.update(merged_state_dict({host_key(k, layout): v for k, v in canon.items()}, pairs, lambda n: host_key(n, layout)))
        _warn_base_mismatch(canon, pairs)
    meta = sd.metadata() if isinstance(sd, SafetensorsFile) else {}
    meta["hirm_patches"] = json.dumps([{"concepts": p.concepts, "strength": s, "base": p.metadata.get("base_fingerprint")}
                                       for p, s in patches])
    view = _Overlay(sd, changed)
    atomic_write(out, lambda f: write_safetensors(f, view, meta), overwrite=overwrite, is_ours=is_patched_checkpoint, what="checkpoint")
    return notes


def _parts_by_component(patches, found: list[str], source: str) -> tuple[dict[str, list], list[str]]:
    """({component: [(single-encoder patch, strength)]} for the encoders ``found`` in the model, notes)
    (``patch.route_parts``)."""
    out: dict[str, list] = {}
    notes: list[str] = []
    for patch, strength in patches:
        parts, more = route_parts(patch, found, source)
        notes += more
        for c, part in parts.items():
            out.setdefault(c, []).append((part, strength))
    return out, notes


class _Overlay(dict):
    """``base`` with ``changed`` on top, read one tensor at a time (a lazy file stays lazy)."""

    def __init__(self, base, changed):
        super().__init__()
        self.base, self.changed = base, changed

    def __getitem__(self, key):
        return self.changed[key] if key in self.changed else self.base[key]

    def __iter__(self):
        return iter(self.base)

    def __len__(self):
        return len(self.base)

    def __contains__(self, key):
        return key in self.base

    def keys(self):
        return list(self.base)

    def info(self, key):
        if key in self.changed or not hasattr(self.base, "info"):
            t = self[key]
            return t.dtype, tuple(t.shape)
        return self.base.info(key)


def _warn_base_mismatch(canon, patches) -> None:
    signature = base_signature(canon)
    for p, _ in patches:
        if note := base_mismatch_note(p, signature, "this checkpoint"):
            warnings.warn(note, BaseMismatchWarning, stacklevel=2)


def merge_into_folder(source: str, patches, out: str, component: str = "auto") -> list[str]:
    """Write a patched text encoder (+ tokenizer) in transformers/diffusers format to ``out`` (a new folder, atomically)
    from a model folder or Hub id. With patches for several encoders (SDXL) and ``component`` "auto":
    ``out/text_encoder`` + ``out/tokenizer`` and ``out/text_encoder_2`` + ``out/tokenizer_2``, the pipeline's own folder
    names. Returns the notes to show."""
    if component == "auto":
        wanted = sorted({c for p, _ in patches for c in p.components})
        components = [c for c in wanted if c in source_components(source)] or wanted[:1]
    else:
        components = [component]
    subfolders = {"clip_l": ("text_encoder", "tokenizer"), "clip_g": ("text_encoder_2", "tokenizer_2")}
    encoders = {}
    by_component, notes = _parts_by_component(patches, components, source)
    for c, pairs in by_component.items():
        enc = encoders[c] = load_text_encoder(source, component=c, dtype=torch.float32)
        for p, s in pairs:
            apply_patch(enc.model, p, s)

    def write(tmp):
        for c, enc in encoders.items():
            model_dir, tok_dir = (os.path.join(tmp, d) for d in subfolders[c]) if len(encoders) > 1 else (tmp, tmp)
            enc.model.save_pretrained(model_dir)
            enc.tokenizer.save_pretrained(tok_dir)

    atomic_folder(out, write, "text-encoder folder")
    return notes
