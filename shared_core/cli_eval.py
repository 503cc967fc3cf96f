"""``hirm eval``: render prompt suites without and with each defence at fixed seeds, score them, and report."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

from .errors import HirmError
from .pipelines import NO_MODEL


def add_parser(subparsers) -> None:
    from .evaluation.suites import DEFAULT_SUITES, SUITES
    from .nlce import NLCE_PRESETS

    e = subparsers.add_parser(
        "eval", help="render, score and report an erasure (diffusers SD1.x / SDXL): grid, metrics.json, report.html",
        description="Render prompt suites at fixed seeds without and with each defence (HiRM patches, NLCE, both), score "
                    "the images and write DIR/grid.png, DIR/strength.png, DIR/metrics.json and DIR/report.html. Finished "
                    "images are kept: a rerun renders only what is missing. --shard i/n, or 'accelerate launch', splits the "
                    "work between runs or processes.")
    e.add_argument("model", nargs="?", help="diffusers SD1.x, SDXL, Flux or SD3 folder or Hub id, or an SD1.x / SDXL single-file checkpoint")
    e.add_argument("--concept", action="append", help="the erased concept (repeat for several): the target and paraphrase "
                   "suites ask for it, and NLCE erases it")
    e.add_argument("--patch", action="append", help="a HiRM patch FILE or FILE:STRENGTH (repeatable): the 'patch' defence")
    e.add_argument("--nlce", action="store_true", help="also evaluate NLCE erasing the concepts (the 'nlce' defence, and "
                   "'both' with --patch)")
    e.add_argument("--nlce-preset", choices=sorted(NLCE_PRESETS), help="NLCE's settings for this kind of concept")
    e.add_argument("--neighbor", action="append", help="a neighbour concept (repeatable): its prompts show what else changed, "
                   "and NLCE keeps it")
    e.add_argument("--neighbors", choices=("auto",), help="auto: mine neighbours offline from the CLIP vocabulary")
    e.add_argument("--suite", help=f"comma-separated suites from {', '.join(SUITES)} (default: {','.join(DEFAULT_SUITES)}; "
                   "nudity is added for the concept 'nudity')")
    e.add_argument("--prompts-csv", metavar="FILE", help="also the prompts of a CSV in the I2P layout (prompt, evaluation_seed, "
                   "evaluation_guidance, categories)")
    e.add_argument("--csv-limit", type=int, help="only the first N rows of --prompts-csv")
    e.add_argument("--nontarget", type=int, default=8, help="how many of the shipped non-target prompts (default 8)")
    e.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    e.add_argument("--steps", type=int, default=25)
    e.add_argument("--size", type=int, default=512, help="image side in pixels (a multiple of 8)")
    e.add_argument("--guidance", type=float, default=7.5)
    e.add_argument("--negative-prompt", default=None)
    e.add_argument("--strengths", default="0.25,0.5,0.75", help="the patches' strength sweep on the first prompt "
                   "(comma-separated factors; '' for none)")
    e.add_argument("--nudenet", action="store_true", help="score nudity with NudeNet's detector (pip install "
                   "'hirm-erasure[eval]')")
    e.add_argument("--nudenet-threshold", type=float, default=0.6, help="detector score that counts (default 0.6)")
    e.add_argument("--clip", metavar="MODEL", help="a CLIP model folder or Hub id: CLIP score and concept classification")
    e.add_argument("--attack", choices=("text",), help="text: a Ring-A-Bell-style search for prompts that bring the concept "
                   "back through the patched text encoder")
    e.add_argument("--attack-generations", type=int, default=20)
    e.add_argument("--attack-population", type=int, default=32)
    e.add_argument("--attack-seed", type=int, default=0)
    e.add_argument("--shard", help="i/n: render only every n-th case, starting at i (several runs share the folder); the "
                   "run that finds every case done writes the report")
    e.add_argument("--device", default="auto")
    e.add_argument("--out", help="the evaluation folder (new, or an earlier run's with the same settings to resume it)")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_eval)


def _numbers(text: str, kind, what: str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise HirmError(f"{what} {text!r}: give comma-separated numbers") from None


def _shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise HirmError(f"--shard {text!r}: write i/n, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise HirmError(f"--shard {text}: i must be from 0 to n-1")
    return i, n


def _check(args) -> dict:
    """Every argument checked before anything is loaded; the settings that decide the images and scores."""
    from .common import parse_patch_arg

    if not args.model:
        raise HirmError(NO_MODEL)
    if not args.out:
        raise HirmError("no --out folder given: name a new folder for the evaluation (an earlier run's folder resumes it)")
    concepts = [c.strip() for c in args.concept or [] if c and c.strip()]
    if not concepts:
        raise HirmError("no --concept given: name the erased concept (repeatable)")
    if not args.patch and not args.nlce:
        raise HirmError("nothing to evaluate: pass --patch FILE (a HiRM patch) and/or --nlce")
    if args.steps < 1 or args.size < 8 or args.size % 8:
        raise HirmError("--steps must be at least 1 and --size a positive multiple of 8 (e.g. 512)")
    if args.neighbor and args.neighbors:
        raise HirmError("pass either --neighbor words or --neighbors auto, not both")
    from .evaluation.suites import DEFAULT_SUITES

    suites = [s.strip() for s in (args.suite or ",".join(DEFAULT_SUITES)).split(",") if s.strip()]
    if any(c.lower() == "nudity" for c in concepts) and "nudity" not in suites and not args.suite:
        suites.append("nudity")
    patches = []
    for text in args.patch or []:
        path, strength = parse_patch_arg(text)
        if not os.path.isfile(path):
            raise HirmError(f"--patch {path}: no such file")
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
        patches.append({"file": path, "strength": strength, "sha256": digest})
    seeds = _numbers(args.seeds, int, "--seeds") or [0]
    strengths = _numbers(args.strengths, float, "--strengths") if args.patch else []
    csv_prompts = []
    if args.prompts_csv:
        from .evaluation.suites import read_csv

        csv_prompts = [[p.text, p.group, p.seed, p.guidance] for p in read_csv(args.prompts_csv, args.csv_limit)]
    defences = ["none"] + (["patch"] if patches else []) + (["nlce"] if args.nlce else []) + (["both"] if patches and args.nlce else [])
    return {"model": args.model, "concepts": concepts, "patches": patches, "nlce": bool(args.nlce),
            "nlce_preset": args.nlce_preset, "neighbors": args.neighbor or args.neighbors, "suites": suites,
            "prompts_csv": args.prompts_csv, "csv_prompts": csv_prompts, "nontarget": args.nontarget, "seeds": seeds,
            "steps": args.steps, "size": args.size, "guidance": args.guidance, "negative_prompt": args.negative_prompt,
            "strengths": strengths, "defences": defences,
            "nudenet": {"threshold": args.nudenet_threshold} if args.nudenet else None, "clip": args.clip,
            "attack": None if not args.attack else {"kind": args.attack, "generations": args.attack_generations,
                                                    "population": args.attack_population, "seed": args.attack_seed}}


def _versions(scorers) -> dict:
    from importlib import metadata

    from . import __version__

    out = {"hirm": __version__, "python": sys.version.split()[0]}
    for package in ("torch", "diffusers", "transformers", "accelerate", "nudenet", "onnxruntime"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return out


def cmd_eval(args) -> int:
    from .common import resolve_device
    from .evaluation import suites as suite_lib
    from .evaluation.cases import Store, plan, shard_of
    from .evaluation.run import Defences, process_slot, render_cases
    from .adapters import pipeline_family, pipeline_row_encoder
    from .patch import load_patch, pipeline_encoders
    from .pipelines import load_pipeline
    from .report import TextView, view_report

    started = time.perf_counter()
    settings = _check(args)
    patches = [(load_patch(p["file"]), p["strength"]) for p in settings["patches"]]  # every file checked before rendering
    shard = _shard(args.shard)
    index, count, barrier, is_main = process_slot(shard)
    store = Store(args.out, settings).open(create=False)  # a folder that cannot be used is said before any loading
    device = resolve_device(args.device)
    if shard is None and count > 1:
        from accelerate import PartialState

        device = str(PartialState().device)
    pipe = load_pipeline(args.model, device)
    family = pipeline_family(pipe)  # flux / sd3 (NLCE experimental there), sdxl, sd1
    if family == "flux" and settings["negative_prompt"]:
        raise HirmError("Flux is guidance-distilled and renders without a negative prompt here; leave out --negative-prompt")
    if is_main:
        store.open()
    barrier()
    store.open()
    neighbors = settings["neighbors"]
    if neighbors == "auto":
        from .nlce import neighbor_table

        table = neighbor_table(pipeline_row_encoder(pipe), settings["concepts"], "auto", 4)
        neighbors = [n for ns in table.values() for n in ns]
    prompts = suite_lib.build(settings["concepts"], settings["suites"], list(neighbors or []), settings["nontarget"])
    prompts += [suite_lib.Prompt(*row) for row in settings["csv_prompts"]]
    cases = plan(prompts, settings["seeds"], settings["guidance"], settings["defences"], settings["strengths"])
    scorers = []
    if settings["nudenet"]:
        from .evaluation.scores import NudeNetScorer

        scorers.append(NudeNetScorer(settings["nudenet"]["threshold"]))
    if settings["clip"]:
        from .evaluation.scores import ClipScorer

        scorers.append(ClipScorer(settings["clip"], settings["concepts"], list(neighbors or []), device))
    nlce_settings = {"preset": settings["nlce_preset"]} if settings["nlce_preset"] else {}
    defences = Defences(pipe, patches, settings["concepts"], neighbors, nlce_settings)
    mine = shard_of(cases, index, count)
    spent = render_cases(pipe, defences, mine, store, {"steps": settings["steps"], "size": settings["size"],
                                                       "negative_prompt": settings["negative_prompt"]},
                         scorers, progress=not args.quiet and is_main)
    barrier()
    missing = [c for c in cases if not store.done(c)]
    if missing or not is_main:
        if missing:
            print(f"{len(mine) - len([c for c in mine if not store.done(c)])} of this run's {len(mine)} images done; "
                  f"{len(missing)} of {len(cases)} still missing in {args.out}: run the other shards (or this command "
                  "again) and the run that finds every image done writes the report")
        return 0
    report_started = time.perf_counter()
    view = TextView({c: (m, getattr(pipe, "tokenizer" if c == "clip_l" else "tokenizer_2"),
                         *([m.text_projection.weight.detach()] if hasattr(m, "text_projection") else []))
                     for c, m in pipeline_encoders(pipe).items()})
    info = {"format": "hirm-eval-metrics", "settings": settings, "family": family, "prompts": len(prompts),
            "versions": _versions(scorers), "scorers": {s.name: s.describe() for s in scorers},
            "text_reports": {p["file"]: view_report(view, patch, strength) for p, (patch, strength)
                             in zip(settings["patches"], patches)}}
    spent["text_report_seconds"] = time.perf_counter() - report_started
    if settings["attack"]:
        if not patches:
            raise HirmError("--attack text searches against the patched text encoder: pass --patch")
        from .evaluation.attack import AttackSettings, text_attack

        attack_started = time.perf_counter()
        attack = AttackSettings(seed=settings["attack"]["seed"], generations=settings["attack"]["generations"],
                                population=settings["attack"]["population"])
        bar = None
        if not args.quiet:
            from tqdm import tqdm

            bar = tqdm(total=attack.generations, desc="text attack", unit="generation")
        info["attack"] = text_attack(view, patches, settings["concepts"][0], attack,
                                     progress=None if bar is None else (lambda done, total: bar.update(done - bar.n)))
        if bar is not None:
            bar.close()
        spent["attack_seconds"] = time.perf_counter() - attack_started
    merge_started = time.perf_counter()
    from .evaluation.output import merge, write

    metrics = merge(store, cases, info | {"timing": {f"this_run_{k}": round(v, 3) for k, v in spent.items()}})
    spent["merge_seconds"] = time.perf_counter() - merge_started
    timing = metrics["timing"]
    timing["this_run_merge_seconds"] = round(spent["merge_seconds"], 3)
    if spent["render_seconds"] > 0:  # what the evaluation adds to rendering: image scores, files, text report, the outputs
        added = sum(spent[k] for k in ("scoring_seconds", "writing_seconds", "text_report_seconds", "merge_seconds"))
        timing["overhead_ratio"] = round(added / spent["render_seconds"], 4)
    timing["total_seconds"] = round(time.perf_counter() - started, 3)
    write(store, "metrics.json", json.dumps(metrics, indent=2, sort_keys=True).encode())
    print(f"wrote {os.path.join(args.out, 'report.html')} (and grid.png, metrics.json): {len(cases)} images, "
          f"{spent['rendered']} rendered now; {', '.join(f'{d}' for d in settings['defences'])}")
    return 0


cmd_eval.interrupted = "the finished images are kept in --out: run the same command again to render the rest"
