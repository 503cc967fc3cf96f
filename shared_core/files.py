"""Every file the project writes goes through here: atomic, never over something it did not make.

The rule (docs/patch-format.md, "Writing files"): a path that exists is replaced only when the
caller says so (``overwrite``: a --force flag, an overwrite toggle) AND ``is_ours(path)`` says it
is a file of this tool's own kind (a patch, an operator file, a grid); never a folder, a device,
a link or anything else. Content goes to an unnamed temporary file in the same folder
(``O_TMPFILE``), is flushed to disk and only then linked into place, so a write killed at any
moment leaves nothing behind. Where the file system has no unnamed files, a named one
(``.tmp-hirm-<pid>-...``) is used and removed on any error; one left by a killed process is
removed by the next write into that folder.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import stat
import struct
import time
from typing import TYPE_CHECKING, BinaryIO, Callable, Mapping

from .errors import HirmError

if TYPE_CHECKING:  # the annotations only: this module imports without torch
    import torch

TEMP_PREFIX = ".tmp-hirm-"
_STALE = re.compile(re.escape(TEMP_PREFIX) + r"(\d+)-")


class WriteRefused(HirmError):
    """The target exists and may not be replaced, or cannot be written."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def sweep_stale_temporaries(folder: str, older_than: float = 60.0) -> None:
    """Remove ``.tmp-hirm-<pid>-*`` files and folders in ``folder`` whose process is gone (nothing else)."""
    try:
        entries = os.listdir(folder)
    except OSError:
        return
    now = time.time()
    for name in entries:
        m = _STALE.match(name)
        if not m or _alive(int(m.group(1))):
            continue
        path = os.path.join(folder, name)
        try:
            if now - os.lstat(path).st_mtime < older_than:
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
        except OSError:
            pass


def check_target(path: str, overwrite: bool = False, is_ours: Callable[[str], bool] | None = None,
                 what: str = "file", force_hint: str = "replace it with --force (overwrite=True in Python)") -> None:
    """Raise ``WriteRefused`` unless ``path`` is free, or an existing file of ours the caller may replace."""
    if path.endswith(os.sep) or (os.altsep and path.endswith(os.altsep)):
        raise WriteRefused(f"{path}: give a file name, not a folder")
    if not os.path.lexists(path):
        parent = os.path.dirname(os.path.abspath(path))
        if os.path.exists(parent) and not os.path.isdir(parent):
            raise WriteRefused(f"{path}: {parent} is not a folder")
        return
    mode = os.lstat(path).st_mode
    if stat.S_ISDIR(mode):
        raise WriteRefused(f"{path} is a folder; give a file name for the {what}")
    if not stat.S_ISREG(mode):
        raise WriteRefused(f"{path} exists and is not a regular file (a link, device or pipe); nothing was written: choose another name")
    if not overwrite:
        raise WriteRefused(f"{path} already exists; {force_hint}, or choose another name")
    if is_ours is not None and not is_ours(path):
        raise WriteRefused(f"{path} exists and is not {_article(what)} {what} written by this tool; it is never replaced: choose "
                           "another name")


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def check_writable_folder(folder: str, what: str) -> None:
    """Raise ``WriteRefused`` unless this process could write in ``folder``, or make it: the folder itself when it
    exists, else the nearest folder on its way that does, must be a folder it may write in (not on a read-only file
    system, not without permission). ``what`` starts the message ("--out eval/"). Said before any work; a write that
    fails anyway is still one line."""
    probe = os.path.abspath(folder)
    while not os.path.lexists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise WriteRefused(f"{what}: {probe} is not a folder; choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise WriteRefused(f"{what}: cannot write in {probe} (a read-only place, or no permission); choose a folder "
                           "you can write to")


def _write_errors() -> tuple:
    """What a failed write raises: OSError, and safetensors' own error (its I/O errors, a full disk included, are not
    OSErrors)."""
    try:
        from safetensors import SafetensorError
    except ImportError:
        return (OSError,)
    return (OSError, SafetensorError)


