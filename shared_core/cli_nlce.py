"""``hirm nlce``: render a diffusers SD1.x, SDXL, Flux or SD3 pipeline with and without NLCE erasure, side by side."""

from __future__ import annotations

import json

from .errors import HirmError
from .files import atomic_write
from .pipelines import NO_MODEL



def add_parser(subparsers) -> None:
    from .nlce import NLCE_PRESETS
    from .nlce.config import setting_help as h

    n = subparsers.add_parser("nlce", help="render with and without NLCE erasure (diffusers SD1.x / SDXL; Flux / SD3 "
                                           "experimental), one grid PNG",
                              description="Erase concepts at sampling time (no training) and save a side-by-side grid: "
                                          "left without, right with the erasure (same seed).")
    n.add_argument("model", nargs="?", help="diffusers SD1.x, SDXL, Flux or SD3 model folder or Hub id")
    n.add_argument("--concept", action="append", help="concept to erase (repeat for several); 'a | b | c' is ONE concept made "
                   "of several terms; 'nudity' stands for the shipped nudity term list")
    n.add_argument("--concepts", metavar="FILE", help="a text file of concepts to erase, one per line ('#' comments; "
                   "'a | b' is one concept of several terms); adds to --concept")
    n.add_argument("--concept-terms", action="append", metavar="FILE",
                   help="a text file of terms, one per line, that form ONE concept's subspace (repeatable)")
    n.add_argument("--neighbor", action="append", help="neighbour concept to keep (repeatable)")
    n.add_argument("--neighbors", choices=("auto",), help="auto: mine neighbours offline from the CLIP vocabulary")
    n.add_argument("--operators", metavar="FILE", help="NLCE operator file (from --save-operators or ConceptSet.save) instead of --concept")
    n.add_argument("--save-operators", metavar="FILE", help="also write the concept operators used, to share or reuse")
    n.add_argument("--prompt", action="append", help="prompt to render (repeat for several rows)")
    n.add_argument("--negative-prompt", default=None)
    n.add_argument("--patch", action="append",
                   help="also apply a HiRM patch (FILE or FILE:STRENGTH) to the text encoders for the erased column")
    n.add_argument("--preset", choices=sorted(NLCE_PRESETS), help="settings of the reference code for this kind of concept")
    n.add_argument("--schedule", choices=("single-pass", "faithful"), help=h("schedule", False))
    n.add_argument("--beta", type=float, help=h("beta"))
    n.add_argument("--gamma", type=float, help=h("gamma") + " (the preset's when not given)")
    n.add_argument("--suppression", choices=("mask", "scale"), help=h("suppression", False))
    n.add_argument("--scrub", choices=("soft", "binary"), help=h("scrub", False))
    n.add_argument("--t-max", type=float, help=h("t_max"))
    n.add_argument("--steps", type=int, default=25)
    n.add_argument("--guidance", type=float, default=7.5)
    n.add_argument("--size", type=int, default=512, help="image side in pixels (a multiple of 8)")
    n.add_argument("--seed", type=int, default=0)
    n.add_argument("--device", default="auto")
    n.add_argument("--out", default="nlce-grid.png")
    n.add_argument("--force", action="store_true", help="replace --out / --save-operators if they are a grid / operator file "
                   "this tool wrote (never any other file)")
    n.set_defaults(func=cmd_nlce)


