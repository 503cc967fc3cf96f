"""NLCE for diffusers: attention processors on every ``attn2`` of a ``UNet2DConditionModel``.

``apply_nlce(pipe, concepts=[...])`` validates everything, then installs the processors and
wraps ``unet.forward`` (to know the timestep, and to run the dry pass of the ``faithful``
schedule) and ``pipe.encode_prompt`` (to know which batch rows are the conditional prompt and
where its words are). ``handle.remove()`` puts back the original objects.
"""

from __future__ import annotations

import weakref

import torch

from ..errors import NlceError
from .config import OPERATOR_SETTINGS, derive_nlce_config, make_nlce_config
from .mining import neighbor_table
from .operators import ConceptSet, build_concept_set, clip_row_encoder, prompt_token_mask, sdxl_row_encoder
from .driver import cross_attention, gating_layer as default_gating_layer, run_unet_pass
from .session import NlceSession, spatial_shape_for

_INSTALLED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # UNet -> the NlceHandle installed on it
# processors that compute plain attention (NLCE replaces them); others (IP-Adapter, custom) carry extra behaviour
PLAIN_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor", "SlicedAttnProcessor", "AttnProcessorNPU",
                    "FusedAttnProcessor2_0")


def cross_attention_names(unet) -> list[str]:
    return [n for n in unet.attn_processors if n.endswith("attn2.processor")]


