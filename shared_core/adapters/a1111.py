"""NLCE inside AUTOMATIC1111's LDM UNet for the length of one job (the adapter ``a1111_extension/jobs.py`` installs).

A1111 replaces ``CrossAttention.forward`` on the class with its chosen attention optimisation,
so NLCE sets an instance ``forward`` on every ``*attn2`` module of ``sd_model.model.diffusion_model``
(SD1.x: ``forward(x, context=None, mask=None)``; SDXL's sgm module also takes ``additional_tokens``
and ``n_times_crossframe_attn_in_self``, passed as None / 0; both with ``to_q``, ``to_k``, ``to_v``,
``to_out``, ``heads``). The diffusion model's own ``forward`` is wrapped to start each UNet pass (and to run
the dry pass of the ``faithful`` schedule), and ``sd_model.get_learned_conditioning`` is watched
to learn where the words of each prompt are in its conditioning rows.
"""

from __future__ import annotations

import re
from typing import Callable

import torch

from .. import nlce
from ..errors import NlceError
from ..nlce.driver import ldm_level
from ..nlce.session import halved

CHUNK = 77  # A1111 encodes prompts in chunks of 77 rows (start, 75 tokens, end)


class Patched:
    """``owner.name`` replaced by ``make(original)`` (an instance attribute) until ``restore()``.

    If something else wrapped the attribute after us, ``restore()`` cannot take ours out of their
    chain; it then turns ours into a pass-through to the original instead.
    """

    def __init__(self, owner, name: str, make: Callable):
        self.owner, self.name = owner, name
        self.had_own = name in owner.__dict__
        self.saved = owner.__dict__.get(name)
        original = getattr(owner, name)
        replacement = make(original)
        self.active = True

        def call(*args, **kwargs):
            return (replacement if self.active else original)(*args, **kwargs)

        self.call = call
        setattr(owner, name, call)

    def restore(self) -> None:
        self.active = False
        if self.owner.__dict__.get(self.name) is self.call:
            if self.had_own:
                setattr(self.owner, self.name, self.saved)
            else:
                delattr(self.owner, self.name)


# ---------------------------------------------------------------------------------------------- rows


def prompt_rows_mask(cond_stage_model, text: str, rows: int) -> torch.Tensor | None:
    """(rows,) bool: True on the rows of ``text``'s words in A1111's chunked conditioning, from the
    webui's own tokenisation (emphasis, embeddings, BREAK); None if the model cannot say."""
    process, end = getattr(cond_stage_model, "process_texts", None), getattr(cond_stage_model, "id_end", None)
    if process is None or end is None:
        return None
    flags: list[bool] = []
    for chunk in process([text])[0][0]:
        tokens = list(chunk.tokens)
        last = tokens.index(end, 1) if end in tokens[1:] else len(tokens) - 1  # the words end at the first end token
        flags += [False] + [True] * (last - 1) + [False] * (len(tokens) - last)
    flags = (flags + [False] * rows)[:rows]
    return torch.tensor(flags, dtype=torch.bool)


def _starts_with(row: torch.Tensor, reference: torch.Tensor) -> bool:
    n = reference.shape[0]
    return (reference.shape[-1] == row.shape[-1] and n <= row.shape[0]
            and torch.equal(row[:n], reference.to(row.device, row.dtype)))


def uncond_tensors(p) -> list[torch.Tensor]:
    """The negative prompts' conditioning of a job (first pass and hires), from ``p.uc`` / ``p.hr_uc``."""
    out = []
    for batch in (getattr(p, "uc", None), getattr(p, "hr_uc", None)):
        for schedule in batch or []:
            for item in schedule if isinstance(schedule, (list, tuple)) else [schedule]:
                cond = getattr(item, "cond", item)
                cond = cond.get("crossattn") if isinstance(cond, dict) else cond
                if isinstance(cond, torch.Tensor) and cond.ndim == 2:
                    out.append(cond)
    return out


