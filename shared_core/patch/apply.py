"""Applying erasure patches to text encoders: in place, reversibly, from several threads.

``apply_patch`` adds ``strength * delta`` to a transformers CLIP text model's weights and returns a handle whose
``remove()`` gives back the weights bit for bit; ``patched`` does both around a block; ``patched_pipeline`` routes each
part of a patch to a diffusers pipeline's encoders. What is applied to a model is kept here, never on the model.

Threads (docs/patch-format.md, "Threads"): each model has a lock; ``apply_patch``, ``remove`` and a ``patched`` block
hold it, so threads that share a model take turns and each sees exactly its own patches inside its block. A thread
that only runs the encoder while others patch it must hold the lock too (``holding(model)``), or it may see weights
half-way through a change. Locks are re-entrant, and a thread that would wait for a lock held by a thread that waits
(directly or through others) for one it holds gets a ``PatchLockError`` at once instead of a deadlock: nesting
``patched`` blocks on two models in opposite orders in two threads ends with one of them refused, nothing left applied.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

from ..common import check_strength
from ..encoders import canonical_parameters, encoder_architecture, model_signature, signature_id, signatures_match
from ..errors import HirmError, PatchMismatchError
from .format import ErasurePatch, check_finite


class BaseMismatchWarning(UserWarning):
    """The patch was trained on other base weights than the encoder it is applied to."""


class PatchLockError(HirmError):
    """Waiting for a model's lock would deadlock (another thread waits for a lock this thread holds)."""


def base_mismatch_note(patch: ErasurePatch, signature: list[float], where: str = "this encoder", fp8: bool = False) -> str | None:
    """The one-line note for a patch trained on other base weights than ``signature`` describes (None when they match;
    ``fp8``: ``signature`` was taken from float8 weights, compared at their precision)."""
    theirs = patch.metadata.get("base_signature", [])
    if signatures_match(signature, theirs, fp8):
        return None
    a, b = signature_id(theirs), signature_id(signature)  # both from the signatures compared, never a stored label
    than = f"({a}) than {where} ({b})" if a != b else f"than {where} (both fingerprints {a}, but the weights differ beyond fp16 rounding)"
    return (f"erasure patch '{', '.join(patch.concepts)}' was trained on other base weights {than}, e.g. another "
            "fine-tune; it may erase less or drift more: retrain it on this model for best results")


# ---------------------------------------------------------------------------------------------- locks

_LOCKS = threading.Condition()  # guards every model lock's owner and the threads waiting
_WAITING: dict[int, "_ModelLock"] = {}  # thread -> the model lock it waits for


class _ModelLock:
    """A re-entrant lock whose owner is known, so that a wait that would close a cycle is refused."""

    def __init__(self):
        self.owner: int | None = None
        self.depth = 0

    def _cycle(self, me: int) -> bool:
        owner, seen = self.owner, set()
        while owner is not None and owner not in seen:
            if owner == me:
                return True
            seen.add(owner)
            waits = _WAITING.get(owner)
            owner = waits.owner if waits is not None else None
        return False

    def acquire(self) -> None:
        me = threading.get_ident()
        with _LOCKS:
            while self.owner not in (None, me):
                if self._cycle(me):
                    raise PatchLockError("another thread holds this model and waits for a model this thread holds (patched() "
                                         "blocks nested in opposite orders); nest them in one order in every thread")
                _WAITING[me] = self
                try:
                    _LOCKS.wait()
                finally:
                    _WAITING.pop(me, None)
            self.owner, self.depth = me, self.depth + 1

    def release(self) -> None:
        with _LOCKS:
            self.depth -= 1
            if self.depth == 0:
                self.owner = None
                _LOCKS.notify_all()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


class _Applied:
    """What the core knows about one model's applied patches (never stored on the model itself)."""

    def __init__(self):
        self.lock = _ModelLock()
        self.stack: list[AppliedPatch] = []
        self.base_signature: list[float] | None = None


_APPLIED: "weakref.WeakKeyDictionary[Any, _Applied]" = weakref.WeakKeyDictionary()
_REGISTRY = threading.Lock()


def _applied(model) -> _Applied:
    with _REGISTRY:
        state = _APPLIED.get(model)
        if state is None:
            state = _APPLIED[model] = _Applied()
        return state


@contextlib.contextmanager
def holding(model):
    """Hold ``model``'s lock for a block: no thread applies or removes a patch on it meanwhile (for a thread that runs
    the encoder while others patch it)."""
    with _applied(model).lock:
        yield model


def applied_patches(model) -> list["AppliedPatch"]:
    """The patches applied to ``model`` and not yet removed, oldest first."""
    state = _APPLIED.get(model)
    return list(state.stack) if state else []


