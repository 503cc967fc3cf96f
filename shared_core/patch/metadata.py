"""A patch file's metadata: decoded from safetensors' text fields into typed values and checked against the schema
(docs/patch-format.md), and the checksum over its tensors. What ``load_patch`` accepts, ``inspect`` calls valid.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any, Mapping

import torch

from ..common import is_plain_text
from ..errors import PatchFileError

FORMAT_NAME = "hirm-erasure-patch"
# 2: metadata under the "hirm." prefix, "format" = "pt" (the safetensors convention); 1 still read.
# 3: a patch for several encoders of one model (SDXL's clip_l and clip_g); a single-encoder patch is still written as 2.
FORMAT_VERSION = 3
META_PREFIX = "hirm."
COMPONENTS = ("clip_l", "clip_g")
PART_FIELDS = ("encoder", "base_signature", "base_fingerprint")  # what each encoder of a multi-encoder patch has of its own
JSON_FIELDS = ("concepts", "config", "encoder", "base_signature", "report", "format_version", "train_seconds",
               "report_seconds", "source", "components")
SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}


def checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """"sha256:..." over every tensor's name, dtype, shape and bytes (in name order): what a file's tensors must give
    back when read. A changed header (another dtype or shape over the same bytes) or a flipped bit changes it."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}\0{SAFETENSORS_DTYPES.get(t.dtype, str(t.dtype))}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def verify_checksum(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], where: str, what: str = "patch") -> None:
    """PatchFileError when ``meta`` holds a checksum the tensors do not give; files written before checksums pass
    (``inspect`` says they have none)."""
    stored = meta.get("checksum")
    if stored is not None and checksum(tensors) != stored:
        raise PatchFileError(f"{where}: the tensors do not match the {what}'s checksum (damaged data, or a header changed "
                             "after writing); download or make it again")


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
        if k in JSON_FIELDS:
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
    return isinstance(value, str) and len(value) <= limit and is_plain_text(value)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(value, lo: int = 1, hi: int = 1_000_000) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def check_metadata(meta: Mapping[str, Any], where: str) -> None:
    """The typed schema of a patch's metadata (docs/patch-format.md); PatchFileError naming the first bad field."""
    components = meta.get("components")
    if components is not None:  # a multi-encoder patch: each encoder's own fields are checked as a single patch's
        if not isinstance(components, dict) or not components or set(components) - set(COMPONENTS):
            raise _damaged(where, f"components must map {' / '.join(COMPONENTS)} to their encoders")
        shared = {k: v for k, v in meta.items() if k not in ("components", *PART_FIELDS)}
        for c, own in components.items():
            if not isinstance(own, dict):
                raise _damaged(where, f"components {c} must be a JSON object")
            check_metadata({**shared, **own}, f"{where} ({c})")
        return
    for k in ("method", "concepts", "encoder", "base_fingerprint", "base_signature"):
        if k not in meta:
            raise _damaged(where, f"no {k!r}")
    concepts = meta["concepts"]
    if not isinstance(concepts, list) or not concepts or not all(_text(c) and c.strip() for c in concepts):
        raise _damaged(where, "concepts must be a list of texts without control characters")
    if not _text(meta["method"], 200) or not meta["method"]:
        raise _damaged(where, "method")
    if "checksum" in meta and not (isinstance(meta["checksum"], str) and re.fullmatch(r"sha256:[0-9a-f]{64}", meta["checksum"])):
        raise _damaged(where, "checksum must be 'sha256:' and 64 hexadecimal digits")
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
            elif k == "measured_on":
                if not _text(v, 64):
                    raise _damaged(where, "report measured_on must be a short text")
            elif k == "per_concept":
                if not (isinstance(v, list) and len(v) <= 100_000 and all(
                        isinstance(row, list) and len(row) == 3 and _text(row[0]) and all(x is None or _number(x) for x in row[1:])
                        for row in v)):
                    raise _damaged(where, "report per_concept must be rows of [concept, target cosine, pooled cosine]")
            elif k == "per_concept_total":
                if not _count(v, 0):
                    raise _damaged(where, "report per_concept_total must be a whole number")
            elif v is not None and not _number(v):
                raise _damaged(where, f"report {k} must be a number")
    source = meta.get("source")
    if source is not None and not (isinstance(source, dict) and all(v is None or _text(v) for v in source.values())):
        raise _damaged(where, "source must hold texts")
