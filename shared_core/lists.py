"""Lists of concepts (and of prompts to keep) from a text file: one entry per line, ``#`` comments, blank lines skipped.

Every entry is checked before any model is loaded, each problem said in one line naming the line: a concept given
twice, one longer than CLIP reads (75 tokens), one holding characters a prompt cannot hold.
"""

from __future__ import annotations

import os
import unicodedata

from .common import TEXT_REFUSED
from .errors import HirmError

MAX_ENTRIES = 100_000


def read_lines(path: str, kind: str, layout: str) -> list[str]:
    """The lines of UTF-8 text file ``path`` (a ``kind`` file, laid out as ``layout``), or HirmError in one line."""
    if not os.path.isfile(path):
        raise HirmError(f"{path}: no such {kind} file; give a text file with {layout}")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except UnicodeDecodeError:
        raise HirmError(f"{path}: not a UTF-8 text file; save the {kind} as UTF-8 text, {layout}") from None
    except OSError as e:
        raise HirmError(f"{path}: cannot be read ({e.strerror}); check the file") from None


def read_list(path: str, what: str = "concept", tokens: int = 75, unique: bool = True) -> list[str]:
    """The entries of a list file, in order (``what`` names them in messages). Blank lines and lines starting with
    ``#`` are skipped; ``a | b | c`` stays one entry (a concept made of several terms, as ``--concept`` takes it)."""
    lines = read_lines(path, f"{what} list", f"one {what} per line")
    from .tokenizer import clip_tokenizer

    tokenizer = clip_tokenizer()
    entries: list[str] = []
    first_seen: dict[str, int] = {}
    for number, raw in enumerate(lines, 1):
        text = " ".join(raw.split())
        if not text or text.startswith("#"):
            continue
        bad = next((name for c in text if (name := TEXT_REFUSED.get(unicodedata.category(c)))), None)
        if bad:
            raise HirmError(f"{path} line {number}: the {what} holds {bad}; remove it")
        n = len(tokenizer(text, truncation=False, add_special_tokens=False)["input_ids"])
        if n > tokens:
            raise HirmError(f"{path} line {number}: the {what} is {n} tokens, CLIP reads at most {tokens}; shorten it")
        key = text.lower()
        if unique and key in first_seen:
            raise HirmError(f"{path} line {number}: {text[:60]!r} is given twice (first on line {first_seen[key]}); give each "
                            f"{what} once")
        first_seen.setdefault(key, number)
        entries.append(text)
        if len(entries) > MAX_ENTRIES:
            raise HirmError(f"{path}: more than {MAX_ENTRIES} entries; split the list")
    if not entries:
        raise HirmError(f"{path}: no {what} in the file (blank lines and '#' comments are skipped); write one {what} per line")
    return entries
