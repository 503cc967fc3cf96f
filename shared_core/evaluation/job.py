"""One evaluation, from its checked settings to its folder (what ``hirm eval`` runs): the patches and the folder
checked, the model loaded, the cases planned and rendered (this process's share), and, by the run that finds every
case done, the text-level report, the attack and the outputs (metrics.json, grid.png, strength.png, report.html)."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

from ..errors import HirmError


@dataclass(frozen=True)
class Outcome:
    """What a run did: ``cases`` in the whole evaluation, ``rendered`` now, this run's share (``mine``, of which
    ``mine_done`` are done), ``missing`` in the folder; ``complete`` when this run wrote the outputs."""

    cases: int
    rendered: int
    mine: int
    mine_done: int
    missing: int
    complete: bool


def versions() -> dict:
    """The versions of what produced the numbers."""
    from importlib import metadata

    from .. import __version__

    out = {"hirm": __version__, "python": sys.version.split()[0]}
    for package in ("torch", "diffusers", "transformers", "accelerate", "nudenet", "onnxruntime"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return out


def run_evaluation(settings: dict, out: str, *, shard: tuple[int, int] | None = None, device: str = "auto",
                   progress: bool = True, started: float | None = None) -> Outcome:
    """Run the evaluation ``settings`` describes (as ``cli_eval`` checks them) into the folder ``out``: a new one, or
    one an earlier run of the same settings left (resumed). ``shard`` (i, n): only every n-th case, from i; under
    ``accelerate launch`` each process renders its share. Every patch file and the folder are checked before the model
    is loaded; nothing is rendered before the model and the settings fit. ``started``: when the command began (for the
    recorded total time)."""
    from ..adapters import pipeline_family, pipeline_row_encoder
    from ..common import resolve_device
    from ..patch import load_patch, pipeline_encoders
    from ..pipelines import load_pipeline
    from ..report import TextView, view_report
    from . import suites as suite_lib
    from .cases import Store, plan, shard_of
    from .run import Defences, process_slot, render_cases

    started = time.perf_counter() if started is None else started
    patches = [(load_patch(p["file"]), p["strength"]) for p in settings["patches"]]  # every file checked before rendering
    index, count, barrier, is_main = process_slot(shard)
    store = Store(out, settings).open(create=False)  # a folder that cannot be used is said before any loading
    device = resolve_device(device)
    if shard is None and count > 1:
        from accelerate import PartialState

        device = str(PartialState().device)
    pipe = load_pipeline(settings["model"], device)
    family = pipeline_family(pipe)  # flux / sd3 (NLCE experimental there), sdxl, sd1
    if family == "flux" and settings["negative_prompt"]:
        raise HirmError("Flux is guidance-distilled and renders without a negative prompt here; leave out --negative-prompt")
    if is_main:
        store.open()
    barrier()
    store.open()
    neighbors = settings["neighbors"]
    if neighbors == "auto":
        from ..nlce import neighbor_table

        table = neighbor_table(pipeline_row_encoder(pipe), settings["concepts"], "auto", 4)
        neighbors = [n for ns in table.values() for n in ns]
    prompts = suite_lib.build(settings["concepts"], settings["suites"], list(neighbors or []), settings["nontarget"])
    prompts += [suite_lib.Prompt(*row) for row in settings["csv_prompts"]]
    cases = plan(prompts, settings["seeds"], settings["guidance"], settings["defences"], settings["strengths"])
    scorers = []
    if settings["nudenet"]:
        from .scores import NudeNetScorer

        scorers.append(NudeNetScorer(settings["nudenet"]["threshold"]))
    if settings["clip"]:
        from .scores import ClipScorer

        scorers.append(ClipScorer(settings["clip"], settings["concepts"], list(neighbors or []), device))
    nlce_settings = {"preset": settings["nlce_preset"]} if settings["nlce_preset"] else {}
    defences = Defences(pipe, patches, settings["concepts"], neighbors, nlce_settings)
    mine = shard_of(cases, index, count)
    spent = render_cases(pipe, defences, mine, store, {"steps": settings["steps"], "size": settings["size"],
                                                       "negative_prompt": settings["negative_prompt"]},
                         scorers, progress=progress and is_main)
    barrier()
    missing = [c for c in cases if not store.done(c)]
    if missing or not is_main:
        return Outcome(cases=len(cases), rendered=spent["rendered"], mine=len(mine),
                       mine_done=len(mine) - len([c for c in mine if not store.done(c)]), missing=len(missing),
                       complete=False)
    report_started = time.perf_counter()
    view = TextView({c: (m, getattr(pipe, "tokenizer" if c == "clip_l" else "tokenizer_2"),
                         *([m.text_projection.weight.detach()] if hasattr(m, "text_projection") else []))
                     for c, m in pipeline_encoders(pipe).items()})
    info = {"format": "hirm-eval-metrics", "settings": settings, "family": family, "prompts": len(prompts),
            "versions": versions(), "scorers": {s.name: s.describe() for s in scorers},
            "text_reports": {p["file"]: view_report(view, patch, strength) for p, (patch, strength)
                             in zip(settings["patches"], patches)}}
    spent["text_report_seconds"] = time.perf_counter() - report_started
    if settings["attack"]:
        if not patches:
            raise HirmError("--attack text searches against the patched text encoder: pass --patch")
        from .attack import AttackSettings, text_attack

        attack_started = time.perf_counter()
        attack = AttackSettings(seed=settings["attack"]["seed"], generations=settings["attack"]["generations"],
                                population=settings["attack"]["population"])
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=attack.generations, desc="text attack", unit="generation")
        info["attack"] = text_attack(view, patches, settings["concepts"][0], attack,
                                     progress=None if bar is None else (lambda done, total: bar.update(done - bar.n)))
        if bar is not None:
            bar.close()
        spent["attack_seconds"] = time.perf_counter() - attack_started
    merge_started = time.perf_counter()
    from .output import merge, write

    metrics = merge(store, cases, info | {"timing": {f"this_run_{k}": round(v, 3) for k, v in spent.items()}})
    spent["merge_seconds"] = time.perf_counter() - merge_started
    timing = metrics["timing"]
    timing["this_run_merge_seconds"] = round(spent["merge_seconds"], 3)
    if spent["render_seconds"] > 0:  # what the evaluation adds to rendering: image scores, files, text report, the outputs
        added = sum(spent[k] for k in ("scoring_seconds", "writing_seconds", "text_report_seconds", "merge_seconds"))
        timing["overhead_ratio"] = round(added / spent["render_seconds"], 4)
    timing["total_seconds"] = round(time.perf_counter() - started, 3)
    write(store, "metrics.json", json.dumps(metrics, indent=2, sort_keys=True).encode())
    return Outcome(cases=len(cases), rendered=spent["rendered"], mine=len(mine), mine_done=len(mine), missing=0,
                   complete=True)
