"""NLCE on a ComfyUI-style MODEL whose denoiser is a joint-attention transformer (Flux, SD3): experimental; the
design is docs/nlce-joint-attention.md.

Nothing here imports a host; it speaks ComfyUI's documented hooks: the UNet function wrapper (stage 1 on the
``c_crossattn`` rows before the context embedder, the passes), ``patches_replace["dit"]`` block replacements (which
block runs) and ``transformer_options["optimized_attention_override"]`` (the joint attention itself: stages 2 and 3
on the image queries). The concept rows come from the CLIP object's own ``tokenize`` / ``encode_from_tokens``.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from .. import nlce
from ..errors import NlceError
from ..families import FAMILIES, joint_gating_block

log = logging.getLogger("hirm")
CLIP_END = 49407  # CLIP's end-of-text token; T5's padding is 0


def joint_model_family(patcher) -> str | None:
    """"flux" or "sd3" for a MODEL NLCE can act on through joint attention, else None."""
    kind = type(patcher.model).__name__
    dm = patcher.model.diffusion_model
    if kind == "Flux" and hasattr(dm, "double_blocks") and hasattr(dm, "single_blocks"):
        return "flux"
    if kind == "SD3" and hasattr(dm, "joint_blocks"):
        return "sd3"
    return None


def _count(tokens, stop: Callable[[int], bool]) -> int:
    """Real rows of one tokenised text (its first chunk): up to and including the first token where ``stop``."""
    ids = [t[0] for t in tokens[0]]
    return next((i + 1 for i, t in enumerate(ids) if stop(t)), len(ids))


def clip_row_encoder(clip, family: str, clip_l):
    """Per text its real rows of the context the transformer reads, from the CLIP object itself (laid out as
    ``diffusers_joint.pipeline_row_encoder`` lays them out: Flux: T5's words, then its end row; SD3: ``sd3_layout``).
    ``clip_l``: the CLIP's CLIP-L as a transformers model (SD1.x's rows: the live floor's scale; its vocabulary: mining
    neighbours)."""
    from ..tokenizer import clip_tokenizer
    from .diffusers_joint import joint_row_encoder, sd3_layout

    t5_in_context = [True]

    def encode(texts):
        out = []
        for text in texts:
            tokens = clip.tokenize(text)
            cond = clip.encode_from_tokens(tokens)[0].float().cpu()
            if "t5xxl" not in tokens:
                raise NlceError("this CLIP has no T5 tokenizer; use the CLIP loaded for this model (DualCLIPLoader: flux; "
                                "TripleCLIPLoader: sd3)")
            n_t5 = _count(tokens["t5xxl"], lambda t: t == 1)  # words and T5's end token
            if family == "flux":
                out.append(cond[:n_t5])
                continue
            t5_in_context[0] = cond.shape[0] > 77  # an SD3 CLIP without T5 gives CLIP's 77 rows alone
            n_clip = _count(tokens["l"], lambda t: t == CLIP_END)
            out.append(sd3_layout(cond[:n_clip], cond[77: 77 + n_t5]))
        return out

    return joint_row_encoder(encode, family, lambda: t5_in_context[0], clip_tokenizer(), clip_l)


class PatcherJointNlce:
    """NLCE on one patched Flux / SD3 MODEL: ``unet_wrapper`` (stage 1 on ``c_crossattn``, the passes; outside a compiled
    diffusion model), ``block`` (each ``dit`` block replacement: which block runs) and ``attention`` (the attention
    override: stages 2 and 3), the last two inside the diffusion model (pure tensor work)."""

    def __init__(self, concept_set, config, family: str, sigma_to_timestep: Callable, gating: tuple[str, int],
                 text_first: dict, patch: int):
        self.session = nlce.NlceSession(concept_set, config)
        self.family, self.sigma_to_timestep, self.gating, self.text_first = family, sigma_to_timestep, gating, text_first
        self.patch = patch
        self.previous_wrapper = None
        self.foreign_blocks: dict[tuple[str, int], Callable] = {}
        self._rows: dict = {}   # conditional rows per layout
        self._words_of: dict = {}

    def _words(self, context: torch.Tensor) -> torch.Tensor:
        """Which context rows can hold words: all (Flux); all but CLIP's start row (SD3; which other rows are padding the
        conditioning does not say). Made once per shape and device."""
        key = (tuple(context.shape[:2]), str(context.device))
        if key not in self._words_of:
            words = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
            if self.family == "sd3":
                words[:, 0] = False
            self._words_of[key] = words
        return self._words_of[key]

    def unet_wrapper(self, apply_model, args):
        c = args["c"]
        context = c.get("c_crossattn")
        call_through = self.previous_wrapper or (lambda f, a: f(a["input"], a["timestep"], **a["c"]))
        if context is None:
            return call_through(apply_model, args)
        from .patcher import conditional_rows

        x = args["input"]
        t = self.sigma_to_timestep(args["timestep"]).flatten()[0]
        chunks = args.get("cond_or_uncond") or [0]
        conditional = conditional_rows(self._rows, chunks, context.shape[0], context.device)
        words = self._words(context)
        h, w = -(-x.shape[-2] // self.patch), -(-x.shape[-1] // self.patch)
        layout = (tuple(chunks), x.shape[0])
        self.session.ready(x.device, layout, x.shape[0] * h * w)
        options = dict(c.get("transformer_options") or {})
        previous_override = options.get("optimized_attention_override")
        options["optimized_attention_override"] = self.attention

        def call():
            p = self.session.current
            p.host.update(previous_override=previous_override, text_len=context.shape[1], block=None, calls=0)
            prepared = self.session.prepare(p, context, conditional, words)
            return call_through(apply_model, {**args, "c": {**c, "c_crossattn": prepared.context, "transformer_options": options}})

        return nlce.run_pass(self.session, t, call, key=layout, batch=x.shape[0], gating_shape=(h, w), device=x.device)

    def block(self, kind: str, index: int):
        def run(args, extra):
            p = self.session.current
            if p is not None:
                p.host.update(block=(kind, index), calls=0)
            foreign = self.foreign_blocks.get((kind, index))
            return foreign(args, extra) if foreign is not None else extra["original_block"](args)

        return run

    def attention(self, func, q, k, v, *args, **kwargs):
        """ComfyUI's ``optimized_attention_override``: ``func(q, k, v, heads, ...)`` is ComfyUI's own attention."""
        p = self.session.current
        passthrough = (p and p.host["previous_override"]) or (lambda f, *a, **kw: f(*a, **kw))
        if p is None or p.prepared is None or p.host["block"] is None or kwargs.get("mask") is not None:
            return passthrough(func, q, k, v, *args, **kwargs)
        p.host["calls"] += 1
        if p.host["calls"] > 1:  # SD3.5's second attention in a block is image-only: left alone
            return passthrough(func, q, k, v, *args, **kwargs)
        block = p.host["block"]
        heads = args[0] if args else kwargs.get("heads")
        skip_reshape = kwargs.get("skip_reshape", False)
        if skip_reshape:  # (B, heads, L, D)
            qh, kh, vh = q, k, v
        else:  # (B, L, heads * D)
            qh, kh, vh = (x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2) for x in (q, k, v))
        L, T = qh.shape[2], p.host["text_len"]
        text = slice(0, T) if self.text_first.get(block, True) else slice(L - T, L)
        shape = p.gating_shape if p.gating_shape[0] * p.gating_shape[1] == L - T else (1, L - T)
        out = self.session.joint_attention(p, qh, kh, vh, text, shape, block == self.gating)
        if out is None:
            return passthrough(func, q, k, v, *args, **kwargs)
        out = out.to(q.dtype)
        return out if kwargs.get("skip_output_reshape") else out.transpose(1, 2).reshape(out.shape[0], L, -1)


def install_joint_nlce(patcher, concept_set, config, sigma_to_timestep: Callable):
    """A clone of a Flux / SD3 MODEL with NLCE on its joint attention; the input is not changed. Another node's UNet
    function wrapper, ``dit`` block replacement or attention override is called through."""
    family = joint_model_family(patcher)
    if family is None:
        raise NlceError(f"NLCE's joint-attention mode supports Flux and SD3 models, not {type(patcher.model).__name__}")
    concept_set.check_family(family, "this model")
    dm = patcher.model.diffusion_model
    if family == "flux":
        width = dm.txt_in.in_features
        blocks = [("double_block", i) for i in range(len(dm.double_blocks))] + \
                 [("single_block", i) for i in range(len(dm.single_blocks))]
        text_first = {("double_block", i): not getattr(b, "flipped_img_txt", False) for i, b in enumerate(dm.double_blocks)}
        doubles = len(dm.double_blocks)
    else:
        width = dm.context_embedder.in_features
        blocks = [("double_block", i) for i in range(len(dm.joint_blocks))]
        text_first = {}
        doubles = len(dm.joint_blocks)
        if getattr(dm, "register_length", 0):
            raise NlceError("this SD3 model prepends register tokens to the text; NLCE does not support it")
    concept_set.check_width(width, "this model", "nlce-comfyui")
    scale = FAMILIES[family].timestep_scale  # Flux's model sampling gives sigma (0..1) as its timestep
    state = PatcherJointNlce(concept_set, config, family, lambda s: sigma_to_timestep(s) * scale,
                             ("double_block", joint_gating_block(doubles)), text_first, int(getattr(dm, "patch_size", 2)))
    clone = patcher.clone()
    state.previous_wrapper = clone.model_options.get("model_function_wrapper")
    replaces = clone.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    state.foreign_blocks = {key: fn for key in blocks if (fn := replaces.get(key)) is not None}
    if state.foreign_blocks:
        log.warning("[hirm] NLCE: another node already replaces %d of %d transformer blocks; NLCE calls through to it",
                    len(state.foreign_blocks), len(blocks))
    for kind, index in blocks:
        clone.set_model_patch_replace(state.block(kind, index), "dit", kind, index)
    clone.set_model_unet_function_wrapper(state.unet_wrapper)
    return clone, state


def joint_concept_set(clip, clip_l_weights, family: str, concepts, neighbors, config, device="cpu", progress=None):
    """NLCE operators for a Flux / SD3 MODEL, built with the CLIP object that encodes its prompts (``clip_l_weights``:
    its CLIP-L under canonical names, the live floor's reference and the vocabulary ``"auto"`` mines)."""
    from ..encoders import build_text_model

    encode = clip_row_encoder(clip, family, build_text_model(clip_l_weights, device=device, own=lambda _: False))
    return nlce.operators_with_progress(encode, list(concepts), neighbors, config, progress)
