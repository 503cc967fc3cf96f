"""Where things sit inside a loaded A1111 / Forge model, and reversible text-encoder patching.

Only attribute access on the objects the webui hands over (``p.sd_model``); nothing here imports
the webui. A1111 holds CLIP-L as a transformers ``CLIPTextModel`` at
``cond_stage_model.wrapped.transformer`` (SD1.x) or ``conditioner.embedders[0].wrapped.transformer``
(SDXL), and SDXL's bigG as an open_clip model at ``conditioner.embedders[1].wrapped.model`` (a
refiner's ``embedders[0]``); Forge holds its text encoders behind ``forge_objects.clip`` (a
patcher, never modified here).
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass

import torch

from shared_core.encoders import OPENCLIP_MODULES, OPENCLIP_QKV, canonical_parameters
from shared_core.errors import HirmError, PatchMismatchError
from shared_core.patch import BaseMismatchWarning, applied_patches, apply_patch, check_compatible, forget_applied

# attributes A1111's built-in Lora extension keeps on every layer it may change (extensions-builtin/Lora/networks.py)
LORA_ATTRS = ("network_current_names", "network_weights_backup", "network_bias_backup")
_MISSING = object()
_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def family(sd_model) -> str:
    """"sd1", "sd2", "sdxl" or "other" from the flags both webuis set when a model loads."""
    for name in ("sdxl", "sd2", "sd1"):
        if getattr(sd_model, f"is_{name}", False):
            return name
    return "other"


def checkpoint_name(sd_model) -> str:
    """The loaded checkpoint as the webui's checkpoint menu shows it ('name [hash]'), for messages."""
    info = getattr(sd_model, "sd_checkpoint_info", None)
    name = getattr(info, "title", None) or getattr(info, "name", None)
    return f"the loaded checkpoint '{name}'" if name else "the loaded checkpoint"


PICK_ANOTHER = "pick an SD1.x or SDXL checkpoint in the 'Stable Diffusion checkpoint' menu at the top"


def check_model(sd_model) -> None:
    if sd_model is None:
        raise HirmError("no Stable Diffusion model is loaded; pick a checkpoint in the 'Stable Diffusion checkpoint' menu at the top")
    if family(sd_model) == "sd2":
        raise HirmError(f"{checkpoint_name(sd_model)} is an SD2.x model (OpenCLIP-H text encoder), which erasure patches and "
                        f"NLCE do not support; {PICK_ANOTHER}")


def is_forge(sd_model) -> bool:
    return getattr(sd_model, "forge_objects", None) is not None


def _transformers_clip(embedder):
    inner = getattr(getattr(embedder, "wrapped", embedder), "transformer", None)
    config = getattr(inner, "config", None)
    return inner if getattr(config, "model_type", None) == "clip_text_model" else None


def openclip_tower(embedder):
    """The open_clip text model inside an embedder A1111 built for SDXL's bigG (``FrozenOpenCLIPEmbedder2``, hijacked as
    ``FrozenOpenCLIPEmbedder2WithCustomWords``: ``.wrapped.model``), or None."""
    model = getattr(getattr(embedder, "wrapped", embedder), "model", None)
    if all(hasattr(model, a) for a in ("transformer", "token_embedding", "ln_final", "positional_embedding")):
        return model
    return None


def embedders(sd_model) -> list:
    """The text embedders of a loaded model: SD1.x's cond_stage_model, SDXL's conditioner embedders (a refiner's one)."""
    conditioner = getattr(sd_model, "conditioner", None)
    found = list(getattr(conditioner, "embedders", None) or [])
    return found or [e for e in [getattr(sd_model, "cond_stage_model", None)] if e is not None]


