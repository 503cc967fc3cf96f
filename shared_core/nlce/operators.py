"""Concept and neighbour subspaces, and the stage-1 context transform (SPEC section 2).

A ``ConceptSet`` holds, per erased concept, an orthonormal basis of its subspace with weights
(``P_F = U diag(lambda) U^T``) and the same for its neighbours (``P_N``). Bases are small
(width x rank) and are what a saved operator file stores; projectors are formed on demand.
"""

from __future__ import annotations

import json
import os
import re
from typing import Mapping

import torch

from ..common import check_text, is_plain_text
from ..errors import NlceError
from ..families import FAMILIES, refusal
from ..files import atomic_write, write_safetensors
from .config import NlceConfig, make_nlce_config
from .rows import RowEncoder

FORMAT = "hirm-nlce-operators"
VERSION = 2  # 2: the model family the operators were built for, and the live-floor scale; 1 (SD1.x) still read


def describe_family(key: str) -> str:
    fam = FAMILIES.get(key)
    return f"{fam.name} ({fam.rows})" if fam is not None else key


def spectral_weights(s: torch.Tensor, a: float) -> torch.Tensor:
    """lambda_i = a r_i / ((a - 1) r_i + 1) with r_i = s_i^2 / sum s^2."""
    r = s.square() / s.square().sum()
    return a * r / ((a - 1) * r + 1)


def subspace(rows: torch.Tensor, rank: int | None, spectral: bool, a: float,
             weights_over: str = "kept") -> tuple[torch.Tensor, torch.Tensor]:
    """(basis (d, r), weights (r,)) of the row space of ``rows`` (n, d) from its SVD.

    Spectral weights normalise ``s_i^2`` over ``weights_over``: "all" singular values (then the
    first ``rank`` are kept) or only the "kept" ones. Numerically null directions (s below 1e-6 of
    the largest) are always dropped: they exist only for linearly dependent rows (a repeated
    term), where the reference's plain projector would remove arbitrary directions.
    """
    rows = rows.double()
    _, s, vh = torch.linalg.svd(rows, full_matrices=False)
    keep = s > s[0] * 1e-6
    if rank is not None:
        keep[rank:] = False
    if spectral:
        weights = spectral_weights(s, a)[keep] if weights_over == "all" else spectral_weights(s[keep], a)
    else:
        weights = torch.ones_like(s[keep])
    return vh[keep].T.float(), weights.float()


