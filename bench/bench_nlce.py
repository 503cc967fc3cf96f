"""NLCE sampling cost and schedule agreement on the SD1.5, SDXL, Flux or SD3 architectures (random weights, CPU).

    python bench/bench_nlce.py [--family sd1|sdxl] [--steps 4] [--latent 32] [--repeats 2] [--suppression mask]
    python bench/bench_nlce.py --family sdxl --gating-survey     # candidate gating layers of the SDXL UNet
    python bench/bench_nlce.py --family flux|sd3 [--depth 2] [--text-len 128]   # joint attention, reduced depth
                                                                 # (docs/nlce-joint-attention.md)
    python bench/bench_nlce.py --narrow --latent 16 --steps 10 [--family ...]   # every layer at a tiny width:
                                                                 # the per-operator overhead a launch-bound GPU pays
    python bench/bench_nlce.py --lists 1,10,100 [--family ...]  # lists of concepts: build time, memory, cost, and
                                                                 # stage 1 alone (one pass's rows through the operators)
    python bench/bench_nlce.py --compile [--backend inductor] [--mode reduce-overhead]   # the denoiser under
                                                                 # torch.compile(fullgraph=True), NLCE applied first

Runs vanilla, single-pass and faithful sampling side by side in one process (interleaved,
median of the repeats), then compares single-pass with faithful: correlation of the gate maps
per step and the difference of the final latents. Random weights: the images mean nothing and
the live-token floor is lowered so that gating really runs; timing and agreement are what count.
SDXL: the real UNet (2.6 B parameters), CLIP-L and OpenCLIP bigG (fp32, about 14 GB of memory).
The gating survey runs both schedules with each candidate gating layer and reports, per layer,
its resolution, how many cross-attention layers of a pass run before it (single-pass gives them
the previous step's gate), the gate's contrast (max / mean) and the single-pass / faithful agreement.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import torch


def build(device, latent, family="sd1", depth=2, single=None, narrow=False):
    """The pipeline of ``family`` with random weights. ``narrow``: the same topology (every block, layer and head count)
    at a tiny width, so that a step's time is the framework's and NLCE's per-operator overhead, which is what a GPU
    that waits for its host (launch-bound) pays; the text encoders keep their output widths but have two layers."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
    from shared_core.tokenizer import clip_tokenizer

    torch.manual_seed(0)
    if family == "sdxl":
        return build_sdxl(device, latent, narrow)
    if family in ("flux", "sd3"):
        return build_joint(device, family, depth, depth if single is None else single, narrow)
    widths = dict(block_out_channels=(32, 32, 64, 64), norm_num_groups=8) if narrow else {}
    unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=latent, **widths)  # SD1.5 architecture (860M parameters)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=2 if narrow else 12, num_attention_heads=12,
                                        max_position_embeddings=77, hidden_act="quick_gelu"))
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        latent_channels=4, norm_num_groups=4)  # never run: latents are the output
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=DDIMScheduler(num_train_timesteps=1000, clip_sample=False, steps_offset=1),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def build_sdxl(device, latent, narrow=False):
    """The SDXL base architecture with random weights: UNet, CLIP-L, OpenCLIP bigG (with projection)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from shared_core.tokenizer import clip_tokenizer

    widths = dict(block_out_channels=(40, 80, 160), norm_num_groups=8) if narrow else \
        dict(block_out_channels=(320, 640, 1280))
    unet = UNet2DConditionModel(sample_size=latent, cross_attention_dim=2048, **widths,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=256,
                                projection_class_embeddings_input_dim=2816)
    clip_l = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                          num_hidden_layers=2 if narrow else 12,
                                          num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"))
    big_g = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120,
                                                       num_hidden_layers=2 if narrow else 32, num_attention_heads=20,
                                                       max_position_embeddings=77,
                                                       hidden_act="gelu", projection_dim=1280))
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        latent_channels=4, norm_num_groups=4)  # never run: latents are the output
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=clip_l, text_encoder_2=big_g, tokenizer=clip_tokenizer(),
                                     tokenizer_2=clip_tokenizer("!"), unet=unet,
                                     scheduler=EulerDiscreteScheduler(num_train_timesteps=1000, steps_offset=1))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def build_joint(device, family, depth, single, narrow=False):
    """Flux-dev or SD3-medium at full width with ``depth`` blocks of each kind (Flux: double and single; SD3: joint),
    CLIP-L, T5-XXL at full width with 2 layers (SD3: CLIP-G too, 2 layers), T5 with a word-level tokenizer written by
    the tests (random weights; a 1-block VAE never run)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    root = __file__.rsplit("/bench/", 1)[0]
    sys.path.insert(0, root + "/tests")
    from tiny_pipeline import tiny_t5

    from shared_core.tokenizer import clip_tokenizer

    def clip(width, layers, heads, act, projection):
        config = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                                num_attention_heads=heads, max_position_embeddings=77, hidden_act=act, projection_dim=width)
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)

    t5_size = dict(d_ff=64, num_heads=4, d_kv=8) if narrow else dict(d_ff=10240, num_heads=64, d_kv=64)
    t5, t5_tokenizer = tiny_t5(0, layers=1 if narrow else 2, width=4096, vocab_size=32128, relative_attention_num_buckets=32,
                               **t5_size)
    clip_l = clip(768, 2 if narrow else 12, 12, "quick_gelu", family == "sd3")
    heads = dict(attention_head_dim=16, num_attention_heads=2) if narrow else {}
    if family == "flux":
        from diffusers import FluxPipeline, FluxTransformer2DModel

        rope = dict(axes_dims_rope=(4, 6, 6)) if narrow else {}
        transformer = FluxTransformer2DModel(num_layers=depth, num_single_layers=single, guidance_embeds=True, **heads,
                                             **rope)
        vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                            latent_channels=16, norm_num_groups=4, shift_factor=0.1159, scaling_factor=0.3611)
        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=clip_l,
                            tokenizer=clip_tokenizer(), text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer)
    else:
        from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

        transformer = SD3Transformer2DModel(num_layers=depth, pos_embed_max_size=192,
                                            **(dict(heads, caption_projection_dim=32) if narrow else
                                               dict(attention_head_dim=64, num_attention_heads=24, caption_projection_dim=1536)))
        vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                            latent_channels=16, norm_num_groups=4, shift_factor=0.0609, scaling_factor=1.5305)
        pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, transformer=transformer,
                                        text_encoder=clip_l, tokenizer=clip_tokenizer(),
                                        text_encoder_2=clip(1280, 2, 20, "gelu", True), tokenizer_2=clip_tokenizer("!"),
                                        text_encoder_3=t5, tokenizer_3=t5_tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


