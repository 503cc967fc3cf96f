"""Atomic output: write to a temporary sibling, then rename into place (never a half-written file)."""

from __future__ import annotations

import os
import shutil
import tempfile


def atomic_write(path: str, write, folder: bool = False) -> str:
    """Call ``write(tmp)`` for a temporary sibling of ``path`` (a file, or a folder with ``folder``), then rename it."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mktemp(prefix=".tmp-hirm-", suffix=os.path.splitext(path)[1], dir=parent)
    try:
        write(tmp)
        if folder and os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.unlink(tmp)
    return path
