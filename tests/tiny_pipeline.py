"""A tiny offline Stable Diffusion pipeline (random weights, nothing downloaded) for NLCE tests."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tiny import random_clip, tiny_config

from shared_core.tokenizer import clip_tokenizer

WIDTH = 32


def tiny_unet(cross_attention_dim=WIDTH, seed=0):
    torch.manual_seed(seed)
    # three levels so that down block 1 works at a coarser size than the latent, like SD1.x's gating layer
    return UNet2DConditionModel(block_out_channels=(8, 16, 16), layers_per_block=1, sample_size=16,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=4).eval()


def tiny_vae(seed=0):
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                         latent_channels=4, norm_num_groups=4, sample_size=16).eval()


def tiny_pipeline(seed=0, text_width=WIDTH, unet_width=WIDTH):
    pipe = StableDiffusionPipeline(vae=tiny_vae(seed), text_encoder=random_clip(tiny_config(hidden=text_width), seed),
                                   tokenizer=clip_tokenizer(), unet=tiny_unet(unet_width, seed),
                                   scheduler=DDIMScheduler(num_train_timesteps=1000, clip_sample=False, steps_offset=1),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe, prompt="a photo of a cat", steps=3, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, height=16, width=16, generator=g, output_type="pt", **kw).images


L_WIDTH, G_WIDTH = 32, 48  # SDXL: CLIP-L (768) and OpenCLIP bigG (1280), side by side in the UNet's context


def tiny_sdxl_unet(seed=0):
    """An SDXL-shaped UNet: no attention at full size, cross-attention reading both encoders' rows side by side,
    ``text_time`` added conditioning (CLIP-G's pooled vector and the size/crop numbers)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(block_out_channels=(8, 16, 16), layers_per_block=1, sample_size=16,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                transformer_layers_per_block=(1, 1, 2), cross_attention_dim=L_WIDTH + G_WIDTH,
                                attention_head_dim=4, norm_num_groups=4, use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=8 * 6 + G_WIDTH).eval()


def clip_with_projection(width, seed):
    """A CLIPTextModelWithProjection (projection as wide as the model) with ``random_clip``'s widened random layers."""
    from transformers import CLIPTextModelWithProjection

    from shared_core.encoders import canonical_parameters

    config = tiny_config(hidden=width)
    config.projection_dim = width  # the pooled vector the added conditioning reads
    model = CLIPTextModelWithProjection(config).eval()
    donor = random_clip(tiny_config(hidden=width), seed)
    with torch.no_grad():
        for name, p in canonical_parameters(model).items():
            p.copy_(canonical_parameters(donor)[name])
    return model.requires_grad_(False)


def tiny_sdxl_pipeline(seed=0):
    """A tiny StableDiffusionXLPipeline: CLIP-L-like and bigG-like encoders (the second with a projection, its
    tokenizer padding with "!"), the UNet above, random weights."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(vae=tiny_vae(seed), text_encoder=random_clip(tiny_config(hidden=L_WIDTH), seed),
                                     text_encoder_2=clip_with_projection(G_WIDTH, seed + 1), tokenizer=clip_tokenizer(),
                                     tokenizer_2=clip_tokenizer("!"), unet=tiny_sdxl_unet(seed),
                                     scheduler=DDIMScheduler(num_train_timesteps=1000, clip_sample=False, steps_offset=1))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_encoders(pipe) -> dict:
    """What ``train_model_patch`` takes for an SDXL pipeline: {component: (encoder, tokenizer, projection)}."""
    return {"clip_l": (pipe.text_encoder, pipe.tokenizer, None),
            "clip_g": (pipe.text_encoder_2, pipe.tokenizer_2, pipe.text_encoder_2.text_projection.weight.detach())}


# ---------------------------------------------------------------------------------------------- joint attention (Flux, SD3)

T5_WIDTH = 32
T5_WORDS = ("a photo of cat dog tiger lion car house painting by van gogh monet picasso the on sofa in field "
            "red blue an tree bird sky sunset portrait woman man city night river boat").split()


def t5_word_tokenizer():
    """A word-level tokenizer with T5's special ids (pad 0, end 1, unknown 2) over ``T5_WORDS``, written here."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(T5_WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512)