def projector(basis: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (basis * weights) @ basis.T


def _key(text: str) -> str:
    return " ".join(text.lower().split())


TERM_SEPARATOR = "|"


def concept_terms(entry) -> tuple[str, list[str]]:
    """(name, terms) of one erased concept: the terms' rows form ONE subspace.

    ``entry`` is a string (one term; ``"a | b | c"`` for several), a list of terms, or
    ``"nudity"``, which stands for ``NUDITY_TERMS``. The name of a term list is its terms joined by
    `` | `` (the text form again).
    """
    from .config import NUDITY_TERMS

    if isinstance(entry, str):
        if _key(entry) == "nudity":
            return "nudity", list(NUDITY_TERMS)
        entry = entry.split(TERM_SEPARATOR)
    if not isinstance(entry, (list, tuple)) or not all(isinstance(t, str) for t in entry):
        raise NlceError(f"a concept is a text or a list of texts, got {type(entry).__name__}")
    for t in entry:
        check_text(t, "NLCE concept")
    terms = [" ".join(t.split()) for t in entry]
    terms = [t for t in terms if t]
    if not terms:
        raise NlceError("no concept to erase; give at least one non-empty concept")
    return f" {TERM_SEPARATOR} ".join(terms), terms

class ConceptSet:
    """Operators of one or more erased concepts (bases and weights), built once and reused.

    ``family`` says which model's text rows the operators live in (``FAMILIES``); ``live_floor_scale``
    multiplies the live-token floor: 1 for SD1.x, whose rows are CLIP-L's final layer-normed output
    (the scale the reference's floors were set in); on SDXL, whose penultimate rows are not
    layer-normed, the ratio of the concept's own word rows there to the same rows as SD1.x reads them.
    """

    def __init__(self, concepts: list[str], neighbors: dict[str, list[str]], bases: list[tuple[torch.Tensor, torch.Tensor]],
                 neighbor_bases: list[tuple[torch.Tensor, torch.Tensor] | None], config: NlceConfig,
                 terms: dict[str, list[str]] | None = None, family: str = "sd1", live_floor_scale: float = 1.0):
        self.concepts, self.neighbors, self.config = list(concepts), dict(neighbors), config
        self.terms = {c: list((terms or {}).get(c) or [c]) for c in self.concepts}  # the texts whose rows made each subspace
        self.bases, self.neighbor_bases = bases, neighbor_bases
        self.width = bases[0][0].shape[0]
        self.family, self.live_floor_scale = family, float(live_floor_scale)
        self._cache: dict = {}

    def __repr__(self) -> str:
        return f"ConceptSet({self.concepts}, {self.family}, width={self.width})"

    def to(self, device=None, dtype=None) -> "ConceptSet":
        mv = lambda t: t.to(device=device, dtype=dtype or t.dtype)  # noqa: E731
        return ConceptSet(self.concepts, self.neighbors, [(mv(b), mv(w)) for b, w in self.bases],
                          [None if nb is None else (mv(nb[0]), mv(nb[1])) for nb in self.neighbor_bases], self.config, self.terms,
                          self.family, self.live_floor_scale)

    def check_family(self, family: str, where: str = "this model") -> None:
        """Refuse operators built for another model family (NlceError, one line)."""
        if family != self.family:
            raise NlceError(f"these NLCE operators were built for {describe_family(self.family)}, but {where} is "
                            f"{describe_family(family)}; build them with this model's text encoders")

    def check_width(self, width: int, where: str, feature: str) -> None:
        """Refuse (NlceError, one line) a denoiser that reads ``width``-wide text rows these operators do not live in;
        a model of a family ``feature`` does not support is told so (``families.refusal``)."""
        if width == self.width:
            return
        fam = next((f for f in FAMILIES.values() if f.context_width == width), None)
        if fam is not None and fam.supports[feature] == "no":
            raise NlceError(refusal(feature, fam.key, where))
        raise NlceError(f"{where} reads {width}-wide text rows but these NLCE operators are {self.width} wide "
                        f"({describe_family(self.family)}); build them with the text encoders of the same model")

    def concept_projector(self, i: int) -> torch.Tensor:
        """``P_F`` of concept ``i`` (d x d)."""
        return self._cached(("pf", i), lambda: projector(*self.bases[i]))

    def modulation(self, i: int, beta: float, gamma: float) -> torch.Tensor:
        """``P_c = I - beta P_F + gamma P_N P_F`` of concept ``i`` (d x d)."""
        def build():
            pf = self.concept_projector(i)
            pc = torch.eye(self.width, dtype=pf.dtype, device=pf.device) - beta * pf
            if self.neighbor_bases[i] is not None and gamma:
                pc = pc + gamma * projector(*self.neighbor_bases[i]) @ pf
            return pc
        return self._cached(("pc", i, beta, gamma), build)

    def _cached(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    # -- files ---------------------------------------------------------------------------------

    def save(self, path: str, overwrite: bool = False) -> str:
        """Write bases, concepts, neighbours, settings and a checksum of the tensors as safetensors, atomically (an
        existing file only with ``overwrite``, and only if it is an operator file itself)."""
        from ..patch.metadata import checksum

        tensors = {}
        for i, (b, w) in enumerate(self.bases):
            tensors[f"concept.{i}.basis"], tensors[f"concept.{i}.weights"] = b, w
            if self.neighbor_bases[i] is not None:
                tensors[f"neighbor.{i}.basis"], tensors[f"neighbor.{i}.weights"] = self.neighbor_bases[i]
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}
        meta = {"format": FORMAT, "format_version": str(VERSION), "concepts": json.dumps(self.concepts),
                "terms": json.dumps(self.terms), "neighbors": json.dumps(self.neighbors),
                "config": json.dumps(self.config.to_dict()), "width": str(self.width), "family": self.family,
                "live_floor_scale": repr(self.live_floor_scale), "checksum": checksum(tensors)}
        return atomic_write(path, lambda f: write_safetensors(f, tensors, meta), overwrite=overwrite, is_ours=is_operator_file,
                            what="NLCE operator file")

    @classmethod
    def load(cls, path: str) -> "ConceptSet":
        """Read and check an operator file as patch files are checked (``_check_file``); NlceError, one line, for
        anything that is not a sound operator file. What this accepts, every host can apply."""
        return _check_file(path)


_NAME = re.compile(r"(concept|neighbor)\.(0|[1-9]\d{0,5})\.(basis|weights)")
_FLOATS = ("F16", "BF16", "F32", "F64")


def _check_file(path: str) -> ConceptSet:
    from safetensors import safe_open

    from ..patch.metadata import checksum

    def damaged(what: str) -> NlceError:
        return NlceError(f"{path}: damaged NLCE operator file ({what}); build and save the operators again")

    if not os.path.isfile(path):
        raise NlceError(f"{path}: no such NLCE operator file")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            table = {k: (str(f.get_slice(k).get_dtype()), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except Exception:
        raise NlceError(f"{path}: not a readable safetensors file (another format, or truncated); pass a file written by "
                        "ConceptSet.save") from None
    if meta.get("format") != FORMAT:
        raise NlceError(f"{path}: not an NLCE operator file; pass a file written by ConceptSet.save")
    if meta.get("format_version") not in ("1", str(VERSION)):
        raise NlceError(f"{path}: NLCE operator format version {str(meta.get('format_version'))[:20]!r} is not one this tool "
                        f"reads (1 to {VERSION})")
    try:
        concepts, neighbors = json.loads(meta["concepts"]), json.loads(meta["neighbors"])
        terms, config = json.loads(meta.get("terms", "{}")), json.loads(meta["config"])
        width, scale = int(meta["width"]), float(meta.get("live_floor_scale", "1.0"))
    except (KeyError, ValueError, TypeError):
        raise damaged("its metadata is incomplete or not the JSON and numbers it should be") from None
    family = meta.get("family", "sd1")  # version 1: SD1.x only
    texts = lambda v: isinstance(v, list) and all(isinstance(x, str) and _printable(x) for x in v)  # noqa: E731
    if not (texts(concepts) and concepts and all(c.strip() for c in concepts)):
        raise damaged("concepts must be a list of texts")
    if not (isinstance(neighbors, dict) and all(isinstance(k, str) and texts(v) for k, v in neighbors.items())):
        raise damaged("neighbours must map concepts to lists of texts")
    if not (isinstance(terms, dict) and all(isinstance(k, str) and texts(v) for k, v in terms.items())):
        raise damaged("terms must map concepts to lists of texts")
    if not isinstance(config, dict):
        raise damaged("config must be a JSON object")
    config = NlceConfig.from_dict(config)  # NlceError naming the setting
    if family not in FAMILIES or not FAMILIES[family].context_width:
        raise damaged(f"family {str(family)[:40]!r} is not one NLCE supports")
    if not (0 < width <= 65536 and 0 < scale < float("inf")):
        raise damaged("width or live-floor scale out of range")
    expected = {f"concept.{i}.{k}" for i in range(len(concepts)) for k in ("basis", "weights")}
    names = set(table)
    unknown = sorted(n for n in names if not _NAME.fullmatch(n) or int(n.split(".")[1]) >= len(concepts))
    if unknown or not expected <= names:
        raise damaged(f"unexpected tensor {unknown[0]!r}" if unknown else "a concept's basis or weights are missing")
    for name, (dtype, shape) in table.items():
        if dtype not in _FLOATS:
            raise damaged(f"tensor {name} is {dtype}; operators are float16, bfloat16 or float32")
        partner = name.rsplit(".", 1)[0] + (".weights" if name.endswith("basis") else ".basis")
        if partner not in table:
            raise damaged(f"{partner} is missing")
        if name.endswith("basis") and not (len(shape) == 2 and shape[0] == width and 1 <= shape[1] <= width
                                           and table[partner][1] == (shape[1],)):
            raise damaged(f"tensor {name} has shape {shape}, expected ({width}, rank) with weights (rank,)")
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if "checksum" in meta and checksum(tensors) != meta["checksum"]:
        raise NlceError(f"{path}: the tensors do not match the operator file's checksum (damaged data, or a header changed "
                        "after writing); build and save the operators again")
    tensors = {k: v.float() for k, v in tensors.items()}
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise damaged(f"tensor {name} holds NaN or Inf values")
        if name.endswith("basis") and not torch.allclose(t.T @ t, torch.eye(t.shape[1]), atol=1e-2):
            raise damaged(f"{name} is not an orthonormal basis")
        if name.endswith("weights") and not ((t >= 0) & (t <= 1 + 1e-4)).all():
            raise damaged(f"{name} must lie between 0 and 1")
    pair = lambda kind, i: (tensors[f"{kind}.{i}.basis"], tensors[f"{kind}.{i}.weights"])  # noqa: E731
    bases = [pair("concept", i) for i in range(len(concepts))]
    nbases = [pair("neighbor", i) if f"neighbor.{i}.basis" in tensors else None for i in range(len(concepts))]
    return ConceptSet(concepts, neighbors, bases, nbases, config, terms, family, scale)


def _printable(text: str) -> bool:
    return len(text) <= 1000 and is_plain_text(text)


def is_operator_file(path: str) -> bool:
    """True for a safetensors file whose header says it holds NLCE operators."""
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:
        return False


def _neighbors_for(concepts: list[str], neighbors) -> dict[str, list[str]]:
    if neighbors is None:
        return {c: [] for c in concepts}
    if isinstance(neighbors, Mapping):
        unknown = [k for k in neighbors if _key(k) not in {_key(c) for c in concepts}]
        if unknown:
            raise NlceError(f"neighbours given for {unknown[0]!r}, which is not one of the concepts {concepts}")
        by_key = {_key(k): [v] if isinstance(v, str) else list(v) for k, v in neighbors.items()}
        return {c: by_key.get(_key(c), []) for c in concepts}
    if isinstance(neighbors, str):
        neighbors = [neighbors]
    return {c: list(neighbors) for c in concepts}


def _rows(encode: RowEncoder, texts: list[str], drop_start_row: bool) -> torch.Tensor:
    """The real-token rows of ``texts`` stacked (n, d); without each text's start row(s) when asked."""
    rows = encode(texts)
    for text, r in zip(texts, rows):
        if encode.word_rows(r).shape[0] < 1:
            raise NlceError(f"{text!r} has no real tokens after tokenising; give words the tokenizer knows")
    return torch.cat([encode.without_start(r) if drop_start_row else r for r in rows])


def build_concept_set(encode, concepts, neighbors=None, config: NlceConfig | None = None, on_concept=None) -> ConceptSet:
    """Operators for ``concepts`` (and their ``neighbors``) from the text encoder behind ``encode``.

    ``concepts``: a list of concepts, each a text, ``"a | b"`` or a list of terms forming ONE
    subspace (see ``concept_terms``). ``neighbors``: None, one list shared by every concept, or
    {concept: [neighbours]}.
    """
    config = config or make_nlce_config()
    encode = RowEncoder.of(encode)
    if isinstance(concepts, str):
        concepts = [concepts]
    entries = [concept_terms(c) for c in concepts or []]
    if not entries:
        raise NlceError("no concept to erase; give at least one non-empty concept")
    names, terms = [n for n, _ in entries], dict(entries)
    if len({_key(n) for n in names}) != len(names):
        raise NlceError("the same concept is given twice; give each concept once")
    table = _neighbors_for(names, neighbors)
    erased = {_key(t) for ts in terms.values() for t in ts} | {_key(n) for n in names}
    for c, ns in table.items():
        if not all(isinstance(n, str) for n in ns):
            raise NlceError(f"neighbours of {c!r} must be texts")
        for n in ns:
            check_text(n, "neighbour")
        ns[:] = [" ".join(n.split()) for n in ns if n and n.strip()]
        clash = [n for n in ns if _key(n) in erased]
        if clash:
            raise NlceError(f"neighbour {clash[0]!r} is itself a concept to erase; remove it from the neighbours")
    family = encode.family
    scale = _live_floor_scale(encode, [t for c in names for t in terms[c]]) if family != "sd1" else 1.0
    bases, nbases = [], []
    for c in names:
        rows = _rows(encode, terms[c], config.drop_start_row)
        bases.append(subspace(rows, config.concept_rank, config.concept_spectral, config.concept_a, config.concept_weights_over))
        ns = table[c]
        nbases.append(subspace(_rows(encode, ns, config.drop_start_row), config.neighbor_rank, True, config.neighbor_a)
                      if ns else None)
        if on_concept is not None:
            on_concept()
    return ConceptSet(names, table, bases, nbases, config, terms, family, scale)


def _live_floor_scale(encode: RowEncoder, texts: list[str]) -> float:
    """How much longer the concept's word rows are in ``encode``'s space than as SD1.x reads them (CLIP-L's final
    layer-normed output, ``encode.reference``): the median row norm of the words (not start, not end) in each."""
    def word_norms(coder: RowEncoder):
        return torch.cat([coder.word_rows(r) for r in coder(texts)]).norm(dim=-1)

    return float(word_norms(encode).median() / word_norms(encode.reference).median())
