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


def concept_list(concepts, shown: int = 5) -> str:
    """A list of concepts for one line (logs, tables, model cards): the first ``shown``, then "and N more"."""
    concepts = list(concepts)
    head = ", ".join(concepts[:shown]) or "?"
    return head + (f" and {len(concepts) - shown} more" if len(concepts) > shown else "")


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


# ---------------------------------------------------------------------------------------------- checks at the edge
# One rule per kind of value a user types, the same in every entry point (CLI, ComfyUI, A1111), each a one-line
# HirmError that says what is wrong without echoing anything a terminal would act on.

# Seeds: what torch.Generator.manual_seed takes without wrapping, and what a HiRM config allows (hirm/config.py).
SEED_RANGE = (0, 2**63 - 1)
# Classifier-free guidance: finite, from 0 (none) to 100 (far beyond any useful value; A1111's slider stops at 30).
GUIDANCE_RANGE = (0.0, 100.0)
# Characters a concept or prompt may not hold (unicodedata categories): control characters (Cc: NUL, ESC, line breaks,
# tabs), invisible format characters (Cf: zero-width characters, bidi controls), line and paragraph separators (Zl,
# Zp), and surrogates (Cs: a lone surrogate is not valid Unicode and cannot be encoded or tokenized).
TEXT_REFUSED = {"Cc": "a control character", "Cf": "an invisible format character (zero-width or bidi control)",
                "Zl": "a line separator", "Zp": "a paragraph separator", "Cs": "a lone surrogate (not valid Unicode)"}


def _shown_number(value) -> str:
    """``value`` for a message; an integer too long to be worth printing (or to convert) is described instead."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return f"a number of {value.bit_length()} bits"
    return repr(value)


def check_seed(seed, what: str = "seed") -> int:
    """``seed`` as an int, or HirmError, one line: a whole number (not text, not True/False) within ``SEED_RANGE``."""
    lo, hi = SEED_RANGE
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not lo <= seed <= hi:
        raise HirmError(f"{what} must be a whole number from 0 to 2^63-1, got {_shown_number(seed)}")
    return int(seed)


def parse_seed(text: str, what: str = "seed") -> int:
    """A seed written as text ("3", "3.0", "1e3") -> int, by ``check_seed``'s rule; "3.5", "1e400", "nan" are refused."""
    from decimal import Decimal, InvalidOperation

    shown = repr(text.strip()[:40])
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise HirmError(f"{what} must be a whole number from 0 to 2^63-1, got {shown}") from None
    lo, hi = SEED_RANGE
    if not value.is_finite() or value != value.to_integral_value() or not lo <= value <= hi:  # compared exactly, never
        raise HirmError(f"{what} must be a whole number from 0 to 2^63-1, got {shown}")  # turned into a huge int
    return int(value)


def check_guidance(guidance, what: str = "guidance") -> float:
    """``guidance`` as a float, or HirmError, one line: a number (not text, not True/False), finite, within
    ``GUIDANCE_RANGE``."""
    lo, hi = GUIDANCE_RANGE
    if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real) or not (math.isfinite(guidance) and lo <= guidance <= hi):
        raise HirmError(f"{what} must be a number from {lo:g} to {hi:g}, got {_shown_number(guidance)}")
    return float(guidance)


def safe_text(text: str, limit: int = 60) -> str:
    """``text`` quoted for a message or a terminal: every character ``check_text`` refuses written as an escape
    (``\\x1b``, ``\\u200b``), at most ``limit`` characters of it."""
    shown = "".join(ascii(ch)[1:-1] if unicodedata.category(ch) in TEXT_REFUSED else ch for ch in text[:limit])
    return f"'{shown}{'...' if len(text) > limit else ''}'"


def is_plain_text(text) -> bool:
    """True for a str without any character of ``TEXT_REFUSED`` (``check_text``'s rule, as a test)."""
    return isinstance(text, str) and not any(unicodedata.category(ch) in TEXT_REFUSED for ch in text)


def check_text(value, what: str = "text") -> str:
    """``value`` unchanged, or HirmError, one line: text (a str) without any character of ``TEXT_REFUSED``: no control
    characters (NUL, ESC, line breaks), no zero-width or bidi controls, no lone surrogates (not valid Unicode)."""
    if not isinstance(value, str):
        raise HirmError(f"{what} must be text, got {type(value).__name__}")
    for i, ch in enumerate(value):
        kind = TEXT_REFUSED.get(unicodedata.category(ch))
        if kind:
            raise HirmError(f"{what} {safe_text(value)} holds {kind}, U+{ord(ch):04X}, at character {i + 1}: remove it "
                            "(type plain text)")
    return value
