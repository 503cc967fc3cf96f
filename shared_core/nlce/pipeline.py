"""NLCE for diffusers: attention processors on every ``attn2`` of a ``UNet2DConditionModel``.

``apply_nlce(pipe, concepts=[...])`` validates everything, then installs the processors and
wraps ``unet.forward`` (to know the timestep, and to run the dry pass of the ``faithful``
schedule) and ``pipe.encode_prompt`` (to know which batch rows are the conditional prompt and
where its words are). ``handle.remove()`` puts back the original objects.
"""

from __future__ import annotations

import re

import torch

from ..errors import NlceError
from ..textenc import real_token_mask
from .config import make_nlce_config
from .mining import mine_neighbors
from .operators import ConceptSet, build_concept_set, clip_row_encoder
from .session import NlceSession, spatial_shape_for

_NAME = re.compile(r"down_blocks\.(\d+)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn2\.processor$")


def cross_attention_names(unet) -> list[str]:
    return [n for n in unet.attn_processors if n.endswith("attn2.processor")]


def default_gating_layer(names: list[str]) -> str:
    """The last attention of the deepest down block with cross-attention (SD1.x: down_blocks.2.attentions.1, 1/32 size)."""
    found = [(int(m[1]), int(m[2]), -int(m[3]), n) for n in names if (m := _NAME.search(n))]
    if not found:
        raise NlceError("this UNet has no cross-attention in its down blocks; NLCE needs an SD1.x-style UNet")
    return max(found)[3]


