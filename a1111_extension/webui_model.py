"""Where things sit inside a loaded A1111 / Forge model, and reversible text-encoder patching.

Only attribute access on the objects the webui hands over (``p.sd_model``); nothing here imports
the webui. A1111 holds CLIP-L as a transformers ``CLIPTextModel`` at
``cond_stage_model.wrapped.transformer`` (SD1.x) or ``conditioner.embedders[0].wrapped.transformer``
(SDXL); Forge holds its text encoders behind ``forge_objects.clip`` (a patcher, never modified here).
"""

from __future__ import annotations

import warnings

import torch

from shared_core.encoders import canonical_parameters
from shared_core.errors import HirmError
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


def clip_l(sd_model):
    """The transformers CLIPTextModel that is CLIP-L in an A1111 SD1.x / SDXL model."""
    check_model(sd_model)
    embedders = [getattr(sd_model, "cond_stage_model", None)]
    conditioner = getattr(sd_model, "conditioner", None)
    embedders += list(getattr(conditioner, "embedders", None) or [])
    for embedder in embedders:  # SDXL: embedders[0] is CLIP-L (transformers), embedders[1] OpenCLIP bigG (not)
        model = _transformers_clip(embedder) if embedder is not None else None
        if model is not None:
            return model
    raise HirmError(f"{checkpoint_name(sd_model)} has no CLIP-L text encoder (an SDXL refiner has only OpenCLIP bigG); "
                    f"erasure patches need one: {PICK_ANOTHER}")


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
        for module, state in self.lora_state.items():
            for attr, value in state.items():
                if value is _MISSING:
                    module.__dict__.pop(attr, None)
                else:
                    setattr(module, attr, value)
        self.lora_state = {}
