"""NLCE on a diffusers ``UNet2DConditionModel`` (SD1.x, SDXL): attention processors on every ``attn2``.

The UNet's ``forward`` is wrapped to run the passes (``nlce.run_pass``: the timestep, the faithful schedule's dry pass)
and hand the pass its context rows once; each ``attn2`` processor is diffusers' default attention with NLCE's stages
between the projections and ``to_out``.
"""

from __future__ import annotations

import torch

from ..errors import NlceError
from ..families import refusal, unet_family_of
from ..nlce import NlceSession, clip_row_encoder, gating_layer as default_gating_layer, prompt_token_mask, run_pass, sdxl_row_encoder
from ..nlce.driver import diffusers_level
from ..nlce.session import halved, spatial_shape_for
from .diffusers_common import LAYOUT, NlceHandle, check_not_installed, pipeline_operators

# processors that compute plain attention (NLCE replaces them); others (IP-Adapter, custom) carry extra behaviour
PLAIN_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor", "SlicedAttnProcessor", "AttnProcessorNPU",
                    "FusedAttnProcessor2_0")


def cross_attention_names(unet) -> list[str]:
    return [n for n in unet.attn_processors if n.endswith("attn2.processor")]


class NlceAttnProcessor:
    """diffusers' default attention (AttnProcessor2_0) with NLCE's stages in between."""

    def __init__(self, handle: "UNetHandle", name: str, is_gating_layer: bool):
        self.handle, self.name, self.is_gating_layer = handle, name, is_gating_layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        session = self.handle.session
        p = session.current
        if encoder_hidden_states is None or p is None:  # not cross-attention after all, or the UNet called around NLCE
            return self.handle.original_processors[self.name](attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if attention_mask is not None:
            raise NlceError("NLCE does not support an attention mask on the text (encoder_attention_mask); leave it unset")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
            shape = (height, width)
        else:
            shape = spatial_shape_for(hidden_states.shape[1], p.host["latent_hw"])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        prepared = p.prepared
        out = session.cross_attention(p, query, attn.to_k(prepared.context), attn.to_v(prepared.context), attn.heads, shape,
                                      self.is_gating_layer, incoming_keys=lambda: attn.to_k(prepared.incoming)).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class UNetHandle(NlceHandle):
    """What ``apply_nlce`` installed on an SD1.x / SDXL pipeline; ``remove()`` restores it exactly."""

    def _processors(self) -> dict:
        return {n: NlceAttnProcessor(self, n, n == self.gating_layer) for n in cross_attention_names(self.denoiser)}

    def _forward(self, forward):
        scheduler = getattr(self.pipe, "scheduler", None)
        per_step = 1000.0 / (getattr(getattr(scheduler, "config", None), "num_train_timesteps", 1000) or 1000)
        level, session, prompts = diffusers_level(self.gating_layer), self.session, self.prompts

        def nlce_forward(sample, timestep, encoder_hidden_states, *args, **kwargs):
            t = (timestep.flatten()[0].float() if torch.is_tensor(timestep) else float(timestep)) * per_step
            conditional, words = prompts.rows(encoder_hidden_states)

            def call():
                p = session.current
                p.host["latent_hw"] = tuple(sample.shape[-2:])
                session.prepare(p, encoder_hidden_states, conditional, words)
                return forward(sample, timestep, encoder_hidden_states, *args, **kwargs)

            return run_pass(session, t, call, key=LAYOUT, batch=sample.shape[0],
                            gating_shape=halved(tuple(sample.shape[-2:]), level), device=sample.device)

        return nlce_forward

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
        self.prompts.remember(embeds, negative if torch.is_tensor(negative) else None, words)


def _check_unet(unet, names: list[str], gating_layer: str | None) -> str:
    """The gating layer's processor name; NlceError if this UNet's cross-attention is not what NLCE can replace."""
    if not names:
        raise NlceError("this UNet has no cross-attention (attn2) layers; NLCE needs a text-conditioned UNet such as SD1.x")
    procs = unet.attn_processors
    custom = sorted({type(procs[n]).__name__ for n in names} - set(PLAIN_PROCESSORS))
    if custom:
        raise NlceError(f"the UNet's cross-attention uses {', '.join(custom)} (e.g. an IP-Adapter); NLCE replaces plain attention "
                        "processors only: unload it first")
    if getattr(unet, "encoder_hid_proj", None) is not None:
        raise NlceError("this UNet projects the text rows before its cross-attention (encoder_hid_proj, e.g. an IP-Adapter); "
                        "NLCE supports SD1.x and SDXL UNets without it")
    for n in names:
        attn = unet.get_submodule(n[: -len(".processor")])
        if getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None or getattr(attn, "norm_cross", None):
            raise NlceError(f"{n[: -len('.processor')]} normalises q/k or its text rows; NLCE supports SD1.x-style cross-attention only")
    if gating_layer is None:
        return default_gating_layer(names)
    name = gating_layer if gating_layer.endswith(".processor") else gating_layer + ".processor"
    if name not in names:
        example = names[0][: -len(".processor")]
        raise NlceError(f"gating layer {gating_layer!r} is not a cross-attention layer of this UNet (e.g. {example})")
    return name


def unet_family(pipe) -> str:
    """"sd1" (one CLIP-L whose output the UNet reads) or "sdxl" (CLIP-L and CLIP-G side by side); NlceError otherwise."""
    from ..patch import pipeline_encoders

    widths = {c: int(m.config.hidden_size) for c, m in pipeline_encoders(pipe).items()}
    width = pipe.unet.config.cross_attention_dim
    if (fam := unet_family_of(widths, width)) is not None:
        return fam.key
    if set(widths) == {"clip_g"}:
        raise NlceError("NLCE does not support an SDXL refiner (its UNet reads CLIP-G alone); use it on the SDXL base model")
    found = ", ".join(f"{c} {w}" for c, w in widths.items()) or "none"
    raise NlceError(refusal("nlce-diffusers", None, f"this pipeline (its UNet reads {width}-wide rows; its CLIP encoders: {found})"))


def unet_row_encoder(pipe, family: str):
    """The row encoder whose rows are what this pipeline's UNet reads."""
    tokenizers = (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None))
    if family == "sdxl":
        return sdxl_row_encoder(pipe.text_encoder, tokenizers[0], pipe.text_encoder_2, tokenizers[1])
    if tokenizers[0] is None:
        raise NlceError("the pipeline has no tokenizer to encode the concepts with; pass concept_set=")
    return clip_row_encoder(pipe.text_encoder, tokenizers[0])


def apply_unet(pipe, concepts, neighbors, *, concept_set, preset, gating_layer, record_maps, mine_top_k, settings) -> UNetHandle:
    """``apply_nlce`` for an SD1.x / SDXL pipeline; everything is checked before anything changes."""
    unet = getattr(pipe, "unet", None)
    if unet is None or not hasattr(unet, "attn_processors"):
        raise NlceError("this pipeline has no UNet with cross-attention or joint-attention transformer NLCE knows "
                        "(it works on SD1.x, SDXL, and experimentally on Flux and SD3)")
    check_not_installed(unet)
    gating_layer = _check_unet(unet, cross_attention_names(unet), gating_layer)
    family = unet_family(pipe)
    concept_set, config = pipeline_operators(pipe, family, lambda: unet_row_encoder(pipe, family), concepts, neighbors,
                                             concept_set, preset, mine_top_k, settings)
    concept_set.check_width(unet.config.cross_attention_dim, "this pipeline's UNet", "nlce-diffusers")
    handle = UNetHandle(pipe, unet, concept_set, NlceSession(concept_set, config, record_maps), gating_layer, family)
    handle._install()
    return handle
