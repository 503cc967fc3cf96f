"""A patch as a LoRA in diffusers' own format, for ``pipe.load_lora_weights`` / ``set_adapters`` / ``fuse_lora``.

A HiRM patch is a full-rank weight difference ``dW`` (plus a bias difference ``db``) per linear
layer of one encoder block. diffusers (through PEFT) applies ``W + B @ A`` and, with PEFT's
``lora_bias``, ``b + bias_B``; with no alphas in the file its scale is 1. So:

- full rank (the default): ``r = min(out, in)`` and one factor is the identity, the other is
  ``dW`` itself. Nothing is approximated: the only difference from ``patched()`` is the storage
  dtype.
- a chosen rank ``r``: the best rank-``r`` approximation (truncated SVD, ``B = U_r S_r``,
  ``A = V_r^T``); the relative error ``||dW - B A|| / ||dW||`` of each layer is returned.

Keys are diffusers' PEFT names, ``text_encoder.`` for CLIP-L (SD1.x, SDXL's first encoder, the
CLIP-L of Flux and SD3) and ``text_encoder_2.`` for CLIP-G (SDXL's second encoder), with the
``text_model.`` segment that diffusers removes for transformers 5 encoders and keeps for 4.x.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch

from .errors import HirmError
from .patch import META_PREFIX, ErasurePatch, check_finite

EXPORT_FORMAT = "hirm-diffusers-lora"
COMPONENT_PREFIX = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}


def is_export_file(path: str) -> bool:
    """True for a file this module wrote (what ``--force`` may replace)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get(META_PREFIX + "format") == EXPORT_FORMAT
    except Exception:
        return False


def to_diffusers_lora(patch: ErasurePatch, rank: int | None = None, dtype: torch.dtype = torch.float32,
                      text_encoder: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, float]]:
    """(tensors, safetensors metadata, {layer: relative error of its weight difference}) for ``patch``.

    ``text_encoder``: the pipeline component the LoRA targets; by default ``text_encoder_2`` for a
    CLIP-G patch and ``text_encoder`` for any other. An SDXL patch (both encoders) targets both, its
    clip_l part ``text_encoder`` and its clip_g part ``text_encoder_2``.
    """
    if text_encoder not in (None, "text_encoder", "text_encoder_2"):
        raise HirmError(f"a diffusers LoRA targets text_encoder or text_encoder_2, not {text_encoder!r}")
    if patch.parts and text_encoder is not None:
        raise HirmError("this patch changes both SDXL encoders; its LoRA targets text_encoder and text_encoder_2: leave "
                        "--text-encoder out")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise HirmError(f"--rank must be a whole number of at least 1, not {rank!r}; leave it out for the exact full rank")
    tensors, errors, targets = {}, {}, []
    for component in patch.components:
        part = patch.part(component)
        prefix = text_encoder or COMPONENT_PREFIX[component]
        targets.append(prefix)
        part_tensors, part_errors = _lora_factors(part.deltas, prefix, rank, dtype)
        tensors.update(part_tensors)
        errors.update({(f"{prefix}.{k}" if patch.parts else k): v for k, v in part_errors.items()})
    check_finite(tensors, f"the LoRA in {str(dtype).replace('torch.', '')}", "nothing was written: export with --dtype fp32")
    meta = {"format": "pt", META_PREFIX + "format": EXPORT_FORMAT,
            META_PREFIX + "source": json.dumps({"concepts": patch.concepts, "method": patch.method, "family": patch.family,
                                                "text_encoder": "+".join(targets),
                                                "base_fingerprint": patch.metadata.get("base_fingerprint"),
                                                "rank": rank or "full", "max_relative_error": max(errors.values(), default=0.0)})}
    return tensors, meta, errors


def _lora_factors(deltas: Mapping[str, torch.Tensor], prefix: str, rank: int | None,
                  dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """PEFT LoRA tensors (``prefix.<layer>.lora_A/B``) for one encoder's deltas, and {layer: its relative error}."""
    tensors, errors = {}, {}
    for layer in sorted({name.rsplit(".", 1)[0] for name in deltas}):
        dw = deltas.get(layer + ".weight")
        if dw is None or dw.dim() != 2:
            raise HirmError(f"{layer} has no weight difference a LoRA can carry; only linear layers can be exported")
        dw = dw.detach().to("cpu", torch.float32)
        out_features, in_features = dw.shape
        full = min(out_features, in_features)
        if rank is None or rank >= full:
            eye = torch.eye(full)
            b, a = (dw, eye) if out_features >= in_features else (eye, dw)
            errors[layer] = 0.0
        else:
            u, s, vh = torch.linalg.svd(dw, full_matrices=False)
            b, a = u[:, :rank] * s[:rank], vh[:rank]
            norm = float(dw.norm())
            errors[layer] = float((dw - b @ a).norm()) / norm if norm else 0.0
        key = f"{prefix}.{layer}"
        tensors[key + ".lora_A.weight"] = a.to(dtype).contiguous()
        tensors[key + ".lora_B.weight"] = b.to(dtype).contiguous()
        db = deltas.get(layer + ".bias")
        tensors[key + ".lora_B.bias"] = (db.detach().to("cpu", torch.float32) if db is not None
                                         else torch.zeros(out_features)).to(dtype).contiguous()
    return tensors, errors


def export_diffusers_lora(patch: ErasurePatch, path: str, rank: int | None = None, dtype: torch.dtype = torch.float32,
                          overwrite: bool = False, text_encoder: str | None = None) -> dict[str, float]:
    """Write ``to_diffusers_lora`` to ``path`` atomically; returns the per-layer relative errors."""
    from .files import atomic_write, write_safetensors

    tensors, meta, errors = to_diffusers_lora(patch, rank, dtype, text_encoder)
    atomic_write(path, lambda f: write_safetensors(f, tensors, meta), overwrite=overwrite, is_ours=is_export_file,
                 what="exported LoRA")
    return errors


def summarize(errors: Mapping[str, float]) -> str:
    worst = max(errors, key=errors.get) if errors else None
    if not worst or errors[worst] == 0.0:
        return "exact (full-rank factors; only the storage dtype rounds)"
    return f"largest relative error of a layer's weight difference {errors[worst]:.2e} ({worst})"
