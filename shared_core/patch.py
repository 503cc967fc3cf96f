"""Erasure patch files: format, validation, atomic writing, apply/remove on a text encoder.

A patch is a safetensors file of weight differences (``delta = W_trained - W_base``) with
metadata. Tensor names follow the full-weight-difference convention of ComfyUI's and A1111's
LoRA loaders (``lora_te_text_model_encoder_layers_0_self_attn_q_proj.diff`` for a weight,
``.diff_b`` for a bias), so the same file also works in their stock LoRA loaders. The format
is documented in docs/patch-format.md.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import re
import threading
import unicodedata
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch

from . import __version__
from .encoders import canonical_parameters, encoder_architecture, model_signature, signature_id, signatures_match
from .common import check_strength
from .errors import HirmError, PatchFileError, PatchMismatchError

FORMAT_NAME = "hirm-erasure-patch"
FORMAT_VERSION = 2  # 2: metadata under the "hirm." prefix, "format" = "pt" (the safetensors convention); 1 still read
META_PREFIX = "hirm."
_FAMILY_KEY_PREFIX = {"clip-g": "lora_te2_"}  # everything else (clip-l) uses lora_te_
_JSON_FIELDS = ("concepts", "config", "encoder", "base_signature", "report", "format_version", "train_seconds",
                "report_seconds", "source")
MAX_TENSORS = 4096  # far above any real patch (a whole CLIP-G is 580 tensors): a bigger header is refused unread
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


class BaseMismatchWarning(UserWarning):
    """The patch was trained on other base weights than the encoder it is applied to."""


# ----------------------------------------------------------------------------------------------
# Names: canonical parameter name <-> key in the file


def file_key(canonical: str, family: str) -> str:
    module, kind = canonical.rsplit(".", 1)
    if kind not in ("weight", "bias"):
        raise HirmError(f"cannot store {canonical} in a patch (only weights and biases)")
    return _FAMILY_KEY_PREFIX.get(family, "lora_te_") + module.replace(".", "_") + (".diff" if kind == "weight" else ".diff_b")


_MODULES = (
    r"text_model_encoder_layers_(0|[1-9]\d{0,2})_(self_attn_(?:q|k|v|out)_proj|mlp_fc[12]|layer_norm[12])",
    r"text_model_(final_layer_norm)",
    r"text_model_embeddings_(token_embedding|position_embedding)",
)


def canonical_name(key: str) -> str | None:
    """Inverse of ``file_key``; None for a key that is not a text-encoder difference."""
    m = re.fullmatch(r"lora_te[12]?_(.+)\.(diff|diff_b)", key)
    if not m:
        return None
    body, kind = m.group(1), "weight" if m.group(2) == "diff" else "bias"
    if mm := re.fullmatch(_MODULES[0], body):
        sub = mm.group(2).replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
        return f"text_model.encoder.layers.{mm.group(1)}.{sub}.{kind}"
    if mm := re.fullmatch(_MODULES[1], body):
        return f"text_model.final_layer_norm.{kind}"
    if mm := re.fullmatch(_MODULES[2], body):
        return f"text_model.embeddings.{mm.group(1)}.{kind}"
    return None


# ----------------------------------------------------------------------------------------------
# The patch object


@dataclass
class ErasurePatch:
    """Weight differences for a text encoder plus what they erase and how they were made.

    ``deltas`` maps canonical parameter names to tensors; ``metadata`` holds decoded values
    (lists/dicts for the JSON fields). Treat instances as immutable: hosts share them.
    """

    deltas: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def concepts(self) -> list[str]:
        return list(self.metadata.get("concepts", []))

    @property
    def method(self) -> str:
        return str(self.metadata.get("method", ""))

    @property
    def encoder(self) -> dict[str, Any]:
        return dict(self.metadata.get("encoder", {}))

    @property
    def family(self) -> str:
        return str(self.encoder.get("family", "clip-l"))

    @property
    def report(self) -> dict[str, Any] | None:
        return self.metadata.get("report")

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.deltas.values())

    def describe(self) -> str:
        """One line for logs and UIs."""
        return (f"{', '.join(self.concepts) or '?'} [{self.method}] on {self.family}, "
                f"{len(self.deltas)} tensors, base {self.metadata.get('base_fingerprint', '?')}")


def make_metadata(*, method: str, concepts: list[str], config: Mapping[str, Any], model,
                  base_signature: list[float], train_seconds: float | None = None,
                  report: Mapping[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "method": method,
        "concepts": list(concepts),
        "anchor": config.get("anchor") or "",
        "config": dict(config),
        "encoder": encoder_architecture(model),
        "base_fingerprint": signature_id(base_signature),
        "base_signature": list(base_signature),
        "tool": f"hirm {__version__}",
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
    }
    if train_seconds is not None:
        meta["train_seconds"] = round(float(train_seconds), 3)
    if report is not None:
        meta["report"] = dict(report)
    meta.update(extra)
    return meta


# ----------------------------------------------------------------------------------------------
# Writing and reading


def patch_to_safetensors(patch: ErasurePatch, dtype: torch.dtype = torch.float16) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and string metadata that make up the file (format 2: every field under ``hirm.``)."""
    family = patch.family
    tensors = {file_key(k, family): v.detach().to("cpu", dtype).contiguous() for k, v in sorted(patch.deltas.items())}
    fields = {k: v for k, v in patch.metadata.items() if k not in ("format", "format_version", "delta_dtype")}
    meta = {"format": "pt", META_PREFIX + "format": FORMAT_NAME, META_PREFIX + "format_version": str(FORMAT_VERSION),
            META_PREFIX + "delta_dtype": str(dtype).replace("torch.", "")}
    for k, v in fields.items():
        meta[META_PREFIX + k] = json.dumps(v) if k in _JSON_FIELDS or not isinstance(v, str) else v
    return tensors, meta


