"""Small helpers every entry point uses: one-line errors, lists typed in a box, safe file names, devices."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import numbers
import os
import re
import unicodedata

from .errors import HirmError


def short_error(e: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (its type when it has none), at most ``limit`` characters."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


def split_list(text: str, what: str | None = None) -> list[str]:
    """Entries typed one per line or comma-separated, blanks dropped; with ``what``, none at all is an error."""
    if text is not None and not isinstance(text, str):
        raise HirmError(f"expected text for the {what or 'list'}, got {type(text).__name__}")
    items = [c.strip() for c in re.split(r"[\n,]", text or "") if c.strip()]
    if what and not items:
        raise HirmError(f"no {what} given: type at least one (one per line or comma-separated)")
    return items


def slug(text: str, limit: int = 60, empty: str = "concept") -> str:
    """A file-name form of ``text``: lower-case ASCII letters, digits and '-', at most ``limit`` + 9 characters.

    Text that does not survive that exactly (other scripts, accents, cut to ``limit``) gets a
    short hash of the whole text appended, so two different concepts never share a name.
    """
    ascii_text = unicodedata.normalize("NFKD", text or "").encode("ascii", "ignore").decode()
    base = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    exact = base == re.sub(r"[^a-z0-9]+", "-", (text or "").lower()).strip("-") and len(base) <= limit and base
    base = base[:limit].strip("-")
    if exact:
        return base
    digest = hashlib.sha256((text or "").encode("utf-8")).hexdigest()[:8]
    return f"{base}-{digest}" if base else f"{empty}-{digest}"


def resolve_device(device: str | None) -> str:
    """A torch device name for "auto" (CUDA when present), "cpu", "cuda", "cuda:N" or "mps"; anything else is refused."""
    import torch

    name = (device or "auto").strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if re.fullmatch(r"cuda(:\d+)?", name):
        if not torch.cuda.is_available():
            raise HirmError(f"device {device}: CUDA is not available here; use cpu")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise HirmError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
        return name
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise HirmError("device mps: Apple's MPS backend is not available here; use cpu")
        return name
    raise HirmError(f"device {device!r} is not supported; use auto, cpu, cuda, cuda:N or mps")


# The strengths every entry point accepts: beyond 4x the trained change a patch stops meaning anything
# (and large values overflow fp16 weights); negative values undo an erasure, which is allowed.
STRENGTH_RANGE = (-4.0, 4.0)
STRENGTH_HELP = "1: the patch as trained; 0: no change; negative values undo an erasure (from -4 to 4)"


def check_strength(strength, what: str = "strength") -> float:
    """``strength`` as a float, or HirmError, one line, the same in every host: a number (not text, not True/False),
    finite, within ``STRENGTH_RANGE``."""
    lo, hi = STRENGTH_RANGE
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not (math.isfinite(strength) and lo <= strength <= hi):
        raise HirmError(f"{what} must be a number from {lo:g} to {hi:g}, got {strength!r}")
    return float(strength)


def parse_patch_arg(text: str) -> tuple[str, float]:
    """``FILE`` or ``FILE:STRENGTH`` -> (file, strength); the strength is checked (finite, within ``STRENGTH_RANGE``)."""
    path, sep, tail = text.rpartition(":")
    if os.path.exists(text) or not sep or not path:
        return text, 1.0
    try:
        value = float(tail)
    except ValueError:
        if re.fullmatch(r"[\w.+-]*", tail) and not tail.endswith(".safetensors"):
            raise HirmError(f"--patch {text}: write FILE or FILE:STRENGTH (e.g. vangogh.safetensors:0.8)") from None
        return text, 1.0  # a colon inside the path (C:\...)
    return path, check_strength(value, f"--patch {text}: the strength")


def setting(default, help: str, *, lo=None, hi=None, open_range: bool = False, choices=None, operator: bool = False):
    """A config field described once: its help, range or choices feed the CLI help, the ComfyUI tooltips and the
    A1111 labels (``describe``). ``operator`` (NLCE): built into a ConceptSet's bases when operators are built."""
    return dataclasses.field(default=default, metadata={"help": help, "lo": lo, "hi": hi, "open": open_range,
                                                        "choices": choices, "operator": operator})


def describe(config_cls, name: str, with_range: bool = True) -> str:
    """The one description of a setting of ``config_cls`` with its range or choices and default."""
    f = {f.name: f for f in dataclasses.fields(config_cls)}[name]
    m = f.metadata
    text = m["help"]
    if with_range and m.get("choices"):
        text += f" ({' / '.join(m['choices'])})"
    elif with_range and (m.get("lo") is not None or m.get("hi") is not None):
        lo, hi = m["lo"], m["hi"]
        text += f" (from {lo:g} to {hi:g})" if hi is not None else f" (above {lo:g})" if m["open"] else f" (at least {lo:g})"
    default = f.default if f.default is not dataclasses.MISSING else None
    return text + (f"; default {default}" if default not in (None, (), "") else "")
