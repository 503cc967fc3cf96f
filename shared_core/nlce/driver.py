"""The NLCE pass driver every host adapter calls: one UNet forward, one cross-attention layer, the gating layer.

A host adapter says only how it reaches its UNet's forward and its cross-attention projections;
the order of the passes (the ``faithful`` schedule's dry pass), where the gate's keys come from
and which layer is the gating layer are decided here, once.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

import torch

from ..errors import NlceError
from .session import NlceSession, PreparedContext

# diffusers: down_blocks.2.attentions.1.transformer_blocks.0.attn2(.processor); LDM (A1111): input_blocks.8.1.transformer_blocks.0.attn2
_DIFFUSERS = re.compile(r"down_blocks\.(\d+)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn2(?:\.processor)?$")
_LDM = re.compile(r"input_blocks\.(\d+)\.\d+\.transformer_blocks\.(\d+)\.attn2$")


def run_unet_pass(session: NlceSession, timestep: float, call: Callable[[], object]):
    """One UNet forward under NLCE; ``call()`` runs the host's UNet once and returns its output.

    In the ``faithful`` schedule (stage 2 or 3 on, timestep inside the window) a dry pass without
    intervention runs first to compute the gate; then the real pass.
    """
    cfg = session.config
    if cfg.schedule == "faithful" and (cfg.stage2 or cfg.stage3) and session.in_window(timestep):
        session.begin_pass(timestep, dry=True)
        call()
    session.begin_pass(timestep)
    return call()


def gate_key(is_gating_layer: bool, prepared: PreparedContext, context: torch.Tensor, to_k: Callable | None):
    """Keys from the context as it came in (before stage 1), at the gating layer only: the gate is then read
    from the same keys as the faithful schedule's dry pass. None where it is not needed."""
    if is_gating_layer and prepared.has_live and prepared.context is not context and to_k is not None:
        return to_k(context)
    return None


def cross_attention(session: NlceSession, query: torch.Tensor, context: torch.Tensor, prepared: PreparedContext,
                    to_k: Callable, to_v: Callable, heads: int, spatial_shape: tuple[int, int], is_gating_layer: bool,
                    scale: float | None = None) -> torch.Tensor:
    """One cross-attention layer between the host's ``to_q`` and ``to_out``: keys and values from the stage-1
    context, stages 2 and 3 (``NlceSession.attend``). ``context`` is the layer's text rows as they came in."""
    key, value = to_k(prepared.context), to_v(prepared.context)
    return session.attend(query, key, value, heads, prepared, spatial_shape, is_gating_layer, scale=scale,
                          gate_key=gate_key(is_gating_layer, prepared, context, to_k))


def _depth(name) -> tuple[int, int, int] | None:
    if isinstance(name, tuple):  # ComfyUI / Forge attn2 patch key (block, number, transformer index)
        kind, number, index = name
        return (int(number), 0, -int(index)) if kind == "input" else None
    if m := _DIFFUSERS.search(name):
        return int(m[1]), int(m[2]), -int(m[3])
    if m := _LDM.search(name):
        return int(m[1]), 0, -int(m[2])
    return None


def gating_layer(names: Iterable):
    """The layer where the gate is read (SPEC section 2): the last cross-attention of the deepest down (input)
    level, its first transformer block. SD1.x: diffusers ``down_blocks.2.attentions.1.transformer_blocks.0.attn2``,
    LDM ``input_blocks.8.1.transformer_blocks.0.attn2``, ComfyUI ``("input", 8, 0)``, at 1/32 of the image size.

    ``names`` are a host's cross-attention names in any of those three forms.
    """
    found = [(d, n) for n in names if (d := _depth(n)) is not None]
    if not found:
        raise NlceError("this UNet has no cross-attention in its down blocks; NLCE needs an SD1.x-style UNet")
    return max(found, key=lambda x: x[0])[1]