def forget_applied(model) -> None:
    """Drop what the core knows of ``model``'s patches without touching its weights: for a host that has just
    reloaded them from a file (so that nothing stale is ever written back over new weights)."""
    state = _APPLIED.get(model)
    if state is not None:
        with state.lock:
            state.stack.clear()
            state.base_signature = None


# ---------------------------------------------------------------------------------------------- apply / remove


@dataclass(eq=False)
class AppliedPatch:
    """Handle of a patch applied to a model; ``remove()`` restores the weights as if it had never been applied."""

    model: Any
    patch: ErasurePatch
    strength: float
    originals: dict[str, torch.Tensor]
    base_matches: bool

    def remove(self) -> None:
        """Take this patch off. The latest one comes off directly; an earlier one (another thread's, or out of order)
        by taking off the later ones, this one, and putting the later ones back: the weights are then bit for bit those
        of the remaining patches applied in their order."""
        state = _applied(self.model)
        with state.lock:
            if self not in state.stack:
                return
            later = state.stack[state.stack.index(self) + 1:]
            for handle in reversed(later):
                handle._restore()
                state.stack.pop()
            self._restore()
            state.stack.pop()
            for handle in later:
                handle.originals = _write(self.model, handle.patch, handle.strength)
                state.stack.append(handle)
            if not state.stack:
                state.base_signature = None

    def _restore(self) -> None:
        params = canonical_parameters(self.model)
        with torch.no_grad():
            for name, orig in self.originals.items():
                params[name].data.copy_(orig)


def _write(model, patch: ErasurePatch, strength: float) -> dict[str, torch.Tensor]:
    """Add ``strength * delta`` to the weights (all computed and checked first: nothing changes on a refusal); the
    weights before, for ``_restore``."""
    params = canonical_parameters(model)
    originals = {n: params[n].detach().clone() for n in patch.deltas}
    new = {n: (params[n].data.float() + strength * d.to(params[n].device, torch.float32)).to(params[n].dtype)
           for n, d in patch.deltas.items()}
    check_finite(new, f"the encoder with '{', '.join(patch.concepts)}' at strength {strength:g}",
                 "nothing was changed: lower the strength", PatchMismatchError)
    with torch.no_grad():
        for name, value in new.items():
            params[name].data.copy_(value)
    return originals


def route_parts(patch: ErasurePatch, have: list[str], where: str = "this model") -> tuple[dict[str, ErasurePatch], list[str]]:
    """({component: single-encoder patch}, notes): which parts of ``patch`` go to which of the text encoders a model
    ``have`` (``clip_l``, ``clip_g``). A part whose encoder the model lacks is left out with a note (an SDXL patch on
    SD1.x: its clip_g half); a CLIP-L patch on SDXL gets a note that CLIP-G keeps the concept; a patch none of whose
    parts fit is refused (PatchMismatchError)."""
    usable = [c for c in patch.components if c in have]
    name = ", ".join(patch.concepts)
    if not usable:
        raise PatchMismatchError(f"erasure patch '{name}' is for {patch.family} but {where} has "
                                 f"{', '.join(have) or 'no CLIP text encoder'}; use a patch trained on this model's encoders "
                                 "(clip_l: SD1.x, SDXL, Flux, SD3; clip_g: SDXL, SD3)")
    notes = [f"{where} has no {c}: the {c} half of erasure patch '{name}' is left out" for c in patch.components if c not in have]
    if patch.components == ["clip_l"] and "clip_g" in have:
        notes.append(f"erasure patch '{name}' changes clip_l only; {where}'s clip_g still carries the concept (a patch trained "
                     "on this SDXL model changes both)")
    return {c: patch.part(c) for c in usable}, notes


def check_compatible(patch: ErasurePatch, model) -> None:
    """Refuse a patch for another encoder architecture (raises PatchMismatchError). A multi-encoder patch fits
    when one of its parts does."""
    patch = patch.for_encoder(model)
    arch = encoder_architecture(model)
    enc = patch.encoder
    if (enc.get("hidden_size"), enc.get("num_layers")) != (arch["hidden_size"], arch["num_layers"]):
        raise PatchMismatchError(
            f"this patch is for {enc.get('family', '?')} (width {enc.get('hidden_size')}, {enc.get('num_layers')} layers) "
            f"but the encoder is {arch['family']} (width {arch['hidden_size']}, {arch['num_layers']} layers); "
            "use a patch trained on this encoder")
    params = canonical_parameters(model)
    for name, delta in patch.deltas.items():
        if name not in params or tuple(params[name].shape) != tuple(delta.shape):
            raise PatchMismatchError(f"patch tensor {name} does not fit this encoder; use a patch trained on this encoder")


