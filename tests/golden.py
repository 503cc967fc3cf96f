"""The golden models (tests/data/golden, see docs/fidelity.md) rebuilt with public transformers / diffusers calls.

The files hold tiny random models and what the authors' own code computed on them (numbers only).
Weights are stored as float16 (cast to float32 here, exactly); token tables are sparse (only the
rows of the tokens listed in golden.json are non-zero).
"""

from __future__ import annotations

import functools
import json
import os

import torch
from safetensors.torch import load_file

FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "golden")


def _read_json(*parts):
    with open(os.path.join(FOLDER, *parts), encoding="utf-8") as f:
        return json.load(f)


@functools.lru_cache(maxsize=1)
def settings() -> dict:
    """golden.json: every setting, token ids, losses, live tokens and the tolerances."""
    return _read_json("golden.json")


def tensors(name: str) -> dict[str, torch.Tensor]:
    """One golden result file, e.g. tensors("hirm_R")."""
    return load_file(os.path.join(FOLDER, f"{name}.safetensors"))


def text_encoder(which: str):
    """"hirm" or "nlce": a float32 transformers CLIPTextModel holding the golden weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig.from_dict(_read_json("models", f"{which}_text_encoder_config.json"))
    stored = load_file(os.path.join(FOLDER, "models", f"{which}_text_encoder.safetensors"))
    ids, rows = stored.pop("token_embedding.ids").long(), stored.pop("token_embedding.rows").float()
    weights = {k: v.float() for k, v in stored.items()}
    weights["text_model.embeddings.token_embedding.weight"] = (
        torch.zeros(config.vocab_size, config.hidden_size).index_copy(0, ids, rows))
    model = CLIPTextModel(config)
    if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers 5 has no text_model level
        weights = {k[len("text_model."):]: v for k, v in weights.items()}
    model.load_state_dict(weights, strict=True)
    return model.eval().requires_grad_(False)


def pipeline():
    """The tiny SD1.x-shaped pipeline of the NLCE goldens (fp32, CPU). Its VAE is never run: latents are compared."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from shared_core.tokenizer import clip_tokenizer

    unet = UNet2DConditionModel.from_config(_read_json("models", "nlce_unet_config.json"))
    unet.load_state_dict({k: v.float() for k, v in load_file(os.path.join(FOLDER, "models", "nlce_unet.safetensors")).items()})
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_config(_read_json("models", "nlce_vae_config.json")), text_encoder=text_encoder("nlce"),
        tokenizer=clip_tokenizer(), unet=unet.eval(),
        scheduler=PNDMScheduler.from_config(_read_json("models", "nlce_scheduler_config.json")),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def rel(a, b) -> float:
    """Relative L2 difference of ``a`` against the reference ``b``."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
