"""What every host adapter calls, on canonical weights: training with a cache of trained patches, a patch's
weight differences in a host's key layout, and NLCE operators for a host's encoder (cached too).

Hosts only get their encoder's weights into canonical form (``encoders.canonical_from_host``,
``extract_text_encoder``) and hand the results to their own patching API; nothing here knows a host.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Mapping

import torch

from .encoders import KeyLayout, base_signature, build_text_model, host_key, is_float8, weights_digest
from .errors import NlceError, PatchMismatchError
from .patch import ErasurePatch, base_mismatch_note

_TRAINED: OrderedDict = OrderedDict()  # (exact weights digest, HirmConfig) -> patch: the same inputs do not retrain
_OPERATORS: OrderedDict = OrderedDict()  # (base signature, concepts, neighbours, operator settings, device) -> ConceptSet
_KEEP = 8
_LOCK = threading.Lock()


def _remember(cache: OrderedDict, key, make: Callable):
    with _LOCK:
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
    value = make()  # outside the lock: training takes seconds, and a cancel raises here and caches nothing
    with _LOCK:
        cache[key] = value
        while len(cache) > _KEEP:
            cache.popitem(last=False)
    return value


def _trained_names(weights: Mapping[str, torch.Tensor], config) -> set[str]:
    """The canonical names training changes: the model gets its own copies of these and shares the rest (frozen)."""
    from .encoders import config_from_state_dict
    from .hirm.train import trained_parameter_names

    return set(trained_parameter_names(config, config_from_state_dict(weights).num_hidden_layers))


def train_on_encoders(encoders: Mapping[str, tuple[Mapping[str, torch.Tensor], torch.Tensor | None]], config, *, device="cpu",
                      progress: Callable | None = None, should_cancel: Callable | None = None) -> ErasurePatch:
    """One HiRM patch for a model's text encoders: ``encoders`` maps components (``clip_l``, ``clip_g``) to (canonical
    weights, pooled projection or None); each is trained on a fp32 model built from its weights (``train_model_patch``).

    Works under a host's inference mode and with a host's inference tensors; the weights are never
    touched. The same weights and settings return the patch trained before.
    """
    from .hirm import train_model_patch
    from .tokenizer import clip_tokenizer

    def make():
        with torch.inference_mode(False), torch.enable_grad():
            models = {c: (build_text_model(w, device=device, dtype=torch.float32, own=_trained_names(w, config).__contains__),
                          clip_tokenizer(*(["!"] if c == "clip_g" else [])),
                          None if p is None else p.to(device, torch.float32, copy=True))
                      for c, (w, p) in encoders.items()}
            return train_model_patch(models, config, progress=progress, should_cancel=should_cancel)

    key = tuple((c, weights_digest(w), None if p is None else weights_digest({"p": p})) for c, (w, p) in sorted(encoders.items()))
    return _remember(_TRAINED, (key, config), make)


def patch_differences(host_state: Mapping[str, torch.Tensor], patch: ErasurePatch, layout: KeyLayout,
                      where: str = "this model") -> tuple[dict[str, torch.Tensor], str | None]:
    """({host key: delta}, base-mismatch note or None) for applying ``patch`` to the encoder at ``layout`` in ``host_state``.

    Refuses (PatchMismatchError) a patch whose tensors the host's encoder lacks or shapes differently.
    """
    from .encoders import canonical_from_host

    out = {}
    for name, delta in patch.deltas.items():
        key = host_key(name, layout)
        if key not in host_state or tuple(host_state[key].shape) != tuple(delta.shape):
            raise PatchMismatchError(f"patch tensor {name} does not fit {where}'s text encoder (a patch for another "
                                     "architecture); use a patch trained on this model's encoder")
        out[key] = delta
    canonical = canonical_from_host(host_state, layout)
    note = base_mismatch_note(patch, base_signature(canonical), where, fp8=any(is_float8(t) for t in canonical.values()))
    return out, note


def concept_set_for(weights: Mapping[str, torch.Tensor] | Mapping[str, Mapping[str, torch.Tensor]], concepts, neighbors, config,
                    device="cpu", progress: Callable | None = None):
    """NLCE operators for ``concepts`` built with a model's text encoders (cached): ``weights`` is one encoder's canonical
    weights (SD1.x's CLIP-L) or ``{"clip_l": ..., "clip_g": ...}`` (SDXL: the operators live in the 2048-wide rows its
    UNet reads).

    ``neighbors`` is anything ``nlce.neighbor_table`` reads ("auto" mines them, never another erased concept);
    ``progress(done, total)`` is told as each concept is mined and built.
    """
    from . import nlce
    from .tokenizer import clip_tokenizer

    by_component = dict(weights) if set(weights) <= {"clip_l", "clip_g"} else {"clip_l": weights}
    operator = tuple(getattr(config, k) for k in nlce.OPERATOR_SETTINGS)
    frozen = lambda x: x if isinstance(x, str) or x is None else tuple(frozen(i) for i in x)  # noqa: E731
    table = tuple(sorted((k, tuple(v)) for k, v in neighbors.items())) if isinstance(neighbors, Mapping) else frozen(neighbors)
    digests = tuple((c, weights_digest(w)) for c, w in sorted(by_component.items()))
    key = (digests, frozen(list(concepts)), table, operator, str(device))

    def make():
        models = {c: build_text_model(w, device=device, own=lambda _: False) for c, w in by_component.items()}  # encodes only
        if set(models) == {"clip_l", "clip_g"}:
            encode = nlce.sdxl_row_encoder(models["clip_l"], clip_tokenizer(), models["clip_g"], clip_tokenizer("!"))
        elif set(models) == {"clip_l"}:
            encode = nlce.clip_row_encoder(models["clip_l"], clip_tokenizer())
        else:
            raise NlceError("NLCE needs CLIP-L (SD1.x) or CLIP-L and CLIP-G together (SDXL); an SDXL refiner's CLIP-G alone "
                            "is not supported")
        return nlce.operators_with_progress(encode, list(concepts), neighbors, config, progress)

    return _remember(_OPERATORS, key, make)
