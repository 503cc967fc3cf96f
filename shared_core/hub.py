"""Share erasure patches on the Hugging Face Hub: push, pull, list (names: hub_names.py; the model card: hub_card.py).

Over 400 lines because push, pull and ls share one deadline and one cache discipline (``Deadline``, partial blobs).
Repository layout (docs/hub.md): one file per patch at the repo root, ``<concept-slug>.safetensors``, its diffusers-LoRA
form ``<concept-slug>-diffusers-lora.safetensors`` and a generated ``README.md``; ``pull`` also accepts a folder layout
``<concept-slug>/patch.safetensors`` and any explicit file name.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import threading
import time
from typing import Any, Iterable

import torch

from .common import concept_list, short_error
from .errors import HirmError, PatchFileError
from .hub_card import check_license, model_card  # noqa: F401  (model_card: also hub's API)
from .hub_errors import hub_error, http_status, offline, unreachable_error, unresolvable
from .hub_names import check_repo_filename, check_repo_id, concept_slug, export_name, visible  # noqa: F401  (visible: also hub's API)
from .patch import ErasurePatch, decode_metadata, encoder_signatures, header_family, is_patch_file, load_patch, save_patch


# ----------------------------------------------------------------------------------------------
# push


def push(patch_files: Iterable[str], repo_id: str, *, private: bool = False, token: str | None = None,
         commit_message: str | None = None, license: str = "openrail++", api=None) -> dict[str, Any]:
    """Upload patch files and a generated model card to ``repo_id`` in one commit.

    Each file is validated first and stored as ``<concept-slug>.safetensors``, its diffusers LoRA as
    ``<concept-slug>-diffusers-lora.safetensors``; two patches that would write one name (the same concept, or one
    named like the other's companion: "cat diffusers lora" beside "cat") are refused before anything is sent, as are
    a repo id or licence id that is not one. Creates the repo if needed. Returns {"repo": ..., "files": [...],
    "commit": url-or-None}.
    """
    paths = list(patch_files)
    if not paths:
        raise HirmError("nothing to push; pass one or more patch files (.safetensors)")
    check_repo_id(repo_id)
    check_license(license)
    patches: list[tuple[str, str, ErasurePatch]] = []
    written: dict[str, tuple[str, str]] = {}  # every file name the commit writes -> (patch file, what it is of that patch)
    for p in paths:
        patch = load_patch(p)
        name = concept_slug("-".join(patch.concepts)) + ".safetensors"
        for file, role in ((name, "patch"), (export_name(name), "diffusers LoRA")):
            if file in written:  # refused, never resolved by renaming: a repo's names are what 'hirm pull' looks up
                other, other_role = written[file]
                raise HirmError(f"the {role} of {visible(p)} and the {other_role} of {visible(other)} would both be stored as "
                                f"{file} in {repo_id}; nothing was uploaded: push them to separate repos")
            written[file] = (p, role)
        patches.append((p, name, patch))
    if api is None:
        if (no_name := unresolvable()) is not None:
            raise unreachable_error(repo_id, no_name)
        from huggingface_hub import HfApi
        api = HfApi()
    from huggingface_hub import CommitOperationAdd

    card = model_card(repo_id, [(name, patch) for _, name, patch in patches], license=license)
    from .export import to_diffusers_lora
    from .files import write_safetensors

    ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=p) for p, name, _ in patches]
    for _, name, patch in patches:  # the diffusers form beside each patch (fp16 full-rank factors: exact up to fp16)
        tensors, meta, _ = to_diffusers_lora(patch, dtype=torch.float16)
        buffer = io.BytesIO()
        write_safetensors(buffer, tensors, meta)
        ops.append(CommitOperationAdd(path_in_repo=export_name(name), path_or_fileobj=buffer.getvalue()))
    ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
    message = commit_message or "Add erasure patches: " + concept_list([c for _, _, pt in patches for c in pt.concepts], 10)
    try:
        api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
        info = api.create_commit(repo_id, ops, commit_message=message, token=token, repo_type="model")
    except HirmError:
        raise
    except Exception as e:
        raise HirmError(f"{repo_id}: upload to the Hugging Face Hub failed ({short_error(e)}); check the repo id, "
                        "your token's write access ('hf auth login') and the network") from None
    return {"repo": repo_id, "files": [name for _, name, _ in patches], "commit": getattr(info, "commit_url", None)}


# ----------------------------------------------------------------------------------------------
# waiting for the Hub: one deadline per command, quiet retries, one line per kind of failure

DEFAULT_TIMEOUT = 60.0  # seconds for a whole pull / ls (CLI --timeout; the nodes and the extension use it too)
_HTTP_LOGGERS = ("huggingface_hub.utils._http", "huggingface_hub.file_download", "huggingface_hub")


class Deadline:
    """Time left for one command's Hub requests; ``run`` gives up on a call that outlives it.

    huggingface_hub's own per-request timeouts and retries stay as they are (they differ between
    its versions); the call runs in a worker thread and is abandoned at the deadline: its HTTP
    session is closed so that the transfer stops, and the partial blobs it left are removed.
    """

    def __init__(self, seconds: float | None = None):
        seconds = DEFAULT_TIMEOUT if seconds is None else float(seconds)
        if not (math.isfinite(seconds) and 0 < seconds <= 86400):
            raise HirmError(f"the Hub timeout must be a number of seconds from 0 to 86400, got {seconds:g}")
        self.seconds, self.end = seconds, time.monotonic() + seconds

    def run(self, call, repo_id: str, cache_dir: str | None = None):
        remaining = self.end - time.monotonic()
        if remaining <= 0:
            raise self.expired(repo_id)
        before = _partial_blobs(repo_id, cache_dir)
        result: dict = {}

        def work():
            try:
                result["value"] = call()
            except BaseException as e:  # handed to the caller's thread
                result["error"] = e

        quiet = [(logging.getLogger(n), logging.getLogger(n).level) for n in _HTTP_LOGGERS]
        for logger, _ in quiet:  # no "Retrying in 1s [Retry 1/5]" lines: the outcome is one line of ours
            logger.setLevel(logging.ERROR)
        try:
            worker = threading.Thread(target=work, name="hirm-hub", daemon=True)
            worker.start()
            worker.join(remaining)
            if worker.is_alive():
                _stop_transfers()
                worker.join(1)  # a worker still blocked is abandoned (a daemon thread); its partial blob is removed below
        finally:
            for logger, level in quiet:
                logger.setLevel(level)
        if "value" in result:
            return result["value"]
        _remove_new_partials(repo_id, cache_dir, before)
        if "error" in result:
            raise result["error"]
        raise self.expired(repo_id)

    def expired(self, repo_id: str) -> HirmError:
        return HirmError(f"{repo_id}: the Hugging Face Hub did not answer within {self.seconds:g} s; nothing was saved: "
                         "try again later, or allow more time (--timeout)")


def _repo_cache(repo_id: str, cache_dir: str | None) -> str:
    from huggingface_hub import constants

    return os.path.join(cache_dir or constants.HF_HUB_CACHE, "models--" + repo_id.replace("/", "--"), "blobs")


def _partial_blobs(repo_id: str, cache_dir: str | None) -> set[str]:
    folder = _repo_cache(repo_id, cache_dir)
    try:
        return {f for f in os.listdir(folder) if f.endswith(".incomplete")}
    except OSError:
        return set()


def _remove_new_partials(repo_id: str, cache_dir: str | None, before: set[str]) -> None:
    folder = _repo_cache(repo_id, cache_dir)
    for name in _partial_blobs(repo_id, cache_dir) - before:
        try:
            os.unlink(os.path.join(folder, name))
        except OSError:
            pass


def _stop_transfers() -> None:
    """Close huggingface_hub's shared HTTP session (it makes a new one on the next call)."""
    import huggingface_hub

    for name in ("close_session", "reset_sessions"):  # 1.x and newer / 0.x
        fn = getattr(huggingface_hub, name, None) or getattr(getattr(huggingface_hub, "utils", None), name, None)
        if fn is not None:
            try:
                fn()
            except Exception:
                pass
            return