def write_failure(e: BaseException) -> str:
    """The cause of a failed write, short, for a message: the OS's words ("No space left on device")."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    m = re.search(r"\(os error (\d+)\)", str(e))  # safetensors: "... I/O error: No space left on device (os error 28) ..."
    if m:
        return os.strerror(int(m.group(1)))
    from .common import short_error

    return short_error(e, 120)


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str, write: Callable[[BinaryIO], None], *, overwrite: bool = False,
                 is_ours: Callable[[str], bool] | None = None, what: str = "file",
                 force_hint: str = "replace it with --force (overwrite=True in Python)", durable: bool = True, sweep: bool = True) -> str:
    """Write ``path`` atomically: ``write(f)`` fills a binary file object; the file appears only when complete.

    See the module docstring for the rule on existing paths. Any OS error (a read-only folder, a
    full disk) is one ``WriteRefused`` line, and nothing is left behind. ``durable=False`` skips the
    fsyncs (the write stays atomic for a killed process, not for a power cut: for many small files
    that can be made again, such as an evaluation's images); ``sweep=False`` leaves the folder's
    stale temporaries to a caller that swept them once.
    """
    check_target(path, overwrite, is_ours, what, force_hint)
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
        if sweep:
            sweep_stale_temporaries(parent)
        try:
            _write_unnamed(path, parent, write, overwrite, durable)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT, errno.EXDEV) or not hasattr(os, "O_TMPFILE"):
                raise
            _write_named(path, parent, write, overwrite, durable)
    except WriteRefused:
        raise
    except FileExistsError:
        raise WriteRefused(f"{path} appeared while it was being written; nothing was replaced: choose another name") from None
    except _write_errors() as e:
        raise WriteRefused(f"cannot write {path} ({write_failure(e)}); nothing was written") from None
    return path


def _write_unnamed(path: str, parent: str, write, overwrite: bool, durable: bool = True) -> None:
    if not hasattr(os, "O_TMPFILE"):
        raise OSError(errno.EOPNOTSUPP, "no unnamed temporary files")
    fd = os.open(parent, os.O_TMPFILE | os.O_WRONLY, _umask_mode())
    with os.fdopen(fd, "wb") as f:
        write(f)
        f.flush()
        if durable:
            os.fsync(f.fileno())
        source = f"/proc/self/fd/{f.fileno()}"
        if not overwrite or not os.path.exists(path):
            os.link(source, path, follow_symlinks=True)  # fails if the name appeared meanwhile: never clobbers
        else:
            tmp = os.path.join(parent, f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}")
            os.link(source, tmp, follow_symlinks=True)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
    if durable:
        _fsync_folder(parent)


def _write_named(path: str, parent: str, write, overwrite: bool, durable: bool = True) -> None:
    tmp = os.path.join(parent, f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}{os.path.splitext(path)[1]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _umask_mode())
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # no-clobber
            os.unlink(tmp)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    if durable:
        _fsync_folder(parent)


def atomic_folder(path: str, write: Callable[[str], None], what: str = "folder") -> str:
    """Create folder ``path`` (which must not exist) atomically: ``write(tmp)`` fills a temporary folder of ours
    beside it, which is then renamed into place. An existing path is never touched."""
    if os.path.lexists(path):
        raise WriteRefused(f"{path} already exists; an output {what} is never written over anything: give a new folder name")
    parent = os.path.dirname(os.path.abspath(path.rstrip(os.sep) or path))
    tmp = os.path.join(parent, f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.makedirs(parent, exist_ok=True)
        sweep_stale_temporaries(parent)
        os.mkdir(tmp)
        write(tmp)
        for root, _, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb+") as f:
                    os.fsync(f.fileno())
        if os.path.lexists(path):
            raise WriteRefused(f"{path} appeared while it was being written; nothing was replaced")
        os.rename(tmp, path)
        _fsync_folder(parent)
    except WriteRefused:
        raise
    except _write_errors() as e:  # a full disk, an I/O error, in our code or in a writer such as save_pretrained
        raise WriteRefused(f"cannot write {path} ({write_failure(e)}); nothing was written") from None
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return path


# ---------------------------------------------------------------------------------------------- safetensors

_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
           "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}
# safetensors lays tensors out by its dtype order (largest first), then by name
_RANK = {n: i for i, n in enumerate(("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
                                     "F64", "I64", "U64"))}


_SIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4,
         "F32": 4, "F64": 8, "I64": 8, "U64": 8}


def _info(tensors, name: str) -> tuple[str, tuple[int, ...]]:
    """(safetensors dtype code, shape) of one entry, without reading it when the mapping can tell (``info``)."""
    if hasattr(tensors, "info"):
        dtype, shape = tensors.info(name)
        code = dtype if isinstance(dtype, str) else _DTYPES[str(dtype).replace("torch.", "")]
        return code, tuple(shape)
    t = tensors[name]
    return _DTYPES[str(t.dtype).replace("torch.", "")], tuple(t.shape)


def write_safetensors(f: BinaryIO, tensors: Mapping[str, "torch.Tensor"], metadata: Mapping[str, str] | None = None) -> None:
    """Stream ``tensors`` into ``f`` in the safetensors format (the same bytes as ``safetensors.torch.save``).

    safetensors' own ``save_file`` writes through a temporary file of its own next to the target,
    which a killed process leaves behind; streaming into our unnamed file avoids that, and a
    checkpoint of several GB is read and written one tensor at a time, never held in memory whole.
    """
    import math

    import torch

    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    info = {k: _info(tensors, k) for k in tensors.keys()}
    order = sorted(info, key=lambda k: (-_RANK[info[k][0]], k))
    offset = 0
    for name in order:
        code, shape = info[name]
        n = math.prod(shape) * _SIZE[code]
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name in order:
        t = tensors[name].detach().contiguous().cpu()
        if (_DTYPES[str(t.dtype).replace("torch.", "")], tuple(t.shape)) != info[name]:
            raise HirmError(f"tensor {name} changed while it was being written")
        if t.numel():
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
