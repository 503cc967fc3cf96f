"""The model card of a repo of patches: front matter the Hub reads, what each patch erases (a list of concepts in a few
lines), its text-level report, how to use it; every text from a patch or a user escaped (docs/hub.md)."""

from __future__ import annotations

import json
import re
import shlex

from .common import concept_list
from .errors import HirmError
from .hub_names import check_repo_id, export_name, visible
from .patch import ErasurePatch

TAGS = ("hirm", "concept-erasure", "safety-patch", "lora", "text-to-image", "stable-diffusion", "text-encoder")
_SERVES = {
    "clip-l": "SD 1.x (text encoder), SDXL (`clip_l`), SD3 and Flux (`clip_l`; Flux uses only its pooled vector)",
    "clip-g": "SDXL (`clip_g`, the OpenCLIP bigG encoder), SD3 (`clip_g`)",
    "clip-l+clip-g": "SDXL and its fine-tunes (both text encoders, `clip_l` and `clip_g`); on SD 1.x and Flux its `clip_l` half",
}


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


def check_license(license) -> str:
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


CARD_CONCEPT_ROWS = 10  # rows of a multi-concept patch's per-concept table shown in the model card


def model_card(repo_id: str, named_patches: list[tuple[str, ErasurePatch]], license: str = "openrail++") -> str:
    """README.md for a repo of patches (huggingface_hub's ModelCard): front matter the Hub reads (license,
    library_name, tags, base_model where a patch names a Hub model), what each patch erases, how to use it."""
    from huggingface_hub import ModelCard, ModelCardData

    from .report import REPORT_ROWS

    check_repo_id(repo_id)
    check_license(license)
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
        lines.append(f"| {_code(name)} | {_md(concept_list(p.concepts))} | {_md(p.method)} | {_md(p.family)} | "
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
        table = rep.get("per_concept")
        if table:  # a patch for several concepts: the least erased of them (a higher target cosine: less erased)
            total = rep.get("per_concept_total", len(table))
            shown = table[:CARD_CONCEPT_ROWS]
            lines += ["", f"The {len(shown)} least erased of its {total} concepts (`hirm inspect --json` gives them all):"
                      if total > len(shown) else "Per concept:", "", "| concept | target cosine | pooled cosine |", "|---|---|---|"]
            lines += [f"| {_md(c)} | {_num(a)} | {_num(b)} |" for c, a, b in shown]
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
