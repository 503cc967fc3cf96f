"""Erasure patch files: the patch value, its file format, validation and atomic writing (applying: ``apply.py``).

A patch is a safetensors file of weight differences (``delta = W_trained - W_base``) with
metadata. Tensor names follow the full-weight-difference convention of ComfyUI's and A1111's
LoRA loaders (``lora_te_text_model_encoder_layers_0_self_attn_q_proj.diff`` for a weight,
``.diff_b`` for a bias), so the same file also works in their stock LoRA loaders. The format
is documented in docs/patch-format.md.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .. import __version__
from ..common import concept_list
from ..encoders import encoder_architecture, signature_id
from ..errors import HirmError, PatchFileError, PatchMismatchError
from .metadata import (FORMAT_NAME, FORMAT_VERSION, JSON_FIELDS, META_PREFIX, PART_FIELDS, SAFETENSORS_DTYPES, check_metadata,
                       checksum, decode_metadata, verify_checksum)

SINGLE_FORMAT_VERSION = 2
_FAMILY_KEY_PREFIX = {"clip-g": "lora_te2_"}  # everything else (clip-l) uses lora_te_
# a multi-encoder patch names its halves as the stock SDXL LoRA loaders do (ComfyUI, A1111): te1 = clip_l, te2 = clip_g
COMPONENT_KEY_PREFIX = {"clip_l": "lora_te1_", "clip_g": "lora_te2_"}
MAX_TENSORS = 4096  # far above any real patch (a whole CLIP-G is 580 tensors): a bigger header is refused unread
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


# ----------------------------------------------------------------------------------------------
# Names: canonical parameter name <-> key in the file


def component_of_family(family: str) -> str:
    """The text encoder a patch of ``family`` belongs to in a model: ``clip_g`` for CLIP-G, ``clip_l`` for any other."""
    return "clip_g" if family == "clip-g" else "clip_l"


def file_key(canonical: str, family: str, component: str | None = None) -> str:
    """The file's key for a canonical tensor: ``lora_te_``/``lora_te2_`` by family, or, in a multi-encoder patch,
    ``lora_te1_``/``lora_te2_`` by ``component``."""
    module, kind = canonical.rsplit(".", 1)
    if kind not in ("weight", "bias"):
        raise HirmError(f"cannot store {canonical} in a patch (only weights and biases)")
    prefix = COMPONENT_KEY_PREFIX[component] if component else _FAMILY_KEY_PREFIX.get(family, "lora_te_")
    return prefix + module.replace(".", "_") + (".diff" if kind == "weight" else ".diff_b")


def key_component(key: str) -> str | None:
    """The component a multi-encoder patch's key belongs to (``lora_te1_``: clip_l, ``lora_te2_``: clip_g)."""
    return next((c for c, prefix in COMPONENT_KEY_PREFIX.items() if key.startswith(prefix)), None)


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
    (lists/dicts for the JSON fields). A patch for several encoders of one model (SDXL) has no
    deltas of its own: ``parts`` maps each component (``clip_l``, ``clip_g``) to a single-encoder
    patch, whose metadata is the shared metadata plus that encoder's ``PART_FIELDS``.
    Treat instances as immutable: hosts share them.
    """

    deltas: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)
    parts: dict[str, "ErasurePatch"] = field(default_factory=dict)

    @classmethod
    def combine(cls, parts: Mapping[str, "ErasurePatch"], metadata: Mapping[str, Any]) -> "ErasurePatch":
        """One patch for several encoders: ``parts`` by component, ``metadata`` shared (its own ``PART_FIELDS`` dropped)."""
        if not parts or any(c not in COMPONENT_KEY_PREFIX for c in parts):
            raise HirmError(f"a multi-encoder patch holds {' and '.join(COMPONENT_KEY_PREFIX)} parts, not {sorted(parts)}")
        shared = {k: v for k, v in metadata.items() if k not in PART_FIELDS}
        own = {c: ErasurePatch(parts[c].deltas, {**shared, **{k: parts[c].metadata[k] for k in PART_FIELDS if k in parts[c].metadata}})
               for c in COMPONENT_KEY_PREFIX if c in parts}  # always clip_l, then clip_g
        if len(own) == 1:
            return next(iter(own.values()))
        shared["encoder"] = {"family": "+".join(p.family for p in own.values())}
        shared["base_fingerprint"] = "+".join(str(p.metadata.get("base_fingerprint")) for p in own.values())
        return cls({}, shared, own)

    @property
    def components(self) -> list[str]:
        """The model components this patch changes (``clip_l``, ``clip_g``)."""
        return list(self.parts) if self.parts else [component_of_family(self.family)]

    def part(self, component: str) -> "ErasurePatch | None":
        """The single-encoder patch for ``component``, or None when this patch does not change that encoder."""
        if self.parts:
            return self.parts.get(component)
        return self if component_of_family(self.family) == component else None

    def for_encoder(self, model) -> "ErasurePatch":
        """The single-encoder patch that fits ``model`` (itself, or the part of the same architecture)."""
        if not self.parts:
            return self
        arch = encoder_architecture(model)
        for p in self.parts.values():
            if (p.encoder.get("hidden_size"), p.encoder.get("num_layers")) == (arch["hidden_size"], arch["num_layers"]):
                return p
        raise PatchMismatchError(f"this patch is for {self.family} but the encoder is {arch['family']}; use a patch trained "
                                 "on this encoder")

    def with_metadata(self, **fields) -> "ErasurePatch":
        """A copy with ``fields`` set in the shared metadata (and in every part's)."""
        return ErasurePatch(self.deltas, {**self.metadata, **fields},
                            {c: p.with_metadata(**fields) for c, p in self.parts.items()})

    def with_deltas(self, fn) -> "ErasurePatch":
        """A copy whose every delta is ``fn(delta)`` (e.g. rounded to the stored dtype)."""
        return ErasurePatch({n: fn(d) for n, d in self.deltas.items()}, self.metadata,
                            {c: p.with_deltas(fn) for c, p in self.parts.items()})

    def per_encoder(self) -> list["ErasurePatch"]:
        """The single-encoder patches this patch is made of (itself, or its parts)."""
        return list(self.parts.values()) or [self]

    def tensor_count(self) -> int:
        return len(self.deltas) + sum(len(p.deltas) for p in self.parts.values())

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

    def describe(self) -> str:
        """One line for logs and UIs."""
        return (f"{concept_list(self.concepts)} [{self.method}] on {self.family}, "
                f"{self.tensor_count()} tensors, base {self.metadata.get('base_fingerprint', '?')}")


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
    """The tensors and string metadata that make up the file (format 2: every field under ``hirm.``; format 3 for a
    multi-encoder patch: its parts' tensors under ``lora_te1_``/``lora_te2_`` and their own fields in ``components``)."""
    def stored(deltas, key):
        return {key(k): v.detach().to("cpu", dtype).contiguous() for k, v in sorted(deltas.items())}

    if patch.parts:
        tensors = {}
        for component, part in patch.parts.items():
            tensors.update(stored(part.deltas, lambda k, c=component: file_key(k, part.family, c)))
        fields = {k: v for k, v in patch.metadata.items() if k not in PART_FIELDS}
        fields["components"] = {c: {k: p.metadata[k] for k in PART_FIELDS if k in p.metadata} for c, p in patch.parts.items()}
        version = FORMAT_VERSION
    else:
        tensors = stored(patch.deltas, lambda k: file_key(k, patch.family))
        fields, version = dict(patch.metadata), SINGLE_FORMAT_VERSION
    fields = {k: v for k, v in fields.items() if k not in ("format", "format_version", "delta_dtype", "checksum")}
    meta = {"format": "pt", META_PREFIX + "format": FORMAT_NAME, META_PREFIX + "format_version": str(version),
            META_PREFIX + "delta_dtype": str(dtype).replace("torch.", ""), META_PREFIX + "checksum": checksum(tensors)}
    for k, v in fields.items():
        meta[META_PREFIX + k] = json.dumps(v) if k in JSON_FIELDS or not isinstance(v, str) else v
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
    from ..files import atomic_write, write_safetensors

    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise HirmError(f"patches are stored as float16, bfloat16 or float32, not {dtype}")
    for part in patch.per_encoder():
        check_finite(part.deltas, "the patch")
    tensors, meta = patch_to_safetensors(patch, dtype)
    check_finite(tensors, f"the patch stored as {dtype}")
    if any(bool(d.any()) for p in patch.per_encoder() for d in p.deltas.values()) and not any(bool(t.any()) for t in tensors.values()):
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


def encoder_signatures(meta: Mapping[str, Any]) -> dict[str, list[float]]:
    """{component: base signature} of a patch's decoded metadata (one entry for a single-encoder patch)."""
    components = meta.get("components")
    if components is not None:
        return {c: own.get("base_signature") or [] for c, own in components.items()}
    return {component_of_family((meta.get("encoder") or {}).get("family", "clip-l")): meta.get("base_signature") or []}


def header_family(meta: Mapping[str, Any]) -> tuple[str, str]:
    """(family, base fingerprint) of a patch's decoded metadata, as ``ErasurePatch.family`` and ``describe`` show them."""
    components = meta.get("components")
    if components is not None:
        return ("+".join((own.get("encoder") or {}).get("family", "?") for own in components.values()),
                "+".join(str(own.get("base_fingerprint")) for own in components.values()))
    return (meta.get("encoder") or {}).get("family", "clip-l"), str(meta.get("base_fingerprint"))


def read_metadata(path: str) -> dict[str, Any]:
    """Validated, decoded metadata of a patch file, reading only its header."""
    return read_header(path)[0]


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
    """Names, dtypes and shapes of a patch's tensors (from its header) against its declared encoder(s)."""
    if not shapes:
        raise PatchFileError(f"{where}: the patch holds no tensors")
    if len(shapes) > MAX_TENSORS:
        raise PatchFileError(f"{where}: {len(shapes)} tensors, far more than any erasure patch holds; the file is damaged")
    components = meta.get("components")
    for key, (dtype, shape) in shapes.items():
        name = canonical_name(key)
        component = key_component(key) if components is not None else None
        if name is None or (components is not None and component not in components):
            raise PatchFileError(f"{where}: unexpected tensor {key!r} in a patch; the file is damaged or not a patch")
        if dtype not in _FLOAT_DTYPES:
            raise PatchFileError(f"{where}: tensor {key} is {dtype}; patches hold float16/bfloat16/float32 differences: the file is damaged")
        expected = expected_shape(name, components[component]["encoder"] if component else meta["encoder"])
        if tuple(shape) != expected:
            raise PatchFileError(f"{where}: tensor {key} has shape {tuple(shape)}, expected {expected}; the file is damaged")
    if components is not None and set(components) - {key_component(k) for k in shapes}:
        raise PatchFileError(f"{where}: the patch declares {', '.join(components)} but holds no tensors for some; the file is damaged")


def validate_patch(tensors: Mapping[str, torch.Tensor], meta: dict[str, Any], where: str) -> ErasurePatch:
    """An ``ErasurePatch`` from a file's tensors and decoded metadata, or PatchFileError (the one validator)."""
    check_metadata(meta, where)
    check_tensor_table({k: (SAFETENSORS_DTYPES.get(v.dtype, str(v.dtype)), tuple(v.shape)) for k, v in tensors.items()}, meta, where)
    check_finite(tensors, where, "the file is damaged: download or train it again", PatchFileError)
    verify_checksum(tensors, meta, where)
    components = meta.get("components")
    if components is None:
        return ErasurePatch({canonical_name(k): v for k, v in tensors.items()}, dict(meta))
    shared = {k: v for k, v in meta.items() if k != "components"}
    parts = {c: ErasurePatch({canonical_name(k): v for k, v in tensors.items() if key_component(k) == c}, {**shared, **own})
             for c, own in components.items()}
    return ErasurePatch.combine(parts, shared)


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


