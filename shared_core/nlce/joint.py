"""NLCE for diffusers' joint-attention transformers (Flux, SD3): experimental; the design is docs/nlce-joint-attention.md.

``apply_nlce(pipe, ...)`` hands a ``FluxPipeline`` or ``StableDiffusion3Pipeline`` to ``apply_joint``: stage 1 on the
text encoder rows before the context embedder (the transformer's ``forward`` is wrapped), stages 2 and 3 on the image
queries of every joint block (processors on the joint attention modules; where a block has nothing to change, its own
processor runs). The concept rows come from the pipeline's own ``encode_prompt``.
"""

from __future__ import annotations

import torch

from ..errors import NlceError
from .diffusers import _INSTALLED, NlceHandle, pipeline_operators  # _INSTALLED: denoiser -> its handle
from .driver import run_unet_pass
from .operators import clip_row_encoder

JOINT_TEXT_ROWS = {"flux": 512, "sd3": 256}  # the pipelines' default max_sequence_length: the concepts are encoded so


def joint_family(pipe) -> str | None:
    """"flux" or "sd3" for a pipeline whose denoiser is one of those joint-attention transformers, else None."""
    name = type(getattr(pipe, "transformer", None)).__name__
    return "flux" if name.startswith("Flux") else "sd3" if name.startswith("SD3") else None


# ---------------------------------------------------------------------------------------------- rows


