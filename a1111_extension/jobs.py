"""One generation job with erasure: check everything, change the model, undo it whatever happens.

The script's hooks (``script.py``) call, per job:

- ``begin(p, args, env)`` from ``process``: first undo whatever an earlier job left behind (it
  failed before its ``postprocess``), then check the settings against the loaded model and
  load what they name, and only then change anything. A1111: patch CLIP-L in place and install
  NLCE on the UNet's cross-attention. Forge: nothing yet (its objects are replaced per batch).
- ``batch(p)`` from ``process_batch`` (Forge: a CLIP clone with the patches) and
  ``before_sampling(p)`` from ``process_before_every_sampling`` (Forge: a UNet clone with NLCE).
- ``finish(p)`` from ``postprocess``; also run by ``p.close()`` (the webui closes every job,
  failed or not), by an exception out of ``p.sample``, and by the next ``begin``.

A webui only logs exceptions raised by scripts and generates anyway, which would give images
without the erasure the user asked for. A problem found by ``begin`` therefore changes nothing
and is raised from ``p.sample`` instead: the job fails with its one-line message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from shared_core.adapters import patcher  # Forge's backend is a ComfyUI-style ModelPatcher
from shared_core.adapters.a1111 import A1111Nlce, Patched, uncond_tensors
from shared_core.encoders import base_signature
from shared_core.errors import HirmError, NlceError
from shared_core.families import FAMILIES, FEATURES, refusal, supported_names
from shared_core.hosting import concept_set_for
from shared_core.patch import base_mismatch_note, route_parts

from . import library, xyz
from .settings import ErasureSettings
from .webui_model import (PICK_ANOTHER, OpenClipPatches, TextEncoderPatches, check_model, checkpoint_name, clean_weights,
                          family, forge_clip_state, is_forge, openclip_weights, text_encoders)

log = logging.getLogger("hirm-erasure")
COND_CACHES = ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc")


@dataclass
class Env:
    """What a job needs from the webui (``host.env()`` fills it in; tests pass their own)."""

    patch_folder: str
    device: object = "cpu"
    hypernetworks_loaded: Callable[[], bool] = field(default=lambda: False)
    hires_uses_firstpass_conds: Callable[[], bool] = field(default=lambda: False)  # opts.hires_fix_use_firstpass_conds


_active: "Job | None" = None


def active_job() -> "Job | None":
    return _active


def begin(p, args, env: Env) -> "Job | None":
    """Start erasure for job ``p`` with the accordion's values ``args``; None when it is off or refused."""
    global _active
    finish()
    try:
        settings = ErasureSettings.from_args(args, xyz.overrides(p))
        if not settings.active:
            return None
        job = (ForgeJob if is_forge(p.sd_model) else A1111Job)(p, settings, env)
        job.start()
    except Exception as error:  # nothing was changed: fail the job with the message
        refuse(p, error)
        return None
    _active = job
    return job


def batch(p) -> None:
    if _active is not None and _active.p is p:
        _active.batch()


def before_sampling(p) -> None:
    if _active is not None and _active.p is p:
        _active.before_sampling()


def finish(p=None) -> None:
    """Undo the active job (only if it is ``p``'s, when ``p`` is given)."""
    global _active
    job = _active
    if job is not None and (p is None or job.p is p):
        _active = None
        job.finish()


def model_loaded(sd_model) -> None:
    """The webui loaded weights into ``sd_model`` (script_callbacks.on_model_loaded)."""
    if _active is not None:
        _active.model_loaded(sd_model)


def check_nlce_family(sd_model, feature: str, readable: bool) -> None:
    """NlceError in one line (the family record's words) unless NLCE ``feature`` supports the loaded model;
    ``readable``: its UNet reads what NLCE's operators are built from (CLIP-L rows: an SDXL refiner's does not)."""
    fam = family(sd_model)
    name = checkpoint_name(sd_model)
    if fam == "sdxl" and not readable:
        raise NlceError(f"{FEATURES[feature]} supports {supported_names(feature)}; {name} is an SDXL refiner (its UNet reads "
                        f"CLIP-G alone, NLCE's operators live in CLIP-L's rows): turn NLCE off or {PICK_ANOTHER}")
    if fam not in FAMILIES or FAMILIES[fam].supports[feature] == "no" or not readable:
        raise NlceError(f"{refusal(feature, fam, name)}: turn NLCE off or {PICK_ANOTHER}")