def is_patch_file(path: str) -> bool:
    """True for a readable safetensors file whose header says it is an erasure patch (what may be overwritten)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            raw = f.metadata() or {}
    except Exception:
        return False
    return raw.get(META_PREFIX + "format") == FORMAT_NAME or raw.get("format") == FORMAT_NAME


def save_patch(patch: ErasurePatch, path: str, dtype: torch.dtype = torch.float16, overwrite: bool = False) -> str:
    """Write ``patch`` to ``path`` atomically (``files.atomic_write``).

    An existing file is replaced only with ``overwrite`` and only if it is an erasure patch itself;
    a patch that would not pass ``load_patch`` is refused before anything is written.
    """
    from .files import atomic_write, write_safetensors

    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise HirmError(f"patches are stored as float16, bfloat16 or float32, not {dtype}")
    check_finite(patch.deltas, "the patch")
    tensors, meta = patch_to_safetensors(patch, dtype)
    check_finite(tensors, f"the patch stored as {dtype}")
    if any(bool(d.any()) for d in patch.deltas.values()) and not any(bool(t.any()) for t in tensors.values()):
        raise HirmError(f"every difference of the patch rounds to 0 in {str(dtype).replace('torch.', '')}; nothing was written: "
                        "store it as fp32 (--dtype fp32) or train with a larger learning rate")
    validate_patch(tensors, decode_metadata(meta, path), path)  # exactly what a reader will check
    return atomic_write(path, lambda f: write_safetensors(f, tensors, meta), overwrite=overwrite, is_ours=is_patch_file,
                        what="erasure patch")


def check_finite(tensors: Mapping[str, torch.Tensor], what: str, consequence: str = "nothing was written",
                 error: type[HirmError] = HirmError) -> None:
    for k, v in tensors.items():
        if not torch.isfinite(v).all():
            raise error(f"{what} holds NaN or Inf values ({k}); {consequence}")


def read_header(path: str) -> tuple[dict[str, Any], dict[str, tuple[str, tuple[int, ...]]]]:
    """(validated metadata, {file key: (dtype, shape)}) of a patch file, reading only its header."""
    from safetensors import safe_open

    if not os.path.exists(path):
        raise PatchFileError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise PatchFileError(f"{path}: not a file; pass an erasure patch (.safetensors)")
    try:
        with safe_open(path, framework="pt") as f:
            raw = f.metadata() or {}
            keys = list(f.keys())
            if len(keys) > MAX_TENSORS:
                raise PatchFileError(f"{path}: {len(keys)} tensors, far more than any erasure patch holds; the file is damaged or not a patch")
            shapes = {}
            for k in keys:
                piece = f.get_slice(k)
                shapes[k] = (str(piece.get_dtype()), tuple(int(n) for n in piece.get_shape()))
    except PatchFileError:
        raise
    except Exception:
        raise PatchFileError(f"{path}: not a valid safetensors file (another format, or truncated/damaged); pass an erasure patch (.safetensors)") from None
    return decode_metadata(raw, path), shapes


def read_metadata(path: str) -> dict[str, Any]:
    """Validated, decoded metadata of a patch file, reading only its header."""
    return read_header(path)[0]


def _damaged(where: str, what: str) -> PatchFileError:
    return PatchFileError(f"{where}: damaged patch metadata ({what}); download or train it again")


def decode_metadata(raw: Mapping[str, str], where: str = "patch") -> dict[str, Any]:
    """Safetensors' str->str metadata of a patch (format 1 or 2) as checked, typed values; PatchFileError otherwise."""
    if raw.get(META_PREFIX + "format") == FORMAT_NAME:
        fields = {k[len(META_PREFIX):]: v for k, v in raw.items() if k.startswith(META_PREFIX)}
    elif raw.get("format") == FORMAT_NAME:  # format 1: the same fields without a prefix
        fields = dict(raw)
    else:
        raise PatchFileError(f"{where}: a safetensors file, but not an erasure patch (no {META_PREFIX}format={FORMAT_NAME} "
                             "in its metadata); train one with 'hirm train'")
    meta: dict[str, Any] = {}
    for k, v in fields.items():
        if not isinstance(v, str):
            raise _damaged(where, f"{k!r} is not text")
        if k in _JSON_FIELDS:
            try:
                meta[k] = json.loads(v)
            except ValueError:
                raise _damaged(where, f"{k!r} is not valid JSON") from None
        else:
            meta[k] = v
    version = meta.get("format_version")
    if isinstance(version, str) and version.isdigit():
        version = int(version)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _damaged(where, f"format_version {fields.get('format_version')!r}")
    if version > FORMAT_VERSION:
        raise PatchFileError(f"{where}: patch format {version} is newer than this tool reads ({FORMAT_VERSION}); upgrade hirm")
    meta["format_version"] = version
    meta["format"] = FORMAT_NAME
    check_metadata(meta, where)
    return meta


