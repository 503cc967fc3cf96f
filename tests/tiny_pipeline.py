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
