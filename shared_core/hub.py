"""Share erasure patches on the Hugging Face Hub: push, pull, list.

Repository layout (see docs/hub.md): one file per concept at the repo root,
``<concept-slug>.safetensors``, its diffusers-LoRA form ``<concept-slug>-diffusers-lora.safetensors``
and a generated ``README.md`` model card. ``pull`` also
accepts a folder layout ``<concept-slug>/patch.safetensors`` and any explicit filename.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import shlex
import threading
import time
import unicodedata
from typing import Any, Iterable

import torch

from .common import short_error, slug
from .errors import HirmError, PatchFileError
from .hub_errors import hub_error, http_status, offline
from .patch import ErasurePatch, decode_metadata, encoder_signatures, header_family, is_patch_file, load_patch, save_patch

TAGS = ("hirm", "concept-erasure", "safety-patch", "lora", "text-to-image", "stable-diffusion", "text-encoder")
_SERVES = {
    "clip-l": "SD 1.x (text encoder), SDXL (`clip_l`), SD3 and Flux (`clip_l`; Flux uses only its pooled vector)",
    "clip-g": "SDXL (`clip_g`, the OpenCLIP bigG encoder), SD3 (`clip_g`)",
    "clip-l+clip-g": "SDXL and its fine-tunes (both text encoders, `clip_l` and `clip_g`); on SD 1.x and Flux its `clip_l` half",
}


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
    _check_license(license)
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
    message = commit_message or "Add erasure patches: " + ", ".join(c for _, _, pt in patches for c in pt.concepts)
    try:
        api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
        info = api.create_commit(repo_id, ops, commit_message=message, token=token, repo_type="model")
    except HirmError:
        raise
    except Exception as e:
        raise HirmError(f"{repo_id}: upload to the Hugging Face Hub failed ({short_error(e)}); check the repo id, "
                        "your token's write access ('hf auth login') and the network") from None
    return {"repo": repo_id, "files": [name for _, name, _ in patches], "commit": getattr(info, "commit_url", None)}


def _num(v) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else "-"


_MD_ENTITIES = {"<": "&lt;", ">": "&gt;", "&": "&amp;"}
_MD_SYNTAX = set("\\`*_{}[]()!#+-.|~:=@$^")  # Markdown/GFM syntax (links, images, emphasis, tables, autolinks, math)


def _md(text) -> str:
    """Text from a patch file, a user or a repo as plain Markdown text, also inside a table cell: one line, every
    syntax character backslash-escaped and HTML's as entities, so it can form no link, image, HTML, emphasis, column,
    autolink or math; control and format characters shown as escapes."""
    return "".join(_MD_ENTITIES.get(c) or ("\\" + c if c in _MD_SYNTAX else c) for c in visible(" ".join(str(text).split())))


_CODE_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+/@=-]{0,199}")


def _code(text) -> str:
    """A file name or fingerprint as a code span when it is plain (letters, digits, ``._+/@=-``), else as ``_md`` text:
    in a code span nothing is escaped, so a backtick, '|' or newline there could end it or the table cell."""
    text = str(text)
    return f"`{text}`" if _CODE_SAFE.fullmatch(text) else _md(text)


def _shell(text: str, fallback: str) -> str:
    """``text`` quoted for a shell command shown in a code block, or ``fallback`` when text holds a character that is
    not printable (a line break would end the code block)."""
    return shlex.quote(text) if text.isprintable() else shlex.quote(fallback if fallback.isprintable() else "patch.safetensors")


_LICENSE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}")
_HUB_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def _check_license(license) -> str:
    import yaml

    if not (isinstance(license, str) and _LICENSE.fullmatch(license)) or yaml.safe_load(license) != license:
        raise HirmError(f"{license!r} is not a licence id for the model card; give one the Hub knows, e.g. openrail++, "
                        "apache-2.0, mit, cc-by-nc-4.0 or other")
    return license


def _front_matter(data) -> str:
    """The card's YAML front matter, checked: every line a plain ``key: value`` or ``- item`` and reading back as
    ``data`` (its values are ids checked above, so this only fails if that checking is wrong)."""
    import yaml

    text = data.to_yaml()
    plain = re.compile(r"[a-z_]+:( [A-Za-z0-9+._-]+)?|- [A-Za-z0-9._/+-]+")
    if not all(plain.fullmatch(line) for line in text.splitlines()) or yaml.safe_load(text) != data.to_dict():
        raise HirmError("the model card's front matter would not read back as written; nothing was uploaded")
    return text


def export_name(name: str) -> str:
    """The diffusers-LoRA companion of a patch file in a pushed repo."""
    return name[: -len(".safetensors")] + "-diffusers-lora.safetensors"


def model_card(repo_id: str, named_patches: list[tuple[str, ErasurePatch]], license: str = "openrail++") -> str:
    """README.md for a repo of patches (huggingface_hub's ModelCard): front matter the Hub reads (license,
    library_name, tags, base_model where a patch names a Hub model), what each patch erases, how to use it."""
    from huggingface_hub import ModelCard, ModelCardData

    from .report import REPORT_ROWS

    check_repo_id(repo_id)
    _check_license(license)
    # base_model: only values that are Hub model ids go into the front matter (a patch made on a local file names none)
    bases = sorted({b for _, p in named_patches if isinstance(b := p.metadata.get("base_model"), str) and _HUB_MODEL.fullmatch(b)
                    and ".." not in b and "--" not in b})
    data = ModelCardData(license=license, library_name="diffusers", tags=list(TAGS),
                         base_model=bases or None, base_model_relation="adapter" if bases else None)
    lines = [f"# Erasure patches: {_md(repo_id)}", "",
             "Text-encoder weight patches (HiRM) that erase concepts from Stable Diffusion / Flux prompts. Each "
             "`<concept>.safetensors` is a patch of weight differences (the stock LoRA loaders of ComfyUI and of A1111 "
             "on SD 1.x read it too); each `<concept>-diffusers-lora.safetensors` is the same patch as a diffusers LoRA "
             "(exact full-rank factors).", "",
             "| file | concepts | method | encoder | base fingerprint | serves |", "|---|---|---|---|---|---|"]
    for name, p in named_patches:
        lines.append(f"| {_code(name)} | {_md(', '.join(p.concepts))} | {_md(p.method)} | {_md(p.family)} | "
                     f"{_code(p.metadata.get('base_fingerprint', '?'))} | "
                     f"{_SERVES.get(p.family, f'a custom {_md(p.family)} encoder (no stock model family)')} |")
    lines += ["", "Flux reads only the pooled vector of CLIP-L, so a CLIP-L patch acts on Flux through that vector alone; "
              "the T5 encoder is untouched."]
    lines += ["", "## Text-level report", "",
              "Measured on the base encoder when the patch was made (cosine/drift of text embeddings)."]
    for name, p in named_patches:
        rep = p.report
        lines += ["", f"### {_code(name)}", ""]
        if not rep:
            lines.append("No report was stored with this patch.")
            continue
        lines += ["| measure | mean | worst | meaning |", "|---|---|---|---|"]
        for title, meaning, mean_key, worst_key in REPORT_ROWS:
            worst = rep.get(worst_key) if worst_key else None
            lines.append(f"| {title} | {_num(rep.get(mean_key))} | {_num(worst)} | {meaning} |")
    first = named_patches[0][0] if named_patches else "patch.safetensors"
    concept = named_patches[0][1].concepts[0] if named_patches and named_patches[0][1].concepts else first
    quoted = _shell(concept, first)  # a command people paste into a shell
    lines += ["", "## Use", "",
              "diffusers (text encoder LoRA; `pip install peft`):", "", "```python",
              f"pipe.load_lora_weights({json.dumps(repo_id)}, weight_name={json.dumps(export_name(first))}, adapter_name=\"erasure\")",
              "pipe.set_adapters([\"erasure\"], [1.0])  # strength; pipe.unload_lora_weights() removes it", "```", "",
              "CLI (`pip install hirm-erasure`):", "", "```", f"hirm pull {repo_id} {quoted} --out patches/", f"hirm ls {repo_id}",
              "```", "",
              f"ComfyUI: the \"Load Erasure Patch from Hub (HiRM)\" node (repo {_code(repo_id)}, file {_code(first)}), "
              "or put the file into `models/erasure_patches` or `models/loras` and use the stock Load LoRA node "
              "(`strength_clip`).", "",
              "A1111 / Forge: download it in the Erasure tab (*Download a patch from the Hugging Face Hub*: this repo and the "
              "concept) or put the file into `models/erasure_patches`, then pick it in the Erasure accordion.", "",
              "## Licence", "", f"{_md(license)}. The patches only remove; use them with the base model's own licence."]
    return str(ModelCard(f"---\n{_front_matter(data)}\n---\n\n" + "\n".join(lines) + "\n"))


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
    is taken only if its own header names that concept. Works offline from the cache when
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
    unreachable: BaseException | None = None  # the Hub could not be asked and the cache lacks the file
    others: list[str] = []  # files found at a concept's place that hold another concept
    for name in candidates:
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
            others.append(f"{name} ({', '.join(patch.concepts)})")
            continue
        sha = _revision_of(path) or revision
        patch = patch.with_metadata(source={"repo": repo_id, "revision": sha, "filename": name})
        if dest is not None:
            save_pulled(patch, dest, overwrite)
        return patch
    if unreachable is not None and not others:
        raise hub_error(unreachable, repo_id, wanted)
    where = "in the local cache (offline)" if local else "in the repo"
    held = f"; {', '.join(others)} hold(s) other concepts" if others else ""
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