# ----------------------------------------------------------------------------------------------
# pull


def _candidates(concept_or_filename: str) -> list[str]:
    s = concept_or_filename.strip()
    if s.endswith(".safetensors"):
        return [check_repo_filename(s)]
    s = s.strip("/")
    slug = concept_slug(s)
    out = [f"{slug}.safetensors", f"{slug}/patch.safetensors"]
    if re.fullmatch(r"[\w\- ][\w.\- ]{0,99}", s, flags=re.ASCII):  # a folder named as typed (ASCII, bounded, never '..' or hidden)
        out.insert(1, f"{s}/patch.safetensors")
    return list(dict.fromkeys(out))


def _same_concept(a: str, b: str) -> bool:
    return " ".join(a.lower().split()) == " ".join(b.lower().split())


def _download(repo_id: str, filename: str, revision, cache_dir, local_files_only, token, endpoint) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                           local_files_only=local_files_only, token=token, endpoint=endpoint)


def _revision_of(path: str) -> str | None:
    # cache layout: .../snapshots/<commit sha>/<filename>
    parts = os.path.normpath(path).split(os.sep)
    if "snapshots" in parts:
        i = len(parts) - 1 - parts[::-1].index("snapshots")
        if i + 1 < len(parts):
            return parts[i + 1]
    return None