def _text(value, limit: int = 1000) -> bool:
    """A display-safe string: no control characters (no fake lines, no terminal escapes), bounded."""
    return isinstance(value, str) and len(value) <= limit and not any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")
                                                                      for c in value)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(value, lo: int = 1, hi: int = 1_000_000) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def check_metadata(meta: Mapping[str, Any], where: str) -> None:
    """The typed schema of a patch's metadata (docs/patch-format.md); PatchFileError naming the first bad field."""
    for k in ("method", "concepts", "encoder", "base_fingerprint", "base_signature"):
        if k not in meta:
            raise _damaged(where, f"no {k!r}")
    concepts = meta["concepts"]
    if not isinstance(concepts, list) or not concepts or not all(_text(c) and c.strip() for c in concepts):
        raise _damaged(where, "concepts must be a list of texts without control characters")
    if not _text(meta["method"], 200) or not meta["method"]:
        raise _damaged(where, "method")
    for k in ("anchor", "base_fingerprint", "tool", "created", "trained_on", "base_model", "delta_dtype"):
        if k in meta and not _text(meta[k]):
            raise _damaged(where, f"{k} must be a text without control characters")
    enc = meta["encoder"]
    if not isinstance(enc, dict) or not all(_count(enc.get(k), 1, 100_000) for k in ("hidden_size", "num_layers", "intermediate_size")):
        raise _damaged(where, "encoder architecture incomplete or not whole numbers")
    for k in ("vocab_size", "max_positions", "num_heads"):
        if k in enc and not _count(enc[k], 1, 10_000_000):
            raise _damaged(where, f"encoder {k} is not a whole number")
    if "family" in enc and not _text(enc["family"], 64):
        raise _damaged(where, "encoder family")
    sig = meta["base_signature"]
    if not isinstance(sig, list) or len(sig) > 100_000 or not all(_number(v) for v in sig):
        raise _damaged(where, "base_signature must be a list of numbers")
    for k in ("train_seconds", "report_seconds"):
        if k in meta and meta[k] is not None and not _number(meta[k]):
            raise _damaged(where, f"{k} must be a number")
    config = meta.get("config", {})
    if not isinstance(config, dict):
        raise _damaged(where, "config must be a JSON object")
    for k, ok in (("preset", _text), ("supervision", _text), ("lr", _number), ("steps", _count), ("seed", _number),
                  ("anchor", _text), ("multi", _text)):
        if config.get(k) is not None and not ok(config[k]):
            raise _damaged(where, f"config {k}")
    for k in ("trainable_layers",):
        if config.get(k) is not None and not (isinstance(config[k], list) and all(_count(x, -1000, 1000) for x in config[k])):
            raise _damaged(where, f"config {k} must be a list of layer numbers")
    for k in ("neighbors", "templates", "concepts"):
        if config.get(k) is not None and not (isinstance(config[k], list) and all(_text(x) for x in config[k])):
            raise _damaged(where, f"config {k} must be a list of texts")
    report = meta.get("report")
    if report is not None:
        if not isinstance(report, dict):
            raise _damaged(where, "report must be a JSON object")
        for k, v in report.items():
            if k == "neighbors":
                if not (isinstance(v, list) and all(_text(x) for x in v)):
                    raise _damaged(where, "report neighbors must be a list of texts")
            elif v is not None and not _number(v):
                raise _damaged(where, f"report {k} must be a number")
    source = meta.get("source")
    if source is not None and not (isinstance(source, dict) and all(v is None or _text(v) for v in source.values())):
        raise _damaged(where, "source must hold texts")


