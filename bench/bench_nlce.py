"""NLCE sampling cost and schedule agreement on the SD1.5 or SDXL UNet architecture (random weights, CPU).

    python bench/bench_nlce.py [--family sd1|sdxl] [--steps 4] [--latent 32] [--repeats 2] [--suppression mask]
    python bench/bench_nlce.py --family sdxl --gating-survey     # candidate gating layers of the SDXL UNet

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
import statistics
import sys
import time

import torch


def build(device, latent, family="sd1"):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
    from shared_core.tokenizer import clip_tokenizer

    torch.manual_seed(0)
    if family == "sdxl":
        return build_sdxl(device, latent)
    unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=latent)  # SD1.5 architecture (860M parameters)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"))
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        latent_channels=4, norm_num_groups=4)  # never run: latents are the output
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=DDIMScheduler(num_train_timesteps=1000, clip_sample=False, steps_offset=1),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def build_sdxl(device, latent):
    """The SDXL base architecture with random weights: UNet, CLIP-L, OpenCLIP bigG (with projection)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from shared_core.tokenizer import clip_tokenizer

    unet = UNet2DConditionModel(sample_size=latent, cross_attention_dim=2048, block_out_channels=(320, 640, 1280),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=256,
                                projection_class_embeddings_input_dim=2816)
    clip_l = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                          num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"))
    big_g = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120,
                                                       num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77,
                                                       hidden_act="gelu", projection_dim=1280))
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        latent_channels=4, norm_num_groups=4)  # never run: latents are the output
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=clip_l, text_encoder_2=big_g, tokenizer=clip_tokenizer(),
                                     tokenizer_2=clip_tokenizer("!"), unet=unet,
                                     scheduler=EulerDiscreteScheduler(num_train_timesteps=1000, steps_offset=1))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def sample(pipe, steps, latent):
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    out = pipe("a painting of a cat sitting on a chair", num_inference_steps=steps, height=latent, width=latent,
               generator=g, output_type="latent").images
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--latent", type=int, default=32, help="latent side (the image is 8x this for real SD1.5)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--suppression", choices=("mask", "scale"), default="mask", help="stage-2 mode of both schedules")
    ap.add_argument("--family", choices=("sd1", "sdxl"), default="sd1", help="the UNet architecture")
    ap.add_argument("--gating-survey", action="store_true", help="compare candidate gating layers (SDXL)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    from shared_core.nlce import apply_nlce

    pipe = build(args.device, args.latent, args.family)
    if args.gating_survey:
        return gating_survey(pipe, args)
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
    name = "SDXL" if args.family == "sdxl" else "SD1.5"
    print(f"{name} UNet architecture, random weights, {args.latent}x{args.latent} latent, batch 2 (CFG), {args.steps} steps, "
          f"suppression {args.suppression}, {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"live tokens (cond row) per step: {[step[1] for step in live]}")
    print(f"{'schedule':<12} {'seconds':>8} {'x vanilla':>10}")
    for m in times:
        print(f"{m:<12} {med[m]:>8.2f} {med[m] / med['vanilla']:>9.3f}x")
    corr, ratio = [], []
    for a, b in zip(gates["single-pass"], gates["faithful"]):
        a, b = a[1].flatten(), b[1].flatten()  # the conditional row
        corr.append(float(torch.corrcoef(torch.stack([a, b]))[0, 1]))
        ratio.append(float(a.mean() / b.mean()))
    v, s, f = results["vanilla"], results["single-pass"], results["faithful"]
    rel = lambda x, y: float((x - y).norm() / y.norm())  # noqa: E731
    print(f"gate correlation single-pass vs faithful per step: {[round(c, 4) for c in corr]}")
    print(f"gate mean single-pass / faithful per step: {[round(r, 4) for r in ratio]}")
    print(f"final latents: |single - faithful| / |faithful| = {rel(s, f):.4f}; "
          f"|faithful - vanilla| / |vanilla| = {rel(f, v):.4f} (size of the erasure's own effect)")


def gating_survey(pipe, args) -> None:
    """Both schedules with each candidate gating layer: cost, stale-gate layers, contrast, agreement."""
    from shared_core.nlce import apply_nlce
    from shared_core.nlce.diffusers import cross_attention_names

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