def pull(repo_id: str, concept_or_filename: str, revision: str | None = None, cache_dir: str | None = None,
         local_files_only: bool | None = None, dest: str | None = None, token: str | None = None,
         endpoint: str | None = None, timeout: float | None = None, overwrite: bool = False) -> ErasurePatch:
    """Fetch a patch through huggingface_hub's cache and return it validated.

    ``concept_or_filename`` is a file in the repo, or a concept name: then the files where a patch
    for it would be (``<slug>.safetensors``, ``<concept>/patch.safetensors``) are tried, and one
    is taken only if its own header names that concept; when none does, the headers of the repo's patches are read
    (``list_patches``) and a file whose concepts include it (a patch for a list of concepts) is taken. Works offline from the cache when
    HF_HUB_OFFLINE is set or ``local_files_only`` is true; when the network is down it falls back
    to the cache. Everything waits at most ``timeout`` seconds in all (default ``DEFAULT_TIMEOUT``).
    With ``dest`` the patch is also saved atomically into that folder (an existing file there only
    with ``overwrite``), its metadata recording ``source`` = {"repo", "revision" (commit), "filename"}.
    A file name is checked before any request (``check_repo_filename``: no '..', absolute path, backslash or hidden
    name). The file is validated by ``load_patch`` (checksum included) before anything is saved; a damaged patch is
    also removed from the cache. ``metadata.get("checksum")`` is None for a file written before checksums.
    """
    from huggingface_hub import errors as he

    wanted = (concept_or_filename or "").strip()
    if not wanted:
        raise HirmError("give a concept name or a file name to pull")
    check_repo_id(repo_id)
    candidates = _candidates(wanted)  # a file name is checked here: no path, no hidden file, before any request
    if dest is not None and os.path.exists(dest) and not os.path.isdir(dest):
        raise HirmError(f"--out {dest} is not a folder; give the folder to save the patch into")
    deadline = Deadline(timeout)
    by_concept = not wanted.endswith(".safetensors")
    local = bool(local_files_only) or offline()
    no_name = None if local else unresolvable(endpoint)  # no network at all: the cache only, without 24 s of retries
    local = local or no_name is not None
    unreachable: BaseException | None = None  # the Hub could not be asked and the cache lacks the file
    others: list[str] = []  # files found at a concept's place that hold another concept
    searched = None  # the patches whose headers were read for the concept (a file of several concepts)
    pending = list(candidates)
    while True:
        for name in pending:
            fetch = lambda only_cache: deadline.run(  # noqa: E731
                lambda: _download(repo_id, name, revision, cache_dir, only_cache, token, endpoint), repo_id, cache_dir)
            try:
                path = fetch(local)
            except (he.RepositoryNotFoundError, he.RevisionNotFoundError, he.GatedRepoError) as e:
                raise hub_error(e, repo_id, revision or wanted) from None
            except he.LocalEntryNotFoundError as e:
                if not local:
                    unreachable = e
                    if http_status(e) is not None:  # the Hub answered with an error after its own retries: the other files fare no better
                        break
                continue
            except he.EntryNotFoundError:
                continue
            except HirmError:
                raise
            except he.HfHubHTTPError as e:
                raise hub_error(e, repo_id, wanted) from None
            except Exception as e:  # connection dropped, truncated transfer...: the cache may still have it
                try:
                    path = fetch(True)
                except Exception:
                    unreachable = e
                    continue
            try:
                patch = load_patch(path)  # all of it: metadata, names, dtypes, shapes, finite values, checksum
            except PatchFileError as e:
                if is_patch_file(path):  # a damaged patch (not some other file of the repo): not kept to be used again
                    _drop_cached(path, repo_id, cache_dir)
                raise PatchFileError(f"{repo_id}/{name}: {str(e).split(': ', 1)[-1]}") from None
            if by_concept and not any(_same_concept(c, wanted) for c in patch.concepts):
                others.append(f"{name} ({concept_list(patch.concepts)})")
                continue
            sha = _revision_of(path) or revision
            patch = patch.with_metadata(source={"repo": repo_id, "revision": sha, "filename": name})
            if dest is not None:
                save_pulled(patch, dest, overwrite)
            return patch
        if searched is not None or not by_concept or local or unreachable is not None:
            break
        remaining = deadline.end - time.monotonic()
        if remaining <= 0:
            raise deadline.expired(repo_id)
        searched = list_patches(repo_id, revision=revision, token=token, endpoint=endpoint, timeout=remaining)
        pending = [r["filename"] for r in searched if r["filename"] not in candidates
                   and any(_same_concept(c, wanted) for c in r["concepts"])]
    if unreachable is not None and not others:
        raise hub_error(unreachable, repo_id, wanted)
    if no_name is not None:
        raise unreachable_error(repo_id, no_name, wanted)
    where = "in the local cache (offline)" if local else "in the repo"
    held = f"; {', '.join(others)} hold(s) other concepts" if others else ""
    if searched is not None:
        held += f"; no other of its {len(searched)} patch file(s) names it"
    raise HirmError(f"{repo_id}: no patch for {wanted!r} {where} (tried {', '.join(candidates)}{held}); "
                    f"list them with 'hirm ls {repo_id}'")


