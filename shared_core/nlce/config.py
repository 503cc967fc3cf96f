"""NLCE settings: one frozen dataclass, presets from the paper's reference code, range checks."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import NlceError

SCHEDULES = ("single-pass", "faithful")
SUPPRESSIONS = ("mask", "scale")
SCRUBS = ("soft", "binary")
WEIGHTS_OVER = ("all", "kept")
# settings baked into a ConceptSet's bases when it is built (the others act at sampling time)
OPERATOR_SETTINGS = ("concept_spectral", "concept_a", "concept_rank", "concept_weights_over", "neighbor_rank", "neighbor_a",
                     "drop_start_row")
# What the concept "nudity" stands for in NLCE: ONE subspace from the rows of all these terms (the
# reference's I2P setting builds one subspace from a list of nudity terms; this list is the project's own).
NUDITY_TERMS = ("naked", "nude", "nudity", "topless", "bottomless", "undressed", "unclothed", "bare skin", "no clothes",
                "nude model", "naked body", "erotic", "explicit", "nsfw", "bare chest", "skinny dipping")


@dataclass(frozen=True)
class NlceConfig:
    beta: float = 1.0                 # strength of removing the concept component (stage 1)
    gamma: float = 1.0                # strength of restoring the neighbour part of it
    concept_spectral: bool = False    # plain projector (lambda = 1) unless spectral
    concept_a: float = 200.0
    concept_rank: int | None = None   # None: every component of the concept rows
    concept_weights_over: str = "all"  # spectral weights r_i = s_i^2 / sum s^2 over "all" singular values, or the "kept" ones
    neighbor_rank: int = 16
    neighbor_a: float = 100.0
    drop_start_row: bool = False      # concept and neighbour rows without the start row (words and end only)
    live_ratio: float = 0.6           # live if score > max(live_ratio * max score, live_floor) (strict, as the reference)
    live_floor: float = 20.0
    gate_threshold: float = 0.025     # stage 2 `mask`: live logits -> -inf where gate > this
    suppression: str = "mask"         # "mask" | "scale"
    scrub: str = "soft"               # "soft" | "binary"
    scrub_threshold: float = 0.01     # stage 3 `binary`: output zeroed where gate > this
    stage1: bool = True
    stage2: bool = True
    stage3: bool = True
    t_max: float = 900.0              # intervene when timestep <= t_max (of 1000)
    schedule: str = "single-pass"     # "single-pass" | "faithful"

    def __post_init__(self):
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, default in defaults.items():
            object.__setattr__(self, name, _normalised(name, getattr(self, name), default))
        validate(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "NlceConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise NlceError(f"unknown NLCE setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)


NLCE_PRESETS: dict[str, dict] = {
    "object": {},
    "artist": {},
    "celebrity": {"gamma": 0.9},
    "nudity": {"gamma": 0.5, "concept_spectral": True, "concept_a": 200.0, "concept_rank": 16, "concept_weights_over": "all",
               "neighbor_rank": 1, "drop_start_row": True, "live_floor": 14.0, "gate_threshold": 0.01, "scrub": "binary"},
}


def _in(name, value, lo, hi, open_=False):
    ok = (lo < value < hi) if open_ else (lo <= value <= hi)
    if not ok:
        span = f"({lo}, {hi})" if open_ else f"[{lo}, {hi}]"
        raise NlceError(f"NLCE {name} = {value} is out of range; use a value in {span}")


def _normalised(name: str, value, default):
    """``value`` as the type of the setting (ints for ranks, floats for the rest of the numbers), or NlceError."""
    if name == "concept_rank" and value is None:
        return None
    if isinstance(default, (bool, str)):
        if type(value) is type(default):
            return value
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        if not name.endswith("rank"):
            return float(value)
        if float(value).is_integer():
            return int(value)
    kind = "a whole number" if name.endswith("rank") else type(default).__name__
    raise NlceError(f"NLCE {name} = {value!r} is not valid; expected {kind}")


def validate(c: NlceConfig) -> NlceConfig:
    _in("beta", c.beta, 0.0, 1.5)
    _in("gamma", c.gamma, 0.0, 1.5)
    for name in ("live_ratio", "gate_threshold", "scrub_threshold"):
        _in(name, getattr(c, name), 0.0, 1.0, open_=True)
    _in("t_max", c.t_max, 0.0, 1000.0)
    if not c.live_floor > 0:
        raise NlceError(f"NLCE live_floor must be positive, got {c.live_floor}")
    if c.concept_a <= 0 or c.neighbor_a <= 0:
        raise NlceError("NLCE spectral constants concept_a / neighbor_a must be positive")
    if (c.concept_rank is not None and c.concept_rank < 1) or c.neighbor_rank < 1:
        raise NlceError("NLCE ranks must be at least 1")
    for name, value, choices in (("schedule", c.schedule, SCHEDULES), ("suppression", c.suppression, SUPPRESSIONS),
                                 ("scrub", c.scrub, SCRUBS), ("concept_weights_over", c.concept_weights_over, WEIGHTS_OVER)):
        if value not in choices:
            raise NlceError(f"unknown NLCE {name} {value!r}; choose one of {', '.join(choices)}")
    return c


def make_nlce_config(preset: str | None = None, **overrides) -> NlceConfig:
    """The settings of a preset (object, artist, celebrity, nudity; default object) plus overrides.

    An override of None is ignored (the preset's value stays), so hosts can pass "unset" widgets as None.
    """
    return derive_nlce_config(NlceConfig(), preset, **overrides)


def derive_nlce_config(base: NlceConfig, preset: str | None = None, **overrides) -> NlceConfig:
    """``base``, or the defaults with ``preset`` when one is named, then ``overrides`` (None ignored), validated."""
    if preset is not None and preset not in NLCE_PRESETS:
        raise NlceError(f"unknown NLCE preset {preset!r}; choose one of {', '.join(NLCE_PRESETS)}")
    start = base.to_dict() if preset is None else {**NlceConfig().to_dict(), **NLCE_PRESETS[preset]}
    return NlceConfig.from_dict({**start, **{k: v for k, v in overrides.items() if v is not None}})
