"""The patch folder (``models/erasure_patches``): listing, safe names, validated and cached loading."""

from __future__ import annotations

import os
from collections import OrderedDict

from shared_core.common import concept_list
from shared_core.errors import PatchFileError
from shared_core.patch import is_patch_file, load_patch

FOLDER_NAME = "erasure_patches"
_LOADED: OrderedDict = OrderedDict()  # (path, inode, mtime, size) -> ErasurePatch
_KEEP = 8


def list_patch_files(folder: str) -> list[str]:
    """The erasure patches under ``folder`` (subfolders too), as '/'-separated relative names, sorted: ``.safetensors``
    files whose header says they are erasure patches (a LoRA or a damaged file in the folder is not offered)."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in files:
            path = os.path.join(root, f)
            if f.endswith(".safetensors") and not f.startswith(".") and is_patch_file(path):  # not a half-written file
                found.append(os.path.relpath(path, folder).replace(os.sep, "/"))
    return sorted(found, key=str.lower)


def shown(folder: str) -> str:
    """The patch folder as messages name it (they reach API clients): relative to the webui's models folder,
    never the server's absolute path."""
    parent, name = os.path.split(os.path.normpath(folder))
    return f"models/{name}" if os.path.basename(parent) == "models" else name


def shown_file(path: str) -> str:
    """A file in the patch folder as messages name it (``models/erasure_patches/NAME``)."""
    return f"{shown(os.path.dirname(path))}/{os.path.basename(path)}"


def patch_path(folder: str, name: str) -> str:
    """Absolute path of patch ``name`` inside ``folder``; a name that leaves the folder is refused."""
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(root, *name.split("/")))
    if os.path.commonpath([root, path]) != root:
        raise PatchFileError(f"erasure patch {name!r} is outside {shown(folder)}; pick a file from the list")
    if not os.path.isfile(path):
        raise PatchFileError(f"erasure patch {name!r} is not in {shown(folder)}; put it there and press the refresh button")
    return path


def pull(folder: str, repo_id: str, concept_or_file: str, overwrite: bool = False, endpoint: str | None = None) -> str:
    """Download a patch from the Hugging Face Hub into ``folder`` (validated, atomic; see ``shared_core.hub.pull``);
    returns the status line for the Erasure tab."""
    from shared_core import hub

    repo_id = (repo_id or "").strip()
    if not repo_id:
        raise PatchFileError("give the Hub repository of the patch (org/name)")
    patch = hub.pull(repo_id, concept_or_file, endpoint=endpoint)
    target = os.path.join(folder, hub.pulled_name(patch))
    if os.path.exists(target) and not overwrite:
        raise PatchFileError(f"{shown_file(target)} already exists; tick 'overwrite' to replace it")
    hub.save_pulled(patch, folder, overwrite=overwrite)
    source = patch.metadata["source"]
    note = hub.checksum_note(patch)
    return (f"saved {shown_file(target)} ({concept_list(patch.concepts)}; from {source['repo']}/"
            f"{source['filename']} at {source['revision'][:12]}); press the refresh button in the Erasure accordion"
            + (f". {note}" if note else ""))


def load(folder: str, name: str):
    """The validated patch ``name`` (see ``shared_core.patch.load_patch``), cached while the file is unchanged."""
    path = patch_path(folder, name)
    stat = os.stat(path)
    key = (path, stat.st_ino, stat.st_mtime_ns, stat.st_size)  # patches are replaced by rename: a new inode
    if key not in _LOADED:
        try:
            _LOADED[key] = load_patch(path)
        except PatchFileError as e:  # the message reaches API clients: the folder's shown name, never the server's path
            raise PatchFileError(str(e).replace(path, shown_file(path))) from None
        while len(_LOADED) > _KEEP:
            _LOADED.popitem(last=False)
    _LOADED.move_to_end(key)
    return _LOADED[key]