class A1111Nlce:
    """NLCE installed on one A1111 SD1.x / SDXL model for one job; ``remove()`` puts every method back."""

    def __init__(self, sd_model, concepts: nlce.ConceptSet, config, uncond: Callable[[], list[torch.Tensor]],
                 check: Callable[[], None] = lambda: None, where: str = "this model"):
        dm = sd_model.model.diffusion_model
        self.attention = {n: m for n, m in dm.named_modules() if n.endswith("attn2")}
        gating = nlce.gating_layer(self.attention)
        concepts.check_width(self.attention[gating].to_k.in_features, f"{where}'s UNet", "nlce-a1111")
        self.sd_model, self.dm, self.gating = sd_model, dm, gating
        self.level = ldm_level(dm, int(re.search(r"input_blocks\.(\d+)\.", gating)[1]))
        self.session = nlce.NlceSession(concepts, config)
        self.uncond, self.check = uncond, check
        self.recorded: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # (conditioning rows, word mask) per prompt
        self._rows: dict = {}
        self.patched: list[Patched] = []

    def install(self) -> "A1111Nlce":
        try:
            self.patched.append(Patched(self.sd_model, "get_learned_conditioning", self._recorder))
            self.patched.append(Patched(self.dm, "forward", self._unet_forward))
            for name, module in self.attention.items():
                self.patched.append(Patched(module, "forward", self._cross_attention(module, name == self.gating)))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for patched in reversed(self.patched):
            patched.restore()
        self.patched = []
        self.recorded, self._rows = [], {}

    # -- replacements ----------------------------------------------------------------------------

    def _recorder(self, original):
        def get_learned_conditioning(texts, *args, **kwargs):
            out = original(texts, *args, **kwargs)
            rows = out.get("crossattn") if isinstance(out, dict) else out
            texts = [texts] if isinstance(texts, str) else list(texts)
            if isinstance(rows, torch.Tensor) and rows.ndim == 3 and rows.shape[0] == len(texts):
                encoder = self._tokenising_embedder()
                for text, r in zip(texts, rows):
                    self.recorded.append((r, prompt_rows_mask(encoder, text, r.shape[0])))
                self.recorded = self.recorded[-64:]
            return out
        return get_learned_conditioning

    def _unet_forward(self, original):
        session = self.session

        def forward(x, timesteps=None, context=None, *args, **kwargs):
            t = timesteps.flatten()[0].float() if torch.is_tensor(timesteps) else float(timesteps)
            self._rows = {}
            batch, shape = x.shape[0], halved(tuple(x.shape[-2:]), self.level)
            cond, words = self.rows(context) if context is not None else (torch.ones(batch, dtype=torch.bool), None)
            layout = (tuple(cond.tolist()), batch)  # worked out on the host (A1111's rows() compares tensors there)
            session.ready(x.device, layout, batch * shape[0] * shape[1])

            def call():
                p = session.current
                p.host["latent_hw"] = tuple(x.shape[-2:])
                if context is not None:
                    session.prepare(p, context, cond, words)
                return original(x, timesteps, context, *args, **kwargs)

            return nlce.run_pass(session, t, call, key=layout, batch=batch, gating_shape=shape, device=x.device)
        return forward

    def _cross_attention(self, module, is_gating: bool):
        session = self.session

        def make(original):
            def forward(x, context=None, mask=None, **kwargs):
                if context is None:  # not a cross-attention call
                    return original(x, context=context, mask=mask, **kwargs)
                if any(v is not None and v != 0 for v in kwargs.values()):  # sgm (SDXL) passes additional_tokens=None
                    raise NlceError(f"NLCE cannot run with this cross-attention call ({', '.join(kwargs)}); turn off the "
                                    "extension that passes it")
                if mask is not None:
                    raise NlceError("NLCE cannot run with an attention mask on the prompt; disable the extension that sets it")
                p = session.current
                prepared = None if p is None else p.prepared
                if prepared is None or prepared.incoming.shape != context.shape:
                    raise NlceError("NLCE's UNet hook did not run before cross-attention; another extension replaced the UNet")
                self.check()
                shape = nlce.spatial_shape_for(x.shape[1], p.host["latent_hw"])
                out = session.cross_attention(p, module.to_q(x), module.to_k(prepared.context), module.to_v(prepared.context),
                                              module.heads, shape, is_gating, incoming_keys=lambda: module.to_k(prepared.incoming))
                return module.to_out(out.to(x.dtype))
            return forward
        return make

    def _tokenising_embedder(self):
        """The embedder whose chunking places the words in the conditioning rows: SD1.x's cond_stage_model; SDXL's
        CLIP-L embedder (bigG's rows sit beside CLIP-L's, chunked the same way)."""
        conditioner = getattr(self.sd_model, "conditioner", None)
        for embedder in [getattr(self.sd_model, "cond_stage_model", None), *(getattr(conditioner, "embedders", None) or [])]:
            if getattr(embedder, "process_texts", None) is not None:
                return embedder
        return None

    # -- which rows are the prompt's words ---------------------------------------------------------

    def rows(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond (B,), word mask (B, S)) for a batch of conditioning rows (cached per pass).

        A row block equal to a negative prompt's conditioning is unconditional; the others are
        prompts, whose words come from the recorded conditioning (or, for conditioning computed
        elsewhere, every row but the chunk starts).
        """
        key = (context.data_ptr(), tuple(context.shape))
        if key not in self._rows:
            B, S, _ = context.shape
            cond = torch.ones(B, dtype=torch.bool)
            words = torch.zeros(B, S, dtype=torch.bool)
            unconds = self.uncond()
            recorded = sorted(self.recorded, key=lambda r: -r[0].shape[0])  # longest match first
            for b in range(B):
                row = context[b]
                if any(_starts_with(row, u) for u in unconds):
                    cond[b] = False
                    continue
                mask = next((m for rows, m in recorded if m is not None and _starts_with(row, rows)), None)
                if mask is None:
                    mask = nlce.infer_token_mask(context[b:b + 1])[0].cpu()
                    mask[::CHUNK] = False
                n = min(S, mask.shape[0])
                words[b, :n] = mask[:n]
            self._rows[key] = (cond, words.to(context.device))
        return self._rows[key]