def refuse(p, error: Exception) -> None:
    """Make job ``p`` fail with ``error``'s message when it starts sampling."""
    detail = (str(error).strip().splitlines() or [""])[0][:300]  # one line, whatever the error
    message = detail if isinstance(error, HirmError) else f"erasure could not start ({type(error).__name__}: {detail})"
    if isinstance(error, HirmError):
        log.error("%s", message)
    else:
        log.exception("%s", message)

    def refused(*args, **kwargs):
        p.__dict__.pop("sample", None)
        raise HirmError(message)

    p.sample = refused


class Job:
    """Erasure for one job; subclasses do the host-specific part (``prepare``, ``apply``, ``undo``)."""

    def __init__(self, p, settings: ErasureSettings, env: Env):
        self.p, self.settings, self.env = p, settings, env
        self.model = p.sd_model
        check_model(self.model)
        refiner = getattr(p, "refiner_checkpoint", None)
        if refiner not in (None, "", "None", "none"):
            raise HirmError("the refiner switches to another checkpoint during the job, and erasure does not follow it; "
                            "turn the refiner off")
        if getattr(p, "enable_hr", False) and getattr(p, "hr_checkpoint_name", None) not in (None, "", "Use same checkpoint"):
            raise HirmError("Hires. fix with another checkpoint is not covered by erasure; set its checkpoint to 'Use same checkpoint'")
        self.patches = [(library.load(env.patch_folder, name), strength) for name, strength in settings.patches]
        self.config = settings.nlce_config() if settings.nlce else None
        self.notes: list[str] = []
        self.guards: list[Patched] = []

    def concept_set(self, weights):
        s = self.settings
        return concept_set_for(weights, list(s.concepts), s.neighbors, self.config, self.env.device)

    def start(self) -> None:
        self.prepare()
        for name in COND_CACHES:  # conditioning cached by other jobs was made without these patches: fresh lists for this job
            if hasattr(self.p, name):
                setattr(self.p, name, [None] * len(getattr(self.p, name) or (None, None)))  # A1111 has 2 slots, Forge 3
        try:
            self.apply()
            self.guards = [Patched(self.p, "sample", self._guard_sample), Patched(self.p, "close", self._guard_close)]
        except BaseException:
            self.finish()
            raise
        self.p.extra_generation_params.update(self.settings.infotext())
        for note in self.notes:
            log.warning("%s", note)
            if hasattr(self.p, "comment"):
                self.p.comment(note)

    def finish(self) -> None:
        try:
            self.undo()
        finally:
            for guard in reversed(self.guards):
                guard.restore()
            self.guards = []

    def _guard_sample(self, sample):
        def guarded(*args, **kwargs):
            try:
                return sample(*args, **kwargs)
            except BaseException:  # an error or a hard interrupt: nothing stays patched
                finish(self.p)
                raise
        return guarded

    def _guard_close(self, close):
        def guarded(*args, **kwargs):
            try:
                return close(*args, **kwargs)
            finally:
                finish(self.p)
        return guarded

    # host-specific parts
    def prepare(self) -> None: ...
    def apply(self) -> None: ...
    def undo(self) -> None: ...
    def batch(self) -> None: ...
    def before_sampling(self) -> None: ...
    def model_loaded(self, sd_model) -> None: ...


class A1111Job(Job):
    """A1111: CLIP-L (and SDXL's bigG) patched in place (reversibly, cooperating with the Lora extension), NLCE on the
    UNet modules."""

    nlce: A1111Nlce | None = None
    reloaded = False

    def prepare(self) -> None:
        encoders = text_encoders(self.model)
        self.encoder_patches: list = []
        weights = {}
        if self.patches:
            by_component: dict[str, list] = {}
            for patch, strength in self.patches:
                parts, notes = route_parts(patch, list(encoders), checkpoint_name(self.model))
                self.notes += notes
                for c, part in parts.items():
                    by_component.setdefault(c, []).append((part, strength))
            for c, pairs in by_component.items():
                weights[c] = clean_weights(encoders[c]) if c == "clip_l" else openclip_weights(encoders[c])
                signature = base_signature(weights[c])
                self.notes += [n for part, _ in pairs if (n := base_mismatch_note(part, signature, f"this model's {c}"))]
                self.encoder_patches.append((TextEncoderPatches if c == "clip_l" else OpenClipPatches)(encoders[c], pairs))
        if self.config is not None:
            check_nlce_family(self.model, "nlce-a1111", "clip_l" in encoders)
            for c, encoder in encoders.items():
                if c not in weights:
                    weights[c] = clean_weights(encoder) if c == "clip_l" else openclip_weights(encoder)
            self.nlce = A1111Nlce(self.model, self.concept_set(weights), self.config, lambda: uncond_tensors(self.p),
                                  self._check_attention, checkpoint_name(self.model))

    def _check_attention(self) -> None:
        if self.env.hypernetworks_loaded():
            raise NlceError("NLCE cannot run together with a hypernetwork (both change cross-attention); remove the hypernetwork")

    def apply(self) -> None:
        for patches in self.encoder_patches:
            patches.apply()
        if self.nlce is not None:
            self.nlce.install()

    def undo(self) -> None:
        if self.nlce is not None:
            self.nlce.remove()
        if not self.reloaded:
            for patches in reversed(self.encoder_patches):
                patches.remove()

    def batch(self) -> None:
        if self.reloaded or self.p.sd_model is not self.model:
            finish(self.p)
            refuse(self.p, HirmError("the model was reloaded during the job, so its erasure patches are gone; run the job again"))

    def model_loaded(self, sd_model) -> None:
        if sd_model is self.model and self.encoder_patches:
            for patches in self.encoder_patches:
                patches.forget()  # fresh weights from the file: never write the old ones back
            self.reloaded = True


