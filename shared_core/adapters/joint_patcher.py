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
from ..nlce.driver import run_unet_pass

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
    """``encode(texts)`` -> per text its real rows of the context the transformer reads, from the CLIP object itself
    (as ``nlce.joint.joint_row_encoder`` lays them out: Flux: T5's words, then its end row; SD3: ``sd3_layout``).
    ``clip_l``: the CLIP's CLIP-L as a transformers model (SD1.x's rows: the live floor's scale; its vocabulary: mining
    neighbours)."""
    from ..nlce.joint import describe_joint_encoder, sd3_layout
    from ..tokenizer import clip_tokenizer

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

    return describe_joint_encoder(encode, family, lambda: t5_in_context[0], clip_tokenizer(), clip_l)


class PatcherJointNlce:
    """NLCE on one patched Flux / SD3 MODEL: ``unet_wrapper`` (stage 1 on ``c_crossattn``, the passes), ``block``
    (each ``dit`` block replacement: which block runs) and ``attention`` (the attention override: stages 2 and 3)."""

    def __init__(self, concept_set, config, family: str, sigma_to_timestep: Callable, gating: tuple[str, int],
                 text_first: dict):
        self.session = nlce.NlceSession(concept_set, config)
        self.family, self.sigma_to_timestep, self.gating, self.text_first = family, sigma_to_timestep, gating, text_first
        self.previous_wrapper = None
        self.foreign_blocks: dict[tuple[str, int], Callable] = {}
        self._prepared, self._text_len, self._block, self._calls_in_block = None, 0, None, 0
        self._previous_override = None

    def unet_wrapper(self, apply_model, args):
        t = float(self.sigma_to_timestep(args["timestep"]).flatten()[0])
        c = args["c"]
        context = c.get("c_crossattn")
        call_through = self.previous_wrapper or (lambda f, a: f(a["input"], a["timestep"], **a["c"]))
        if context is None:
            return call_through(apply_model, args)
        from .patcher import PatcherNlce

        cond = PatcherNlce.cond_rows(args, context.shape[0])
        words = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
        if self.family == "sd3":
            words[:, 0] = False  # CLIP's start row; which other rows are padding the conditioning does not say
        options = dict(c.get("transformer_options") or {})
        self._previous_override = options.get("optimized_attention_override")
        options["optimized_attention_override"] = self.attention

        def call():
            self._prepared = self.session.prepare(context, cond, words)
            self._text_len = context.shape[1]
            return call_through(apply_model, {**args, "c": {**c, "c_crossattn": self._prepared.context,
                                                            "transformer_options": options}})

        try:
            return run_unet_pass(self.session, t, call)
        finally:
            self._prepared = self._block = None  # no context tensors kept between passes (or copied by clone())

    def block(self, kind: str, index: int):
        def run(args, extra):
            self._block, self._calls_in_block = (kind, index), 0
            foreign = self.foreign_blocks.get((kind, index))
            return foreign(args, extra) if foreign is not None else extra["original_block"](args)

        return run

    def attention(self, func, q, k, v, *args, **kwargs):
        """ComfyUI's ``optimized_attention_override``: ``func(q, k, v, heads, ...)`` is ComfyUI's own attention."""
        passthrough = self._previous_override or (lambda f, *a, **kw: f(*a, **kw))
        prepared, block = self._prepared, self._block
        self._calls_in_block += 1
        heads = args[0] if args else kwargs.get("heads")
        skip_reshape = kwargs.get("skip_reshape", False)
        if (prepared is None or block is None or self._calls_in_block > 1 or kwargs.get("mask") is not None
                or not prepared.has_live):  # SD3.5's second attention in a block is image-only; a mask: left alone
            return passthrough(func, q, k, v, *args, **kwargs)
        if skip_reshape:  # (B, heads, L, D)
            qh, kh, vh = q, k, v
        else:  # (B, L, heads * D)
            qh, kh, vh = (x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2) for x in (q, k, v))
        L, T = qh.shape[2], self._text_len
        text = slice(0, T) if self.text_first.get(block, True) else slice(L - T, L)
        side = int((L - T) ** 0.5)
        shape = (side, side) if side * side == L - T else (1, L - T)
        out = self.session.joint_attend(qh, kh, vh, text, prepared, shape, block == self.gating)
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
        gating = ("double_block", len(dm.double_blocks) // 2)
    else:
        width = dm.context_embedder.in_features
        blocks = [("double_block", i) for i in range(len(dm.joint_blocks))]
        text_first = {}
        gating = ("double_block", len(dm.joint_blocks) // 2)
        if getattr(dm, "register_length", 0):
            raise NlceError("this SD3 model prepends register tokens to the text; NLCE does not support it")
    if width != concept_set.width:
        raise NlceError(f"this model reads {width}-wide text rows but the concept operators are {concept_set.width} wide; "
                        "use the CLIP that came with this model")
    scale = 1000.0 if family == "flux" else 1.0  # Flux's model sampling gives sigma (0..1) as its timestep

    state = PatcherJointNlce(concept_set, config, family, lambda s: sigma_to_timestep(s) * scale, gating, text_first)
    state.session.warm(patcher.load_device)
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


def joint_concept_set(clip, clip_l_weights, family: str, concepts, neighbors, config, device="cpu"):
    """NLCE operators for a Flux / SD3 MODEL, built with the CLIP object that encodes its prompts (``clip_l_weights``:
    its CLIP-L under canonical names, the live floor's reference and the vocabulary ``"auto"`` mines)."""
    from ..encoders import build_text_model

    encode = clip_row_encoder(clip, family, build_text_model(clip_l_weights, device=device, own=lambda _: False))
    return nlce.build_concept_set(encode, list(concepts), nlce.neighbor_table(encode, concepts, neighbors), config)