def tiny_t5(seed=0, layers=2, width=T5_WIDTH, **config):
    """A T5 encoder (tiny unless ``config`` says otherwise: d_ff, num_heads, d_kv, vocab_size) and ``t5_word_tokenizer``;
    random weights, nothing downloaded."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = t5_word_tokenizer()
    torch.manual_seed(seed)
    config = {"vocab_size": len(tokenizer), "d_kv": 8, "d_ff": 64, "num_heads": 4, "relative_attention_num_buckets": 8, **config}
    model = T5EncoderModel(T5Config(d_model=width, num_layers=layers, feed_forward_proj="gated-gelu", **config)).eval()
    return model.requires_grad_(False), tokenizer


def tiny_flux_pipeline(seed=0):
    """A tiny FluxPipeline: 2 double-stream and 2 single-stream blocks, a tiny T5 (text rows) and CLIP (pooled vector)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
                                         num_attention_heads=2, joint_attention_dim=T5_WIDTH, pooled_projection_dim=WIDTH,
                                         axes_dims_rope=[4, 4, 8]).eval()
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        latent_channels=1, norm_num_groups=4, sample_size=16, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035).eval()
    t5, t5_tokenizer = tiny_t5(seed)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=random_clip(tiny_config(), seed),
                        tokenizer=clip_tokenizer(), text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render_joint(pipe, prompt="a photo of cat", steps=2, seed=0, **kw):
    """A tiny Flux or SD3 pipeline's images (16 px, 16 T5 rows; guidance 3.5 for Flux, 3.0 with CFG for SD3)."""
    g = torch.Generator().manual_seed(seed)
    guidance = 3.5 if type(pipe).__name__.startswith("Flux") else 3.0
    return pipe(prompt, num_inference_steps=steps, height=16, width=16, generator=g, output_type="pt", max_sequence_length=16,
                guidance_scale=guidance, **kw).images


SD3_T5_WIDTH = 96  # at least CLIP-L + CLIP-G (their rows are zero-padded to T5's width)


def tiny_sd3_pipeline(seed=0):
    """A tiny StableDiffusion3Pipeline: CLIP-L and bigG-like encoders with projections, a tiny T5, two joint blocks."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=SD3_T5_WIDTH, caption_projection_dim=16,
                                        pooled_projection_dim=L_WIDTH + G_WIDTH, out_channels=4, pos_embed_max_size=16).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        latent_channels=4, norm_num_groups=4, sample_size=16, shift_factor=0.0609, scaling_factor=1.5035).eval()
    t5, t5_tokenizer = tiny_t5(seed, width=SD3_T5_WIDTH)
    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, transformer=transformer,
                                    text_encoder=clip_with_projection(L_WIDTH, seed), tokenizer=clip_tokenizer(),
                                    text_encoder_2=clip_with_projection(G_WIDTH, seed + 1), tokenizer_2=clip_tokenizer("!"),
                                    text_encoder_3=t5, tokenizer_3=t5_tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def saved_sd1(folder, steps: int) -> dict:
    """A tiny SD1 pipeline saved in ``folder``/model and a patch for "cat" trained ``steps`` steps beside it."""
    from shared_core.hirm import train_patch
    from shared_core.patch import save_patch

    pipe = tiny_pipeline(seed=4)
    pipe.save_pretrained(str(folder / "model"))
    patch = save_patch(train_patch(pipe.text_encoder, pipe.tokenizer, concepts=["cat"], steps=steps, report=False),
                       str(folder / "cat.safetensors"))
    return {"model": str(folder / "model"), "patch": patch, "base": folder}