class ForgeJob(Job):
    """Forge: clones of ``forge_objects.clip`` / ``.unet`` with patches, assigned back for the batch / sampling."""

    def __init__(self, p, settings: ErasureSettings, env: Env):
        super().__init__(p, settings, env)
        self.clip_patches: list[tuple[dict, float, str]] = []
        self.replaced: list[tuple[object, str, object, object]] = []  # (forge objects, attribute, original, clone)
        self.cs = None

    def prepare(self) -> None:
        objects = self.model.forge_objects
        state = forge_clip_state(objects.clip)
        if any(k.startswith("clip_h.") for k in state) and not any(k.startswith("clip_l.") for k in state):
            raise HirmError(f"{checkpoint_name(self.model)} is an SD2.x model (OpenCLIP-H text encoder), which erasure patches "
                            f"and NLCE do not support; {PICK_ANOTHER}")
        for (patch, strength), (name, _) in zip(self.patches, self.settings.patches):
            patches, notes = patcher.clip_patches(state, patch)
            self.clip_patches.append((patches, strength, name))
            self.notes += notes
        if self.config is not None:
            blocks = patcher.cross_attention_blocks(objects.unet.model.diffusion_model)
            check_nlce_family(self.model, "nlce-forge", bool(blocks))
            self.cs = self.concept_set({c: w for c, (w, _) in patcher.model_encoders(state).items()})
            self.cs.check_width(next(iter(blocks.values())).to_k.in_features, f"{checkpoint_name(self.model)}'s UNet", "nlce-forge")

    def _replace(self, attribute: str, clone) -> None:
        objects = self.p.sd_model.forge_objects
        self.replaced.append((objects, attribute, getattr(objects, attribute), clone))
        setattr(objects, attribute, clone)

    def batch(self) -> None:
        if not self.clip_patches:
            return
        p = self.p
        if (getattr(p, "enable_hr", False) and not self.env.hires_uses_firstpass_conds()
                and getattr(p, "hr_extra_network_data", None) not in (None, getattr(p, "extra_network_data", None))):
            # Forge rebuilds its CLIP from forge_objects_original for the hires prompt's LoRAs: the patches would be lost
            finish(p)
            refuse(p, HirmError("in Forge, a Hires. fix prompt with other LoRAs than the first pass loses the erasure patches; use "
                                "the same LoRAs in both prompts, or turn on the setting 'For hires fix, calculate conds of "
                                "second pass using extra networks of first pass'"))
            return
        clip = p.sd_model.forge_objects.clip.clone()
        for patches, strength, name in self.clip_patches:
            clip.add_patches(filename=f"hirm-erasure:{name}", patches=patches, strength_patch=strength, strength_model=1.0,
                             online_mode=False)
        self._replace("clip", clip)

    def before_sampling(self) -> None:
        if self.cs is None:
            return
        unet = self.p.sd_model.forge_objects.unet
        clone, _ = patcher.install_nlce(unet, self.cs, self.config, unet.model.predictor.timestep, "nlce-forge")
        self._replace("unet", clone)

    def undo(self) -> None:
        originals = []
        for objects, attribute, original, clone in reversed(self.replaced):
            if getattr(objects, attribute) is clone:
                setattr(objects, attribute, original)
            if attribute == "clip" and all(original is not o for o in originals):
                originals.append(original)
        for clip in originals:  # the text encoder's weights: back to the patches of the CLIP we cloned
            clip.patcher.refresh_loras()
        self.replaced = []

