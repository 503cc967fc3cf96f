"""Concept and neighbour subspaces, and the stage-1 context transform (SPEC section 2).

A ``ConceptSet`` holds, per erased concept, an orthonormal basis of its subspace with weights
(``P_F = U diag(lambda) U^T``) and the same for its neighbours (``P_N``). Bases are small
(width x rank) and are what a saved operator file stores; projectors are formed on demand.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Mapping

import torch

from ..errors import HirmError, NlceError
from ..files import atomic_write
from .config import NlceConfig, make_nlce_config

FORMAT = "hirm-nlce-operators"
VERSION = 1
Encoder = Callable[[list[str]], list[torch.Tensor]]


def clip_row_encoder(text_model, tokenizer, device=None) -> Encoder:
    """``encode(texts)`` -> per text, its real-token rows (start, words, end) of the final-layer-norm output, fp32.

    The encoder runs where ``text_model`` lives (it is never moved); rows are returned on
    ``device`` (default CPU). A text longer than 77 tokens is refused.
    """
    from ..encoders import text_module
    from ..textenc import encode, real_token_mask, tokenize

    def encode_rows(texts: list[str]) -> list[torch.Tensor]:
        try:
            ids = tokenize(tokenizer, list(texts), what="NLCE concept")
        except HirmError as e:
            raise NlceError(str(e)) from None
        mask = real_token_mask(tokenizer, ids)
        # attention is causal: rows up to the end token do not depend on the padding after it
        hidden, _ = encode(text_model, ids[:, : int(mask.sum(1).max())], batch_size=64)
        return [hidden[i][mask[i][: hidden.shape[1]]].to(device or "cpu") for i in range(len(texts))]

    encode_rows.tokenizer = tokenizer
    encode_rows.token_embedding = text_module(text_model).embeddings.token_embedding.weight.detach()
    return encode_rows


def prompt_token_mask(tokenizer, prompts: list[str], length: int = 77) -> torch.Tensor:
    """(len(prompts), length) bool: True on the rows of the prompts' words (not start, end or padding).

    For hosts that know the prompt text: pass the rows of each prompt as ``token_mask`` to
    ``NlceSession.prepare``. Prompts are truncated to ``length`` like the pipelines do.
    """
    from ..textenc import real_token_mask

    ids = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="pt")["input_ids"]
    words = real_token_mask(tokenizer, ids) & (ids != tokenizer.eos_token_id)
    words[:, 0] = False
    return words


def spectral_weights(s: torch.Tensor, a: float) -> torch.Tensor:
    """lambda_i = a r_i / ((a - 1) r_i + 1) with r_i = s_i^2 / sum s^2."""
    r = s.square() / s.square().sum()
    return a * r / ((a - 1) * r + 1)


def subspace(rows: torch.Tensor, rank: int | None, spectral: bool, a: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(basis (d, r), weights (r,)) of the row space of ``rows`` (n, d) from its SVD."""
    rows = rows.double()
    _, s, vh = torch.linalg.svd(rows, full_matrices=False)
    keep = s > s[0] * 1e-6  # drop numerically null directions
    if rank is not None:
        keep[rank:] = False
    s, basis = s[keep], vh[keep].T
    weights = spectral_weights(s, a) if spectral else torch.ones_like(s)
    return basis.float(), weights.float()


