"""``hirm eval``: render prompt suites without and with each defence at fixed seeds, score them, and report."""

from __future__ import annotations

import hashlib
import math
import os
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
    from .common import check_guidance, check_seed, check_strength, check_text, parse_patch_arg

    if not args.model:
        raise HirmError(NO_MODEL)
    if not args.out:
        raise HirmError("no --out folder given: name a new folder for the evaluation (an earlier run's folder resumes it)")
    concepts = [c.strip() for c in args.concept or [] if c and c.strip()]
    if not concepts:
        raise HirmError("no --concept given: name the erased concept (repeatable)")
    for c in concepts:
        check_text(c, "--concept")
    for n in args.neighbor or []:
        check_text(n, "--neighbor")
    if args.negative_prompt is not None:
        check_text(args.negative_prompt, "--negative-prompt")
    if not args.patch and not args.nlce:
        raise HirmError("nothing to evaluate: pass --patch FILE (a HiRM patch) and/or --nlce")
    if args.steps < 1 or args.size < 8 or args.size % 8:
        raise HirmError("--steps must be at least 1 and --size a positive multiple of 8 (e.g. 512)")
    check_guidance(args.guidance, "--guidance")
    if args.neighbor and args.neighbors:
        raise HirmError("pass either --neighbor words or --neighbors auto, not both")
    from .evaluation.suites import DEFAULT_SUITES, SUITES

    suites = [s.strip() for s in (args.suite or ",".join(DEFAULT_SUITES)).split(",") if s.strip()]
    if any(c.lower() == "nudity" for c in concepts) and "nudity" not in suites and not args.suite:
        suites.append("nudity")
    unknown = sorted(set(suites) - set(SUITES))
    if unknown:
        raise HirmError(f"unknown suite {unknown[0]!r}; choose from {', '.join(SUITES)}")
    if args.attack and not args.patch:
        raise HirmError("--attack text searches against the patched text encoder: pass --patch")
    if args.attack:
        check_seed(args.attack_seed, "--attack-seed")
        if args.attack_generations < 1 or args.attack_population < 1:
            raise HirmError("--attack-generations and --attack-population must be at least 1")
    if args.nudenet:
        from importlib.util import find_spec

        from .evaluation.scores import NUDENET_MISSING

        if find_spec("nudenet") is None:
            raise HirmError(NUDENET_MISSING)
        if not 0.0 < args.nudenet_threshold <= 1.0:  # nan too
            raise HirmError(f"--nudenet-threshold {args.nudenet_threshold}: give a score from 0 to 1")
    if args.csv_limit is not None and args.csv_limit < 1:
        raise HirmError(f"--csv-limit {args.csv_limit}: give at least 1 (or leave it out for every row)")
    patches = []
    for text in args.patch or []:
        path, strength = parse_patch_arg(text)
        if not os.path.isfile(path):
            raise HirmError(f"--patch {path}: no such file")
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
        patches.append({"file": path, "strength": strength, "sha256": digest})
    seeds = [check_seed(seed, "--seeds: each seed") for seed in _numbers(args.seeds, int, "--seeds")] or [0]
    strengths = _numbers(args.strengths, float, "--strengths") if args.patch else []
    for factor in strengths:  # each factor scales every patch's strength: the product must be a strength (-4..4)
        if not math.isfinite(factor):
            raise HirmError(f"--strengths {args.strengths!r}: give finite numbers (factors of the patches' strengths, e.g. "
                            "0.25,0.5,0.75)")
        for p in patches:
            check_strength(p["strength"] * factor, f"--strengths {factor:g} with --patch {p['file']}:{p['strength']:g}: "
                                                   "the strength")
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


def cmd_eval(args) -> int:
    from .evaluation.job import run_evaluation

    started = time.perf_counter()
    settings = _check(args)
    outcome = run_evaluation(settings, args.out, shard=_shard(args.shard), device=args.device, progress=not args.quiet,
                             started=started)
    if outcome.missing:
        print(f"{outcome.mine_done} of this run's {outcome.mine} images done; {outcome.missing} of {outcome.cases} still "
              f"missing in {args.out}: run the other shards (or this command again) and the run that finds every image "
              "done writes the report")
    elif outcome.complete:
        print(f"wrote {os.path.join(args.out, 'report.html')} (and grid.png, metrics.json): {outcome.cases} images, "
              f"{outcome.rendered} rendered now; {', '.join(f'{d}' for d in settings['defences'])}")
    return 0


cmd_eval.interrupted = "the finished images are kept in --out: run the same command again to render the rest"
