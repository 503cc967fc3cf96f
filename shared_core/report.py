"""Text-level measurement of a patch (SPEC section 3): what the UNet would see, without images."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from importlib import resources

import torch

from .errors import HirmError
from .patch import ErasurePatch, component_of_family, patched
from .textenc import encode, layer_rows, tokenize

BATCH = 16  # prompts per encoder call: at 64 the report of 1,000 concepts peaked 0.6 GB above training (docs/hirm-lists.md)
_MEMORY: OrderedDict = OrderedDict()  # (weights digest, prompt) -> (hidden, pooled) of the unpatched encoder
_MEMORY_KEEP = 1024  # about 240 MB of CLIP-L encodings
_LOCK = threading.Lock()

TARGET_TEMPLATES = ("{}", "a painting by {}", "a photo of {}", "an image in the style of {}", "a picture of {}")
DEFAULT_NEIGHBORS = {
    "style": ("Claude Monet", "Pablo Picasso", "Rembrandt", "Salvador Dali", "Paul Cezanne", "Edvard Munch"),
    "object": ("dog", "cat", "car", "tree", "house", "bird"),
    "nudity": ("a woman in a dress", "a man in a suit", "a person in swimwear", "a couple on the beach", "a portrait of a person"),
}


def report_prompt_count(tokenizer, concepts: list[str], neighbors: list[str] | None, preset: str) -> tuple[int, int]:
    """How many prompts ``text_report`` measures for these concepts: (target prompts, shared prompts)."""
    targets = [t for c in concepts for t in TARGET_TEMPLATES if t == "{}" or _fits(tokenizer, t.replace("{}", c))]
    return len(targets), len(nontarget_prompts(concepts)) + len(neighbors or default_neighbors(preset, concepts))


def nontarget_prompts(concepts: list[str] = ()) -> list[str]:
    """The shipped non-target prompts, minus any that mention a word of the concepts."""
    text = resources.files(__package__).joinpath("data/nontarget_prompts.txt").read_text(encoding="utf-8")
    prompts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    words = {w for c in concepts for w in re.findall(r"[a-z]+", c.lower()) if len(w) > 2}
    return [p for p in prompts if not words & set(re.findall(r"[a-z]+", p.lower()))]


def _fits(tokenizer, prompt: str) -> bool:
    return len(tokenizer(prompt, truncation=False)["input_ids"]) <= 77


def default_neighbors(preset: str, concepts: list[str]) -> list[str]:
    lowered = {c.lower() for c in concepts}
    return [n for n in DEFAULT_NEIGHBORS.get(preset, DEFAULT_NEIGHBORS["object"]) if n.lower() not in lowered]


def batches(n_prompts: int) -> int:
    """How many encoder calls of ``BATCH`` prompts ``n_prompts`` take."""
    return -(-n_prompts // BATCH)


def report_batches(targets: int, shared: int) -> int:
    """How many encoder batches a report takes (base and patched passes of its target and shared prompts)."""
    return 2 * (batches(targets) + batches(shared))


class TextView:
    """What a model's denoiser reads of a prompt, from its text encoders.

    One encoder (SD1.x's CLIP-L, or any single CLIP): the final output after the final layer
    norm (77 x width) and the pooled end-token row. SDXL (``clip_l`` and ``clip_g``): the two
    encoders' penultimate-layer outputs side by side (77 x 2048, what its UNet cross-attends to)
    and CLIP-G's pooled vector through its projection (what its added conditioning reads).
    """

    def __init__(self, encoders: Mapping[str, tuple]):
        self.encoders = dict(encoders)  # component -> (CLIPTextModel, tokenizer[, projection])
        self.sdxl = set(self.encoders) == {"clip_l", "clip_g"}
        self.tokenizer = self.encoders["clip_l" if "clip_l" in self.encoders else next(iter(self.encoders))][1]

    @classmethod
    def single(cls, model, tokenizer) -> "TextView":
        return cls({"clip_l": (model, tokenizer)})

    @property
    def name(self) -> str:
        return "sdxl" if self.sdxl else "final"

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return {c: tokenize(e[1], prompts) for c, e in self.encoders.items()}

    def digest(self, length: int) -> str:
        from .encoders import canonical_parameters, weights_digest

        parts = [weights_digest(canonical_parameters(e[0])) for e in self.encoders.values()]
        if self.sdxl and len(self.encoders["clip_g"]) > 2 and self.encoders["clip_g"][2] is not None:
            parts.append(weights_digest({"projection": self.encoders["clip_g"][2]}))
        return "-".join(parts) + f":{length}" + (":sdxl" if self.sdxl else "")

    def encode(self, ids: Mapping[str, torch.Tensor], done=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, pooled) of the prompts, fp32 on CPU; ``done()`` after each batch."""
        if not self.sdxl:
            model = next(iter(self.encoders.values()))[0]
            return encode(model, next(iter(ids.values())), batch_size=BATCH, done=done)
        return encode_sdxl(self.encoders, ids, done=done)

    @contextlib.contextmanager
    def patched(self, patch: ErasurePatch, strength: float):
        """Every encoder of the view with its part of ``patch`` (an encoder the patch does not change stays as it is)."""
        with contextlib.ExitStack() as stack:
            for component, entry in self.encoders.items():
                part = patch.part(component) if patch.parts else (patch if component == self._single_component(patch) else None)
                if part is not None:
                    stack.enter_context(patched(entry[0], part, strength))
            yield

    def _single_component(self, patch: ErasurePatch) -> str:
        return next(iter(self.encoders)) if len(self.encoders) == 1 else component_of_family(patch.family)


@torch.no_grad()
def encode_sdxl(encoders: Mapping[str, tuple], ids: Mapping[str, torch.Tensor], batch_size: int = BATCH,
                done=None) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's text conditioning: (clip_l and clip_g penultimate-layer outputs concatenated (n, 77, 2048), CLIP-G's
    pooled vector through its projection (n, 1280); without a projection, the unprojected pooled vector)."""
    (model_l, *_), (model_g, _, *projection) = encoders["clip_l"], encoders["clip_g"]
    projection = projection[0] if projection else None
    rows, pooled = [], []
    for i in range(0, ids["clip_l"].shape[0], batch_size):
        (h_l, _), (h_g, p) = layer_rows(model_l, ids["clip_l"][i:i + batch_size]), layer_rows(model_g, ids["clip_g"][i:i + batch_size])
        rows.append(torch.cat([h_l, h_g], dim=-1))
        pooled.append(p @ projection.float().cpu().T if projection is not None else p)
        if done is not None:
            done()
    return torch.cat(rows), torch.cat(pooled)


def text_report(model, tokenizer, patch: ErasurePatch, strength: float = 1.0, neighbors: list[str] | None = None,
                concepts: list[str] | None = None, target_prompts: list[str] | None = None, progress=None) -> dict:
    """Measure a patch on one encoder (left unchanged): displacement, non-target and neighbour drift (``view_report``)."""
    return view_report(TextView.single(model, tokenizer), patch, strength, neighbors, concepts, target_prompts, progress)


PER_CONCEPT_KEPT = 2000  # rows of the per-concept table kept in a patch's metadata (worst first): about 100 kB at most


def view_report(view: TextView, patch: ErasurePatch, strength: float = 1.0, neighbors: list[str] | None = None,
                concepts: list[str] | None = None, target_prompts: list[str] | None = None, progress=None) -> dict:
    """Measure a patch on the text ``view`` of a model (its encoders are left unchanged).

    ``progress(done, total)`` (optional) follows the encoder batches (``report_batches``); cached
    base encodings are counted as done at once.

    Cosines and relative changes are of the rows the denoiser reads (``TextView``: SD1.x's final
    encoder output, SDXL's concatenated penultimate outputs); the pooled cosine is of the pooled
    vector (Flux's conditioning from CLIP-L; SDXL's CLIP-G vector). The target prompts are measured a batch at a time
    and only their cosines kept, so a list of a thousand concepts takes the memory of one batch; with several concepts
    the report holds a per-concept table (``per_concept``: concept, target cosine, pooled cosine; the least erased
    first).
    """
    tokenizer = view.tokenizer
    concepts = list(concepts or patch.concepts)
    preset = (patch.metadata.get("config") or {}).get("preset", "object")
    if neighbors is None:
        neighbors = list((patch.metadata.get("config") or {}).get("neighbors") or default_neighbors(preset, concepts))
    if target_prompts is None:  # templated variants that would not fit CLIP's 77 tokens are left out (the bare concept fits)
        owners = [(t.replace("{}", c), c) for c in concepts for t in TARGET_TEMPLATES
                  if t == "{}" or _fits(tokenizer, t.replace("{}", c))]
    else:
        owners = [(t, None) for t in target_prompts]
    others = nontarget_prompts(concepts)
    shared = others + list(neighbors)  # encoded once per base model and cached
    total, count = report_batches(len(owners), len(shared)), [0]

    def done():
        count[0] += 1
        if progress is not None:
            progress(min(count[0], total), total)

    cos, pooled_cos = [], []
    for i in range(0, len(owners), BATCH):  # base and patched encodings of one batch at a time: only cosines are kept
        ids = view.tokenize([p for p, _ in owners[i:i + BATCH]])
        before, pooled_before = view.encode(ids, done=done)
        with view.patched(patch, strength):
            after, pooled_after = view.encode(ids, done=done)
        cos.append(torch.nn.functional.cosine_similarity(before.flatten(1), after.flatten(1), dim=1))
        pooled_cos.append(torch.nn.functional.cosine_similarity(pooled_before, pooled_after, dim=1))
    cos, pooled_cos = torch.cat(cos), torch.cat(pooled_cos)
    nt = nb = torch.zeros(0)
    if shared:
        ids = view.tokenize(shared)
        before, _ = base_encodings(view, shared, ids, done)
        with view.patched(patch, strength):
            after, _ = view.encode(ids, done=done)
        drift = (after - before).flatten(1).norm(dim=1) / before.flatten(1).norm(dim=1)
        nt, nb = drift[: len(others)], drift[len(others):]
    r = lambda x: round(float(x), 4)  # noqa: E731
    out = {
        "target_cosine_mean": r(cos.mean()), "target_cosine_max": r(cos.max()),
        "target_pooled_cosine_mean": r(pooled_cos.mean()),
        "nontarget_drift_mean": r(nt.mean()) if len(nt) else None, "nontarget_drift_max": r(nt.max()) if len(nt) else None,
        "neighbor_drift_mean": r(nb.mean()) if len(nb) else None, "neighbor_drift_max": r(nb.max()) if len(nb) else None,
        "n_target_prompts": len(owners), "n_nontarget_prompts": len(others), "neighbors": list(neighbors),
        "strength": strength,
    }
    if len(concepts) > 1 and all(c is not None for _, c in owners):
        rows = {}
        for (_, c), a, b in zip(owners, cos.tolist(), pooled_cos.tolist()):
            rows.setdefault(c, []).append((a, b))
        table = sorted(([c, r(sum(a for a, _ in v) / len(v)), r(sum(b for _, b in v) / len(v))] for c, v in rows.items()),
                       key=lambda row: -row[1])
        out["per_concept"] = table[:PER_CONCEPT_KEPT]
        out["per_concept_total"] = len(table)
    if view.sdxl:
        out["measured_on"] = "sdxl"  # the UNet's 2048-wide context and CLIP-G's pooled vector
    return out


def cache_folder() -> str | None:
    """Where base encodings are kept between runs: $HIRM_CACHE, else ~/.cache/hirm; "off" (or "") keeps none."""
    folder = os.environ.get("HIRM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "hirm"))
    return None if folder.strip().lower() in ("", "off", "0", "none") else os.path.join(folder, "encodings")


def base_encodings(view: TextView, prompts: list[str], ids: Mapping[str, torch.Tensor] | None = None,
                   done=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, pooled) of the unpatched ``view`` for ``prompts``, fp32 on CPU; ``done()`` once per batch of ``BATCH``
    prompts, encoded or found in the cache.

    Encodings are cached per exact weights (a digest of every tensor) and prompt, in memory and
    in ``cache_folder()``, so the shipped prompt sets are encoded once per base model; a damaged or
    unwritable cache is ignored (they are then encoded again).
    """
    from .files import atomic_write, write_safetensors

    ids = view.tokenize(prompts) if ids is None else ids
    digest = view.digest(next(iter(ids.values())).shape[1])
    folder = cache_folder()
    path = os.path.join(folder, hashlib.sha256(digest.encode()).hexdigest()[:40] + ".safetensors") if folder else None
    stored = _read_cache(path) if path else {}
    found: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    with _LOCK:
        for i, p in enumerate(prompts):
            key = hashlib.sha256(p.encode("utf-8")).hexdigest()[:32]
            hit = _MEMORY.get((digest, p)) or ((stored[key + ".h"], stored[key + ".p"]) if key + ".h" in stored else None)
            if hit is not None:
                found[i] = hit
    missing = [i for i in range(len(prompts)) if i not in found]
    if done is not None:
        for _ in range(batches(len(prompts)) - batches(len(missing))):  # the batches the cache saved
            done()
    if missing:
        hidden, pooled = view.encode({c: t[missing] for c, t in ids.items()}, done=done)
        for j, i in enumerate(missing):
            found[i] = (hidden[j].clone(), pooled[j].clone())  # not views: a cached row must not keep its whole batch alive
    with _LOCK:
        for i, p in enumerate(prompts):
            _MEMORY[(digest, p)] = found[i]
            _MEMORY.move_to_end((digest, p))
        while len(_MEMORY) > _MEMORY_KEEP:
            _MEMORY.popitem(last=False)
    if path and missing:
        entries = dict(stored)
        for i, p in enumerate(prompts):
            key = hashlib.sha256(p.encode("utf-8")).hexdigest()[:32]
            entries[key + ".h"], entries[key + ".p"] = found[i][0].contiguous(), found[i][1].contiguous()
        try:
            atomic_write(path, lambda f: write_safetensors(f, entries, {"format": "pt", "hirm.format": "hirm-encoding-cache"}),
                         overwrite=True, is_ours=lambda p: os.path.dirname(os.path.abspath(p)) == os.path.abspath(folder))
        except HirmError:
            pass  # a read-only home or a full disk: the cache is only an optimisation
    return torch.stack([found[i][0] for i in range(len(prompts))]), torch.stack([found[i][1] for i in range(len(prompts))])


def _read_cache(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        return {}
    try:
        from safetensors.torch import load_file

        return load_file(path)
    except Exception:  # damaged (e.g. a killed write of another tool): encode afresh, rewrite it
        return {}


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
    sdxl = report.get("measured_on") == "sdxl"
    lines = [f"{'measure':<20} {'mean':>8} {'worst':>8}  meaning"]
    for title, meaning, mean_key, worst_key in REPORT_ROWS:
        if sdxl and mean_key == "target_pooled_cosine_mean":
            title, meaning = "pooled (CLIP-G)", "cosine of SDXL's pooled CLIP-G vector, target prompts"
        mean = report.get(mean_key)
        worst = report.get(worst_key) if worst_key else None
        fmt = lambda v: f"{v:8.4f}" if isinstance(v, (int, float)) else f"{'-':>8}"  # noqa: E731
        lines.append(f"{title:<20} {fmt(mean)} {fmt(worst)}  {meaning}")
    lines.append(f"({report.get('n_target_prompts')} target, {report.get('n_nontarget_prompts')} non-target prompts; "
                 f"neighbours: {', '.join(report.get('neighbors') or []) or 'none'}"
                 + ("; measured on what SDXL's UNet reads: clip_l + clip_g penultimate rows, 2048 wide" if sdxl else "") + ")")
    table = report.get("per_concept")
    if table:
        worst = ", ".join(f"{c} {cos:.3f}" for c, cos, _ in table[:5])
        lines.append(f"least erased of {report.get('per_concept_total', len(table))} concepts (target cosine): {worst}"
                     + (" ..." if len(table) > 5 else "") + "; the whole table: --json")
    return "\n".join(lines)