def _drop_cached(path: str, repo_id: str, cache_dir: str | None) -> None:
    """Remove a cached file that failed validation (its snapshot entry and the blob behind it), so that the next pull
    downloads it again instead of reading the damaged copy; only inside this repo's cache folder."""
    root = os.path.realpath(os.path.dirname(_repo_cache(repo_id, cache_dir)))
    inside = lambda p: os.path.commonpath([root, p]) == root  # noqa: E731
    try:
        link = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
        blob = os.path.realpath(path)
        if not inside(link):
            return
        os.unlink(link)
        if blob != link and inside(blob):
            os.unlink(blob)
    except (OSError, ValueError):
        pass


def checksum_note(patch: ErasurePatch) -> str | None:
    """The one line every host shows for a pulled patch written before checksums (None for one that has a checksum)."""
    if patch.metadata.get("checksum"):
        return None
    name = visible((patch.metadata.get("source") or {}).get("filename") or "this patch")
    return (f"note: {name} has no checksum (written before hirm stored one): its tensors were checked for shape and "
            "finite values, but damage or a changed header cannot be detected")


def pulled_name(patch: ErasurePatch) -> str:
    """The file name a pulled patch is saved under: its repo file's, or (for ``<concept>/patch.safetensors``) its concepts'."""
    name = os.path.basename(check_repo_filename(patch.metadata["source"]["filename"]))
    return concept_slug("-".join(patch.concepts)) + ".safetensors" if name == "patch.safetensors" else name


