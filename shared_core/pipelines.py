"""Loading a diffusers text-to-image pipeline from what a user has (a model folder, a Hub id, a single file)."""

from __future__ import annotations

import os

from .errors import EncoderSourceError

NO_MODEL = ("no model given: pass a diffusers model folder (SD1.x, SDXL; Flux and SD3 too) (e.g. ./stable-diffusion-v1-5), "
            "a Hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5, stabilityai/stable-diffusion-xl-base-1.0) or an "
            "SD1.x / SDXL single-file checkpoint")


def load_pipeline(model: str, device: str):
    """A text-to-image pipeline on ``device`` (``pipeline_dtype``), progress bars off: any diffusers folder
    or Hub id ``AutoPipelineForText2Image`` reads (SD1.x, SDXL, Flux, SD3), or an SD1.x / SDXL single file.

    A single file is read with diffusers' ``from_single_file``, which needs the model type's configuration from the Hub
    once (then from the cache); offline without it, the message says to use a diffusers folder.
    """
    import diffusers
    import transformers
    from diffusers import AutoPipelineForText2Image

    diffusers.utils.logging.disable_progress_bar()  # loading bars: the commands draw their own for the work
    transformers.utils.logging.disable_progress_bar()

    if os.path.isfile(model):
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        from .encoders import text_components
        from .loading import load_state_dict_file

        xl = "clip_g" in text_components(load_state_dict_file(model).keys())
        cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
        try:
            pipe = cls.from_single_file(model, **({} if xl else {"safety_checker": None, "requires_safety_checker": False}))
        except Exception as e:  # diffusers raises several kinds (config not cached offline, unknown layout)
            raise EncoderSourceError(f"{model}: diffusers cannot read it as a single-file {'SDXL' if xl else 'SD1.x'} checkpoint "
                                     f"({str(e).splitlines()[0][:160]}); offline it needs the model type's config in the "
                                     "Hugging Face cache: convert the file to a diffusers folder once instead") from None
    elif os.path.isdir(model) or "/" in model:
        checker = True  # a Hub id: unknown until loaded
        if os.path.isfile(index := os.path.join(model, "model_index.json")):
            with open(index, encoding="utf-8") as f:
                checker = '"safety_checker"' in f.read()
        try:  # without the safety checker where the pipeline has one (SD1.x); other pipelines warn about the argument
            pipe = AutoPipelineForText2Image.from_pretrained(
                model, **({"safety_checker": None, "requires_safety_checker": False} if checker else {}))
        except (OSError, ValueError) as e:
            raise EncoderSourceError(f"{model}: cannot load a Stable Diffusion pipeline ({str(e).splitlines()[0][:160]}); "
                                     "pass an SD1.x, SDXL, Flux or SD3 diffusers folder, or connect once to download a Hub id") from None
    else:
        raise EncoderSourceError(f"{model}: no such file or folder; {NO_MODEL}")
    pipe.set_progress_bar_config(disable=True)
    dtype = pipeline_dtype(pipe, device)
    if pipe.dtype != dtype:  # diffusers renamed from_pretrained's dtype argument; .to() takes it everywhere (and warns)
        pipe.to(dtype=dtype)
    return pipe.to(device)


def pipeline_dtype(pipe, device: str):
    """fp32 off CUDA; on CUDA fp16, but bf16 for Flux, whose T5 and transformer overflow in fp16."""
    import torch

    if not device.startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if type(getattr(pipe, "transformer", None)).__name__.startswith("Flux") else torch.float16
