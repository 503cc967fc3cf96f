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


def tiny_sdxl_pipeline(seed=0):
    """A tiny StableDiffusionXLPipeline: CLIP-L-like and bigG-like encoders (the second with a projection, its
    tokenizer padding with "!"), the UNet above, random weights."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    from shared_core.encoders import canonical_parameters

    config_2 = tiny_config(hidden=G_WIDTH)
    config_2.projection_dim = G_WIDTH  # the pooled vector the added conditioning reads
    text_encoder_2 = CLIPTextModelWithProjection(config_2).eval()
    donor = random_clip(tiny_config(hidden=G_WIDTH), seed + 1)  # the same widened random layers as the other encoder
    with torch.no_grad():
        for name, p in canonical_parameters(text_encoder_2).items():
            p.copy_(canonical_parameters(donor)[name])
    pipe = StableDiffusionXLPipeline(vae=tiny_vae(seed), text_encoder=random_clip(tiny_config(hidden=L_WIDTH), seed),
                                     text_encoder_2=text_encoder_2.requires_grad_(False), tokenizer=clip_tokenizer(),
                                     tokenizer_2=clip_tokenizer("!"), unet=tiny_sdxl_unet(seed),
                                     scheduler=DDIMScheduler(num_train_timesteps=1000, clip_sample=False, steps_offset=1))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_encoders(pipe) -> dict:
    """What ``train_model_patch`` takes for an SDXL pipeline: {component: (encoder, tokenizer, projection)}."""
    return {"clip_l": (pipe.text_encoder, pipe.tokenizer, None),
            "clip_g": (pipe.text_encoder_2, pipe.tokenizer_2, pipe.text_encoder_2.text_projection.weight.detach())}
