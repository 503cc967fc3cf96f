"""Offline neighbour mining: concepts close to the erased one that should stay intact.

The paper mines neighbours from Wikipedia with several large models; offline we rank candidate
words (whole alphabetic words of the CLIP vocabulary, plus any user list) by the cosine
similarity of their text-encoder embeddings (the end-token row) to the concept's. A cheap
pre-filter on the input token embeddings keeps the encoder work to a few hundred words.
"""

from __future__ import annotations

import re

import torch

from ..errors import NlceError

_WORD = re.compile(r"^[a-z]{3,}$")


def vocabulary_words() -> list[str]:
    """Whole alphabetic words of the CLIP BPE vocabulary (single tokens, 3+ letters)."""
    from ..tokenizer import clip_vocab_and_merges

    vocab, _ = clip_vocab_and_merges()
    return sorted({w[:-4] for w in vocab if w.endswith("</w>") and _WORD.match(w[:-4])})


def _related(a: str, b: str) -> bool:
    """Same word up to a plural ending, or one a long prefix of the other."""
    if a == b or a in (b + "s", b + "es") or b in (a + "s", a + "es"):
        return True
    short, long_ = sorted((a, b), key=len)
    return len(short) >= 5 and long_.startswith(short)


def _prefilter(encode, terms: list[str], words: list[str], pool: int) -> list[str]:
    """The ``pool`` words whose input token embeddings are closest to the concept's (``nearest_words``)."""
    emb, tok = getattr(encode, "token_embedding", None), getattr(encode, "tokenizer", None)
    if emb is None or tok is None:
        raise NlceError("mining the vocabulary needs an encoder from clip_row_encoder; or pass candidates with vocabulary=False")
    return nearest_words(emb, tok, terms, words, pool)


def nearest_words(emb: torch.Tensor, tok, terms: list[str], words: list[str], pool: int) -> list[str]:
    """The ``pool`` of ``words`` whose CLIP token embeddings (``emb``: the vocabulary's input embedding matrix) are
    closest (cosine) to the mean embedding of the tokens of ``terms``."""
    ids = [i for t in terms for i in tok(t, add_special_tokens=False)["input_ids"]]
    target = emb[ids].float().mean(0)
    word_ids = [tok.convert_tokens_to_ids(w + "</w>") for w in words]
    sims = torch.nn.functional.cosine_similarity(emb[word_ids].float(), target[None], dim=-1)
    return [words[i] for i in sims.topk(min(pool, len(words))).indices.tolist()]


def mine_neighbors(encode, concept, candidates: list[str] | None = None, top_k: int = 8,
                   vocabulary: bool = True, exclude: list[str] = (), pool: int = 400,
                   near_duplicate: float = 0.98) -> list[tuple[str, float]]:
    """Up to ``top_k`` (word, cosine) pairs, most similar first.

    ``concept`` is anything ``concept_terms`` reads (a text, ``"a | b"``, a list of terms; a term
    list is represented by the mean of its terms' embeddings). ``encode`` is a row encoder
    (``clip_row_encoder``); candidates are ``candidates`` plus, with ``vocabulary``, the CLIP
    vocabulary's words (pre-filtered to ``pool`` by token embedding). The concept's own words (and
    their plural forms), the words of ``exclude`` (other concepts) and near-duplicates of an
    already chosen word (cosine above ``near_duplicate``) are left out.
    """
    from .operators import concept_terms

    if isinstance(concept, str) and not concept.strip():
        raise NlceError("no concept given to mine neighbours for")
    name, terms = concept_terms(concept)
    if top_k < 1:
        raise NlceError(f"top_k must be at least 1, got {top_k}")
    others = [t for e in exclude for t in concept_terms(e)[1]]
    own = [w for t in terms + others for w in re.findall(r"[a-z]+", t.lower())]
    user = [c.strip() for c in candidates or [] if c and c.strip()]
    words = _prefilter(encode, terms, vocabulary_words(), pool) if vocabulary else []
    pool_words = list(dict.fromkeys(user + words))
    pool_words = [w for w in pool_words if not any(_related(p, o) for p in re.findall(r"[a-z]+", w.lower()) for o in own)]
    if not pool_words:
        raise NlceError(f"no neighbour candidates left for {name!r}; pass candidate words")
    rows = encode(terms + pool_words)
    vecs = torch.nn.functional.normalize(torch.stack([r[-1] for r in rows]).float(), dim=-1)
    target = torch.nn.functional.normalize(vecs[: len(terms)].mean(0), dim=-1)
    vecs = torch.cat([target[None], vecs[len(terms):]])
    sims = vecs[1:] @ vecs[0]
    chosen: list[int] = []
    for i in sims.argsort(descending=True).tolist():
        w = pool_words[i]
        if any(_related(w.lower(), pool_words[j].lower()) or float(vecs[1 + i] @ vecs[1 + j]) > near_duplicate for j in chosen):
            continue
        chosen.append(i)
        if len(chosen) == top_k:
            break
    return [(pool_words[i], round(float(sims[i]), 4)) for i in chosen]


def neighbor_table(encode, concepts, neighbors=None, top_k: int = 8, on_concept=None) -> dict:
    """What ``build_concept_set`` takes as neighbours, with ``"auto"`` resolved.

    ``neighbors``: None or "" (none), "auto" (mined per concept, never a word of another erased
    concept), a list shared by every concept, or {concept: [neighbours]} (passed through). ``on_concept()`` is called
    after each concept is mined.
    """
    from .operators import concept_terms

    if isinstance(neighbors, str):
        if neighbors.strip().lower() == "auto":
            concepts = [concepts] if isinstance(concepts, str) else list(concepts or [])
            names = [concept_terms(c)[0] for c in concepts]
            table = {}
            for n, c in zip(names, concepts):
                table[n] = [w for w, _ in mine_neighbors(encode, c, top_k=top_k, exclude=[o for o in concepts if o is not c])]
                if on_concept is not None:
                    on_concept()
            return table
        return [n.strip() for n in re.split(r"[\n,]", neighbors) if n.strip()] or None
    return neighbors


def operators_with_progress(encode, concepts: list, neighbors, config, progress=None):
    """``build_concept_set`` with ``neighbors`` as ``neighbor_table`` reads them ("auto": mined), telling
    ``progress(done, total)`` after each concept mined and each built (hosts draw it: large lists take minutes)."""
    from .operators import build_concept_set

    auto = isinstance(neighbors, str) and neighbors.strip().lower() == "auto"
    total, done = len(concepts) * (2 if auto else 1), [0]

    def step():
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    table = neighbor_table(encode, concepts, neighbors, on_concept=step if auto else None)
    return build_concept_set(encode, concepts, table, config, on_concept=step)