def load_patch(path: str, device="cpu") -> ErasurePatch:
    """Read and validate a patch file: the header first (metadata schema, names, float dtypes, shapes against
    its encoder), then the tensors (finite values). What this accepts, ``inspect`` calls valid."""
    from safetensors.torch import load_file

    meta, shapes = read_header(path)
    check_tensor_table(shapes, meta, path)
    try:
        tensors = load_file(path, device=str(device))
    except Exception:
        raise PatchFileError(f"{path}: the patch file is truncated or damaged; download or train it again") from None
    return validate_patch(tensors, meta, path)


def check_tensor_table(shapes: Mapping[str, tuple[str, tuple[int, ...]]], meta: Mapping[str, Any], where: str) -> None:
    """Names, dtypes and shapes of a patch's tensors (from its header) against its declared encoder."""
    if not shapes:
        raise PatchFileError(f"{where}: the patch holds no tensors")
    if len(shapes) > MAX_TENSORS:
        raise PatchFileError(f"{where}: {len(shapes)} tensors, far more than any erasure patch holds; the file is damaged")
    enc = meta["encoder"]
    for key, (dtype, shape) in shapes.items():
        name = canonical_name(key)
        if name is None:
            raise PatchFileError(f"{where}: unexpected tensor {key!r} in a patch; the file is damaged or not a patch")
        if dtype not in _FLOAT_DTYPES:
            raise PatchFileError(f"{where}: tensor {key} is {dtype}; patches hold float16/bfloat16/float32 differences: the file is damaged")
        expected = expected_shape(name, enc)
        if tuple(shape) != expected:
            raise PatchFileError(f"{where}: tensor {key} has shape {tuple(shape)}, expected {expected}; the file is damaged")


_DTYPE_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}