class NlceAttnProcessor:
    """diffusers' default attention (AttnProcessor2_0) with NLCE's stages in between."""

    def __init__(self, handle: "NlceHandle", name: str, is_gating_layer: bool):
        self.handle, self.name, self.is_gating_layer = handle, name, is_gating_layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if encoder_hidden_states is None:  # not cross-attention after all
            return self.handle.original_processors[self.name](attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if attention_mask is not None:
            raise NlceError("NLCE does not support an attention mask on the text (encoder_attention_mask); leave it unset")
        session = self.handle.session
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
            shape = (height, width)
        else:
            shape = spatial_shape_for(hidden_states.shape[1], self.handle.latent_hw)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        cond, token_mask = self.handle.rows(encoder_hidden_states)  # the embeddings as encode_prompt returned them
        prepared = session.prepare(context, cond, token_mask)
        out = cross_attention(session, query, context, prepared, attn.to_k, attn.to_v, attn.heads, shape,
                              self.is_gating_layer).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class NlceHandle:
    """What ``apply_nlce`` installed; ``remove()`` restores the pipeline exactly."""

    def __init__(self, pipe, concept_set: ConceptSet, session: NlceSession, gating_layer: str):
        self.pipe, self.unet, self.concept_set, self.session = pipe, pipe.unet, concept_set, session
        self.gating_layer = gating_layer
        self.latent_hw = (64, 64)
        self.original_processors = dict(self.unet.attn_processors)
        self._prompts: list[tuple] = []  # (prompt embeddings, negative embeddings or None, word rows or None), newest last
        self._rows_key = None
        self._rows = None
        self._saved_forward = self.unet.__dict__.get("forward")
        self._saved_encode = pipe.__dict__.get("encode_prompt")
        self.removed = False

    @property
    def diagnostics(self) -> list[dict]:
        """One dict per UNet pass: run, step, timestep, dry, live tokens and active concepts per batch row, gate statistics."""
        return self.session.diagnostics

    # -- install / remove ----------------------------------------------------------------------

    def _install(self) -> None:
        procs = dict(self.original_processors)
        for name in cross_attention_names(self.unet):
            procs[name] = NlceAttnProcessor(self, name, name == self.gating_layer)
        self.unet.set_attn_processor(procs)
        forward, scheduler = self.unet.forward, getattr(self.pipe, "scheduler", None)
        train_steps = getattr(getattr(scheduler, "config", None), "num_train_timesteps", 1000) or 1000
        session = self.session

        def nlce_forward(sample, timestep, encoder_hidden_states, *args, **kwargs):
            t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
            self.latent_hw = tuple(sample.shape[-2:])
            return run_unet_pass(session, t * 1000.0 / train_steps,
                                 lambda: forward(sample, timestep, encoder_hidden_states, *args, **kwargs))

        self.unet.forward = nlce_forward
        encode_prompt = getattr(self.pipe, "encode_prompt", None)
        if encode_prompt is not None:
            def nlce_encode_prompt(prompt=None, *args, **kwargs):
                result = encode_prompt(prompt, *args, **kwargs)
                self._remember(result, prompt)
                return result

            self.pipe.encode_prompt = nlce_encode_prompt
        _INSTALLED[self.unet] = self

    def remove(self) -> None:
        """Put back the original processors, ``unet.forward`` and ``pipe.encode_prompt``."""
        if self.removed:
            return
        self.unet.set_attn_processor(dict(self.original_processors))
        for owner, name, saved in self._saved_attributes():
            if saved is not None:
                setattr(owner, name, saved)
            else:
                owner.__dict__.pop(name, None)
        _INSTALLED.pop(self.unet, None)
        self.removed = True

    def _saved_attributes(self) -> list:
        """(owner, attribute, what its instance dict held before, or None) for each attribute ``_install`` set."""
        return [(self.unet, "forward", self._saved_forward), (self.pipe, "encode_prompt", self._saved_encode)]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    # -- which rows are the conditional prompt, and where its words are ------------------------

    def _remember(self, result, prompt) -> None:
        """Keep what ``encode_prompt`` returned (prompt and negative embeddings) and, when the text is known, the word rows."""
        embeds, negative = result[0], (result[1] if len(result) > 1 else None)
        if embeds is None:
            return
        words = None
        tok = getattr(self.pipe, "tokenizer", None)
        if isinstance(prompt, (str, list)) and tok is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if hasattr(self.pipe, "maybe_convert_prompt"):  # textual-inversion tokens, exactly as encode_prompt does
                prompts = self.pipe.maybe_convert_prompt(prompts, tok)
            words = prompt_token_mask(tok, prompts, embeds.shape[1])
            words = words.repeat_interleave(embeds.shape[0] // max(1, len(prompts)), dim=0)  # num_images_per_prompt copies
        negative = negative.detach() if torch.is_tensor(negative) and negative.shape == embeds.shape else None
        self._prompts = (self._prompts + [(embeds.detach(), negative, words)])[-4:]
        self._rows_key = None

    def rows(self, context: torch.Tensor):
        """(cond (B,), token mask (B, S) or None) for a batch of context rows.

        The batch is matched against what ``encode_prompt`` returned: ``[negative, prompt]`` (the
        pipelines' classifier-free-guidance layout) or ``prompt`` alone; failing that, row by row
        (a row equal to a prompt row is conditional). With no ``encode_prompt`` seen (embeddings
        passed straight to the UNet) every row counts as a prompt and the token mask is inferred.
        """
        key = (context.data_ptr(), tuple(context.shape))
        if key != self._rows_key:
            self._rows_key, self._rows = key, self._match(context)
        return self._rows

    def _match(self, context: torch.Tensor):
        B, S = context.shape[:2]
        if not self._prompts:
            return torch.ones(B, dtype=torch.bool), None
        same = lambda a, b: a.shape == b.shape and torch.equal(a.to(b.device, b.dtype), b)  # noqa: E731
        for embeds, negative, words in reversed(self._prompts):
            n = embeds.shape[0]
            if same(embeds, context):
                return torch.ones(B, dtype=torch.bool), None if words is None else words.to(context.device)
            if negative is not None and B == 2 * n and same(negative, context[:n]) and same(embeds, context[n:]):
                cond = torch.tensor([False] * n + [True] * n)
                return cond, None if words is None else torch.cat([torch.zeros_like(words), words]).to(context.device)
        cond = torch.zeros(B, dtype=torch.bool)
        mask = torch.zeros(B, S, dtype=torch.bool, device=context.device)
        known = True
        for b in range(B):
            for embeds, _, words in reversed(self._prompts):
                hit = next((i for i in range(embeds.shape[0]) if same(embeds[i], context[b])), None)
                if hit is not None:
                    cond[b] = True
                    known = known and words is not None
                    if words is not None:
                        mask[b] = words[hit].to(context.device)
                    break
        return cond, mask if known else None


def _check_unet(unet, names: list[str], gating_layer: str | None) -> str:
    """The gating layer's processor name; NlceError if this UNet's cross-attention is not what NLCE can replace."""
    if not names:
        raise NlceError("this UNet has no cross-attention (attn2) layers; NLCE needs a text-conditioned UNet such as SD1.x")
    procs = unet.attn_processors
    custom = sorted({type(procs[n]).__name__ for n in names} - set(PLAIN_PROCESSORS))
    if custom:
        raise NlceError(f"the UNet's cross-attention uses {', '.join(custom)} (e.g. an IP-Adapter); NLCE replaces plain attention "
                        "processors only: unload it first")
    for n in names:
        attn = unet.get_submodule(n[: -len(".processor")])
        if getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None:
            raise NlceError(f"{n[: -len('.processor')]} normalises q/k; NLCE supports SD1.x-style cross-attention only")
    if gating_layer is None:
        return default_gating_layer(names)
    name = gating_layer if gating_layer.endswith(".processor") else gating_layer + ".processor"
    if name not in names:
        example = names[0][: -len(".processor")]
        raise NlceError(f"gating layer {gating_layer!r} is not a cross-attention layer of this UNet (e.g. {example})")
    return name


def pipeline_family(pipe) -> str:
    """"sd1" (one CLIP-L whose output the UNet reads) or "sdxl" (CLIP-L and CLIP-G side by side); NlceError otherwise."""
    from ..patch import pipeline_encoders

    encoders = pipeline_encoders(pipe)
    width = pipe.unet.config.cross_attention_dim
    widths = {c: int(m.config.hidden_size) for c, m in encoders.items()}
    if set(widths) == {"clip_l", "clip_g"} and widths["clip_l"] + widths["clip_g"] == width:
        return "sdxl"
    if set(widths) == {"clip_l"} and widths["clip_l"] == width:
        return "sd1"
    if set(widths) == {"clip_g"}:
        raise NlceError("NLCE does not support an SDXL refiner (its UNet reads CLIP-G alone); use it on the SDXL base model")
    raise NlceError(f"the UNet's cross-attention reads {width}-wide rows that are not this pipeline's CLIP encoders "
                    f"({', '.join(f'{c} {w}' for c, w in widths.items()) or 'none'}); NLCE supports SD1.x and SDXL pipelines")


def pipeline_row_encoder(pipe):
    """The row encoder whose rows are what this pipeline's denoiser reads (``clip_row_encoder`` / ``sdxl_row_encoder``;
    Flux / SD3: ``joint.joint_row_encoder``)."""
    from .joint import JOINT_TEXT_ROWS, joint_family, joint_row_encoder

    if (family := joint_family(pipe)) is not None:
        return joint_row_encoder(pipe, family, JOINT_TEXT_ROWS[family])
    tokenizers = (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None))
    if pipeline_family(pipe) == "sdxl":
        return sdxl_row_encoder(pipe.text_encoder, tokenizers[0], pipe.text_encoder_2, tokenizers[1])
    if tokenizers[0] is None:
        raise NlceError("the pipeline has no tokenizer to encode the concepts with; pass concept_set=")
    return clip_row_encoder(pipe.text_encoder, tokenizers[0])


def pipeline_concept_set(pipe, concepts, neighbors, config, mine_top_k: int = 8) -> ConceptSet:
    """NLCE operators for ``concepts`` built with the pipeline's own text encoders, as its denoiser reads their rows
    (``neighbors`` as ``neighbor_table`` takes them: a list, a table, or "auto")."""
    encode = pipeline_row_encoder(pipe)
    return build_concept_set(encode, concepts, neighbor_table(encode, concepts, neighbors, mine_top_k), config)


def pipeline_operators(pipe, family: str, concepts, neighbors, concept_set, preset, mine_top_k, settings):
    """(concept set, config) for ``apply_nlce`` on ``pipe``: operators built from ``concepts`` with the pipeline's own
    encoders, or ``concept_set`` checked (settings built into its operators cannot change; its family must match)."""
    if concept_set is None:
        config = make_nlce_config(preset, **settings)
        concept_set = pipeline_concept_set(pipe, concepts, neighbors, config, mine_top_k)
    else:
        if concepts or neighbors:
            raise NlceError("pass either concepts (and neighbours) or a concept_set, not both")
        config = derive_nlce_config(concept_set.config, preset, **settings)
        changed = [k for k in OPERATOR_SETTINGS if getattr(config, k) != getattr(concept_set.config, k)]
        if changed:
            raise NlceError(f"{', '.join(changed)} are built into the concept set's operators; build a new concept set to change them")
    concept_set.check_family(family, "this pipeline")
    return concept_set, config


def apply_nlce(pipe, concepts=None, neighbors=None, *, concept_set: ConceptSet | None = None, preset: str | None = None,
               gating_layer: str | None = None, record_maps: bool = False, mine_top_k: int = 8, **settings) -> NlceHandle:
    """Erase ``concepts`` from a diffusers SD1.x or SDXL pipeline (Flux and SD3: experimental, docs/nlce-joint-attention.md)
    at sampling time; returns a handle (``remove()``).

    ``neighbors``: None, a list, {concept: list}, or "auto" (mined offline from the CLIP vocabulary).
    ``concept_set``: operators built or loaded earlier (instead of ``concepts``); its settings are the
    base that ``preset`` / ``settings`` change (operator settings such as ranks cannot change).
    ``settings``: any ``NlceConfig`` field (beta, gamma, schedule, suppression, scrub, t_max, ...).
    ``gating_layer``: a diffusers attn2 module name (default: ``driver.gating_layer``'s choice).
    Everything is validated before the pipeline is touched.
    """
    from .joint import apply_joint, joint_family

    if joint_family(pipe) is not None:  # Flux / SD3: experimental (docs/nlce-joint-attention.md)
        return apply_joint(pipe, concepts, neighbors, concept_set=concept_set, preset=preset, gating_layer=gating_layer,
                           record_maps=record_maps, mine_top_k=mine_top_k, settings=settings)
    unet = getattr(pipe, "unet", None)
    if unet is None or not hasattr(unet, "attn_processors"):
        raise NlceError("this pipeline has no UNet with cross-attention or joint-attention transformer NLCE knows "
                        "(it works on SD1.x, SDXL, and experimentally on Flux and SD3)")
    if unet in _INSTALLED:
        raise NlceError("NLCE is already applied to this pipeline; call remove() on its handle first")
    gating_layer = _check_unet(unet, cross_attention_names(unet), gating_layer)
    width = unet.config.cross_attention_dim
    concept_set, config = pipeline_operators(pipe, pipeline_family(pipe), concepts, neighbors, concept_set, preset,
                                             mine_top_k, settings)
    if concept_set.width != width:
        raise NlceError(f"the concept operators are {concept_set.width} wide but the UNet's cross-attention expects {width}; "
                        "use operators built with the pipeline's own text encoders")
    handle = NlceHandle(pipe, concept_set, NlceSession(concept_set, config, record_maps), gating_layer)
    handle._install()
    return handle
