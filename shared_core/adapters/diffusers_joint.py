"""NLCE on diffusers' joint-attention transformers (Flux, SD3): experimental; the design is docs/nlce-joint-attention.md.

``apply_nlce(pipe, ...)`` hands a ``FluxPipeline`` or ``StableDiffusion3Pipeline`` to ``apply_joint``: stage 1 on the
text encoder rows before the context embedder (the transformer's ``forward`` is wrapped), stages 2 and 3 on the image
queries of every joint block (processors on the joint attention modules). The concept rows come from the pipeline's
own ``encode_prompt``.
"""

from __future__ import annotations

import math

import torch

from ..errors import NlceError
from ..families import FAMILIES, joint_gating_block
from ..nlce import NlceSession, RowEncoder, clip_row_encoder, run_pass
from .diffusers_common import LAYOUT, NlceHandle, check_not_installed, pipeline_operators


def joint_family(pipe) -> str | None:
    """"flux" or "sd3" for a pipeline whose denoiser is one of those joint-attention transformers, else None."""
    transformer = getattr(pipe, "transformer", None)
    name = type(getattr(transformer, "_orig_mod", transformer)).__name__  # the model itself, also behind torch.compile
    return "flux" if name.startswith("Flux") else "sd3" if name.startswith("SD3") else None


# ---------------------------------------------------------------------------------------------- rows