def validate_patch(tensors: Mapping[str, torch.Tensor], meta: dict[str, Any], where: str) -> ErasurePatch:
    """An ``ErasurePatch`` from a file's tensors and decoded metadata, or PatchFileError (the one validator)."""
    check_metadata(meta, where)
    check_tensor_table({k: (_DTYPE_NAMES.get(v.dtype, str(v.dtype)), tuple(v.shape)) for k, v in tensors.items()}, meta, where)
    deltas = {canonical_name(k): v for k, v in tensors.items()}
    check_finite(deltas, where, "the file is damaged: download or train it again", PatchFileError)
    return ErasurePatch(deltas, dict(meta))


def expected_shape(name: str, enc: Mapping[str, Any]) -> tuple[int, ...] | None:
    """The shape a canonical tensor must have in the encoder ``enc`` describes; None where it has no such tensor."""
    h, i = int(enc["hidden_size"]), int(enc["intermediate_size"])
    if name.startswith("text_model.final_layer_norm."):
        return (h,)
    if name == "text_model.embeddings.token_embedding.weight":
        return (int(enc["vocab_size"]), h) if "vocab_size" in enc else None
    if name == "text_model.embeddings.position_embedding.weight":
        return (int(enc["max_positions"]), h) if "max_positions" in enc else None
    m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", name)
    if not m or int(m.group(1)) >= int(enc["num_layers"]):
        return None
    mod, kind = m.group(2), m.group(3)
    if mod.startswith("layer_norm"):
        return (h,)
    out_in = {"mlp.fc1": (i, h), "mlp.fc2": (h, i)}.get(mod, (h, h))
    return out_in if kind == "weight" else (out_in[0],)


# ----------------------------------------------------------------------------------------------
# Applying to a transformers CLIPTextModel


def base_mismatch_note(patch: ErasurePatch, signature: list[float], where: str = "this encoder") -> str | None:
    """The one-line note for a patch trained on other base weights than ``signature`` describes (None when they match)."""
    if signatures_match(signature, patch.metadata.get("base_signature", [])):
        return None
    return (f"erasure patch '{', '.join(patch.concepts)}' was trained on other base weights "
            f"({patch.metadata.get('base_fingerprint')}) than {where} ({signature_id(signature)}), e.g. another "
            "fine-tune; it may erase less or drift more: retrain it on this model for best results")


class _Applied:
    """What the core knows about one model's applied patches (never stored on the model itself)."""

    def __init__(self):
        self.lock = threading.RLock()
        self.stack: list[AppliedPatch] = []
        self.base_signature: list[float] | None = None


_APPLIED: "weakref.WeakKeyDictionary[Any, _Applied]" = weakref.WeakKeyDictionary()
_APPLIED_LOCK = threading.Lock()


def _applied(model) -> _Applied:
    with _APPLIED_LOCK:
        state = _APPLIED.get(model)
        if state is None:
            state = _APPLIED[model] = _Applied()
        return state


def applied_patches(model) -> list["AppliedPatch"]:
    """The patches applied to ``model`` and not yet removed, oldest first."""
    state = _APPLIED.get(model)
    return list(state.stack) if state else []


def forget_applied(model) -> None:
    """Drop what the core knows of ``model``'s patches without touching its weights: for a host that has just
    reloaded them from a file (so that nothing stale is ever written back over new weights)."""
    state = _APPLIED.get(model)
    if state is not None:
        with state.lock:
            state.stack.clear()
            state.base_signature = None


@dataclass(eq=False)
class AppliedPatch:
    """Handle of a patch applied to a model; ``remove()`` restores the weights bit for bit."""

    model: Any
    patch: ErasurePatch
    strength: float
    originals: dict[str, torch.Tensor]
    base_matches: bool

    def remove(self) -> None:
        state = _applied(self.model)
        with state.lock:
            if self not in state.stack:
                return
            if state.stack[-1] is not self:
                raise HirmError("patches must be removed in reverse order of application; remove the most recent one first")
            params = canonical_parameters(self.model)
            with torch.no_grad():
                for name, orig in self.originals.items():
                    params[name].data.copy_(orig)
            state.stack.pop()
            if not state.stack:
                state.base_signature = None


