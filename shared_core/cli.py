"""The ``hirm`` command line: train, inspect and apply erasure patches (and NLCE, Hub sharing).

Over 400 lines because the argument parser of every subcommand lives here, beside the small commands it calls; the
larger commands have their own modules (cli_eval, cli_hub, cli_nlce) and their work lives in the library.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings

from . import __version__, cli_eval, cli_hub, cli_nlce
from .common import concept_list, parse_patch_arg, resolve_device, slug
from .errors import HirmError
from .files import atomic_write, check_target

SOURCE_HELP = ("the text encoder: a single-file checkpoint (SD1.x, SDXL, Flux/SD3 clip_l, ComfyUI state dict), "
               "a diffusers or transformers model folder, or a Hugging Face Hub repo id")
NO_SOURCE = ("no text encoder given: pass a checkpoint file (e.g. v1-5-pruned-emaonly.safetensors, sd_xl_base_1.0.safetensors, "
             "clip_l.safetensors), a diffusers model folder or a Hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5); "
             "run 'hirm demo' to check the install on a tiny random model")


class _Progress:
    """tqdm bar on stderr for training steps."""

    def __init__(self, enabled: bool):
        self.bar = None
        self.enabled = enabled

    def __call__(self, step, total, loss):
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="training", unit="step", file=sys.stderr, leave=False)
        self.bar.update(step - self.bar.n)
        if loss is None:
            self.bar.set_description("measuring the report", refresh=False)
            self.bar.set_postfix_str("")
        else:
            self.bar.set_postfix(loss=f"{loss:.4g}")

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------------------


def cmd_train(args) -> int:
    if not args.source:
        raise HirmError(NO_SOURCE)
    import torch

    from .loading import load_text_encoders, source_components
    from .hirm import make_config, train_model_patch
    from .patch import is_patch_file, save_patch
    from .report import format_report

    from .lists import read_list

    pairs = _read_pairs(args.pairs) if args.pairs else None
    concepts = list(args.concept or []) + (read_list(args.concepts, "concept") if args.concepts else [])
    preserve = read_list(args.preserve, "prompt to keep", unique=False) if args.preserve else ()
    config = make_config(concepts, method=args.method, preset=args.preset, steps=args.steps, lr=args.lr,
                         anchor=args.anchor, seed=args.seed, trainable_layers=args.layers, supervision=args.supervision,
                         templates=args.template, neighbors=args.neighbor, multi=args.multi, eta=args.eta,
                         target_scale=args.scale, preserve=preserve, preservation=args.preservation,
                         batch_prompts=args.batch_prompts, step_prompts=args.step_prompts, **({"pairs": pairs} if pairs else {}))
    out = args.out or f"erasure-{slug('-'.join(config.concepts[:3]) + (f'-and-{len(config.concepts) - 3}-more' if len(config.concepts) > 3 else ''))}.safetensors"
    _never_the_input(out, args.source)
    check_target(out, args.force, is_patch_file, "erasure patch")  # before training: no half a minute for nothing
    device = resolve_device(args.device)
    found = source_components(args.source)
    components = _train_components(args.component, found, args.source)
    encoders = load_text_encoders(args.source, components, device=device, dtype=torch.float32)
    if found == ["clip_g"] and not args.json:
        print("(this model has only an OpenCLIP bigG text encoder, e.g. an SDXL refiner: the patch is for CLIP-G alone)")
    progress = _Progress(not args.json and not args.quiet)
    try:
        patch = train_model_patch({c: (e.model, e.tokenizer, e.projection) for c, e in encoders.items()}, config,
                                  progress=progress)
    finally:
        progress.close()
    patch = patch.with_metadata(trained_on=os.path.basename(str(args.source).rstrip("/")),
                                **({} if os.path.exists(args.source) else {"base_model": str(args.source)}))  # a Hub id: the card's base_model
    save_patch(patch, out, dtype=torch.float32 if args.dtype == "fp32" else torch.float16, overwrite=args.force)
    if args.json:
        print(json.dumps({"out": out, "concepts": list(config.concepts), "method": config.method,
                          "train_seconds": patch.metadata["train_seconds"], "size_bytes": os.path.getsize(out),
                          "report": patch.report}, indent=2))
    else:
        print(f"trained {patch.describe()} in {patch.metadata['train_seconds']:.1f} s on {device}")
        print(format_report(patch.report))
        print(f"wrote {out} ({os.path.getsize(out) / 1e6:.1f} MB)")
    return 0


def _train_components(asked: str, found: list[str], source: str) -> list[str]:
    """The encoders ``hirm train`` trains: ``auto`` = every CLIP the model has (SDXL: both), else the one asked for."""
    if asked == "auto":
        return found or ["clip_l"]  # nothing recognised: let the loader say what it found
    wanted = ["clip_l", "clip_g"] if asked == "both" else [asked]
    missing = [c for c in wanted if found and c not in found]
    if missing:
        raise HirmError(f"{source} has no {' or '.join(missing)} text encoder (it has {', '.join(found)}); "
                        f"use --component {' or '.join(found)} or auto")
    return wanted


def _never_the_input(out: str, source: str | None) -> None:
    """Refuse an output path that is the input model (or inside its folder)."""
    if not source or not os.path.exists(source):
        return
    out_real, src_real = os.path.realpath(out), os.path.realpath(source)
    if out_real == src_real or (os.path.isdir(src_real) and out_real.startswith(src_real + os.sep)):
        raise HirmError(f"--out {out} is the input model {source} (or inside it); it is never written over: choose another path")


def _read_pairs(path: str) -> list[tuple[str, str]]:
    from .lists import read_lines

    pairs = []
    for ln in read_lines(path, "pairs", "one 'with<TAB>without' per line"):
        if ln.strip() and not ln.startswith("#"):
            parts = ln.split("\t")
            if len(parts) != 2 or not all(x.strip() for x in parts):
                raise HirmError(f"{path}: each line must be 'prompt with concept<TAB>same prompt without it'")
            pairs.append((parts[0], parts[1]))
    if not pairs:
        raise HirmError(f"{path}: no prompt pairs")
    return pairs


def cmd_inspect(args) -> int:
    from .patch import load_patch
    from .report import format_report

    patch = load_patch(args.file)
    meta = patch.metadata
    if args.json:
        out = {k: v for k, v in meta.items() if k != "base_signature"}
        if patch.parts:
            out["components"] = {c: {"encoder": p.encoder, "base_fingerprint": p.metadata.get("base_fingerprint")}
                                 for c, p in patch.parts.items()}
        out.update(valid=True, tensors=patch.tensor_count(), size_bytes=os.path.getsize(args.file),
                   checksum_verified=bool(meta.get("checksum")))
        print(json.dumps(out, indent=2))
        return 0
    cfg = meta.get("config") or {}
    print(f"{args.file}: valid erasure patch (format {meta['format_version']})")
    rows = [
        ("concepts", concept_list(patch.concepts, 20) + (f" ({len(patch.concepts)} in all; --json lists them)"
                                                          if len(patch.concepts) > 20 else "")),
        ("method", patch.method + (f" (anchor: {meta['anchor']})" if meta.get("anchor") else "")),
        ("preset / lr / steps", f"{cfg.get('preset')} / {cfg.get('lr')} / {cfg.get('steps')}"),
        ("trained layers", ", ".join(str(x) for x in cfg.get("trainable_layers", []))),
        ("supervision", cfg.get("supervision")),
    ]
    for component, part in ((c, patch.part(c)) for c in patch.components):
        enc = part.encoder
        label = f"{component} encoder" if patch.parts else "encoder"
        rows += [(label, f"{enc.get('family')} (width {enc.get('hidden_size')}, {enc.get('num_layers')} layers), "
                         f"base fingerprint {part.metadata.get('base_fingerprint')}")]
    rows += [
        ("tensors", f"{patch.tensor_count()} ({meta.get('delta_dtype', '?')}, {os.path.getsize(args.file) / 1e6:.1f} MB)"),
        ("tool / created", f"{meta.get('tool')} / {meta.get('created')}"),
        ("training time", f"{meta.get('train_seconds')} s"),
        ("checksum", "verified (" + meta["checksum"][:19] + "...)" if meta.get("checksum") else
         "none: written before checksums (hirm 0.1), so damaged data cannot be told from the file alone"),
    ]
    if meta.get("source"):
        rows.append(("source", json.dumps(meta["source"])))
    for k, v in rows:
        print(f"  {k:<20} {v}")
    print(format_report(patch.report))
    return 0


def cmd_apply(args) -> int:
    if not args.source:
        raise HirmError(NO_SOURCE)
    from .patch import load_patch

    patches = [(load_patch(p), s) for p, s in map(parse_patch_arg, args.patch)]  # every file checked before any work
    _never_the_input(args.out, args.source)
    if not os.path.isfile(args.source) and os.path.lexists(args.out):  # a folder output: checked before any loading
        raise HirmError(f"--out {args.out} already exists; a patched text-encoder folder is written only to a new path")
    from .merge import merge_into_checkpoint, merge_into_folder

    if os.path.isfile(args.source):
        notes = merge_into_checkpoint(args.source, patches, args.out, args.force)
    else:
        notes = merge_into_folder(args.source, patches, args.out, args.component)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {args.out} with {len(patches)} patch(es): " + "; ".join(f"{p.describe()} x{s}" for p, s in patches))
    return 0


def cmd_export(args) -> int:
    import torch

    from .export import export_diffusers_lora, summarize
    from .patch import load_patch

    patch = load_patch(args.file)
    out = args.out or os.path.splitext(args.file)[0] + "-diffusers-lora.safetensors"
    if os.path.realpath(out) == os.path.realpath(args.file):
        raise HirmError(f"--out {out} is the patch being exported; choose another path")
    errors = export_diffusers_lora(patch, out, rank=args.rank, dtype=torch.float16 if args.dtype == "fp16" else torch.float32,
                                   overwrite=args.force, text_encoder=args.text_encoder)
    print(f"wrote {out} ({os.path.getsize(out) / 1e6:.1f} MB): {patch.describe()} as a diffusers LoRA, "
          f"rank {args.rank or 'full'}; {summarize(errors)}")
    print(f"  load it with: pipe.load_lora_weights({out!r}, adapter_name='erasure'); "
          "pipe.set_adapters(['erasure'], [1.0])")
    return 0


def cmd_demo(args) -> int:
    """The whole chain on a tiny random model, to check an install: HiRM train, save, load, apply, remove,
    then (with diffusers) one image without and with the patch and NLCE, side by side."""
    import torch

    from .hirm import train_patch
    from .patch import apply_patch, load_patch, save_patch
    from .report import format_report
    from .tokenizer import clip_tokenizer

    print("hirm demo: a TINY RANDOM model, so every number and picture below is MEANINGLESS; it only checks that the install "
          "works. For a real erasure: hirm train /path/to/model.safetensors --concept \"Van Gogh\"")
    if args.image:
        check_target(args.image, args.force, _is_demo_image, "demo image")  # before any work
    torch.manual_seed(0)
    pipe = _demo_pipeline() if args.image else None
    model = pipe.text_encoder if pipe is not None else _demo_encoder()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    progress = _Progress(True)
    patch = train_patch(model, clip_tokenizer(), concepts=["Van Gogh"], preset="style", steps=args.steps, progress=progress)
    progress.close()
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_patch(save_patch(patch, os.path.join(tmp, "demo.safetensors")))
    apply_patch(model, loaded, 1.0).remove()
    exact = all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    print(format_report(patch.report))
    print(f"train -> save -> load -> apply -> remove: OK (weights restored bit for bit: {exact})")
    if pipe is not None:
        _demo_image(pipe, loaded, args.image, args.force)
    return 0 if exact else 1


def _demo_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                            num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
    return CLIPTextModel(config).eval().requires_grad_(False)


def _demo_pipeline():
    """A tiny SD1-shaped pipeline (random weights, 64-wide text, 32 px images) or None without diffusers."""
    try:
        from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    except ImportError:
        print("(diffusers is not installed: no demo image; pip install 'hirm-erasure[diffusers]' for it)")
        return None
    from .tokenizer import clip_tokenizer

    unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=16, cross_attention_dim=64,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=8,
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(16, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8)
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=_demo_encoder(), tokenizer=clip_tokenizer(), unet=unet.eval(),
                                   scheduler=DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _demo_image(pipe, patch, out: str, force: bool) -> None:
    import torch
    from PIL import Image, ImageDraw

    from .adapters import apply_nlce
    from .patch import patched

    prompt = "a starry night over a village, by Van Gogh"

    def render():
        g = torch.Generator().manual_seed(0)
        return pipe(prompt, num_inference_steps=4, height=32, width=32, generator=g, output_type="pil").images[0]

    plain = render()
    with patched(pipe.text_encoder, [(patch, 1.0)]):
        handle = apply_nlce(pipe, concepts=["Van Gogh"], neighbors=["Monet"])
        try:
            erased = render()
        finally:
            handle.remove()
    cell = 128
    sheet = Image.new("RGB", (2 * cell + 8, cell + 34), "white")
    for i, (image, label) in enumerate(((plain, "without"), (erased, "patch + NLCE"))):
        sheet.paste(image.resize((cell, cell), Image.NEAREST), (i * (cell + 8), 0))
        ImageDraw.Draw(sheet).text((i * (cell + 8) + 2, cell + 2), label, fill="black")
    ImageDraw.Draw(sheet).text((2, cell + 18), "random weights: MEANINGLESS", fill="red")
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("hirm-demo", "random weights; meaningless")
    atomic_write(out, lambda f: sheet.save(f, format="PNG", pnginfo=info), overwrite=force, is_ours=_is_demo_image,
                 what="demo image")
    print(f"wrote {out}: one prompt without and with the patch and NLCE (random weights: the picture is meaningless)")


def _is_demo_image(path: str) -> bool:
    try:
        from PIL import Image

        with Image.open(path) as im:
            return im.format == "PNG" and "hirm-demo" in im.info
    except Exception:
        return False


# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .hirm import METHODS, PRESETS, SUPERVISION_POINTS
    from .hirm.config import setting_help as h

    ap = argparse.ArgumentParser(prog="hirm", description="Concept erasure for Stable Diffusion / Flux text encoders (HiRM) and UNets (NLCE).")
    ap.add_argument("--version", action="version", version=f"hirm {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train a HiRM erasure patch", description="Train a HiRM erasure patch for one or more concepts.")
    t.add_argument("source", nargs="?", help=SOURCE_HELP)
    t.add_argument("--concept", action="append", help=h("concepts", False) + " (repeat for several)")
    t.add_argument("--concepts", metavar="FILE", help="a text file of concepts to erase, one per line ('#' comments; "
                                                     "with --concept, both)")
    t.add_argument("--preserve", metavar="FILE", help="a text file of prompts to keep unchanged, one per line, besides the "
                                                     "shipped ones (several concepts: the preservation term)")
    t.add_argument("--preservation", type=float, help=h("preservation"))
    t.add_argument("--batch-prompts", type=int, default=8, help=h("batch_prompts"))
    t.add_argument("--step-prompts", type=int, default=16, help=h("step_prompts"))
    t.add_argument("--method", default="random", choices=METHODS, help=h("method", False))
    t.add_argument("--anchor", help=h("anchor"))
    t.add_argument("--preset", choices=sorted(PRESETS), help=h("preset", False) + " (default: style; nudity for --method safety)")
    t.add_argument("--steps", type=int, help=h("steps", False))
    t.add_argument("--lr", type=float, help=h("lr", False))
    t.add_argument("--seed", type=int, default=42, help=h("seed"))
    t.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    t.add_argument("--out", help="patch file to write (default: erasure-<concept>.safetensors)")
    t.add_argument("--component", default="auto", choices=("auto", "both", "clip_l", "clip_g"),
                   help="which text encoder(s) to train: auto = every CLIP of the model (SDXL: clip_l and clip_g, one patch), "
                        "or one of them")
    t.add_argument("--layers", type=int, nargs="+", help=h("trainable_layers"))
    t.add_argument("--supervision", choices=SUPERVISION_POINTS, default="attn_out", help=h("supervision", False))
    t.add_argument("--template", action="append", help=h("templates") + " (repeatable)")
    t.add_argument("--neighbor", action="append", help=h("neighbors") + " (repeatable)")
    t.add_argument("--multi", choices=("joint", "average"), default="joint", help=h("multi", False))
    t.add_argument("--eta", type=float, default=1.0, help=h("eta"))
    t.add_argument("--scale", type=float, help=h("target_scale", False))
    t.add_argument("--pairs", help=h("pairs", False) + ": a TSV file of 'with concept<TAB>without' lines (default: the shipped nudity pairs)")
    t.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16", help="storage dtype of the deltas (default fp16)")
    t.add_argument("--force", action="store_true", help="replace --out if it is an erasure patch already (never any other file)")
    t.add_argument("--json", action="store_true", help="machine-readable output")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    i = sub.add_parser("inspect", help="show and validate a patch file")
    i.add_argument("file")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    a = sub.add_parser("apply", help="write a patched text encoder or checkpoint",
                       description="Merge patches into a copy of a model. A single-file checkpoint gives a patched .safetensors "
                                   "checkpoint; a folder or Hub id gives a patched text encoder folder (transformers/diffusers format).")
    a.add_argument("source", nargs="?", help=SOURCE_HELP)
    a.add_argument("--patch", action="append", required=True, help="patch file, optionally FILE:STRENGTH (repeat to stack)")
    a.add_argument("--out", required=True, help="output .safetensors (checkpoint) or a NEW folder (never written over)")
    a.add_argument("--force", action="store_true", help="replace --out if it is a checkpoint this tool wrote (never any other file)")
    a.add_argument("--component", default="auto", choices=("auto", "clip_l", "clip_g"),
                   help="for a folder or Hub id: the encoder to write (auto: every encoder the patches change; SDXL patches "
                        "give text_encoder/ and text_encoder_2/ subfolders)")
    a.set_defaults(func=cmd_apply)

    e = sub.add_parser("export", help="write a patch as a diffusers LoRA (pipe.load_lora_weights)",
                       description="Write a patch as a LoRA in diffusers' format, for load_lora_weights / set_adapters / "
                                   "fuse_lora. Full rank by default (exact); --rank R gives a smaller file and prints its error.")
    e.add_argument("file", help="the erasure patch (.safetensors)")
    e.add_argument("--format", default="diffusers", choices=("diffusers",), help="the LoRA format (diffusers' PEFT keys)")
    e.add_argument("--rank", type=int, help="LoRA rank (default: full, exact)")
    e.add_argument("--dtype", choices=("fp16", "fp32"), default="fp32", help="storage dtype of the factors (default fp32)")
    e.add_argument("--text-encoder", choices=("text_encoder", "text_encoder_2"),
                   help="the pipeline's encoder to target (default: text_encoder_2 for a CLIP-G patch, else text_encoder)")
    e.add_argument("--out", help="file to write (default: <patch>-diffusers-lora.safetensors)")
    e.add_argument("--force", action="store_true", help="replace --out if it is a LoRA this command wrote (never any other file)")
    e.set_defaults(func=cmd_export)

    d = sub.add_parser("demo", help="run the whole chain on a tiny random model (checks the install; output is meaningless)")
    d.add_argument("--steps", type=int, default=5, help="training steps (default 5)")
    d.add_argument("--image", default="hirm-demo.png", help="before/after picture to write (default hirm-demo.png; '' for none)")
    d.add_argument("--force", action="store_true", help="replace --image if an earlier demo wrote it")
    d.set_defaults(func=cmd_demo)

    cli_nlce.add_parser(sub)
    cli_eval.add_parser(sub)
    cli_hub.add_parsers(sub)
    return ap


def _interrupt_on_sigterm() -> None:
    """SIGTERM (a service manager, ``kill``) stops the command like Ctrl-C: writes in progress are abandoned cleanly."""
    import signal
    import threading

    def stop(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "func", None):
        ap.print_help()
        return 2
    warnings.simplefilter("default")
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    _interrupt_on_sigterm()
    try:
        return int(args.func(args) or 0)
    except HirmError as e:
        print(f"hirm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hirm: interrupted; {getattr(args.func, 'interrupted', 'nothing was written')}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
