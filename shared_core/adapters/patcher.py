"""Hosts built on a ComfyUI-style ModelPatcher (ComfyUI itself, and Forge's backend).

Nothing here imports a host: it speaks the patcher's documented protocol on the objects a host
hands over. CLIP state dicts are keyed ``clip_l.transformer.text_model.*`` (``PATCHER_LAYOUTS``);
a CLIP takes weight differences as ``{key: ("diff", (delta,))}``; cross-attention is reached
through ``attn2_patch`` (before the projections: stage 1), ``attn2`` replace functions (between
projections and ``to_out``: stages 2 and 3) and the UNet function wrapper (the passes).
"""

from __future__ import annotations

import logging
import re
import weakref
from typing import Callable, Mapping

import torch

from .. import nlce
from ..encoders import PATCHER_LAYOUTS, extract_text_encoder
from ..errors import HirmError, NlceError
from ..families import FEATURES, supported_names
from ..hosting import patch_differences
from ..patch import route_parts
from ..nlce.driver import gating_layer, ldm_level

log = logging.getLogger("hirm")
_ATTN2 = re.compile(r"^(?:(input|output)_blocks\.(\d+)|(middle)_block)\.\d+\.transformer_blocks\.(\d+)\.attn2$")


def components(clip_sd: Mapping[str, torch.Tensor]) -> list[str]:
    return sorted({k.split(".")[0] for k in clip_sd if "." in k})


def encoder_weights(clip_sd: Mapping[str, torch.Tensor], component: str = "clip_l") -> dict[str, torch.Tensor]:
    """One text encoder of a patcher CLIP's state dict (``clip.get_sd()``) under canonical names: the CLIP's own
    tensors, detached (``build_text_model`` copies them, so nothing done to a model built from them reaches the CLIP)."""
    prefix = PATCHER_LAYOUTS[component].prefix
    if not any(k.startswith(prefix) for k in clip_sd):
        raise HirmError(f"this CLIP has no {component} text encoder (it has {', '.join(components(clip_sd)) or 'nothing'}); "
                        "use the CLIP of an SD1.x, SDXL or Flux model")
    own = {k: v.detach() for k, v in clip_sd.items() if k.startswith(component + ".")}
    _, canon = extract_text_encoder(own, component, source=f"the CLIP's {component}")
    return canon


def model_encoders(clip_sd: Mapping[str, torch.Tensor]) -> dict[str, tuple[dict[str, torch.Tensor], torch.Tensor | None]]:
    """{component: (canonical weights, pooled projection or None)} of every CLIP in a patcher CLIP's state dict
    (SDXL: clip_l and clip_g; SD1.x, Flux, SD3: clip_l first), for ``hosting.train_on_encoders``."""
    from ..encoders import text_projection

    found = [c for c in PATCHER_LAYOUTS if any(k.startswith(c + ".") for k in clip_sd)]
    if not found:
        raise HirmError(f"this CLIP has no CLIP-L or CLIP-G text encoder (it has {', '.join(components(clip_sd)) or 'nothing'}); "
                        "use the CLIP of an SD1.x, SDXL or Flux model")
    out = {}
    for c in found:
        projection = text_projection(clip_sd, PATCHER_LAYOUTS[c].prefix) if c == "clip_g" else None
        out[c] = (encoder_weights(clip_sd, c), None if projection is None else projection.detach())
    return out


def clip_patches(clip_sd: Mapping[str, torch.Tensor], patch) -> tuple[dict, list[str]]:
    """(``add_patches`` dict for a CLIP holding ``clip_sd``, notes): each part of ``patch`` goes to its encoder
    (``patch.route_parts``: a CLIP-G patch to ``clip_g``, any other to ``clip_l``, an SDXL patch to both; a part
    the CLIP has no encoder for is left out with a note). A patch of other shapes is refused (PatchMismatchError);
    notes also say when the patch was trained on other base weights.
    """
    parts, notes = route_parts(patch, components(clip_sd), "this CLIP")
    out = {}
    for c, part in parts.items():
        diffs, note = patch_differences(clip_sd, part, PATCHER_LAYOUTS[c], where=f"this CLIP's {c}" if len(parts) > 1 else "this CLIP")
        out.update({k: ("diff", (d,)) for k, d in diffs.items()})
        notes += [note] if note else []
    return out, notes


def cross_attention_blocks(diffusion_model) -> dict[tuple[str, int, int], torch.nn.Module]:
    """Patch keys (block, number, transformer index) of an LDM UNet's cross-attentions -> the attn2 module."""
    found = {}
    for name, module in diffusion_model.named_modules():
        m = _ATTN2.match(name)
        if m:
            kind, number, middle, index = m.groups()
            found[(kind or middle, int(number or 0), int(index))] = module
    return found


def _foreign_replace(model_options: dict, key: tuple[str, int, int]) -> Callable | None:
    """An attn2 replace another node installed at ``key`` (looked up the way ComfyUI does: with, then without the index)."""
    table = model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    return table.get(key) or table.get(key[:2])


