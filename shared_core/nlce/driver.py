"""The NLCE pass driver every host adapter calls, and where a UNet's gate is read.

A host adapter says only how it reaches its denoiser's forward and its attention; the order of the passes (the
``faithful`` schedule's dry pass) and which layer is the gating layer are decided here, once.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

from ..errors import NlceError
from .session import NlceSession, Pass

# diffusers: down_blocks.2.attentions.1.transformer_blocks.0.attn2(.processor); LDM (A1111): input_blocks.8.1.transformer_blocks.0.attn2
_DIFFUSERS = re.compile(r"down_blocks\.(\d+)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn2(?:\.processor)?$")
_LDM = re.compile(r"input_blocks\.(\d+)\.\d+\.transformer_blocks\.(\d+)\.attn2$")


def run_pass(session: NlceSession, timestep, call: Callable[[], object], *, key, batch: int, gating_shape, device):
    """One denoiser forward under NLCE; ``call()`` runs the host's denoiser once and returns its output, its layers reach
    the pass as ``session.current``. In the ``faithful`` schedule (stage 2 or 3 on) a dry pass without intervention runs
    first to read the gate (at every step: the timestep window is applied to the gate, not decided on the host)."""
    cfg = session.config
    where = {"key": key, "batch": batch, "gating_shape": gating_shape, "device": device}
    given = None
    if cfg.schedule == "faithful" and (cfg.stage2 or cfg.stage3):
        given = _run(session, session.begin(timestep, dry=True, **where), call)[1].gate
    return _run(session, session.begin(timestep, given=given, **where), call)[0]


def _run(session: NlceSession, p: Pass, call):
    session.current = p
    try:
        return call(), p
    finally:
        session.current = None


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
        raise NlceError("this UNet has no cross-attention in its down blocks; NLCE needs an SD1.x or SDXL UNet")
    return max(found, key=lambda x: x[0])[1]


def diffusers_level(name: str) -> int:
    """Stride-2 downsamplings before a diffusers UNet's cross-attention ``name`` (every down block before it has one)."""
    return int(_DIFFUSERS.search(name)[1])


def ldm_level(diffusion_model, number: int) -> int:
    """Stride-2 downsamplings before an LDM UNet's ``input_blocks[number]`` (A1111, Forge, ComfyUI: a block that is a
    ``Downsample`` halves the size)."""
    blocks = dict(diffusion_model.input_blocks.named_children())
    return sum(any(type(m).__name__ == "Downsample" for m in blocks[str(i)].children()) for i in range(number) if str(i) in blocks)