class NlceAttnProcessor:
    """diffusers' default attention with NLCE's stages (same maths as AttnProcessor2_0 otherwise)."""

    def __init__(self, handle: "NlceHandle", name: str, is_gating_layer: bool):
        self.handle, self.name, self.is_gating_layer = handle, name, is_gating_layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if encoder_hidden_states is None:  # not cross-attention after all
            return self.handle.original_processors[self.name](attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if attention_mask is not None:
            raise NlceError("NLCE does not support an attention mask on the text (encoder_attention_mask); leave it unset")
        if attn.norm_q is not None or attn.norm_k is not None:
            raise NlceError("NLCE does not support attention layers with q/k norms; use an SD1.x-style UNet")
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
        cond, token_mask = self.handle.rows(context)
        prepared = session.prepare(context, cond, token_mask)
        key, value = attn.to_k(prepared.context), attn.to_v(prepared.context)
        out = session.attend(query, key, value, attn.heads, prepared, shape, self.is_gating_layer).to(query.dtype)
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
        self._prompts: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self._rows_key = None
        self._rows = None
        self._saved_forward = self.unet.__dict__.get("forward")
        self._saved_encode = pipe.__dict__.get("encode_prompt")
        self.removed = False

    @property
    def diagnostics(self) -> list[dict]:
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
            t = t * 1000.0 / train_steps
            self.latent_hw = tuple(sample.shape[-2:])
            cfg = session.config
            if cfg.schedule == "faithful" and (cfg.stage2 or cfg.stage3) and session.in_window(t):
                session.begin_pass(t, dry=True)
                forward(sample, timestep, encoder_hidden_states, *args, **kwargs)
            session.begin_pass(t)
            return forward(sample, timestep, encoder_hidden_states, *args, **kwargs)

        self.unet.forward = nlce_forward
        encode_prompt = getattr(self.pipe, "encode_prompt", None)
        if encode_prompt is not None:
            def nlce_encode_prompt(prompt=None, *args, **kwargs):
                result = encode_prompt(prompt, *args, **kwargs)
                self._remember(result[0], prompt)
                return result

            self.pipe.encode_prompt = nlce_encode_prompt
        self.unet._hirm_nlce = self

    def remove(self) -> None:
        """Put back the original processors, ``unet.forward`` and ``pipe.encode_prompt``."""
        if self.removed:
            return
        self.unet.set_attn_processor(dict(self.original_processors))
        for owner, name, saved in ((self.unet, "forward", self._saved_forward), (self.pipe, "encode_prompt", self._saved_encode)):
            if saved is not None:
                setattr(owner, name, saved)
            else:
                owner.__dict__.pop(name, None)
        self.unet.__dict__.pop("_hirm_nlce", None)
        self.removed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    # -- which rows are the conditional prompt, and where its words are ------------------------

    def _remember(self, embeds, prompt) -> None:
        if embeds is None:
            return
        mask = None
        tok = getattr(self.pipe, "tokenizer", None)
        if isinstance(prompt, (str, list)) and tok is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            ids = tok(prompts, padding="max_length", max_length=embeds.shape[1], truncation=True, return_tensors="pt")["input_ids"]
            words = real_token_mask(tok, ids) & (ids != tok.eos_token_id)
            words[:, 0] = False
            mask = words.repeat_interleave(embeds.shape[0] // max(1, len(prompts)), dim=0)
        self._prompts = (self._prompts + [(embeds.detach(), mask)])[-4:]
        self._rows_key = None

    def rows(self, context: torch.Tensor):
        """(cond (B,), token mask (B, S) or None) for a batch of context rows."""
        key = (context.data_ptr(), tuple(context.shape))
        if key == self._rows_key:
            return self._rows
        B = context.shape[0]
        if not self._prompts:  # no encode_prompt seen (prompt_embeds passed by hand elsewhere): all rows are prompts
            result = (torch.ones(B, dtype=torch.bool), None)
        else:
            cond = torch.zeros(B, dtype=torch.bool)
            mask = torch.zeros(context.shape[:2], dtype=torch.bool, device=context.device)
            known = True
            for b in range(B):
                for embeds, words in self._prompts:
                    hit = next((i for i in range(embeds.shape[0]) if embeds.shape[1:] == context.shape[1:]
                                and torch.equal(embeds[i].to(context.device, context.dtype), context[b])), None)
                    if hit is not None:
                        cond[b] = True
                        if words is None:
                            known = False
                        else:
                            mask[b] = words[hit].to(context.device)
                        break
            result = (cond, mask if known else None)
        self._rows_key, self._rows = key, result
        return result


def apply_nlce(pipe, concepts=None, neighbors=None, *, concept_set: ConceptSet | None = None, preset: str | None = None,
               gating_layer: str | None = None, record_maps: bool = False, mine_top_k: int = 8, **settings) -> NlceHandle:
    """Erase ``concepts`` from a diffusers SD pipeline at sampling time; returns a handle (``remove()``).

    ``neighbors``: None, a list, {concept: list}, or "auto" (mined offline from the CLIP vocabulary).
    ``settings``: any ``NlceConfig`` field (beta, gamma, schedule, suppression, scrub, t_max, ...).
    Everything is validated before the pipeline is touched.
    """
    unet = getattr(pipe, "unet", None)
    if unet is None or not hasattr(unet, "attn_processors"):
        raise NlceError("this pipeline has no UNet with cross-attention (NLCE works on SD1.x-style UNets; Flux/SD3 transformers are not supported)")
    if getattr(unet, "_hirm_nlce", None) is not None:
        raise NlceError("NLCE is already applied to this pipeline; call remove() on its handle first")
    names = cross_attention_names(unet)
    if not names:
        raise NlceError("this UNet has no cross-attention (attn2) layers; NLCE needs a text-conditioned UNet such as SD1.x")
    gating_layer = gating_layer or default_gating_layer(names)
    if gating_layer not in names:
        raise NlceError(f"gating layer {gating_layer!r} is not a cross-attention processor of this UNet")
    config = make_nlce_config(preset, **settings)
    width = unet.config.cross_attention_dim
    if concept_set is None:
        te, tok = getattr(pipe, "text_encoder", None), getattr(pipe, "tokenizer", None)
        if te is None or tok is None:
            raise NlceError("the pipeline has no text_encoder/tokenizer to encode the concepts with; pass concept_set=")
        encode = clip_row_encoder(te, tok)
        if isinstance(concepts, str):
            concepts = [concepts]
        if isinstance(neighbors, str) and neighbors.strip().lower() == "auto":
            neighbors = {c: [w for w, _ in mine_neighbors(encode, c, top_k=mine_top_k)] for c in concepts or [] if c and c.strip()}
        concept_set = build_concept_set(encode, concepts, neighbors, config)
    else:
        if concepts or neighbors:
            raise NlceError("pass either concepts (and neighbours) or a concept_set, not both")
    if concept_set.width != width:
        raise NlceError(f"the text encoder is {concept_set.width} wide but the UNet's cross-attention expects {width}; "
                        "use the pipeline's own text encoder")
    handle = NlceHandle(pipe, concept_set, NlceSession(concept_set, config, record_maps), gating_layer)
    handle._install()
    return handle