def text_encoders(sd_model) -> dict[str, object]:
    """{component: encoder} of a loaded A1111 model: ``clip_l`` a transformers CLIPTextModel (SD1.x, SDXL), ``clip_g``
    the open_clip bigG tower (SDXL base and refiner)."""
    check_model(sd_model)
    out = {}
    for embedder in embedders(sd_model):
        if (model := _transformers_clip(embedder)) is not None:
            out.setdefault("clip_l", model)
        elif (tower := openclip_tower(embedder)) is not None and family(sd_model) == "sdxl":
            out.setdefault("clip_g", tower)
    return out


@dataclass(frozen=True)
class Slot:
    """Where one canonical tensor lives in a loaded encoder, and where A1111's Lora extension keeps its backup of it."""

    tensor: torch.Tensor                 # the live weight: a Parameter, or a view of one (q/k/v rows of a fused in_proj)
    module: torch.nn.Module | None       # the module whose Lora backup covers it (None: the Lora extension never backs it up)
    attr: str = ""                       # network_weights_backup or network_bias_backup
    index: int | None = None             # nn.MultiheadAttention backs up (in_proj_weight, out_proj.weight) as a tuple
    rows: tuple[int, int] | None = None  # the rows of the backed-up tensor that are this tensor (q, k or v of in_proj)

    def backup(self) -> torch.Tensor | None:
        b = self.module.__dict__.get(self.attr) if self.module is not None else None
        if self.index is not None:
            b = b[self.index] if isinstance(b, (tuple, list)) else None
        if isinstance(b, torch.Tensor) and self.rows is not None:
            b = b[self.rows[0]:self.rows[1]]
        return b if isinstance(b, torch.Tensor) and b.shape == self.tensor.shape else None

    def add_to_backup(self, delta: torch.Tensor, strength: float) -> None:
        """Lora's backup carries the patch too (a new tensor: Lora's own backup object stays intact)."""
        current = self.backup()
        if current is None:
            return
        new = (current.float() + strength * delta.to(current.device).float()).to(current.dtype)
        if self.index is None:
            setattr(self.module, self.attr, new)
            return
        whole = list(self.module.__dict__[self.attr])
        if self.rows is not None:
            full = whole[self.index].clone()
            full[self.rows[0]:self.rows[1]] = new
            new = full
        whole[self.index] = new
        setattr(self.module, self.attr, tuple(whole))


def openclip_slots(tower) -> dict[str, Slot]:
    """Canonical name -> ``Slot`` for an open_clip text tower (``transformer.resblocks``, fused ``attn.in_proj_*``)."""
    width = int(tower.ln_final.weight.shape[0])
    token = getattr(tower.token_embedding, "wrapped", tower.token_embedding)  # A1111's EmbeddingsWithFixes
    out = {"text_model.embeddings.token_embedding.weight": Slot(token.weight, None),
           "text_model.embeddings.position_embedding.weight": Slot(tower.positional_embedding, None)}
    for kind in ("weight", "bias"):
        out[f"text_model.final_layer_norm.{kind}"] = Slot(getattr(tower.ln_final, kind), tower.ln_final, _BACKUP[kind])
    for i, block in enumerate(tower.transformer.resblocks):
        base = f"text_model.encoder.layers.{i}."
        attn = block.attn
        for j, name in enumerate(OPENCLIP_QKV):
            rows = (j * width, (j + 1) * width)
            out[f"{base}{name}.weight"] = Slot(attn.in_proj_weight[rows[0]:rows[1]], attn, _BACKUP["weight"], 0, rows)
            out[f"{base}{name}.bias"] = Slot(attn.in_proj_bias[rows[0]:rows[1]], None)  # Lora keeps no in_proj_bias
        for canonical, path in OPENCLIP_MODULES.items():
            module = operator.attrgetter(path)(block)
            owner = attn if path == "attn.out_proj" else module  # A1111's Lora backs up out_proj with its attention:
            for kind in ("weight", "bias"):                      # the weight as the pair (in_proj_weight, out_proj.weight)
                index = 1 if owner is attn and kind == "weight" else None
                out[f"{base}{canonical}.{kind}"] = Slot(getattr(module, kind), owner, _BACKUP[kind], index)
    return out


