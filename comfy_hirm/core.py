"""ComfyUI-side logic that needs no ComfyUI import (unit-tested in CI without ComfyUI).

Inside ComfyUI the pack is imported as ``custom_nodes/<folder>``, so the core is a sibling
package reached relatively; in tests and with ``pip install`` it is the top-level ``shared_core``.
Everything here works on plain state dicts, tensors and ComfyUI's documented patch callbacks; the
calls into ComfyUI itself are in ``host.py``.
"""

from __future__ import annotations

import hashlib
import re
import weakref
from collections import OrderedDict
from typing import Callable, Mapping

import torch

try:
    from ..shared_core import encoders, hirm, hub, nlce, patch as patches, report  # noqa: F401 (re-exported for the nodes)
    from ..shared_core.errors import HirmError, NlceError, PatchMismatchError  # noqa: F401
    from ..shared_core.tokenizer import clip_tokenizer
except ImportError:  # not inside a ComfyUI custom_nodes package
    from shared_core import encoders, hirm, hub, nlce, patch as patches, report  # noqa: F401
    from shared_core.errors import HirmError, NlceError, PatchMismatchError  # noqa: F401
    from shared_core.tokenizer import clip_tokenizer

PREFIX = {"clip-l": "clip_l.transformer.", "clip-g": "clip_g.transformer."}
_TRAINED: OrderedDict = OrderedDict()  # (exact weights digest, HirmConfig) -> patch: the same inputs do not retrain
_TRAINED_KEEP = 8


def parse_list(text: str, what: str = "concept") -> list[str]:
    """One entry per line or comma; blank entries dropped; none at all is an error."""
    items = [c.strip() for c in re.split(r"[\n,]", text or "") if c.strip()]
    if not items:
        raise HirmError(f"no {what} given: type at least one (one per line or comma-separated)")
    return items


def encoder_weights(clip_sd: Mapping[str, torch.Tensor], component: str = "clip_l") -> dict[str, torch.Tensor]:
    """Canonical copy of one text encoder of a ComfyUI CLIP state dict (``clip.get_sd()``).

    The copy is made outside inference mode so that a model built from it can be trained, and
    so that nothing done to it reaches the CLIP's own tensors.
    """
    prefix = component + "."
    if not any(k.startswith(prefix) for k in clip_sd):
        have = sorted({k.split(".")[0] for k in clip_sd if "." in k}) or ["nothing"]
        raise HirmError(f"this CLIP has no {component} text encoder (it has {', '.join(have)}); "
                        "use the CLIP of an SD1.x, SDXL or Flux model")
    with torch.inference_mode(False):
        own = {k: v.detach().clone() for k, v in clip_sd.items() if k.startswith(prefix)}
    _, canon = encoders.extract_text_encoder(own, component, source="the CLIP input")
    return canon