PROMPT = "a painting of a cat on sofa"  # every word known to the T5 word-level tokenizer of build_joint


TEXT_LEN = [128]  # flux / sd3: T5 rows per prompt (--text-len)


def sample(pipe, steps, latent, prompt=PROMPT):
    g = torch.Generator().manual_seed(0)
    joint = hasattr(pipe, "transformer")
    kwargs = {"max_sequence_length": TEXT_LEN[0], "guidance_scale": 3.5 if type(pipe).__name__.startswith("Flux") else 5.0} if joint else {}
    side = latent * 2 if joint else latent  # the joint pipelines here have a VAE scale of 1 and pack 2x2 latent patches
    start = time.perf_counter()
    out = pipe(prompt, num_inference_steps=steps, height=side, width=side, generator=g, output_type="latent", **kwargs).images
    if out.is_cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--latent", type=int, default=32, help="latent side (the image is 8x this for real SD1.5)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                    help="weights and activations (a GPU: bfloat16, as Flux and SD3 are run)")
    ap.add_argument("--suppression", choices=("mask", "scale"), default="mask", help="stage-2 mode of both schedules")
    ap.add_argument("--family", choices=("sd1", "sdxl", "flux", "sd3"), default="sd1", help="the architecture")
    ap.add_argument("--depth", type=int, default=2, help="flux / sd3: blocks of each kind (full width)")
    ap.add_argument("--single", type=int, default=None, help="flux: single-stream blocks (default --depth; Flux-dev: 38)")
    ap.add_argument("--text-len", type=int, default=128, help="flux / sd3: T5 rows per prompt (Flux-dev: 512)")
    ap.add_argument("--gating-survey", action="store_true", help="compare candidate gating layers (SDXL)")
    ap.add_argument("--narrow", action="store_true",
                    help="every block and layer at a tiny width: the per-operator overhead a launch-bound GPU pays")
    ap.add_argument("--compile", action="store_true", help="time the denoiser compiled (fullgraph=True): vanilla, single-pass, "
                                                            "faithful, each compiled once")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend with --compile (inductor, aot_eager, cudagraphs)")
    ap.add_argument("--mode", default=None, help="torch.compile mode with --compile (reduce-overhead: CUDA graphs)")
    ap.add_argument("--lists", default=None, help="erase lists of this many concepts (e.g. 1,10,100): operator build time, "
                    "their memory and single-pass sampling time against one concept")
    ap.add_argument("--schedules", default="vanilla,single-pass,faithful", help="with --compile: which to compile and time")
    args = ap.parse_args()
    TEXT_LEN[0] = args.text_len
    torch.set_grad_enabled(False)
    from shared_core.adapters import apply_nlce

    joint = args.family in ("flux", "sd3")  # their random weights are made where they run (full-depth Flux: 48 GB at fp32)
    with torch.device(args.device) if joint else contextlib.nullcontext():  # (SD schedulers' tables must stay on the CPU)
        pipe = build(args.device, args.latent, args.family, args.depth, args.single, args.narrow)
    pipe.to(dtype=getattr(torch, args.dtype))
    if args.gating_survey:
        return gating_survey(pipe, args)
    if args.compile:
        return compiled(pipe, args)
    if args.lists:
        return lists(pipe, args)
    # random weights: a low floor lets the ratio rule pick live tokens, so the gate really runs
    settings = dict(live_floor=1.0, suppression=args.suppression)
    sample(pipe, 1, args.latent)  # warm-up
    times = {"vanilla": [], "single-pass": [], "faithful": []}
    results, gates = {}, {}
    for _ in range(args.repeats):
        for mode in times:
            if mode == "vanilla":
                results[mode], t = sample(pipe, args.steps, args.latent)
            else:
                with apply_nlce(pipe, ["cat"], ["dog", "tiger"], schedule=mode, record_maps=True, **settings) as h:
                    results[mode], t = sample(pipe, args.steps, args.latent)
                # the gate each step computed: single-pass in its real pass, faithful in its dry pass
                gates[mode] = [d["gate_map"] for d in h.diagnostics if d["gate"] and d["dry"] == (mode == "faithful")]
                live = [d["live_tokens"] for d in h.diagnostics if not d["dry"]]
            times[mode].append(t)
    med = {m: statistics.median(v) for m, v in times.items()}
    kinds = f"{args.depth} double + {args.single} single" if args.family == "flux" and args.single is not None else \
        f"{args.depth} blocks of each kind"
    name = {"sdxl": "SDXL", "sd1": "SD1.5"}.get(args.family, f"{args.family} ({kinds})")
    name += " (every block and layer at a tiny width: --narrow)" if args.narrow else ""
    batch = "batch 1 (guidance-distilled)" if args.family == "flux" else "batch 2 (CFG)"
    tokens = f", {args.text_len} text rows" if args.family in ("flux", "sd3") else ""
    print(f"{name} architecture, random weights, {args.latent}x{args.latent} latent{tokens}, {batch}, {args.steps} steps, "
          f"suppression {args.suppression}, {args.device} {args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"live tokens (cond row) per step: {[step[-1] for step in live]}")
    print(f"{'schedule':<12} {'seconds':>8} {'x vanilla':>10}")
    for m in times:
        print(f"{m:<12} {med[m]:>8.2f} {med[m] / med['vanilla']:>9.3f}x")
    corr, ratio = [], []
    for a, b in zip(gates["single-pass"], gates["faithful"]):
        a, b = a[-1].flatten().float(), b[-1].flatten().float()  # the conditional row
        corr.append(float(torch.corrcoef(torch.stack([a, b]))[0, 1]))
        ratio.append(float(a.mean() / b.mean()))
    v, s, f = results["vanilla"], results["single-pass"], results["faithful"]
    rel = lambda x, y: float((x - y).float().norm() / y.float().norm())  # noqa: E731
    print(f"gate correlation single-pass vs faithful per step: {[round(c, 4) for c in corr]}")
    print(f"gate mean single-pass / faithful per step: {[round(r, 4) for r in ratio]}")
    print(f"final latents: |single - faithful| / |faithful| = {rel(s, f):.4f}; "
          f"|faithful - vanilla| / |vanilla| = {rel(f, v):.4f} (size of the erasure's own effect)")
    if args.family in ("flux", "sd3"):
        joint_checks(pipe, args)


def lists(pipe, args) -> None:
    """NLCE erasing lists of concepts (words of CLIP's vocabulary, two neighbours each): the operators' build time and
    memory, single-pass sampling time against vanilla and against one concept (median of ``--repeats``), and the time
    of stage 1 alone: ``prepare`` on one pass's context (two 77-row prompts of random rows, which name no concept: every
    concept's operator applies), what a launch-bound GPU pays once per denoiser call for a list (median of 50); and the
    aten operators one sampling run dispatches (torch.profiler), against one concept's: what a GPU that waits for its
    host pays, counted here without one."""
    from shared_core.adapters import apply_nlce, pipeline_concept_set
    from shared_core.nlce import make_nlce_config
    from shared_core.nlce.mining import vocabulary_words
    from shared_core.nlce.stages import Operators, prepare

    def stage1_ms(cs, config) -> float:
        ops = Operators(cs, config, args.device)
        x = torch.randn(2, 77, cs.width, device=args.device)
        conditional, window = torch.tensor([False, True]), torch.tensor(True, device=args.device)
        laps = []
        for _ in range(53):
            start = time.perf_counter()
            prepare(ops, x, conditional, None, window)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            laps.append(time.perf_counter() - start)
        return 1e3 * statistics.median(laps[3:])

    def dispatched() -> int:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            sample(pipe, args.steps, args.latent)
        return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))

    words = vocabulary_words()
    sizes = [int(n) for n in args.lists.split(",")]
    step = max(1, len(words) // (3 * max(sizes)))
    pool = words[::step]
    settings = dict(live_floor=1.0, suppression=args.suppression)
    sample(pipe, 1, args.latent)  # warm-up
    rows = []
    for n in sizes:
        concepts = pool[0:3 * n:3]
        neighbors = {c: [pool[3 * i + 1], pool[3 * i + 2]] for i, c in enumerate(concepts)}
        start = time.perf_counter()
        cs = pipeline_concept_set(pipe, concepts, neighbors, make_nlce_config(**settings))
        build = time.perf_counter() - start
        size = sum(t.numel() * t.element_size() for b, w in cs.bases for t in (b, w))
        size += sum(t.numel() * t.element_size() for nb in cs.neighbor_bases if nb is not None for t in nb)
        times, vanilla = [], []
        for _ in range(args.repeats):
            vanilla.append(sample(pipe, args.steps, args.latent)[1])
            with apply_nlce(pipe, concept_set=cs, schedule="single-pass", **settings):
                times.append(sample(pipe, args.steps, args.latent)[1])
        with apply_nlce(pipe, concept_set=cs, schedule="single-pass", **settings):
            ops = dispatched()
        rows.append((n, build, size, statistics.median(times), statistics.median(vanilla), stage1_ms(cs, make_nlce_config(**settings)),
                     ops))
    print(f"{args.family} architecture, random weights, {args.latent}x{args.latent} latent, {args.steps} steps, single-pass, "
          f"{args.device} {args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'concepts':>8} {'build s':>8} {'operators':>10} {'sampling s':>11} {'x vanilla':>10} {'x one concept':>14} "
          f"{'stage 1 ms':>11} {'aten ops':>9} {'x one':>7}")
    for n, build, size, t, v, ms, ops in rows:
        print(f"{n:>8} {build:>8.2f} {size / 1e6:>8.2f}MB {t:>11.2f} {t / v:>9.3f}x {t / rows[0][3]:>13.3f}x {ms:>11.2f} "
              f"{ops:>9} {ops / rows[0][6]:>6.3f}x")


def compiled(pipe, args) -> None:
    """Vanilla, single-pass and faithful sampling with the denoiser under ``torch.compile(fullgraph=True)`` (NLCE applied
    before compiling, as a user who compiles last does): compile time, then the median of ``--repeats`` timed runs."""
    from torch._dynamo.utils import counters

    from shared_core.adapters import apply_nlce

    attr = "transformer" if hasattr(pipe, "transformer") else "unet"
    raw = getattr(pipe, attr)
    settings = dict(live_floor=1.0, suppression=args.suppression)
    rows, results = {}, {}
    for mode in args.schedules.split(","):
        torch._dynamo.reset()
        counters.clear()
        with contextlib.ExitStack() as stack:
            if mode != "vanilla":
                stack.enter_context(apply_nlce(pipe, ["cat"], ["dog", "tiger"], schedule=mode, **settings))
            setattr(pipe, attr, torch.compile(raw, fullgraph=True, backend=args.backend, mode=args.mode))
            try:
                _, first = sample(pipe, 1, args.latent)  # compiles
                for _ in range(2):  # CUDA graphs record on a later call; inductor's compile workers settle
                    sample(pipe, args.steps, args.latent)
                times = []
                for _ in range(args.repeats):
                    results[mode], t = sample(pipe, args.steps, args.latent)
                    times.append(t)
            finally:
                setattr(pipe, attr, raw)
        rows[mode] = (statistics.median(times), first, counters["stats"]["unique_graphs"])
    print(f"{args.family} architecture{' (--narrow)' if args.narrow else ''}, random weights, {args.latent}x{args.latent} latent, "
          f"{args.steps} steps, compiled: backend {args.backend}, mode {args.mode}, fullgraph; {args.device} {args.dtype}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'schedule':<12} {'seconds':>8} {'x vanilla':>10} {'first call (compile)':>21} {'graphs':>7}")
    for mode, (t, first, graphs) in rows.items():
        print(f"{mode:<12} {t:>8.2f} {t / rows['vanilla'][0]:>9.3f}x {first:>20.1f}s {graphs:>7}")
    rel = lambda x, y: float((x - y).float().norm() / y.float().norm())  # noqa: E731
    if {"single-pass", "faithful", "vanilla"} <= set(results):
        print(f"final latents: |single - faithful| / |faithful| = {rel(results['single-pass'], results['faithful']):.4f}; "
              f"|faithful - vanilla| / |vanilla| = {rel(results['faithful'], results['vanilla']):.4f}")


def joint_checks(pipe, args) -> None:
    """Flux / SD3 only: every stage off is bit-identical to vanilla; how much of the concept is left in each block's
    text keys at the live row (|cos| with the concept's own key at that block) without and with stage 1."""
    from shared_core.adapters import apply_nlce

    vanilla, _ = sample(pipe, args.steps, args.latent)
    with apply_nlce(pipe, ["cat"], ["dog", "tiger"], stage1=False, stage2=False, stage3=False, live_floor=1.0):
        off, _ = sample(pipe, args.steps, args.latent)
    print(f"every stage off: bit-identical to vanilla: {torch.equal(off, vanilla)}")
    keys = {}
    modules = {n: m for n, m in pipe.transformer.named_modules() if n.endswith(".attn") and hasattr(m, "add_k_proj")}

    def capture(tag):
        def hook(name):
            def keep(module, inputs, output):  # returns None: the module's output stays as it was
                keys.setdefault(tag, {}).setdefault(name, output.detach().float())
            return keep
        return [m.add_k_proj.register_forward_hook(hook(n)) for n, m in modules.items()]

    def run(tag, prompt, **settings):
        handles = capture(tag)
        try:
            if settings:
                with apply_nlce(pipe, ["cat"], ["dog", "tiger"], stage2=False, stage3=False, t_max=1000.0, live_floor=1.0,
                                **settings) as h:
                    sample(pipe, 1, args.latent, prompt)
                    return h.diagnostics[-1]["live_tokens"][-1]
            sample(pipe, 1, args.latent, prompt)
        finally:
            for handle in handles:
                handle.remove()

    run("concept", "cat")
    live = run("stage1", PROMPT, stage1=True)
    run("plain", PROMPT)
    cat_row = 0 if args.family == "flux" else 77  # T5's "cat" in the concept's own context (SD3: after CLIP's 77 rows)
    print(f"live rows {live}; |cos| of the live row's text key with the concept's own key, per joint block:")
    print(f"{'block':<34} {'without stage 1':>16} {'with stage 1':>13}")
    for name in modules:
        ref = keys["concept"][name][-1, cat_row]
        cos = [float(torch.nn.functional.cosine_similarity(keys[t][name][-1, live].mean(0), ref, dim=0).abs())
               for t in ("plain", "stage1")]
        print(f"{name:<34} {cos[0]:>16.3f} {cos[1]:>13.3f}")


def gating_survey(pipe, args) -> None:
    """Both schedules with each candidate gating layer: cost, stale-gate layers, contrast, agreement."""
    from shared_core.adapters import apply_nlce
    from shared_core.adapters.diffusers_unet import cross_attention_names

    names = [n[: -len(".processor")] for n in cross_attention_names(pipe.unet)]
    order = [n for stage in ("down_blocks", "mid_block", "up_blocks") for n in names if n.startswith(stage)]  # as a pass runs them
    candidates = [n for n in order if n.endswith("transformer_blocks.0.attn2") and n.startswith(("down_blocks", "mid_block"))]
    settings = dict(live_floor=1.0, suppression=args.suppression)
    print(f"gating-layer survey, random weights, {args.latent}x{args.latent} latent, {args.steps} steps, {len(order)} "
          "cross-attention layers per pass")
    print(f"{'gating layer':<52} {'size':>5} {'before':>6} {'contrast':>9} {'corr':>6}")
    for layer in candidates:
        gates = {}
        for mode in ("single-pass", "faithful"):
            with apply_nlce(pipe, ["cat"], ["dog", "tiger"], schedule=mode, gating_layer=layer, record_maps=True, **settings) as h:
                sample(pipe, args.steps, args.latent)
            gates[mode] = [d["gate_map"] for d in h.diagnostics if d["gate"] and d["dry"] == (mode == "faithful")]
        maps = [g[1] for g in gates["single-pass"]]
        contrast = statistics.mean(float(m.max() / m.mean().clamp(min=1e-12)) for m in maps) if maps else float("nan")
        corr = [float(torch.corrcoef(torch.stack([a[1].flatten(), b[1].flatten()]))[0, 1])
                for a, b in zip(gates["single-pass"], gates["faithful"])]
        size = "x".join(str(x) for x in maps[0].shape) if maps else "-"
        # before: the layers a pass runs before the gating layer; single-pass gives them the previous step's gate
        print(f"{layer:<52} {size:>5} {order.index(layer):>6} {contrast:>9.2f} {statistics.mean(corr) if corr else float('nan'):>6.3f}")


if __name__ == "__main__":
    main()