_BACKUP = {"weight": "network_weights_backup", "bias": "network_bias_backup"}


def openclip_weights(tower) -> dict[str, torch.Tensor]:
    """Canonical weights of an open_clip tower as loaded from the checkpoint (Lora's backups where it merged a LoRA)."""
    out = {}
    for name, slot in openclip_slots(tower).items():
        backup = slot.backup()
        out[name] = (backup if backup is not None else slot.tensor).detach()
    return out


def openclip_projection(tower) -> torch.Tensor:
    """The tower's pooled-output projection as a Linear weight (open_clip applies it as ``x @ P``)."""
    return tower.text_projection.detach().T


def _owners(model) -> dict[int, tuple[torch.nn.Module, str]]:
    """id(parameter) -> (module holding it, 'weight' or 'bias')."""
    return {id(p): (m, leaf) for m in model.modules() for leaf, p in m.named_parameters(recurse=False)}


def clean_weights(model) -> dict[str, torch.Tensor]:
    """Canonical weights of a CLIPTextModel as loaded from the checkpoint: where A1111's Lora extension
    has merged a LoRA into a layer, its backup of the original weight is used instead."""
    if applied_patches(model):
        raise HirmError("an erasure patch is still applied to this text encoder; finish or cancel the running job first")
    params = canonical_parameters(model)
    owners = _owners(model)
    out = {}
    for name, p in params.items():
        module, leaf = owners[id(p)]
        backup = module.__dict__.get("network_weights_backup" if leaf == "weight" else "network_bias_backup")
        out[name] = backup if isinstance(backup, torch.Tensor) and backup.shape == p.shape else p.detach()
    return out


def forge_clip_state(clip) -> dict[str, torch.Tensor]:
    """State dict of a Forge CLIP as loaded: LoRA-merged tensors replaced by the LoraLoader's backups."""
    sd = clip.cond_stage_model.state_dict()
    backup = getattr(getattr(clip.patcher, "lora_loader", None), "backup", None) or {}
    return {k: backup.get(k, v) for k, v in sd.items()}


class TextEncoderPatches:
    """Erasure patches added in place to a CLIPTextModel for one job; ``remove()`` restores it bit for bit.

    Cooperates with A1111's built-in Lora extension, which merges LoRAs into the same weights and
    keeps its own backups of the originals (``LORA_ATTRS``): while the patches are on, those
    backups carry the patches too (so a LoRA re-applied during the job keeps the erasure), and
    ``remove()`` puts back the weights and the Lora attributes exactly as they were.
    """

    def __init__(self, model, pairs):
        if any(p.dtype in _FP8 for p in model.parameters()):
            raise HirmError("the text encoder is stored in fp8 (Settings > Optimizations > FP8 weight); erasure patches need "
                            "fp16 or fp32 weights: turn FP8 off, or use NLCE only")
        for patch, _ in pairs:
            check_compatible(patch, model)  # every patch is checked before any weight changes
        self.model, self.pairs = model, list(pairs)
        self.handles = []
        self.lora_state: dict[torch.nn.Module, dict[str, object]] = {}

    def apply(self) -> "TextEncoderPatches":
        params, owners = canonical_parameters(self.model), _owners(self.model)
        touched = {n: owners[id(params[n])] for patch, _ in self.pairs for n in patch.deltas}
        self.lora_state = {m: {a: m.__dict__.get(a, _MISSING) for a in LORA_ATTRS} for m, _ in touched.values()}
        try:
            with warnings.catch_warnings():  # the caller compares base signatures on the LoRA-free weights
                warnings.simplefilter("ignore", BaseMismatchWarning)
                for patch, strength in self.pairs:
                    self.handles.append(apply_patch(self.model, patch, strength))
            for patch, strength in self.pairs:
                for name, delta in patch.deltas.items():
                    module, leaf = touched[name]
                    attr = "network_weights_backup" if leaf == "weight" else "network_bias_backup"
                    backup = module.__dict__.get(attr)
                    if isinstance(backup, torch.Tensor):  # a new tensor: Lora's own backup object stays intact
                        setattr(module, attr, (backup.float() + strength * delta.to(backup.device).float()).to(backup.dtype))
        except BaseException:
            self.remove()
            raise
        return self

    def forget(self) -> None:
        """The model's weights were reloaded from a file (fresh, unpatched): drop the handles without
        writing anything back, so that nothing stale is ever restored over new weights."""
        forget_applied(self.model)
        self.handles, self.lora_state = [], {}

    def remove(self) -> None:
        for handle in reversed(self.handles):
            handle.remove()
        self.handles = []
        _restore_lora_state(self.lora_state)
        self.lora_state = {}


