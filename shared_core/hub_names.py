"""Names on the Hub, checked before any request: repo ids, file names asked of a repo, the file names patches are stored
under, and text from a repo or a patch made safe to print."""

from __future__ import annotations

import re
import unicodedata

from .common import slug
from .errors import HirmError


def concept_slug(concept: str) -> str:
    """File-name form of a concept (``common.slug``): safe, bounded, and different for different concepts."""
    return slug(concept.strip(), empty="patch")


_INVISIBLE = ("Cc", "Cf", "Cs", "Co", "Zl", "Zp")  # controls, format (bidi overrides, zero-width), surrogates, private use, line breaks


def visible(text) -> str:
    """``text`` safe to print on a terminal or show in a UI: every control, format or line-breaking character as its
    escape (``\\x1b``, ``\\u202e``), so that no escape sequence reaches the terminal and no newline forges a line."""
    out = []
    for c in str(text):
        if unicodedata.category(c) not in _INVISIBLE:
            out.append(c)
        else:
            n = ord(c)
            out.append(f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}")
    return "".join(out)


def check_repo_id(repo_id) -> str:
    """``repo_id`` if it is a Hugging Face repo id (``owner/name``: letters, digits, '-', '_', '.'), else a one-line
    HirmError; checked before any request, so that a typo is not reported as an unreachable Hub."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
        if not repo_id:
            raise HFValidationError("empty")
    except HFValidationError:
        raise HirmError(f"{repo_id!r} is not a Hugging Face repo id; give it as owner/name (letters, digits, '-', '_' and "
                        "'.', at most 96 characters), e.g. me/erasure-patches") from None
    return repo_id


_RESERVED = '<>:"|?*'  # characters Windows file names cannot hold (':' would also name a drive or a stream)


def check_repo_filename(name: str) -> str:
    """A file asked of a repo by name (``van-gogh.safetensors``, ``van-gogh/patch.safetensors``): plain names separated
    by '/', none empty, hidden ('.' first) or a path component ('.', '..'); no backslash, absolute path, control
    character or character a file name cannot hold. One-line HirmError saying what is wrong, before any request."""
    def bad(why: str) -> HirmError:
        return HirmError(f"{name!r} is not a file name in a repo: {why}; give a concept name, or a file of the repo such as "
                         "van-gogh.safetensors or van-gogh/patch.safetensors")

    if any(unicodedata.category(c) in _INVISIBLE for c in name):
        raise bad("it holds control characters")
    if "\\" in name:
        raise bad("a backslash is a path separator, not part of a file name")
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        raise bad("it is an absolute path (or names a drive)")
    parts = name.split("/")
    if any(p in (".", "..") for p in parts):
        raise bad("'..' and '.' are path components, not file names")
    if any(not p for p in parts):
        raise bad("it has an empty folder name ('//' or a '/' at the end)")
    if parts[-1] == ".safetensors":
        raise bad("there is no name before '.safetensors'")
    if any(p.startswith(".") for p in parts):
        raise bad("a name starting with '.' is a hidden file")
    if reserved := sorted({c for c in name if c in _RESERVED}):
        raise bad(f"file names cannot hold {' '.join(reserved)}")
    return name


def export_name(name: str) -> str:
    """The diffusers-LoRA companion of a patch file in a pushed repo."""
    return name[: -len(".safetensors")] + "-diffusers-lora.safetensors"