def _is_grid(path: str) -> bool:
    """A PNG this command wrote (it carries the ``hirm-nlce`` text chunk)."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            return im.format == "PNG" and "hirm-nlce" in getattr(im, "text", {})
    except Exception:
        return False


def _check_args(args) -> None:
    import os

    from .common import check_guidance, check_seed, check_text

    if not args.model:
        raise HirmError(NO_MODEL)
    if args.concepts:  # read and checked line by line before anything else (docs/hirm-lists.md: list files)
        from .lists import read_list

        args.concept = list(args.concept or []) + read_list(args.concepts, "concept")
    for flag, texts in (("--concept", args.concept), ("--neighbor", args.neighbor), ("--prompt", args.prompt),
                        ("--negative-prompt", [] if args.negative_prompt is None else [args.negative_prompt])):
        for text in texts or []:
            check_text(text, flag)  # never echoed raw to a terminal, never stored raw in the grid's record
    if args.operators and (args.concept or args.concept_terms or args.neighbor or args.neighbors):
        raise HirmError("--operators already holds the concepts and neighbours; drop --concept/--concepts/--concept-terms/--neighbor/"
                        "--neighbors")
    if not args.operators and not (args.concept or args.concept_terms):
        raise HirmError("no concept to erase: pass --concept (repeatable), --concepts FILE, --concept-terms FILE or --operators FILE")
    if args.neighbors and args.neighbor:
        raise HirmError("pass either --neighbor words or --neighbors auto, not both")
    if args.steps < 1:
        raise HirmError(f"--steps {args.steps}: give at least 1")
    if args.size < 8 or args.size % 8:
        raise HirmError(f"--size {args.size}: the image side must be a positive multiple of 8 (e.g. 512)")
    check_seed(args.seed, "--seed")
    check_guidance(args.guidance, "--guidance")
    from .files import check_target, check_writable_folder
    from .nlce.operators import is_operator_file

    if args.save_operators and (os.path.realpath(args.save_operators) == os.path.realpath(args.out)
                                or (os.path.exists(args.out) and os.path.exists(args.save_operators)
                                    and os.path.samefile(args.out, args.save_operators))):
        raise HirmError(f"--out and --save-operators both name {args.out}: give the grid image and the operator file "
                        "different names")
    check_target(args.out, args.force, _is_grid, "grid image")  # before any model is loaded or image made
    check_writable_folder(os.path.dirname(os.path.abspath(args.out)), f"--out {args.out}")
    if args.save_operators:
        check_target(args.save_operators, args.force, is_operator_file, "NLCE operator file")
        check_writable_folder(os.path.dirname(os.path.abspath(args.save_operators)),
                              f"--save-operators {args.save_operators}")


def _load_operators(path: str):
    """An operator file, read and checked before any model is loaded; its concept texts by the rule typed ones follow."""
    from .common import check_text
    from .nlce import ConceptSet

    concept_set = ConceptSet.load(path)
    for text in [*concept_set.concepts, *(n for ns in concept_set.neighbors.values() for n in ns),
                 *(t for ts in concept_set.terms.values() for t in ts)]:
        check_text(text, f"--operators {path}: a concept")
    return concept_set


def _concept_set(args, concepts, pipe, config, loaded=None):
    """The operators: loaded (``loaded``, read by ``_load_operators``), or built with the pipeline's text encoder as
    the erased column will run it."""
    from .adapters import pipeline_concept_set

    if args.operators:
        return loaded if loaded is not None else _load_operators(args.operators)
    return pipeline_concept_set(pipe, concepts, args.neighbors or args.neighbor, config)


def _concepts(args) -> list:
    """--concept texts, plus one concept per --concept-terms file (its lines are the terms of ONE subspace)."""
    from .common import check_text

    concepts = list(args.concept or [])
    for path in args.concept_terms or []:
        try:
            with open(path, encoding="utf-8") as f:
                terms = [check_text(ln.strip(), f"--concept-terms {path}, line {i}:")
                         for i, ln in enumerate(f, start=1) if ln.strip() and not ln.lstrip().startswith("#")]
        except OSError as e:
            raise HirmError(f"--concept-terms {path}: cannot read it ({e.strerror})") from None
        except UnicodeDecodeError:
            raise HirmError(f"--concept-terms {path}: not a UTF-8 text file (one term per line)") from None
        if not terms:
            raise HirmError(f"--concept-terms {path}: no terms in it (one per line)")
        concepts.append(terms)
    return concepts


def cmd_nlce(args) -> int:
    import torch
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from .common import parse_patch_arg, resolve_device
    from .adapters import apply_nlce
    from .nlce import make_nlce_config
    from .patch import load_patch, patched_pipeline
    from .pipelines import load_pipeline

    _check_args(args)
    settings = {k: v for k, v in (("schedule", args.schedule), ("beta", args.beta), ("gamma", args.gamma),
                                  ("suppression", args.suppression), ("scrub", args.scrub), ("t_max", args.t_max)) if v is not None}
    config = make_nlce_config(args.preset, **settings)  # bad settings fail before any model is loaded
    concepts = _concepts(args)
    patch_args = [parse_patch_arg(p) for p in args.patch or []]
    patches = [(load_patch(f), s) for f, s in patch_args]
    loaded = _load_operators(args.operators) if args.operators else None  # checked before any model is loaded
    pipe = load_pipeline(args.model, resolve_device(args.device))

    def render(prompt):
        g = torch.Generator(device="cpu").manual_seed(args.seed)
        return pipe(prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                    height=args.size, width=args.size, generator=g).images[0]

    # the erased column first: every check (patches, concepts, settings, model) runs before any image is made
    with patched_pipeline(pipe, patches):
        concept_set = _concept_set(args, concepts, pipe, config, loaded)
        prompts = args.prompt or [f"a picture of {concept_set.concepts[0]}"]
        handle = apply_nlce(pipe, concept_set=concept_set, preset=args.preset, **settings)
        try:
            if args.save_operators:
                concept_set.save(args.save_operators, overwrite=args.force)
            after = [render(p) for p in prompts]
        finally:
            handle.remove()
    before = [render(p) for p in prompts]
    w, h = before[0].size
    grid = Image.new("RGB", (2 * w, h * len(prompts)))
    for i, (a, b) in enumerate(zip(before, after)):
        grid.paste(a, (0, i * h))
        grid.paste(b, (w, i * h))
    info = PngInfo()
    record = {"model": args.model, "concepts": concept_set.concepts, "neighbors": concept_set.neighbors,
              "settings": handle.session.config.to_dict(), "operators": args.operators, "prompts": prompts,
              "negative_prompt": args.negative_prompt, "seed": args.seed, "steps": args.steps, "guidance": args.guidance,
              "size": args.size, "patches": [{"file": f, "strength": s} for f, s in patch_args],
              "layout": "left: without erasure, right: with erasure"}
    info.add_text("hirm-nlce", json.dumps(record))
    atomic_write(args.out, lambda f: grid.save(f, format="PNG", pnginfo=info), overwrite=args.force, is_ours=_is_grid, what="grid image")
    print(f"wrote {args.out} (left: without, right: with erasure of {', '.join(concept_set.concepts)}; "
          f"neighbours {json.dumps(concept_set.neighbors)})")
    return 0