def check_compatible(patch: ErasurePatch, model) -> None:
    """Refuse a patch for another encoder architecture (raises PatchMismatchError)."""
    arch = encoder_architecture(model)
    enc = patch.encoder
    if (enc.get("hidden_size"), enc.get("num_layers")) != (arch["hidden_size"], arch["num_layers"]):
        raise PatchMismatchError(
            f"this patch is for {enc.get('family', '?')} (width {enc.get('hidden_size')}, {enc.get('num_layers')} layers) "
            f"but the encoder is {arch['family']} (width {arch['hidden_size']}, {arch['num_layers']} layers); "
            "use a patch trained on this encoder")
    params = canonical_parameters(model)
    for name, delta in patch.deltas.items():
        if name not in params or tuple(params[name].shape) != tuple(delta.shape):
            raise PatchMismatchError(f"patch tensor {name} does not fit this encoder; use a patch trained on this encoder")


def apply_patch(model, patch: ErasurePatch, strength: float = 1.0) -> AppliedPatch:
    """Add ``strength * delta`` to the model's weights in place; returns a handle to undo it.

    Refuses a patch for another architecture, or a strength outside ``STRENGTH_RANGE``, before
    touching anything; warns (``BaseMismatchWarning``) when the base weights differ from those the
    patch was trained on. Safe to call from several threads: each model has its own lock.
    """
    strength = check_strength(strength)
    check_compatible(patch, model)
    state = _applied(model)
    with state.lock:
        if not state.stack:
            state.base_signature = model_signature(model)
        note = base_mismatch_note(patch, state.base_signature)
        if note:
            warnings.warn(note, BaseMismatchWarning, stacklevel=2)
        params = canonical_parameters(model)
        originals = {n: params[n].detach().clone() for n in patch.deltas}
        new = {n: (params[n].data.float() + strength * d.to(params[n].device, torch.float32)).to(params[n].dtype)
               for n, d in patch.deltas.items()}
        check_finite(new, f"the encoder with '{', '.join(patch.concepts)}' at strength {strength:g}",
                     "nothing was changed: lower the strength", PatchMismatchError)
        with torch.no_grad():
            for name, value in new.items():
                params[name].data.copy_(value)
        handle = AppliedPatch(model, patch, strength, originals, note is None)
        state.stack.append(handle)
        return handle


@contextlib.contextmanager
def patched(model, patches: ErasurePatch | Iterable[tuple[ErasurePatch, float]], strength: float = 1.0):
    """Context manager: the model carries the patch(es) inside the block, its own weights after.

    The block holds the model's lock: another thread using ``patched`` on the same model waits
    until this block ends (nested blocks in one thread are fine).
    """
    pairs = [(patches, strength)] if isinstance(patches, ErasurePatch) else list(patches)
    with _applied(model).lock:
        handles = []
        try:
            for p, s in pairs:
                handles.append(apply_patch(model, p, s))
            yield handles
        finally:
            for h in reversed(handles):
                h.remove()


def merged_state_dict(canonical_sd: Mapping[str, torch.Tensor], patches: Iterable[tuple[ErasurePatch, float]],
                      name_map=lambda n: n) -> dict[str, torch.Tensor]:
    """A copy of the changed tensors of a state dict with patches added (for writing files).

    ``name_map`` turns a canonical name into the state dict's own key.
    """
    out: dict[str, torch.Tensor] = {}
    for patch, strength in patches:
        strength = check_strength(strength)
        for name, delta in patch.deltas.items():
            key = name_map(name)
            if key not in canonical_sd:
                raise PatchMismatchError(f"the checkpoint has no {key}; use a patch trained on this encoder")
            base = out.get(key, canonical_sd[key])
            if tuple(base.shape) != tuple(delta.shape):
                raise PatchMismatchError(f"patch tensor {name} does not fit {key} {tuple(base.shape)}; use a patch trained on this encoder")
            out[key] = (base.float() + strength * delta.float()).to(base.dtype)
    check_finite(out, "the patched weights", "nothing was written: lower the strength", PatchMismatchError)
    return out
