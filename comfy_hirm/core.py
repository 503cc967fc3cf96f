"""ComfyUI-side logic that needs no ComfyUI import (unit-tested in CI without ComfyUI).

Inside ComfyUI the pack is imported as ``custom_nodes/<folder>``, so the core is a sibling
package reached relatively; in tests and with ``pip install`` it is the top-level ``shared_core``.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Callable

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
_TRAINED: OrderedDict = OrderedDict()  # (base fingerprint, settings) -> patch: the same inputs do not retrain


def parse_concepts(text: str, what: str = "concept") -> list[str]:
    """One concept per line or comma; blank entries dropped; none at all is an error."""
    items = [c.strip() for c in re.split(r"[\n,]", text or "") if c.strip()]
    if not items:
        raise HirmError(f"no {what} given: type at least one (one per line or comma-separated)")
    return items


def text_encoder_from_clip_sd(clip_sd: dict, component: str = "clip_l", device="cpu"):
    """A trainable transformers CLIPTextModel (fp32) from a ComfyUI CLIP state dict (``clip.get_sd()``)."""
    if component == "clip_l" and not any(k.startswith("clip_l.") for k in clip_sd):
        raise HirmError("this CLIP has no CLIP-L text encoder (clip_l); HiRM patches need SD1.x, SDXL or Flux CLIP")
    with torch.inference_mode(False):
        own = {k: v.detach().clone() for k, v in clip_sd.items() if k.startswith(component + ".")}  # no inference tensors
        _, canon = encoders.extract_text_encoder(own, component, source="the CLIP input")
        return encoders.build_text_model(canon, device=device, dtype=torch.float32)


def train(clip_sd: dict, concepts: list[str], *, method: str = "random", anchor: str | None = None,
          preset: str | None = None, steps: int = 0, lr: float = 0.0, seed: int = 0, device="cpu",
          progress: Callable | None = None, should_cancel: Callable | None = None):
    """(patch, report text). Trains on a copy of clip_l, so the CLIP's own weights are never touched;
    the same base weights and settings return the cached patch instead of training again."""
    config = hirm.make_config(concepts, method=method, anchor=anchor or None, preset=preset or None,
                              steps=steps or None, lr=lr or None, seed=seed)
    with torch.inference_mode(False), torch.enable_grad():
        model = text_encoder_from_clip_sd(clip_sd, device=device)
        key = (encoders.signature_id(encoders.model_signature(model)), repr(sorted(config.to_dict().items())))
        if key in _TRAINED:
            _TRAINED.move_to_end(key)
        else:
            _TRAINED[key] = hirm.train_patch(model, clip_tokenizer(), config, progress=progress, should_cancel=should_cancel)
            while len(_TRAINED) > 8:
                _TRAINED.popitem(last=False)
    patch = _TRAINED[key]
    return patch, report.format_report(patch.report)


def encoder_patches(clip_sd: dict, patch) -> tuple[dict, str | None]:
    """ComfyUI ``add_patches`` dict for a CLIP holding ``clip_sd``, and a warning on a base mismatch.

    Refuses (PatchMismatchError) a patch for an encoder this CLIP does not have or whose shapes differ.
    """
    family = patch.family
    prefix = PREFIX.get(family, PREFIX["clip-l"])  # other families (custom widths) can only sit in clip_l; shapes decide
    present = [k for k in clip_sd if k.startswith(prefix)]
    if not present:
        have = sorted({k.split(".")[0] for k in clip_sd if k.startswith("clip_")}) or ["no CLIP encoder"]
        raise PatchMismatchError(f"this patch is for {family} but this CLIP has {', '.join(have)}; "
                                 f"apply it to a model with {prefix.split('.')[0]} (SD1.x/SDXL/Flux for clip_l, SDXL for clip_g)")
    out = {}
    for name, delta in patch.deltas.items():
        key = prefix + name
        if key not in clip_sd or tuple(clip_sd[key].shape) != tuple(delta.shape):
            raise PatchMismatchError(f"patch tensor {name} does not fit this CLIP's {family} encoder (a patch for another "
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

_ATTN2 = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(\d+)\.\d+\.transformer_blocks\.(\d+)\.attn2$")
_BLOCK = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}


def cross_attention_blocks(diffusion_model) -> list[tuple[str, int, int]]:
    """ComfyUI attn2 patch keys (block, number, transformer index) of an LDM UNet, in forward order."""
    found = []
    for name, _ in diffusion_model.named_modules():
        m = _ATTN2.match(name)
        if m:
            number = 0 if m.group(1) == "middle_block" else int(m.group(2))
            found.append((_BLOCK[m.group(1)], number, int(m.group(3))))
    return found


def gating_block(blocks: list[tuple[str, int, int]]) -> tuple[str, int, int]:
    """SD1.x: input block 8 (the second cross-attention of down block 2, 1/32 of the image)."""
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
    """

    def __init__(self, concept_set, config, sigma_to_timestep: Callable, gating: tuple[str, int, int]):
        self.session = nlce.NlceSession(concept_set, config)
        self.sigma_to_timestep, self.gating = sigma_to_timestep, gating
        self._prepared = None
        self.previous_wrapper = None

    def _cond_rows(self, extra: dict, batch: int) -> torch.Tensor:
        chunks = extra.get("cond_or_uncond") or [0]
        per = max(1, batch // len(chunks))
        return torch.tensor([c == 0 for c in chunks], dtype=torch.bool).repeat_interleave(per)[:batch]

    def context_patch(self, n, context, value, extra):
        prepared = self.session.prepare(context, self._cond_rows(extra, context.shape[0]), None)
        self._prepared = prepared
        return n, prepared.context, prepared.context

    def attention(self, q, k, v, extra):
        prepared = self._prepared
        if prepared is None or prepared.context.shape[0] != q.shape[0]:
            raise NlceError("NLCE attention called without its context patch; another node replaced it")
        shape = nlce.spatial_shape_for(q.shape[1], tuple(extra.get("original_shape", [0, 0, 64, 64])[-2:]))
        block = extra.get("block") or ("", -1)
        is_gating = (block[0], block[1], extra.get("block_index", 0)) == self.gating
        return self.session.attend(q, k, v, extra["n_heads"], prepared, shape, is_gating).to(q.dtype)

    def unet_wrapper(self, apply_model, args):
        sigma = args["timestep"]
        t = float(self.sigma_to_timestep(sigma).flatten()[0])
        cfg = self.session.config
        call = self.previous_wrapper or (lambda f, a: f(a["input"], a["timestep"], **a["c"]))
        if cfg.schedule == "faithful" and (cfg.stage2 or cfg.stage3) and self.session.in_window(t):
            self.session.begin_pass(t, dry=True)
            call(apply_model, args)
        self.session.begin_pass(t)
        return call(apply_model, args)


def nlce_model(model, clip_sd: dict, concepts: list[str], neighbors: str, preset: str | None = None, **settings):
    """(a clone of ComfyUI MODEL ``model`` with NLCE attention patches, the neighbours used per concept)."""
    diffusion_model = model.model.diffusion_model
    blocks = cross_attention_blocks(diffusion_model)
    if not blocks:
        raise NlceError("this model has no UNet cross-attention (e.g. Flux, SD3 use joint attention); NLCE Gate needs an SD1.x model")
    width = diffusion_model.get_submodule(_module_name(blocks[0])).to_k.in_features
    config = nlce.make_nlce_config(preset, **settings)
    text_model = text_encoder_from_clip_sd(clip_sd)
    if text_model.config.hidden_size != width:
        raise NlceError(f"this UNet's cross-attention reads {width}-wide text rows but the CLIP's clip_l gives "
                        f"{text_model.config.hidden_size}; NLCE Gate supports SD1.x models (SDXL's concatenated text is not supported)")
    encode = nlce.clip_row_encoder(text_model, clip_tokenizer())
    text = (neighbors or "").strip()
    if text.lower() == "auto":
        table = {c: [w for w, _ in nlce.mine_neighbors(encode, c)] for c in concepts}
    else:
        table = {c: [n.strip() for n in re.split(r"[\n,]", text) if n.strip()] for c in concepts}
    concept_set = nlce.build_concept_set(encode, concepts, table, config)
    sampling = model.get_model_object("model_sampling")
    patched = model.clone()
    state = ComfyNlce(concept_set, config, sampling.timestep, gating_block(blocks))
    state.previous_wrapper = patched.model_options.get("model_function_wrapper")
    patched.set_model_attn2_patch(state.context_patch)
    for block, number, index in blocks:
        patched.set_model_attn2_replace(state.attention, block, number, index)
    patched.set_model_unet_function_wrapper(state.unet_wrapper)
    return patched, concept_set.neighbors


def _module_name(block: tuple[str, int, int]) -> str:
    kind, number, index = block
    head = {"input": f"input_blocks.{number}", "middle": "middle_block", "output": f"output_blocks.{number}"}[kind]
    return f"{head}.1.transformer_blocks.{index}.attn2"