class OpenClipPatches:
    """Erasure patch parts added in place to an open_clip tower (A1111's SDXL bigG) for one job; ``remove()`` restores it
    bit for bit. Cooperates with the Lora extension as ``TextEncoderPatches`` does (its backups carry the patch while it
    is on, and are put back exactly)."""

    def __init__(self, tower, pairs):
        if any(p.dtype in _FP8 for p in tower.parameters()):
            raise HirmError("the text encoder is stored in fp8 (Settings > Optimizations > FP8 weight); erasure patches need "
                            "fp16 or fp32 weights: turn FP8 off, or use NLCE only")
        self.tower, self.pairs, self.slots = tower, list(pairs), openclip_slots(tower)
        layers = len(tower.transformer.resblocks)
        for patch, _ in self.pairs:  # every patch is checked before any weight changes
            enc = patch.encoder
            if (enc.get("hidden_size"), enc.get("num_layers")) != (int(tower.ln_final.weight.shape[0]), layers):
                raise PatchMismatchError(f"erasure patch '{', '.join(patch.concepts)}' is for {patch.family} (width "
                                         f"{enc.get('hidden_size')}, {enc.get('num_layers')} layers), not this model's bigG; "
                                         "use a patch trained on this model")
            for name, delta in patch.deltas.items():
                if name not in self.slots or self.slots[name].tensor.shape != delta.shape:
                    raise PatchMismatchError(f"patch tensor {name} does not fit this model's bigG; use a patch trained on this model")
        self.originals: dict[str, torch.Tensor] = {}
        self.lora_state: dict[torch.nn.Module, dict[str, object]] = {}

    def apply(self) -> "OpenClipPatches":
        touched = {n for patch, _ in self.pairs for n in patch.deltas}
        modules = {self.slots[n].module for n in touched} - {None}
        self.lora_state = {m: {a: m.__dict__.get(a, _MISSING) for a in LORA_ATTRS} for m in modules}
        try:
            with torch.no_grad():
                for patch, strength in self.pairs:
                    for name, delta in patch.deltas.items():
                        slot = self.slots[name]
                        self.originals.setdefault(name, slot.tensor.detach().clone())
                        new = (slot.tensor.float() + strength * delta.to(slot.tensor.device).float()).to(slot.tensor.dtype)
                        if not torch.isfinite(new).all():
                            raise PatchMismatchError(f"erasure patch '{', '.join(patch.concepts)}' at strength {strength:g} gives "
                                                     "NaN or Inf weights; lower the strength")
                        slot.tensor.copy_(new)
                        slot.add_to_backup(delta, strength)
        except BaseException:
            self.remove()
            raise
        return self

    def forget(self) -> None:
        """The weights were reloaded from a file: drop what would be written back."""
        self.originals, self.lora_state = {}, {}

    def remove(self) -> None:
        with torch.no_grad():
            for name, original in self.originals.items():
                self.slots[name].tensor.copy_(original)
        self.originals = {}
        _restore_lora_state(self.lora_state)
        self.lora_state = {}


def _restore_lora_state(state: dict) -> None:
    for module, attrs in state.items():
        for attr, value in attrs.items():
            if value is _MISSING:
                module.__dict__.pop(attr, None)
            else:
                setattr(module, attr, value)
