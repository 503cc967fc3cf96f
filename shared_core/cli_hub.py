"""`hirm push`, `hirm pull`, `hirm ls`: the Hub subcommands.

``add_parsers(subparsers)`` adds them to the main parser. Errors are HirmError, printed by the
main CLI. Everything printed that comes from a repo (file names, concepts, metadata) goes through
``hub.visible``: no terminal escape sequence, no forged line.
"""

from __future__ import annotations

from . import hub
from .common import concept_list
from .hub import visible

TIMEOUT_HELP = f"seconds to wait for the Hub in all (default {hub.DEFAULT_TIMEOUT:g})"


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("push", help="upload patch files and a model card to a Hugging Face repo (one commit)")
    p.add_argument("files", nargs="+", help="patch files (.safetensors)")
    p.add_argument("--repo", required=True, help="repo id, e.g. user/erasure-patches")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--token", default=None, help="Hugging Face token (default: the logged-in one)")
    p.set_defaults(func=lambda a: run_push(a.files, a.repo, private=a.private, token=a.token))
    p = subparsers.add_parser("pull", help="download a patch from a Hugging Face repo (validated, cached)")
    p.add_argument("repo", help="repo id")
    p.add_argument("concept", help="concept name, folder or filename in the repo")
    p.add_argument("--revision", default=None, help="branch, tag or commit sha to pin")
    p.add_argument("--out", default=None, help="folder to save the patch into (default: only the Hub cache)")
    p.add_argument("--force", action="store_true", help="replace a patch of the same name in --out (never any other file)")
    p.add_argument("--token", default=None)
    p.add_argument("--timeout", type=float, default=hub.DEFAULT_TIMEOUT, help=TIMEOUT_HELP)
    p.set_defaults(func=lambda a: run_pull(a.repo, a.concept, revision=a.revision, out_dir=a.out, token=a.token,
                                           timeout=a.timeout, force=a.force))
    p = subparsers.add_parser("ls", help="list the patches of a Hugging Face repo (reads headers only)")
    p.add_argument("repo", help="repo id")
    p.add_argument("--revision", default=None)
    p.add_argument("--encoder", default=None, help="text encoder source to check each patch's base fingerprint against")
    p.add_argument("--component", default="clip_l", choices=("clip_l", "clip_g"))
    p.add_argument("--token", default=None)
    p.add_argument("--timeout", type=float, default=hub.DEFAULT_TIMEOUT, help=TIMEOUT_HELP)
    p.set_defaults(func=lambda a: run_ls(a.repo, revision=a.revision, encoder=a.encoder, component=a.component, token=a.token,
                                         timeout=a.timeout))


def run_push(files: list[str], repo: str, private: bool = False, token: str | None = None, api=None, out=print) -> int:
    result = hub.push(files, repo, private=private, token=token, api=api)
    out(visible(f"pushed {', '.join(result['files'])} + README.md to {repo}" + (f" ({result['commit']})" if result["commit"] else "")))
    return 0


def run_pull(repo: str, concept: str, revision: str | None = None, out_dir: str | None = None,
             token: str | None = None, out=print, timeout: float | None = None, force: bool = False) -> int:
    patch = hub.pull(repo, concept, revision=revision, dest=out_dir, token=token, timeout=timeout, overwrite=force)
    src = patch.metadata["source"]
    out(f"{visible(patch.describe())}\nfrom {visible(src['repo'])}/{visible(src['filename'])} @ {visible(src['revision'])}")
    if note := hub.checksum_note(patch):
        out(note)
    if out_dir:
        out(f"saved into {visible(out_dir)}")
    return 0


def format_table(rows: list[dict], match: dict[str, bool] | None = None) -> str:
    head = ["file", "concepts", "method", "size", "base"] + (["matches encoder"] if match is not None else [])
    table = [head]
    for r in rows:
        line = [visible(r["filename"]), visible(concept_list(r["concepts"])), visible(r["method"]), f"{r['size'] / 1e6:.2f} MB",
                visible(r["base_fingerprint"])]
        if match is not None:
            line.append("yes" if match.get(r["filename"]) else "NO")
        table.append(line)
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)


def run_ls(repo: str, revision: str | None = None, encoder: str | None = None, component: str = "clip_l",
           token: str | None = None, api=None, endpoint: str | None = None, out=print, timeout: float | None = None) -> int:
    skipped: list = []
    rows = hub.list_patches(repo, revision=revision, token=token, api=api, endpoint=endpoint, timeout=timeout, skipped=skipped)
    for filename, reason in skipped:
        out(f"skipped {filename!r}: {visible(reason)}")
    if not rows:
        out(f"{visible(repo)}: no erasure patches")
        return 0
    match = None
    if encoder:
        from .encoders import model_signature, signatures_match
        from .loading import load_text_encoder

        sig = model_signature(load_text_encoder(encoder, component=component).model)
        match = {r["filename"]: bool(r["base_signatures"].get(component)) and signatures_match(r["base_signatures"][component], sig)
                 for r in rows}
    out(format_table(rows, match))
    if unverified := [visible(r["filename"]) for r in rows if not r.get("checksum")]:
        out(f"note: no checksum in {', '.join(unverified)} (written before hirm stored one): damage or a changed header "
            "cannot be detected when pulled")
    return 0
