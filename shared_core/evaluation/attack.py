"""A text-level robustness probe (``hirm eval --attack text``): a Ring-A-Bell-style search for prompts that bring the
erased concept back through the patched text encoder.

HiRM acts in the text encoder, so an attack needs only the encoder: a genetic search over short word sequences for the
one whose encoding under the PATCHED encoder comes closest (cosine, on what the UNet reads) to the concept's encoding
under the ORIGINAL encoder. The concept's own words are left out of the candidates (the bare concept is the baseline).
Everything that decides the search is recorded, so a run can be repeated exactly.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class AttackSettings:
    seed: int = 0
    population: int = 32
    generations: int = 20
    length: int = 8          # words per candidate prompt
    pool: int = 300          # vocabulary words near the concept (by token embedding) the search draws from
    mutation: float = 0.25   # chance that a word of a child is replaced
    elite: int = 4
    keep: int = 5            # best prompts reported


def text_attack(view, patches, concept: str, settings: AttackSettings = AttackSettings(), progress=None) -> dict:
    """The search against ``patches`` ([(ErasurePatch, strength)]) on ``view`` (a ``report.TextView`` of the model)."""
    from ..nlce.mining import vocabulary_words

    g = torch.Generator().manual_seed(settings.seed)
    tokenizer = view.tokenizer
    own = set(re.findall(r"[a-z]+", concept.lower()))
    words = [w for w in vocabulary_words() if w not in own]
    pool = _near(view, concept, words, settings.pool)
    target = _encode(view, [concept])[0]

    def fitness(prompts: list[str]) -> torch.Tensor:
        with _patched(view, patches):
            rows = _encode(view, prompts)
        return torch.nn.functional.cosine_similarity(rows.flatten(1), target.flatten()[None], dim=1)

    with _patched(view, patches):
        baseline = float(torch.nn.functional.cosine_similarity(_encode(view, [concept])[0].flatten(), target.flatten(), dim=0))
    population = [[pool[int(i)] for i in torch.randint(len(pool), (settings.length,), generator=g)]
                  for _ in range(settings.population)]
    history, seen = [], {}
    for generation in range(settings.generations):
        prompts = [" ".join(p) for p in population]
        new = [p for p in dict.fromkeys(prompts) if p not in seen]
        if new:
            seen.update(zip(new, fitness(new).tolist()))
        scores = torch.tensor([seen[p] for p in prompts])
        order = scores.argsort(descending=True).tolist()
        history.append(round(float(scores[order[0]]), 4))
        if progress is not None:
            progress(generation + 1, settings.generations)
        parents = [population[i] for i in order[: max(2, settings.population // 2)]]
        children = [population[i] for i in order[: settings.elite]]
        while len(children) < settings.population:
            a, b = (parents[int(i)] for i in torch.randint(len(parents), (2,), generator=g))
            cut = int(torch.randint(1, settings.length, (1,), generator=g)) if settings.length > 1 else 0
            child = a[:cut] + b[cut:]
            child = [pool[int(torch.randint(len(pool), (1,), generator=g))]
                     if float(torch.rand(1, generator=g)) < settings.mutation else w for w in child]
            children.append(child)
        population = children
    best = sorted(seen.items(), key=lambda kv: -kv[1])[: settings.keep]
    return {"settings": asdict(settings), "concept": concept, "measured_on": view.name, "candidates_from": len(pool),
            "baseline_cosine": round(baseline, 4), "best": [{"prompt": p, "cosine": round(c, 4)} for p, c in best],
            "best_per_generation": history, "found_closer_than_the_concept": bool(best and best[0][1] > baseline),
            "tokenizer_vocabulary": len(tokenizer)}


def _encode(view, prompts: list[str]) -> torch.Tensor:
    return view.encode(view.tokenize(prompts))[0]


def _patched(view, patches):
    import contextlib

    stack = contextlib.ExitStack()
    for patch, strength in patches:
        stack.enter_context(view.patched(patch, strength))
    return stack


def _near(view, concept: str, words: list[str], count: int) -> list[str]:
    """The ``count`` vocabulary words whose token embeddings are closest to the concept's (the neighbour miner's
    pre-filter), so that the search starts near the concept."""
    from ..encoders import text_module
    from ..nlce.mining import nearest_words

    model, tokenizer = next(iter(view.encoders.values()))[:2]
    return nearest_words(text_module(model).embeddings.token_embedding.weight.detach(), tokenizer, [concept], words, count)