def _t5_lengths(tokenizer, texts, length) -> list[int]:
    ids = tokenizer(list(texts), padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return ids.attention_mask.sum(1).tolist()  # words and the end token


def _clip_lengths(tokenizer, texts) -> list[int]:
    from ..textenc import real_token_mask

    ids = tokenizer(list(texts), padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return real_token_mask(tokenizer, ids).sum(1).tolist()  # start, words, the first end token


def sd3_layout(clip_rows: torch.Tensor, t5_rows: torch.Tensor) -> torch.Tensor:
    """One SD3 text's real rows for NLCE: CLIP's start row and words, T5's words, then the end rows (CLIP's, T5's)."""
    return torch.cat([clip_rows[:-1], t5_rows[:-1], clip_rows[-1:], t5_rows[-1:]])


def joint_row_encoder(encode, family: str, t5_in_context, clip_tokenizer, clip_model) -> RowEncoder:
    """A ``RowEncoder`` for a joint family's rows: which are words (Flux: all but T5's end row; SD3: between CLIP's start
    row and the end rows, ``t5_in_context()``: whether SD3's rows end with T5's end row too), which is a start row,
    CLIP-L's vocabulary (mining neighbours) and CLIP-L's SD1.x rows (the live floor's scale)."""
    from ..encoders import text_module

    flux = family == "flux"
    return RowEncoder(encode, family, clip_tokenizer, text_module(clip_model).embeddings.token_embedding.weight.detach(),
                      clip_row_encoder(clip_model, clip_tokenizer),
                      word_rows=(lambda r: r[:-1]) if flux else (lambda r: r[1: -1 - bool(t5_in_context())]),
                      without_start=(lambda r: r) if flux else (lambda r: r[1:]))


def pipeline_row_encoder(pipe, family: str) -> RowEncoder:
    """Per text its real rows of the context the transformer reads, from ``pipe.encode_prompt``. Flux: T5's words, then
    its end row (T5 has no start row). SD3: ``sd3_layout`` (both segments' rows of the 4096-wide context, the end rows
    last)."""
    length = FAMILIES[family].text_rows
    t5_in_context = family == "flux" or pipe.text_encoder_3 is not None  # SD3 without T5: zero rows, not words

    def encode(texts):
        texts = list(texts)
        with torch.no_grad():
            if family == "flux":
                embeds = pipe.encode_prompt(prompt=texts, prompt_2=None, max_sequence_length=length)[0]
                return [embeds[i, :n].float().cpu() for i, n in enumerate(_t5_lengths(pipe.tokenizer_2, texts, length))]
            embeds = pipe.encode_prompt(prompt=texts, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
                                        max_sequence_length=length)[0]
        out = []
        for i, c in enumerate(_clip_lengths(pipe.tokenizer, texts)):
            t = _t5_lengths(pipe.tokenizer_3, [texts[i]], length)[0] if t5_in_context else 0
            out.append(sd3_layout(embeds[i, :c], embeds[i, 77: 77 + t]).float().cpu())
        return out

    return joint_row_encoder(encode, family, lambda: t5_in_context, pipe.tokenizer, pipe.text_encoder)


def prompt_words(pipe, family: str, prompts: list[str], rows: int) -> torch.Tensor:
    """(len(prompts), rows) bool: the rows of a ``rows``-long context that hold each prompt's words (not start, end or
    padding). Flux: T5's rows; SD3: CLIP's 77, then T5's."""
    words = torch.zeros(len(prompts), rows, dtype=torch.bool)
    t5, offset = (pipe.tokenizer_2, 0) if family == "flux" else (pipe.tokenizer_3, 77)
    if family == "flux" or pipe.text_encoder_3 is not None:
        for i, n in enumerate(_t5_lengths(t5, prompts, rows - offset)):
            words[i, offset: offset + n - 1] = True
    if family == "sd3":
        for i, n in enumerate(_clip_lengths(pipe.tokenizer, prompts)):
            words[i, 1: n - 1] = True
    return words


# ---------------------------------------------------------------------------------------------- processors


def _rotary_takes_sequence_dim() -> bool:
    import inspect

    try:
        from diffusers.models.embeddings import apply_rotary_emb
    except ImportError:
        return False
    return "sequence_dim" in inspect.signature(apply_rotary_emb).parameters


_ROTARY_SEQUENCE_DIM = _rotary_takes_sequence_dim()  # diffusers 0.33+: rotary on (B, tokens, heads, dim) as Flux runs it


class JointProcessor:
    """A joint-attention block with NLCE's stages 2 and 3 on the image queries; the block's own processor where the
    settings leave it alone. ``kind``: "double" (Flux: text first, its own projections), "single" (Flux: one projection
    over [text, image]), "sd3" (image first, then the text's own projections)."""

    def __init__(self, handle: "JointHandle", name: str, kind: str, is_gating_block: bool):
        self.handle, self.name, self.kind, self.is_gating_block = handle, name, kind, is_gating_block

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None, *args,
                 **kwargs):
        original = self.handle.original_processors[self.name]
        session = self.handle.session
        p = session.current
        cfg = session.config
        if (p is None or attention_mask is not None or not (cfg.stage2 or cfg.stage3)
                or (p.dry and not self.is_gating_block)):
            return original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, *args, **kwargs)
        B = hidden_states.shape[0]
        heads = attn.heads
        text_len = p.host["text_len"]
        flux = self.kind in ("double", "single")
        # Flux's own processor keeps (B, tokens, heads, dim) up to the attention; SD3's (B, heads, tokens, dim)
        seq = 1 if flux and _ROTARY_SEQUENCE_DIM else 2

        def split(x):
            x = x.view(B, -1, heads, x.shape[-1] // heads)
            return x if seq == 1 else x.transpose(1, 2)

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        if getattr(attn, "norm_q", None) is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:
            eq, ek, ev = (split(f(encoder_hidden_states)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if getattr(attn, "norm_added_q", None) is not None:
                eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            first = self.kind == "double"
            q, k, v = ((torch.cat([a, b], dim=seq) if first else torch.cat([b, a], dim=seq)) for a, b in ((eq, q), (ek, k), (ev, v)))
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            rotate = (lambda x: apply_rotary_emb(x, image_rotary_emb, sequence_dim=1)) if seq == 1 else \
                (lambda x: apply_rotary_emb(x, image_rotary_emb))
            q, k = rotate(q), rotate(k)
        if seq == 1:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        text = slice(0, text_len) if flux else slice(q.shape[2] - text_len, q.shape[2])
        image_tokens = q.shape[2] - text_len
        grid = p.host["grid"]
        shape = grid if grid[0] * grid[1] == image_tokens else (1, image_tokens)
        out = session.joint_attention(p, q, k, v, text, shape, self.is_gating_block)
        out = out.transpose(1, 2).reshape(B, -1, heads * out.shape[-1]).to(q.dtype)
        if encoder_hidden_states is None:  # Flux single block: the block applies its own output projection
            return out
        if self.kind == "double":
            txt, img = out[:, :text_len], out[:, text_len:]
        else:
            img, txt = out[:, : out.shape[1] - text_len], out[:, out.shape[1] - text_len:]
        img = attn.to_out[1](attn.to_out[0](img))
        if self.kind == "sd3" and getattr(attn, "context_pre_only", False):
            return img, txt
        return img, attn.to_add_out(txt)


# ---------------------------------------------------------------------------------------------- the handle


class JointHandle(NlceHandle):
    """What ``apply_joint`` installed on a Flux / SD3 pipeline; ``remove()`` restores it exactly."""

    def __init__(self, pipe, concept_set, session, gating_block: str, family: str):
        super().__init__(pipe, pipe.transformer, concept_set, session, gating_block, family)
        self._negatives: set[str] = set()  # Flux: the negative prompts of the current call

    def _wrapped(self) -> list:
        return super()._wrapped() + [(self.pipe, "check_inputs")]

    def blocks(self) -> dict[str, str]:
        """Processor name -> kind, for every joint-attention module of the transformer."""
        out = {}
        for name in self.original_processors:
            if name.startswith("transformer_blocks.") and name.endswith(".attn.processor"):
                out[name] = "double" if self.family == "flux" else "sd3"
            elif name.startswith("single_transformer_blocks.") and name.endswith(".attn.processor"):
                out[name] = "single"
        return out

    def _processors(self) -> dict:
        return {name: JointProcessor(self, name, kind, name == self.gating_layer) for name, kind in self.blocks().items()}

    def _install(self) -> None:
        super()._install()
        check_inputs = getattr(self.pipe, "check_inputs", None)
        if check_inputs is not None and self.family == "flux":
            def nlce_check_inputs(*args, **kwargs):  # Flux's true CFG encodes the negative prompt with a second call
                negative = kwargs.get("negative_prompt")
                self._negatives = set([negative] if isinstance(negative, str) else negative or [])
                return check_inputs(*args, **kwargs)

            self.pipe.check_inputs = nlce_check_inputs

    def _forward(self, forward):
        session, prompts, scale = self.session, self.prompts, FAMILIES[self.family].timestep_scale
        patch = getattr(self.denoiser.config, "patch_size", 1)

        def nlce_forward(*args, **kwargs):
            context = kwargs.get("encoder_hidden_states")
            if context is None:
                return forward(*args, **kwargs)
            t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            t = (t.flatten()[0].float() if torch.is_tensor(t) else float(t)) * scale  # Flux passes sigma (0..1)
            latent = kwargs.get("hidden_states", args[0] if args else None)
            grid = _grid(latent, patch)
            conditional, words = prompts.rows(context)

            def call():
                p = session.current
                p.host.update(grid=grid, text_len=context.shape[1])
                prepared = session.prepare(p, context, conditional, words)
                return forward(*args, **{**kwargs, "encoder_hidden_states": prepared.context})

            return run_pass(session, t, call, key=LAYOUT, batch=latent.shape[0], gating_shape=grid, device=latent.device)

        return nlce_forward

    def _remember(self, result, prompt) -> None:
        """Flux: (prompt_embeds, pooled, text_ids) per call, the negative prompt in its own call; SD3: (prompt, negative,
        pooled, negative pooled) as SD1.x/SDXL's."""
        embeds = result[0]
        if embeds is None:
            return
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, list) else None
        if self.family == "flux" and prompts and set(prompts) <= self._negatives:
            self.prompts.remember_negative(embeds)  # a negative prompt: never the concept's
            return
        words = None
        if prompts:
            words = prompt_words(self.pipe, self.family, prompts, embeds.shape[1])
            words = words.repeat_interleave(embeds.shape[0] // max(1, len(prompts)), dim=0)
        negative = result[1] if self.family == "sd3" and len(result) > 1 and torch.is_tensor(result[1]) else None
        self.prompts.remember(embeds, negative, words)


def _grid(latent, patch: int) -> tuple[int, int]:
    """(h, w) of the image tokens: Flux packs 2x2 latent patches into a sequence (the pipeline's own height/width are not
    passed to the transformer, so a square is assumed; else one row); SD3 takes the latent itself."""
    if latent.ndim == 4:
        return latent.shape[-2] // patch, latent.shape[-1] // patch
    side = math.isqrt(latent.shape[1])
    return (side, side) if side * side == latent.shape[1] else (1, latent.shape[1])


def apply_joint(pipe, concepts, neighbors, *, concept_set, preset, gating_layer, record_maps, mine_top_k, settings) -> JointHandle:
    """``apply_nlce`` for a Flux or SD3 pipeline (see the module doc); everything is checked before anything changes."""
    transformer = pipe.transformer
    family = joint_family(pipe)
    check_not_installed(transformer)
    concept_set, config = pipeline_operators(pipe, family, lambda: pipeline_row_encoder(pipe, family), concepts, neighbors,
                                             concept_set, preset, mine_top_k, settings)
    concept_set.check_width(transformer.config.joint_attention_dim, "this pipeline's transformer", "nlce-diffusers")
    handle = JointHandle(pipe, concept_set, NlceSession(concept_set, config, record_maps), "", family)
    blocks = [n for n, kind in handle.blocks().items() if kind != "single"]
    if not blocks:
        raise NlceError("this transformer has no joint-attention blocks NLCE can act on")
    if gating_layer is None:
        gating = blocks[joint_gating_block(len(blocks))]
    else:
        gating = gating_layer if gating_layer.endswith(".processor") else gating_layer + ".processor"
        if gating not in handle.blocks():
            raise NlceError(f"gating block {gating_layer!r} is not a joint-attention block of this transformer (e.g. {blocks[0]})")
    handle.gating_layer = gating
    handle._install()
    return handle