def _t5_lengths(tokenizer, texts, length) -> list[int]:
    ids = tokenizer(list(texts), padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return ids.attention_mask.sum(1).tolist()  # words and the end token


def _clip_lengths(tokenizer, texts) -> list[int]:
    from ..textenc import real_token_mask

    ids = tokenizer(list(texts), padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return real_token_mask(tokenizer, ids).sum(1).tolist()  # start, words, the first end token


def joint_row_encoder(pipe, family: str, length: int):
    """``encode(texts)`` -> per text its real rows of the context the transformer reads, from ``pipe.encode_prompt``.
    Flux: T5's words, then its end row (T5 has no start row). SD3: ``sd3_layout`` (both segments' rows of the 4096-wide
    context, the end rows last)."""

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

    return describe_joint_encoder(encode, family, lambda: t5_in_context, pipe.tokenizer, pipe.text_encoder)


def sd3_layout(clip_rows: torch.Tensor, t5_rows: torch.Tensor) -> torch.Tensor:
    """One SD3 text's real rows for NLCE: CLIP's start row and words, T5's words, then the end rows (CLIP's, T5's)."""
    return torch.cat([clip_rows[:-1], t5_rows[:-1], clip_rows[-1:], t5_rows[-1:]])


def describe_joint_encoder(encode, family: str, t5_in_context, clip_tokenizer, clip_model):
    """``encode`` with what NLCE reads about its rows: which are words (``word_rows``; ``t5_in_context()``: whether
    SD3's rows end with T5's end row too), which is a start row (``without_start``), CLIP-L's vocabulary
    (``tokenizer``, ``token_embedding``: mining neighbours) and CLIP-L's SD1.x rows (``reference``: the live floor's
    scale)."""
    from ..encoders import text_module

    encode.tokenizer, encode.family = clip_tokenizer, family
    encode.token_embedding = text_module(clip_model).embeddings.token_embedding.weight.detach()
    encode.reference = clip_row_encoder(clip_model, clip_tokenizer)
    encode.word_rows = (lambda r: r[:-1]) if family == "flux" else (lambda r: r[1: -1 - bool(t5_in_context())])
    encode.without_start = (lambda r: r) if family == "flux" else (lambda r: r[1:])
    return encode


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


class JointProcessor:
    """A joint-attention block with NLCE's stages 2 and 3 on the image queries; the block's own processor where there
    is nothing to change. ``kind``: "double" (Flux: text first, its own projections), "single" (Flux: one projection
    over [text, image]), "sd3" (image first, then the text's own projections)."""

    def __init__(self, handle: "JointHandle", name: str, kind: str, is_gating_block: bool):
        self.handle, self.name, self.kind, self.is_gating_block = handle, name, kind, is_gating_block

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None, *args,
                 **kwargs):
        original = self.handle.original_processors[self.name]
        handle, session = self.handle, self.handle.session
        prepared = handle.prepared
        if (prepared is None or attention_mask is not None
                or not session.joint_acts(prepared, self.is_gating_block, hidden_states.shape[0])):
            return original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, *args, **kwargs)
        B = hidden_states.shape[0]
        heads = attn.heads

        def split(x):
            return x.view(B, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        if getattr(attn, "norm_q", None) is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        text_len = handle.text_len
        if encoder_hidden_states is not None:
            eq, ek, ev = (split(f(encoder_hidden_states)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if getattr(attn, "norm_added_q", None) is not None:
                eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            first = self.kind == "double"
            q, k, v = ((torch.cat([a, b], dim=2) if first else torch.cat([b, a], dim=2)) for a, b in ((eq, q), (ek, k), (ev, v)))
        text = slice(0, text_len) if self.kind in ("double", "single") else slice(q.shape[2] - text_len, q.shape[2])
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            q, k = apply_rotary_emb(q, image_rotary_emb), apply_rotary_emb(k, image_rotary_emb)
        image_tokens = q.shape[2] - text_len
        shape = handle.image_grid if handle.image_grid and handle.image_grid[0] * handle.image_grid[1] == image_tokens \
            else (1, image_tokens)
        out = session.joint_attend(q, k, v, text, prepared, shape, self.is_gating_block)
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
        self.pipe, self.concept_set, self.session, self.family = pipe, concept_set, session, family
        self.unet = pipe.transformer  # the denoiser (NlceHandle's name for it)
        self.gating_layer = gating_block
        self.original_processors = dict(self.unet.attn_processors)
        self.prepared, self.text_len, self.image_grid = None, 0, None
        self._prompts: list[tuple] = []
        self._negatives: set[str] = set()  # Flux: the negative prompts of the current call
        self._negative_rows: list[torch.Tensor] = []
        self._rows_key = self._rows = None
        self._saved = {(o, n): o.__dict__.get(n) for o, n in ((self.unet, "forward"), (pipe, "encode_prompt"), (pipe, "check_inputs"))}
        self.removed = False

    def blocks(self) -> dict[str, str]:
        """Processor name -> kind, for every joint-attention module of the transformer."""
        out = {}
        for name in self.original_processors:
            if name.startswith("transformer_blocks.") and name.endswith(".attn.processor"):
                out[name] = "double" if self.family == "flux" else "sd3"
            elif name.startswith("single_transformer_blocks.") and name.endswith(".attn.processor"):
                out[name] = "single"
        return out

    def _install(self) -> None:
        procs = dict(self.original_processors)
        for name, kind in self.blocks().items():
            procs[name] = JointProcessor(self, name, kind, name == self.gating_layer)
        self.unet.set_attn_processor(procs)
        forward, session = self.unet.forward, self.session
        flux = self.family == "flux"

        def nlce_forward(*args, **kwargs):
            context = kwargs.get("encoder_hidden_states")
            if context is None:
                return forward(*args, **kwargs)
            t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            t = float(t.flatten()[0]) if torch.is_tensor(t) else float(t)
            latent = kwargs.get("hidden_states", args[0] if args else None)
            self.image_grid = self._grid(latent)

            cond, words = self.rows(context)
            t = t * 1000.0 if flux else t  # Flux passes sigma (0..1); SD3 the timestep (0..1000)

            def call():
                self.prepared = session.prepare(context, cond, words)
                self.text_len = context.shape[1]
                try:
                    return forward(*args, **{**kwargs, "encoder_hidden_states": self.prepared.context})
                finally:
                    self.prepared = None

            if not bool(cond.any()) and session._last_t == t:  # Flux's true-CFG negative call, after the prompt's in this
                return call()  # step: stage 1 as on any row, no pass of its own (the prompt's gate carries to the next step)
            return run_unet_pass(session, t, call)

        self.unet.forward = nlce_forward
        encode_prompt, check_inputs = self.pipe.encode_prompt, getattr(self.pipe, "check_inputs", None)

        def nlce_encode_prompt(*args, **kwargs):
            result = encode_prompt(*args, **kwargs)
            prompt = kwargs.get("prompt", args[0] if args else None)
            self._remember(result, prompt)
            return result

        self.pipe.encode_prompt = nlce_encode_prompt
        if check_inputs is not None and flux:
            def nlce_check_inputs(*args, **kwargs):  # Flux's true CFG encodes the negative prompt with a second call
                negative = kwargs.get("negative_prompt")
                self._negatives = set([negative] if isinstance(negative, str) else negative or [])
                return check_inputs(*args, **kwargs)

            self.pipe.check_inputs = nlce_check_inputs
        _INSTALLED[self.unet] = self

    def _grid(self, latent) -> tuple[int, int] | None:
        """(h, w) of the image tokens: Flux packs 2x2 latent patches into a sequence (the pipeline's own height/width are
        not passed to the transformer, so a square is assumed); SD3 takes the latent itself."""
        if latent is None:
            return None
        if latent.ndim == 4:
            p = self.unet.config.patch_size
            return latent.shape[-2] // p, latent.shape[-1] // p
        side = int(latent.shape[1] ** 0.5)
        return (side, side) if side * side == latent.shape[1] else None

    def _saved_attributes(self) -> list:
        return [(owner, name, saved) for (owner, name), saved in self._saved.items()]

    def _remember(self, result, prompt) -> None:
        """Flux: (prompt_embeds, pooled, text_ids) per call, the negative prompt in its own call; SD3: (prompt, negative,
        pooled, negative pooled) as SD1.x/SDXL's."""
        embeds = result[0]
        if embeds is None:
            return
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, list) else None
        words = None
        if prompts:
            words = prompt_words(self.pipe, self.family, prompts, embeds.shape[1])
            words = words.repeat_interleave(embeds.shape[0] // max(1, len(prompts)), dim=0)
        negative = result[1] if self.family == "sd3" and len(result) > 1 else None
        negative = negative.detach() if torch.is_tensor(negative) and negative.shape == embeds.shape else None
        if self.family == "flux" and prompts and set(prompts) <= self._negatives:
            self._negative_rows = (self._negative_rows + [embeds.detach()])[-4:]  # a negative prompt: never the concept's
        else:
            self._prompts = (self._prompts + [(embeds.detach(), negative, words)])[-4:]
        self._rows_key = None

    def _match(self, context):
        """As ``NlceHandle._match``; Flux's true-CFG negative call (its rows equal the negative prompt's) has no prompt row."""
        for negative in reversed(self._negative_rows):
            if negative.shape == context.shape and torch.equal(negative.to(context.device, context.dtype), context):
                return torch.zeros(context.shape[0], dtype=torch.bool), None
        return super()._match(context)


def apply_joint(pipe, concepts, neighbors, *, concept_set, preset, gating_layer, record_maps, mine_top_k, settings):
    """``apply_nlce`` for a Flux or SD3 pipeline (see the module doc); everything is checked before anything changes."""
    from .session import NlceSession

    transformer = pipe.transformer
    family = joint_family(pipe)
    if transformer in _INSTALLED:
        raise NlceError("NLCE is already applied to this pipeline; call remove() on its handle first")
    concept_set, config = pipeline_operators(pipe, family, concepts, neighbors, concept_set, preset, mine_top_k, settings)
    width = transformer.config.joint_attention_dim
    if concept_set.width != width:
        raise NlceError(f"the concept operators are {concept_set.width} wide but the transformer reads {width}-wide text rows; "
                        "use operators built with the pipeline's own text encoders")
    handle = JointHandle(pipe, concept_set, NlceSession(concept_set, config, record_maps), "", family)
    blocks = [n for n, kind in handle.blocks().items() if kind != "single"]
    if not blocks:
        raise NlceError("this transformer has no joint-attention blocks NLCE can act on")
    if gating_layer is None:
        gating = blocks[len(blocks) // 2]
    else:
        gating = gating_layer if gating_layer.endswith(".processor") else gating_layer + ".processor"
        if gating not in handle.blocks():
            raise NlceError(f"gating block {gating_layer!r} is not a joint-attention block of this transformer (e.g. {blocks[0]})")
    handle.gating_layer = gating
    handle.session.warm(transformer.device)
    handle._install()
    return handle
