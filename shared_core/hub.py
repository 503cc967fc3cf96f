"""Share erasure patches on the Hugging Face Hub: push, pull, list.

Repository layout (see docs/hub.md): one file per concept at the repo root,
``<concept-slug>.safetensors``, plus a generated ``README.md`` model card. ``pull`` also
accepts a folder layout ``<concept-slug>/patch.safetensors`` and any explicit filename.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable

import torch

from .common import short_error, slug
from .errors import HirmError, PatchFileError
from .patch import ErasurePatch, decode_metadata, load_patch, save_patch

TAGS = ("hirm", "concept-erasure", "safety-patch", "stable-diffusion", "text-encoder", "safetensors")
_SERVES = {
    "clip-l": "SD 1.x (text encoder), SDXL (`clip_l`), SD3 and Flux (`clip_l`; Flux uses only its pooled vector)",
    "clip-g": "SDXL (`clip_g`, the OpenCLIP bigG encoder), SD3 (`clip_g`)",
}


def concept_slug(concept: str) -> str:
    """File-name form of a concept (``common.slug``): safe, bounded, and different for different concepts."""
    return slug(concept.strip(), empty="patch")


# ----------------------------------------------------------------------------------------------
# push


def push(patch_files: Iterable[str], repo_id: str, *, private: bool = False, token: str | None = None,
         commit_message: str | None = None, license: str = "openrail++", api=None) -> dict[str, Any]:
    """Upload patch files and a generated model card to ``repo_id`` in one commit.

    Each file is validated first and stored as ``<concept-slug>.safetensors``. Creates the repo
    if needed. Returns {"repo": ..., "files": [...], "commit": url-or-None}.
    """
    paths = list(patch_files)
    if not paths:
        raise HirmError("nothing to push; pass one or more patch files (.safetensors)")
    patches: list[tuple[str, str, ErasurePatch]] = []
    seen: dict[str, str] = {}
    for p in paths:
        patch = load_patch(p)
        name = concept_slug("-".join(patch.concepts)) + ".safetensors"
        if name in seen:
            raise HirmError(f"{p} and {seen[name]} would both be stored as {name}; push them to separate repos or retrain one")
        seen[name] = p
        patches.append((p, name, patch))
    if api is None:
        from huggingface_hub import HfApi
        api = HfApi()
    from huggingface_hub import CommitOperationAdd

    card = model_card(repo_id, [(name, patch) for _, name, patch in patches], license=license)
    ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=p) for p, name, _ in patches]
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


def model_card(repo_id: str, named_patches: list[tuple[str, ErasurePatch]], license: str = "openrail++") -> str:
    """README.md for a repo of patches: front matter with tags, what each patch erases, how to use it."""
    from .report import REPORT_ROWS

    lines = ["---", f"license: {license}", "library_name: hirm", "tags:"]
    lines += [f"- {t}" for t in TAGS]
    lines += ["---", "", f"# Erasure patches: {repo_id}", "",
              "Text-encoder weight patches (HiRM) that erase concepts from Stable Diffusion / Flux prompts. "
              "Each file is a small safetensors patch of weight differences, loadable as a LoRA-style diff.", "",
              "| file | concepts | method | encoder | base fingerprint | serves |", "|---|---|---|---|---|---|"]
    for name, p in named_patches:
        lines.append(f"| `{name}` | {', '.join(p.concepts)} | {p.method} | {p.family} | "
                     f"`{p.metadata.get('base_fingerprint', '?')}` | {_SERVES.get(p.family, f'a custom {p.family} encoder (no stock model family)')} |")
    lines += ["", "Flux reads only the pooled vector of CLIP-L, so a CLIP-L patch acts on Flux through that vector alone; "
              "the T5 encoder is untouched."]
    lines += ["", "## Text-level report", "",
              "Measured on the base encoder when the patch was made (cosine/drift of text embeddings)."]
    for name, p in named_patches:
        rep = p.report
        lines += ["", f"### `{name}`", ""]
        if not rep:
            lines.append("No report was stored with this patch.")
            continue
        lines += ["| measure | mean | worst | meaning |", "|---|---|---|---|"]
        for title, meaning, mean_key, worst_key in REPORT_ROWS:
            worst = rep.get(worst_key) if worst_key else None
            lines.append(f"| {title} | {_num(rep.get(mean_key))} | {_num(worst)} | {meaning} |")
    first = named_patches[0][0] if named_patches else "patch.safetensors"
    concept = named_patches[0][1].concepts[0] if named_patches and named_patches[0][1].concepts else first
    lines += ["", "## Use", "",
              "CLI:", "", "```", f"hirm pull {repo_id} \"{concept}\" --out patches/", f"hirm ls {repo_id}", "```", "",
              "Python / diffusers:", "", "```python",
              "from shared_core.hub import pull", "from shared_core.patch import apply_patch",
              f"patch = pull(\"{repo_id}\", \"{concept}\")",
              "handle = apply_patch(pipe.text_encoder, patch, strength=1.0)  # handle.remove() restores it",
              "```", "",
              f"ComfyUI: the \"Load Erasure Patch from Hub\" node (repo `{repo_id}`, file `{first}`), "
              "or download the file into `models/loras` and use the stock LoRA loader.", "",
              "A1111 / Forge: pick the patch from the Hub dropdown of the extension, or put the file into the "
              "extension's patch folder.", "",
              "## Licence", "", f"{license}. The patches only remove; use them with the base model's own licence."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# pull


def _candidates(concept_or_filename: str) -> list[str]:
    s = concept_or_filename.strip().strip("/")
    if s.endswith(".safetensors"):
        return [s]
    slug = concept_slug(s)
    out = [f"{s}/patch.safetensors", f"{slug}.safetensors", f"{slug}/patch.safetensors"]
    return list(dict.fromkeys(out))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_error(e: BaseException, repo_id: str, what: str) -> HirmError:
    from huggingface_hub import errors as he

    if isinstance(e, he.RepositoryNotFoundError):  # also what the Hub answers for a private repo without a token
        return HirmError(f"{repo_id}: repository not found on the Hugging Face Hub (or private: log in with 'hf auth login' or pass a token)")
    if isinstance(e, he.RevisionNotFoundError):
        return HirmError(f"{repo_id}: revision {what!r} does not exist; pass a branch, tag or commit sha of the repo")
    if isinstance(e, he.GatedRepoError):
        return HirmError(f"{repo_id}: gated repository; accept its terms on the Hub and log in")
    if isinstance(e, he.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            return HirmError(f"{repo_id}: access denied ({status}); it is private: log in with 'hf auth login' or pass a token")
        return HirmError(f"{repo_id}: the Hugging Face Hub refused the request ({short_error(e)})")
    return HirmError(f"{repo_id}: the Hugging Face Hub cannot be reached and no cached copy of {what} exists "
                     f"({type(e).__name__}); connect once, or pull a local file")


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
         endpoint: str | None = None) -> ErasurePatch:
    """Fetch a patch through huggingface_hub's cache and return it validated.

    ``concept_or_filename`` is a file in the repo, a folder holding ``patch.safetensors``, or a
    concept name (found as ``<slug>.safetensors``). Works offline from the cache when
    HF_HUB_OFFLINE is set or ``local_files_only`` is true; when the network is down it falls back
    to the cache. With ``dest`` the patch is also saved atomically into that folder, its metadata
    recording ``source`` = {"repo", "revision" (commit sha), "filename"}.
    """
    from huggingface_hub import errors as he

    local = bool(local_files_only) or _offline()
    path = filename = None
    unreachable: BaseException | None = None  # the Hub could not be asked and the cache lacks the file
    for name in _candidates(concept_or_filename):
        try:
            path = _download(repo_id, name, revision, cache_dir, local, token, endpoint)
            filename = name
            break
        except (he.RepositoryNotFoundError, he.RevisionNotFoundError, he.GatedRepoError) as e:
            raise _hub_error(e, repo_id, revision or concept_or_filename) from None
        except he.LocalEntryNotFoundError as e:
            if not local:
                unreachable = e
        except he.EntryNotFoundError:
            continue
        except he.HfHubHTTPError as e:
            raise _hub_error(e, repo_id, concept_or_filename) from None
        except Exception as e:  # connection dropped, truncated transfer...: the cache may still have it
            try:
                path = _download(repo_id, name, revision, cache_dir, True, token, endpoint)
                filename = name
                break
            except Exception:
                unreachable = e
    if path is None:
        if unreachable is not None:
            raise _hub_error(unreachable, repo_id, concept_or_filename)
        where = "in the local cache (offline)" if local else "in the repo"
        raise HirmError(f"{repo_id}: no patch {concept_or_filename!r} {where}; tried "
                        f"{', '.join(_candidates(concept_or_filename))}; list them with 'hirm ls {repo_id}'")
    try:
        patch = load_patch(path)
    except PatchFileError as e:
        raise PatchFileError(f"{repo_id}/{filename}: {str(e).split(': ', 1)[-1]}") from None
    sha = _revision_of(path) or revision
    patch = ErasurePatch(patch.deltas, {**patch.metadata, "source": {"repo": repo_id, "revision": sha, "filename": filename}})
    if dest is not None:
        save_pulled(path, patch, dest)
    return patch


def save_pulled(cached_path: str, patch: ErasurePatch, dest: str) -> str:
    """Save a pulled patch into folder ``dest`` atomically, named after its repo file, with ``source`` metadata."""
    name = os.path.basename(patch.metadata["source"]["filename"])
    if name == "patch.safetensors":
        name = os.path.basename(os.path.dirname(patch.metadata["source"]["filename"])) + ".safetensors"
    out = os.path.join(dest, name)
    # keep the stored dtype of the original file (save_patch writes atomically)
    dtype = getattr(torch, patch.metadata.get("delta_dtype", "float16"), torch.float16)
    meta = {k: v for k, v in patch.metadata.items() if k != "delta_dtype"}
    save_patch(ErasurePatch(patch.deltas, meta), out, dtype=dtype)
    return out


# ----------------------------------------------------------------------------------------------
# list


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def list_patches(repo_id: str, revision: str | None = None, token: str | None = None, api=None,
                 endpoint: str | None = None) -> list[dict[str, Any]]:
    """Patches in a repo, from their safetensors headers only (no full download).

    Lists the repo's ``.safetensors`` files, then reads each header with a range request.
    Rows: filename, concepts, method, family, size (bytes of tensor data), base_fingerprint,
    base_signature, report. Files that are safetensors but not patches are skipped.
    """
    if api is None:
        from huggingface_hub import HfApi
        api = HfApi(endpoint=endpoint)
    try:
        files = [f for f in api.list_repo_files(repo_id, revision=revision, token=token) if f.endswith(".safetensors")]
    except Exception as e:
        raise _hub_error(e, repo_id, revision or "the file list") from None
    rows = []
    for filename in sorted(files):
        try:
            fm = api.parse_safetensors_file_metadata(repo_id, filename, revision=revision, token=token)
        except Exception as e:
            if type(e).__name__ == "SafetensorsParsingError":
                continue
            raise _hub_error(e, repo_id, filename) from None
        try:
            meta = decode_metadata(fm.metadata or {}, f"{repo_id}/{filename}")
        except PatchFileError:
            continue
        size = sum(_DTYPE_BYTES.get(t.dtype, 4) * math.prod(t.shape) for t in fm.tensors.values())
        rows.append({"filename": filename, "concepts": list(meta.get("concepts", [])), "method": meta.get("method"),
                     "family": (meta.get("encoder") or {}).get("family", "clip-l"), "size": size,
                     "base_fingerprint": meta.get("base_fingerprint"), "base_signature": meta.get("base_signature"),
                     "report": meta.get("report")})
    return rows