def apply_patch(model, patch: ErasurePatch, strength: float = 1.0) -> AppliedPatch:
    """Add ``strength * delta`` to the model's weights in place; returns a handle to undo it.

    Refuses a patch for another architecture, or a strength that is not a number within ``STRENGTH_RANGE``, before
    touching anything; warns (``BaseMismatchWarning``) when the base weights differ from those the patch was trained
    on. Holds the model's lock while it writes. Of a multi-encoder patch (SDXL) the part for this encoder is applied
    (``ErasurePatch.for_encoder``).
    """
    if not isinstance(patch, ErasurePatch):
        raise HirmError(f"apply_patch takes an ErasurePatch (load_patch(path)), got {type(patch).__name__}")
    strength = check_strength(strength)
    patch = patch.for_encoder(model)
    check_compatible(patch, model)
    state = _applied(model)
    with state.lock:
        if not state.stack:
            state.base_signature = model_signature(model)
        note = base_mismatch_note(patch, state.base_signature)
        if note:
            warnings.warn(note, BaseMismatchWarning, stacklevel=2)
        handle = AppliedPatch(model, patch, strength, _write(model, patch, strength), note is None)
        state.stack.append(handle)
        return handle


@contextlib.contextmanager
def patched(model, patches: ErasurePatch | Iterable[tuple[ErasurePatch, float]], strength: float = 1.0):
    """Context manager: the model carries the patch(es) inside the block, its own weights after.

    The block holds the model's lock: another thread patching the same model (or holding it, ``holding``) waits until
    this block ends; nested blocks in one thread are fine.
    """
    pairs = [(patches, strength)] if isinstance(patches, ErasurePatch) else list(patches)
    with _applied(model).lock:
        handles = []
        try:
            for p, s in pairs:
                handles.append(apply_patch(model, p, s))
            yield handles
        finally:
            for h in reversed(handles):
                h.remove()


# ---------------------------------------------------------------------------------------------- diffusers pipelines


def pipeline_encoders(pipe) -> dict[str, Any]:
    """{component: model} of a diffusers pipeline's CLIP text encoders: ``text_encoder`` is CLIP-L (SD1.x, SDXL, SD3,
    Flux), ``text_encoder_2`` CLIP-G where it is a CLIP (SDXL, SD3; Flux's is T5, left out)."""
    out = {}
    for component, name in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2")):
        model = getattr(pipe, name, None)
        if getattr(getattr(model, "config", None), "model_type", None) in ("clip_text_model", "clip_text_with_projection_model"):
            out[component] = model
    return out


class PatchNote(UserWarning):
    """Something a user should know about a patch on a pipeline (a half left out, a half missing)."""


@contextlib.contextmanager
def patched_pipeline(pipe, patches: ErasurePatch | Iterable[tuple[ErasurePatch, float]], strength: float = 1.0):
    """Context manager: every CLIP text encoder of a diffusers pipeline carries its part of the patch(es) inside the
    block (SD1.x: ``text_encoder``; SDXL: ``text_encoder`` and ``text_encoder_2``), its own weights after.

    What ``route_parts`` notes (e.g. a CLIP-L patch on SDXL leaves CLIP-G as it was) is issued as a ``PatchNote``
    warning; a patch none of whose parts fits the pipeline is refused before anything changes.
    """
    pairs = [(patches, strength)] if isinstance(patches, ErasurePatch) else list(patches)
    encoders = pipeline_encoders(pipe)
    routed = []
    for patch, s in pairs:
        parts, notes = route_parts(patch, list(encoders), "this pipeline")
        for note in notes:
            warnings.warn(note, PatchNote, stacklevel=3)
        routed += [(encoders[c], part, check_strength(s)) for c, part in parts.items()]
    with contextlib.ExitStack() as stack:
        for model, part, s in routed:
            stack.enter_context(patched(model, part, s))
        yield


def merged_state_dict(canonical_sd: Mapping[str, torch.Tensor], patches: Iterable[tuple[ErasurePatch, float]],
                      name_map=lambda n: n) -> dict[str, torch.Tensor]:
    """A copy of the changed tensors of a state dict with patches added (for writing files).

    ``name_map`` turns a canonical name into the state dict's own key. Patches are single-encoder
    patches (``ErasurePatch.part`` of a multi-encoder patch).
    """
    out: dict[str, torch.Tensor] = {}
    for patch, strength in patches:
        if patch.parts:
            raise HirmError(f"merged_state_dict takes one encoder's patch; pass patch.part(component) of {patch.describe()}")
        strength = check_strength(strength)
        for name, delta in patch.deltas.items():
            key = name_map(name)
            if key not in canonical_sd:
                raise PatchMismatchError(f"the checkpoint has no {key}; use a patch trained on this encoder")
            base = out.get(key, canonical_sd[key])
            if tuple(base.shape) != tuple(delta.shape):
                raise PatchMismatchError(f"patch tensor {name} does not fit {key} {tuple(base.shape)}; use a patch trained on this encoder")
            out[key] = (base.float() + strength * delta.float()).to(base.dtype)
    check_finite(out, "the patched weights", "nothing was written: lower the strength", PatchMismatchError)
    return out