def projector(basis: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (basis * weights) @ basis.T


def _key(text: str) -> str:
    return " ".join(text.lower().split())


class ConceptSet:
    """Operators of one or more erased concepts (bases and weights), built once and reused."""

    def __init__(self, concepts: list[str], neighbors: dict[str, list[str]], bases: list[tuple[torch.Tensor, torch.Tensor]],
                 neighbor_bases: list[tuple[torch.Tensor, torch.Tensor] | None], config: NlceConfig):
        self.concepts, self.neighbors, self.config = list(concepts), dict(neighbors), config
        self.bases, self.neighbor_bases = bases, neighbor_bases
        self.width = bases[0][0].shape[0]
        self._cache: dict = {}

    def __repr__(self) -> str:
        return f"ConceptSet({self.concepts}, width={self.width})"

    def to(self, device=None, dtype=None) -> "ConceptSet":
        mv = lambda t: t.to(device=device, dtype=dtype or t.dtype)  # noqa: E731
        return ConceptSet(self.concepts, self.neighbors, [(mv(b), mv(w)) for b, w in self.bases],
                          [None if nb is None else (mv(nb[0]), mv(nb[1])) for nb in self.neighbor_bases], self.config)

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

    def save(self, path: str) -> str:
        """Write bases, concepts, neighbours and settings as safetensors, atomically."""
        from safetensors.torch import save_file

        tensors = {}
        for i, (b, w) in enumerate(self.bases):
            tensors[f"concept.{i}.basis"], tensors[f"concept.{i}.weights"] = b, w
            if self.neighbor_bases[i] is not None:
                tensors[f"neighbor.{i}.basis"], tensors[f"neighbor.{i}.weights"] = self.neighbor_bases[i]
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}
        meta = {"format": FORMAT, "format_version": str(VERSION), "concepts": json.dumps(self.concepts),
                "neighbors": json.dumps(self.neighbors), "config": json.dumps(self.config.to_dict()), "width": str(self.width)}
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str) -> "ConceptSet":
        from safetensors import safe_open

        if not os.path.isfile(path):
            raise NlceError(f"{path}: no such NLCE operator file")
        try:
            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise NlceError(f"{path}: not a readable safetensors file ({type(e).__name__}); save it again with ConceptSet.save") from None
        if meta.get("format") != FORMAT:
            raise NlceError(f"{path}: not an NLCE operator file (format {meta.get('format')!r}); pass a file written by ConceptSet.save")
        if meta.get("format_version") != str(VERSION):
            raise NlceError(f"{path}: NLCE operator format version {meta.get('format_version')} is not supported (this tool reads {VERSION})")
        try:
            concepts, neighbors = json.loads(meta["concepts"]), json.loads(meta["neighbors"])
            config, width = NlceConfig.from_dict(json.loads(meta["config"])), int(meta["width"])
            bases = [(tensors[f"concept.{i}.basis"], tensors[f"concept.{i}.weights"]) for i in range(len(concepts))]
            nbases = [(tensors[f"neighbor.{i}.basis"], tensors[f"neighbor.{i}.weights"]) if f"neighbor.{i}.basis" in tensors else None
                      for i in range(len(concepts))]
        except (KeyError, ValueError, TypeError) as e:
            raise NlceError(f"{path}: damaged NLCE operator file ({type(e).__name__}: {e}); save it again") from None
        for b, w in bases + [nb for nb in nbases if nb is not None]:
            if b.ndim != 2 or b.shape[0] != width or w.shape != (b.shape[1],) or not (torch.isfinite(b).all() and torch.isfinite(w).all()):
                raise NlceError(f"{path}: damaged NLCE operator file (bad shapes or values); save it again")
        if not concepts:
            raise NlceError(f"{path}: the NLCE operator file holds no concept")
        return cls(concepts, neighbors, bases, nbases, config)


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


def build_concept_set(encode: Encoder, concepts: list[str], neighbors=None, config: NlceConfig | None = None) -> ConceptSet:
    """Operators for ``concepts`` (and their ``neighbors``) from the text encoder behind ``encode``.

    ``neighbors``: None, one list shared by every concept, or {concept: [neighbours]}.
    """
    config = config or make_nlce_config()
    if isinstance(concepts, str):
        concepts = [concepts]
    concepts = [c.strip() for c in concepts or []]
    if not concepts or any(not c for c in concepts):
        raise NlceError("no concept to erase; give at least one non-empty concept")
    table = _neighbors_for(concepts, neighbors)
    erased = {_key(c) for c in concepts}
    for c, ns in table.items():
        ns[:] = [n.strip() for n in ns if n and n.strip()]
        clash = [n for n in ns if _key(n) in erased]
        if clash:
            raise NlceError(f"neighbour {clash[0]!r} is itself a concept to erase; remove it from the neighbours")
    rows = encode(concepts)
    bases, nbases = [], []
    for c, r in zip(concepts, rows):
        if r.shape[0] < 3:  # start + end only
            raise NlceError(f"concept {c!r} has no real tokens after tokenising; give words the tokenizer knows")
        bases.append(subspace(r, config.concept_rank, config.concept_spectral, config.concept_a))
    widths = {b.shape[0] for b, _ in bases}
    if len(widths) != 1:
        raise NlceError("the encoder returned rows of different widths; pass one text encoder")
    for c in concepts:
        ns = table[c]
        if ns:
            nrows = torch.cat(encode(ns))
            nbases.append(subspace(nrows, config.neighbor_rank, True, config.neighbor_a))
        else:
            nbases.append(None)
    return ConceptSet(concepts, table, bases, nbases, config)
