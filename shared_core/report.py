"""Text-level measurement of a patch (SPEC section 3): what the UNet would see, without images."""

from __future__ import annotations

import re
from importlib import resources

import torch

from .patch import ErasurePatch, patched
from .textenc import encode, tokenize

TARGET_TEMPLATES = ("{}", "a painting by {}", "a photo of {}", "an image in the style of {}", "a picture of {}")
DEFAULT_NEIGHBORS = {
    "style": ("Claude Monet", "Pablo Picasso", "Rembrandt", "Salvador Dali", "Paul Cezanne", "Edvard Munch"),
    "object": ("dog", "cat", "car", "tree", "house", "bird"),
    "nudity": ("a woman in a dress", "a man in a suit", "a person in swimwear", "a couple on the beach", "a portrait of a person"),
}


def nontarget_prompts(concepts: list[str] = ()) -> list[str]:
    """The shipped non-target prompts, minus any that mention a word of the concepts."""
    text = resources.files(__package__).joinpath("data/nontarget_prompts.txt").read_text(encoding="utf-8")
    prompts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    words = {w for c in concepts for w in re.findall(r"[a-z]+", c.lower()) if len(w) > 2}
    return [p for p in prompts if not words & set(re.findall(r"[a-z]+", p.lower()))]


def default_neighbors(preset: str, concepts: list[str]) -> list[str]:
    lowered = {c.lower() for c in concepts}
    return [n for n in DEFAULT_NEIGHBORS.get(preset, DEFAULT_NEIGHBORS["object"]) if n.lower() not in lowered]


def text_report(model, tokenizer, patch: ErasurePatch, strength: float = 1.0, neighbors: list[str] | None = None,
                concepts: list[str] | None = None, target_prompts: list[str] | None = None) -> dict:
    """Measure a patch on an encoder (left unchanged): displacement, non-target and neighbour drift.

    Cosines and relative changes are of the final encoder output (77 x width, after the final
    layer norm), the tensor the UNet cross-attends to; the pooled cosine is what Flux uses.
    """
    concepts = list(concepts or patch.concepts)
    preset = (patch.metadata.get("config") or {}).get("preset", "object")
    if neighbors is None:
        neighbors = list((patch.metadata.get("config") or {}).get("neighbors") or default_neighbors(preset, concepts))
    if target_prompts is None:
        target_prompts = [t.format(c) for c in concepts for t in TARGET_TEMPLATES]
    others = nontarget_prompts(concepts)
    groups = {"target": target_prompts, "nontarget": others, "neighbor": list(neighbors)}
    prompts = [p for g in groups.values() for p in g]
    ids = tokenize(tokenizer, prompts)
    before, pooled_before = encode(model, ids)
    with patched(model, patch, strength):
        after, pooled_after = encode(model, ids)

    def split(t):
        out, i = {}, 0
        for k, g in groups.items():
            out[k] = t[i : i + len(g)]
            i += len(g)
        return out

    b, a, pb, pa = split(before), split(after), split(pooled_before), split(pooled_after)
    cos = torch.nn.functional.cosine_similarity(b["target"].flatten(1), a["target"].flatten(1), dim=1)
    pooled_cos = torch.nn.functional.cosine_similarity(pb["target"], pa["target"], dim=1)

    def drift(k):
        if not groups[k]:
            return torch.zeros(0)
        return (a[k] - b[k]).flatten(1).norm(dim=1) / b[k].flatten(1).norm(dim=1)

    nt, nb = drift("nontarget"), drift("neighbor")
    r = lambda x: round(float(x), 4)  # noqa: E731
    return {
        "target_cosine_mean": r(cos.mean()), "target_cosine_max": r(cos.max()),
        "target_pooled_cosine_mean": r(pooled_cos.mean()),
        "nontarget_drift_mean": r(nt.mean()), "nontarget_drift_max": r(nt.max()),
        "neighbor_drift_mean": r(nb.mean()) if len(nb) else None, "neighbor_drift_max": r(nb.max()) if len(nb) else None,
        "n_target_prompts": len(target_prompts), "n_nontarget_prompts": len(others), "neighbors": list(neighbors),
        "strength": strength,
    }


REPORT_ROWS = (
    ("target displacement", "cosine to original, target prompts (lower = erased)", "target_cosine_mean", "target_cosine_max"),
    ("pooled (Flux)", "cosine of the pooled vector, target prompts", "target_pooled_cosine_mean", None),
    ("non-target drift", "relative change, shipped non-target prompts (want ~0)", "nontarget_drift_mean", "nontarget_drift_max"),
    ("neighbour drift", "relative change, neighbour concepts (want small)", "neighbor_drift_mean", "neighbor_drift_max"),
)


def format_report(report: dict | None) -> str:
    """A small plain-text table."""
    if not report:
        return "(no text-level report stored)"
    lines = [f"{'measure':<20} {'mean':>8} {'worst':>8}  meaning"]
    for title, meaning, mean_key, worst_key in REPORT_ROWS:
        mean = report.get(mean_key)
        worst = report.get(worst_key) if worst_key else None
        fmt = lambda v: f"{v:8.4f}" if isinstance(v, (int, float)) else f"{'-':>8}"  # noqa: E731
        lines.append(f"{title:<20} {fmt(mean)} {fmt(worst)}  {meaning}")
    lines.append(f"({report.get('n_target_prompts')} target, {report.get('n_nontarget_prompts')} non-target prompts; "
                 f"neighbours: {', '.join(report.get('neighbors') or []) or 'none'})")
    return "\n".join(lines)
