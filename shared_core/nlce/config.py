"""NLCE settings: one frozen dataclass, presets from the paper's reference code, range checks."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..common import describe, setting
from ..errors import NlceError

SCHEDULES = ("single-pass", "faithful")
SUPPRESSIONS = ("mask", "scale")
SCRUBS = ("soft", "binary")
WEIGHTS_OVER = ("all", "kept")
# What the concept "nudity" stands for in NLCE: ONE subspace from the rows of all these terms (the
# reference's I2P setting builds one subspace from a list of nudity terms; this list is the project's own).
NUDITY_TERMS = ("naked", "nude", "nudity", "topless", "bottomless", "undressed", "unclothed", "bare skin", "no clothes",
                "nude model", "naked body", "erotic", "explicit", "nsfw", "bare chest", "skinny dipping")


_setting = setting


@dataclass(frozen=True)
class NlceConfig:
    # operator settings
    concept_spectral: bool = _setting(False, "spectral weights for the concept projector (off: a plain projector, lambda = 1)",
                                      operator=True)
    concept_a: float = _setting(200.0, "spectral constant a of the concept weights a*r/((a-1)*r+1)", lo=0.0, open_range=True,
                                operator=True)
    concept_rank: int | None = _setting(None, "components kept of the concept subspace (none: all)", lo=1, operator=True)
    concept_weights_over: str = _setting("all", "spectral weights r_i = s_i^2 / sum s^2 over 'all' singular values "
                                         "(then the first concept_rank are kept) or the 'kept' ones", choices=WEIGHTS_OVER,
                                         operator=True)
    neighbor_rank: int = _setting(16, "components kept of the neighbour subspace", lo=1, operator=True)
    neighbor_a: float = _setting(100.0, "spectral constant a of the neighbour weights", lo=0.0, open_range=True, operator=True)
    drop_start_row: bool = _setting(False, "build the subspaces without each text's start row (words and end only)",
                                    operator=True)
    # sampling settings
    beta: float = _setting(1.0, "how much of the concept component is removed from the text rows (stage 1)", lo=0.0, hi=1.5)
    gamma: float = _setting(1.0, "how much of the part neighbours share is given back (stage 1)", lo=0.0, hi=1.5)
    live_ratio: float = _setting(0.6, "a word is live when its concept score > max(ratio * the top score, floor)", lo=0.0,
                                 hi=1.0, open_range=True)
    live_floor: float = _setting(20.0, "the lowest concept score of a live word", lo=0.0, open_range=True)
    gate_threshold: float = _setting(0.025, "stage 2 'mask': live words are hidden where the gate is above this", lo=0.0,
                                     hi=1.0, open_range=True)
    suppression: str = _setting("mask", "stage 2: 'mask' hides live words where the gate is high (reference), 'scale' "
                                "multiplies their attention by 1 - gate (paper)", choices=SUPPRESSIONS)
    scrub: str = _setting("soft", "stage 3: 'soft' scales the output by 1 - gate, 'binary' zeroes it where the gate is high",
                          choices=SCRUBS)
    scrub_threshold: float = _setting(0.01, "stage 3 'binary': output zeroed where the gate is above this", lo=0.0, hi=1.0,
                                      open_range=True)
    stage1: bool = _setting(True, "stage 1: remove the concept from the text rows")
    stage2: bool = _setting(True, "stage 2: suppress attention to live words where the gate is high")
    stage3: bool = _setting(True, "stage 3: scrub the cross-attention output where the gate is high")
    t_max: float = _setting(900.0, "intervene only at timesteps at or below this (of 1000)", lo=0.0, hi=1000.0)
    schedule: str = _setting("single-pass", "'single-pass' (about vanilla cost) or 'faithful' (the reference's dry pass per "
                             "step, about 2x)", choices=SCHEDULES)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _normalised(f.name, getattr(self, f.name), f.default))
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



# settings baked into a ConceptSet's bases when it is built; the others act at sampling time
OPERATOR_SETTINGS = tuple(f.name for f in dataclasses.fields(NlceConfig) if f.metadata["operator"])


NLCE_PRESETS: dict[str, dict] = {
    "object": {},
    "artist": {},
    "celebrity": {"gamma": 0.9},
    "nudity": {"gamma": 0.5, "concept_spectral": True, "concept_a": 200.0, "concept_rank": 16, "concept_weights_over": "all",
               "neighbor_rank": 1, "drop_start_row": True, "live_floor": 14.0, "gate_threshold": 0.01, "scrub": "binary"},
}


def setting_help(name: str, with_range: bool = True) -> str:
    """The one description of NLCE setting ``name`` (with its range or choices), as every host shows it."""
    return describe(NlceConfig, name, with_range)


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
    """Every setting against its described range or choices (NlceError naming the first that is off)."""
    for f in dataclasses.fields(c):
        value, m = getattr(c, f.name), f.metadata
        if m["choices"] and value not in m["choices"]:
            raise NlceError(f"unknown NLCE {f.name} {value!r}; choose one of {', '.join(m['choices'])}")
        if value is None or isinstance(value, (bool, str)) or (m["lo"] is None and m["hi"] is None):
            continue
        lo = -math.inf if m["lo"] is None else m["lo"]
        hi = math.inf if m["hi"] is None else m["hi"]
        ok = (lo < value < hi) if m["open"] else (lo <= value <= hi)
        if not ok:
            raise NlceError(f"NLCE {f.name} = {value:g} is out of range: {setting_help(f.name)}")
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
