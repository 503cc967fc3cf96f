"""Rendering the cases of an evaluation under each defence, in one process, a shard, or one of several processes."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

from .cases import Case, Store


@dataclass
class Defences:
    """How each defence is put on the pipeline: HiRM patches on its text encoders, NLCE in its UNet, or both."""

    pipe: object
    patches: list = field(default_factory=list)          # [(ErasurePatch, strength)]
    nlce_concepts: list = field(default_factory=list)
    nlce_neighbors: object = None
    nlce_settings: dict = field(default_factory=dict)
    _operators: dict = field(default_factory=dict)        # "plain" / "patched" -> ConceptSet

    def _concept_set(self, which: str):
        """NLCE operators built with the encoders the prompts go through (patched ones for "both"), once."""
        if which not in self._operators:
            from ..nlce import make_nlce_config
            from ..adapters import pipeline_concept_set

            config = make_nlce_config(self.nlce_settings.get("preset"), **{k: v for k, v in self.nlce_settings.items()
                                                                           if k != "preset"})
            self._operators[which] = pipeline_concept_set(self.pipe, self.nlce_concepts, self.nlce_neighbors, config)
        return self._operators[which]

    @contextlib.contextmanager
    def on(self, defence: str, strength: float = 1.0):
        """The pipeline with ``defence`` on (patch strengths times ``strength``); as it was after."""
        from ..adapters import apply_nlce
        from ..patch import patched_pipeline

        with contextlib.ExitStack() as stack:
            if defence in ("patch", "both"):
                stack.enter_context(patched_pipeline(self.pipe, [(p, s * strength) for p, s in self.patches]))
            if defence in ("nlce", "both"):
                operators = self._concept_set("patched" if defence == "both" else "plain")
                stack.enter_context(apply_nlce(self.pipe, concept_set=operators,
                                               **{k: v for k, v in self.nlce_settings.items() if k != "preset"}))
            yield


def process_slot(shard: tuple[int, int] | None):
    """(index, count, barrier, is_main) of this process: ``--shard i/n``, a process of ``accelerate launch`` (its
    PartialState), or the only process."""
    if shard is not None:  # separate runs: each may be the one that finds every case done and writes the report
        return shard[0], shard[1], (lambda: None), True
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # accelerate launch (and torchrun) set it
        from accelerate import PartialState

        state = PartialState()
        return state.process_index, state.num_processes, state.wait_for_everyone, state.is_main_process
    return 0, 1, (lambda: None), True


def render_cases(pipe, defences: Defences, cases: list[Case], store: Store, render_settings: dict, scorers: list,
                 progress: bool = True) -> dict:
    """Render (and score, with the scorers that read one image) every case of ``cases`` not yet in ``store``; grouped by
    defence so that each is put on once. Returns seconds spent rendering and scoring."""
    import torch

    pending = [c for c in cases if not store.done(c)]
    spent = {"render_seconds": 0.0, "scoring_seconds": 0.0, "writing_seconds": 0.0, "rendered": len(pending)}
    if not pending:
        return spent
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(pending), desc="rendering", unit="image")
    negative = {"negative_prompt": render_settings["negative_prompt"]} if render_settings.get("negative_prompt") else {}
    by_defence: dict[tuple[str, float], list[Case]] = {}
    for c in pending:
        by_defence.setdefault((c.defence, c.strength), []).append(c)
    try:
        for (defence, strength), group in by_defence.items():
            with defences.on(defence, strength):
                for case in group:
                    start = time.perf_counter()
                    generator = torch.Generator(device="cpu").manual_seed(case.seed)
                    image = pipe(case.prompt, num_inference_steps=render_settings["steps"], guidance_scale=case.guidance,
                                 height=render_settings["size"], width=render_settings["size"], generator=generator,
                                 **negative).images[0]
                    rendered = time.perf_counter()
                    scores = {s.name: s(image, case.prompt) for s in scorers}
                    scored = time.perf_counter()
                    store.save(case, image, {"scores": scores, "render_seconds": round(rendered - start, 4),
                                             "scoring_seconds": round(scored - rendered, 4)})
                    spent["render_seconds"] += rendered - start
                    spent["scoring_seconds"] += scored - rendered
                    spent["writing_seconds"] += time.perf_counter() - scored
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return spent