def conditional_rows(cache: dict, chunks, batch: int, device) -> torch.Tensor:
    """(batch,) bool, True for conditional rows; patchers batch equal chunks, 0 = cond, 1 = uncond (``chunks``: the
    call's ``cond_or_uncond``). Made once per layout in ``cache`` (no copy to the device per pass)."""
    key = (tuple(chunks), batch, str(device))
    if key not in cache:
        per = max(1, batch // len(chunks))
        cache[key] = torch.tensor([c == 0 for c in chunks], dtype=torch.bool).repeat_interleave(per)[:batch].to(device)
    return cache[key]


class PatcherNlce:
    """NLCE on one patched MODEL: ``unet_wrapper`` (runs each pass, outside a compiled diffusion model), ``context_patch``
    (attn2_patch: stage 1 and the live tokens, once per pass) and ``attention`` (attn2 replace: stages 2 and 3), the
    last two inside the diffusion model (a ``TorchCompileModel`` graph: pure tensor work, nothing read back).

    Where another node had already installed an attn2 replace, NLCE calls through to it: that
    block gets stage 1 (its keys and values), the gate, and stage 3 on its output; stage 2 needs
    NLCE's own attention there and is left out (said once in the log). Patchers deep-copy
    ``model_options`` on every clone, so modules are held through weak references only.
    """

    def __init__(self, concept_set, config, sigma_to_timestep: Callable, gating: tuple[str, int, int],
                 gating_to_k: torch.nn.Module, gating_level: int):
        self.session = nlce.NlceSession(concept_set, config)
        self.sigma_to_timestep, self.gating, self.gating_level = sigma_to_timestep, gating, gating_level
        self._gating_to_k = weakref.ref(gating_to_k)
        self._rows: dict = {}  # (cond_or_uncond, batch, device) -> conditional rows (a tensor made once, on the host's side)
        self.previous_wrapper = None
        self.foreign: dict[tuple[str, int, int], Callable] = {}

    def context_patch(self, n, context, value, extra):
        p = self.session.current
        if p is None:  # the wrapper never ran: a node applied after NLCE replaced it
            raise NlceError("NLCE's UNet wrapper was replaced by a node applied after NLCE Erasure Gate; apply NLCE Erasure Gate last")
        prepared = self.session.prepare(p, context, p.host["conditional"], None)
        return n, prepared.context, prepared.context

    def attention(self, q, k, v, extra):
        p = self.session.current
        prepared = None if p is None else p.prepared
        if prepared is None or prepared.context.shape[0] != q.shape[0]:
            raise NlceError("NLCE's attention ran without its context patch (another node replaced it); apply NLCE Erasure Gate last")
        p.host["attended"] = True
        if extra.get("activations_shape"):
            shape = tuple(extra["activations_shape"][-2:])
        else:
            shape = nlce.spatial_shape_for(q.shape[1], tuple(extra["original_shape"][-2:]))
        block = extra.get("block") or ("", -1)
        key = (block[0], block[1], extra.get("block_index", 0))
        is_gating = key == self.gating
        to_k = self._gating_to_k()
        keys = None if to_k is None else (lambda: to_k(prepared.incoming))
        foreign = self.foreign.get(key)
        if foreign is None:
            return self.session.cross_attention(p, q, k, v, extra["n_heads"], shape, is_gating, incoming_keys=keys).to(q.dtype)
        out = foreign(q, k, v, extra)
        return self.session.scrub(p, out, q, k, extra["n_heads"], shape, is_gating, incoming_keys=keys).to(q.dtype)

    def unet_wrapper(self, apply_model, args):
        x = args["input"]
        t = self.sigma_to_timestep(args["timestep"]).flatten()[0]
        chunks = args.get("cond_or_uncond") or [0]
        call = self.previous_wrapper or (lambda f, a: f(a["input"], a["timestep"], **a["c"]))
        batch, shape = x.shape[0], nlce.session.halved(tuple(x.shape[-2:]), self.gating_level)
        layout = (tuple(chunks), batch)
        self.session.ready(x.device, layout, batch * shape[0] * shape[1])
        conditional = conditional_rows(self._rows, chunks, batch, x.device)
        passes = []

        def one_pass():
            p = self.session.current
            p.host["conditional"] = conditional
            passes.append(p)
            return call(apply_model, args)

        out = nlce.run_pass(self.session, t, one_pass, key=layout, batch=batch, gating_shape=shape, device=x.device)
        if any(p.prepared is not None and not p.host.get("attended") for p in passes):
            raise NlceError("NLCE's attention was replaced by a node applied after NLCE Erasure Gate, so only part of the erasure "
                            "ran; apply NLCE Erasure Gate last")
        return out


def install_nlce(patcher, concept_set, config, sigma_to_timestep: Callable, feature: str = "nlce-comfyui"):
    """A clone of ``patcher`` (a MODEL) with NLCE on every cross-attention of its UNet; the input is not changed.

    Other nodes' patches stay: attn2 patches run before NLCE's context patch, a UNet function
    wrapper is called through, an attn2 replace at a block is called through (``PatcherNlce``).
    """
    blocks = cross_attention_blocks(patcher.model.diffusion_model)
    if not blocks:
        raise NlceError(f"this model has no UNet cross-attention; {FEATURES[feature]} supports {supported_names(feature)}")
    concept_set.check_width(next(iter(blocks.values())).to_k.in_features, "this model's UNet", feature)
    gating = gating_layer(blocks)
    state = PatcherNlce(concept_set, config, sigma_to_timestep, gating, blocks[gating].to_k,
                        ldm_level(patcher.model.diffusion_model, gating[1]))
    clone = patcher.clone()
    state.previous_wrapper = clone.model_options.get("model_function_wrapper")
    state.foreign = {key: fn for key in blocks if (fn := _foreign_replace(clone.model_options, key)) is not None}
    if state.foreign:
        log.warning("[hirm] NLCE: another node's or extension's attention already replaces cross-attention at %d of %d blocks (e.g. an "
                    "IP-Adapter); NLCE calls through to it there, with stages 1 and 3 (stage 2 needs NLCE's own attention)",
                    len(state.foreign), len(blocks))
    clone.set_model_attn2_patch(state.context_patch)
    for block, number, index in blocks:
        clone.set_model_attn2_replace(state.attention, block, number, index)
    clone.set_model_unet_function_wrapper(state.unet_wrapper)
    return clone, state