def weights_digest(weights: Mapping[str, torch.Tensor]) -> str:
    """Exact content hash of a state dict (any change to any weight, e.g. a LoRA, changes it)."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(weights):
        t = weights[name].detach().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).cpu().numpy())
    return h.hexdigest()


def train(clip_sd: Mapping[str, torch.Tensor], concepts: list[str], *, method: str = "random", anchor: str | None = None,
          preset: str | None = None, steps: int = 0, lr: float = 0.0, seed: int = 42, device="cpu",
          progress: Callable | None = None, should_cancel: Callable | None = None):
    """(patch, report text) for the CLIP holding ``clip_sd``; 0 steps / lr mean "from the preset".

    Trains on a fp32 copy of clip_l (works under ComfyUI's inference mode; the CLIP is never
    touched). The same weights and settings return the patch trained before. A cancel (raised by
    ``should_cancel``) propagates and caches nothing.
    """
    config = hirm.make_config(concepts, method=method, anchor=anchor or None, preset=preset or None,
                              steps=steps or None, lr=lr or None, seed=seed)
    weights = encoder_weights(clip_sd)
    key = (weights_digest(weights), config)
    if key not in _TRAINED:
        with torch.inference_mode(False), torch.enable_grad():
            model = encoders.build_text_model(weights, device=device, dtype=torch.float32)
            _TRAINED[key] = hirm.train_patch(model, clip_tokenizer(), config, progress=progress, should_cancel=should_cancel)
        while len(_TRAINED) > _TRAINED_KEEP:
            _TRAINED.popitem(last=False)
    _TRAINED.move_to_end(key)
    patch = _TRAINED[key]
    return patch, report.format_report(patch.report)


def encoder_patches(clip_sd: Mapping[str, torch.Tensor], patch) -> tuple[dict, str | None]:
    """ComfyUI ``add_patches`` dict for a CLIP holding ``clip_sd``, and a warning on a base mismatch.

    Refuses (PatchMismatchError) a patch for an encoder this CLIP does not have or whose shapes differ.
    """
    family = patch.family
    prefix = PREFIX.get(family, PREFIX["clip-l"])  # other families (custom widths) can only sit in clip_l; shapes decide
    component = prefix.split(".")[0]
    if not any(k.startswith(prefix) for k in clip_sd):
        have = sorted({k.split(".")[0] for k in clip_sd if k.startswith("clip_")}) or ["no CLIP encoder"]
        raise PatchMismatchError(f"this patch is for {family} but this CLIP has {', '.join(have)}; apply it to a model "
                                 f"with {component} (SD1.x/SDXL/Flux for clip_l, SDXL for clip_g)")
    out = {}
    for name, delta in patch.deltas.items():
        key = prefix + name
        if key not in clip_sd or tuple(clip_sd[key].shape) != tuple(delta.shape):
            raise PatchMismatchError(f"patch tensor {name} does not fit this CLIP's {component} encoder (a patch for another "
                                     "architecture); use a patch trained on this model's encoder")
        out[key] = ("diff", (delta,))
    canon = {k[len(prefix):]: v for k, v in clip_sd.items() if k.startswith(prefix)}
    layers = 1 + max(int(m.group(1)) for k in canon if (m := re.search(r"encoder\.layers\.(\d+)\.", k)))
    mine = encoders.base_signature(canon, layers)
    warning = None
    if not encoders.signatures_match(mine, patch.metadata.get("base_signature", [])):
        warning = (f"erasure patch '{', '.join(patch.concepts)}' was trained on other base weights "
                   f"({patch.metadata.get('base_fingerprint')}) than this CLIP ({encoders.signature_id(mine)}); "
                   "it may erase less or drift more: retrain it on this model for best results")
    return out, warning


# ---------------------------------------------------------------------------------------------- NLCE

_ATTN2 = re.compile(r"^(?:(input|output)_blocks\.(\d+)|(middle)_block)\.\d+\.transformer_blocks\.(\d+)\.attn2$")


def cross_attention_blocks(diffusion_model) -> dict[tuple[str, int, int], torch.nn.Module]:
    """ComfyUI attn2 patch keys (block, number, transformer index) of an LDM UNet -> the attn2 module."""
    found = {}
    for name, module in diffusion_model.named_modules():
        m = _ATTN2.match(name)
        if m:
            kind, number, middle, index = m.groups()
            found[(kind or middle, int(number or 0), int(index))] = module
    return found


def gating_block(blocks) -> tuple[str, int, int]:
    """The first cross-attention of the deepest input level: ("input", 8, 0) in SD1.x (1/32 of the image)."""
    inputs = [b for b in blocks if b[0] == "input"]
    if not inputs:
        raise NlceError("this model has no cross-attention in its input blocks; NLCE needs an SD1.x UNet")
    last = max(b[1] for b in inputs)
    return min(b for b in inputs if b[1] == last)


class ComfyNlce:
    """NLCE wired into ComfyUI's attention patches: one object per patched MODEL.

    ``context_patch`` (attn2_patch, before the projections) applies stage 1 and finds live
    tokens; ``attention`` (attn2 replace, between projections and to_out) applies stages 2/3;
    ``unet_wrapper`` starts each UNet pass (and runs the dry pass of the faithful schedule).
    ComfyUI deep-copies ``model_options`` on every clone: the gating layer's key projection is
    therefore held through a weak reference (copied as is), never as a module.
    """

    def __init__(self, concept_set, config, sigma_to_timestep: Callable, gating: tuple[str, int, int],
                 gating_to_k: torch.nn.Module):
        self.session = nlce.NlceSession(concept_set, config)
        self.sigma_to_timestep, self.gating = sigma_to_timestep, gating
        self._gating_to_k = weakref.ref(gating_to_k)
        self._incoming = self._prepared = None
        self._in_pass = False
        self.previous_wrapper = None

    @staticmethod
    def cond_rows(extra: dict, batch: int) -> torch.Tensor:
        """(batch,) bool, True for conditional rows; ComfyUI batches equal chunks, 0 = cond, 1 = uncond."""
        chunks = extra.get("cond_or_uncond") or [0]
        per = max(1, batch // len(chunks))
        return torch.tensor([c == 0 for c in chunks], dtype=torch.bool).repeat_interleave(per)[:batch]

    def context_patch(self, n, context, value, extra):
        if not self._in_pass:  # begin_pass never ran: the gate and caches would carry stale state
            raise NlceError("NLCE Gate's UNet wrapper was replaced by a node applied after it; apply NLCE Gate last")
        self._incoming = context
        self._prepared = self.session.prepare(context, self.cond_rows(extra, context.shape[0]), None)
        return n, self._prepared.context, self._prepared.context

    def attention(self, q, k, v, extra):
        prepared = self._prepared
        if prepared is None or prepared.context.shape[0] != q.shape[0]:
            raise NlceError("NLCE attention ran without its context patch (another node replaced it); put NLCE Gate last")
        if extra.get("activations_shape"):
            shape = tuple(extra["activations_shape"][-2:])
        else:
            shape = nlce.spatial_shape_for(q.shape[1], tuple(extra["original_shape"][-2:]))
        block = extra.get("block") or ("", -1)
        is_gating = (block[0], block[1], extra.get("block_index", 0)) == self.gating
        gate_key = None
        to_k = self._gating_to_k()
        if is_gating and to_k is not None and prepared.context is not self._incoming:
            gate_key = to_k(self._incoming)  # the gate is read from the keys the unmodified model sees
        return self.session.attend(q, k, v, extra["n_heads"], prepared, shape, is_gating, gate_key=gate_key).to(q.dtype)

    def unet_wrapper(self, apply_model, args):
        t = float(self.sigma_to_timestep(args["timestep"]).flatten()[0])
        cfg = self.session.config
        call = self.previous_wrapper or (lambda f, a: f(a["input"], a["timestep"], **a["c"]))
        self._in_pass = True
        try:
            if cfg.schedule == "faithful" and (cfg.stage2 or cfg.stage3) and self.session.in_window(t):
                self.session.begin_pass(t, dry=True)
                call(apply_model, args)
            self.session.begin_pass(t)
            return call(apply_model, args)
        finally:
            self._in_pass = False
            self._incoming = self._prepared = None  # no context tensors kept between passes (or copied by clone())


def neighbour_table(encode, concepts: list[str], neighbors: str) -> dict[str, list[str]]:
    """{concept: neighbours}: "auto" mines them offline (never another erased concept); else one shared list."""
    text = (neighbors or "").strip()
    if text.lower() == "auto":
        return {c: [w for w, _ in nlce.mine_neighbors(encode, c, exclude=concepts)] for c in concepts}
    shared = [n.strip() for n in re.split(r"[\n,]", text) if n.strip()]
    return {c: list(shared) for c in concepts}


def nlce_model(model, clip_sd: Mapping[str, torch.Tensor], concepts: list[str], neighbors: str, preset: str | None = None,
               device="cpu", **settings):
    """(a clone of ComfyUI MODEL ``model`` with NLCE attention patches, the neighbours used per concept)."""
    diffusion_model = model.model.diffusion_model
    blocks = cross_attention_blocks(diffusion_model)
    if not blocks:
        raise NlceError("this model has no UNet cross-attention (Flux and SD3 use joint attention); NLCE Gate needs an SD1.x model")
    width = next(iter(blocks.values())).to_k.in_features
    if width != 768:
        raise NlceError(f"this UNet's cross-attention reads {width}-wide text rows; NLCE Gate supports SD1.x models "
                        "(768-wide CLIP-L text; SDXL and SD2.x are not supported)")
    config = nlce.make_nlce_config(preset, **settings)
    encode = nlce.clip_row_encoder(encoders.build_text_model(encoder_weights(clip_sd), device=device), clip_tokenizer())
    concept_set = nlce.build_concept_set(encode, concepts, neighbour_table(encode, concepts, neighbors), config)
    gating = gating_block(blocks)
    state = ComfyNlce(concept_set, config, model.get_model_object("model_sampling").timestep, gating, blocks[gating].to_k)
    patched = model.clone()
    state.previous_wrapper = patched.model_options.get("model_function_wrapper")
    patched.set_model_attn2_patch(state.context_patch)
    for block, number, index in blocks:
        patched.set_model_attn2_replace(state.attention, block, number, index)
    patched.set_model_unet_function_wrapper(state.unet_wrapper)
    return patched, concept_set.neighbors