def save_pulled(patch: ErasurePatch, dest: str, overwrite: bool = False) -> str:
    """Save a pulled patch into folder ``dest`` atomically, named after its repo file (or its concepts), with
    ``source`` metadata; its deltas keep the dtype they have in the file."""
    name = pulled_name(patch)
    dtypes = {t.dtype for p in patch.per_encoder() for t in p.deltas.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    return save_patch(patch, os.path.join(dest, name), dtype=dtype, overwrite=overwrite)


# ----------------------------------------------------------------------------------------------
# list


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def list_patches(repo_id: str, revision: str | None = None, token: str | None = None, api=None,
                 endpoint: str | None = None, timeout: float | None = None, skipped: list | None = None) -> list[dict[str, Any]]:
    """Patches in a repo, from their safetensors headers only (no full download), within ``timeout`` seconds in all.

    Lists the repo's ``.safetensors`` files, then reads each header with a range request. Rows:
    filename, concepts, method, family, size (bytes of tensor data), base_fingerprint,
    base_signatures ({component: signature}), report, checksum (None for a file written before checksums). Files that are not patches are left out; a file whose header cannot be
    read or is damaged is left out too, and ``(filename, reason)`` is added to ``skipped`` if given.
    """
    check_repo_id(repo_id)
    if api is None:
        if (no_name := unresolvable(endpoint)) is not None:
            raise unreachable_error(repo_id, no_name)
        from huggingface_hub import HfApi
        api = HfApi(endpoint=endpoint)
    deadline = Deadline(timeout)
    try:
        files = deadline.run(lambda: [f for f in api.list_repo_files(repo_id, revision=revision, token=token)
                                      if str(f).endswith(".safetensors")], repo_id)
    except Exception as e:
        raise hub_error(e, repo_id, revision or "the file list") from None
    rows = []
    for filename in sorted(files):
        try:
            fm = deadline.run(lambda: api.parse_safetensors_file_metadata(repo_id, filename, revision=revision, token=token), repo_id)
        except HirmError as e:
            if "did not answer within" in str(e):
                raise
            _skip(skipped, filename, str(e))
            continue
        except Exception as e:
            if type(e).__name__ in ("SafetensorsParsingError", "NotASafetensorsRepoError"):
                continue
            if isinstance(e, (OSError, ValueError)) and http_status(e) is None and "RepositoryNotFound" not in type(e).__name__:
                _skip(skipped, filename, short_error(e))
                continue
            error = hub_error(e, repo_id, filename)
            if http_status(e) in (401, 403, 429) or (http_status(e) or 0) >= 500:
                raise error from None
            _skip(skipped, filename, str(error))
            continue
        try:
            meta = decode_metadata(fm.metadata or {}, f"{repo_id}/{filename}")
        except PatchFileError as e:
            if "not an erasure patch" not in str(e):
                _skip(skipped, filename, str(e).split(": ", 1)[-1])
            continue
        size = sum(_DTYPE_BYTES.get(t.dtype, 4) * math.prod(t.shape) for t in fm.tensors.values())
        family, fingerprint = header_family(meta)
        rows.append({"filename": filename, "concepts": list(meta.get("concepts", [])), "method": meta.get("method"),
                     "family": family, "size": size, "base_fingerprint": fingerprint,
                     "base_signatures": encoder_signatures(meta), "report": meta.get("report"), "checksum": meta.get("checksum")})
    return rows


def _skip(skipped: list | None, filename: str, reason: str) -> None:
    if skipped is not None:
        skipped.append((filename, reason))
