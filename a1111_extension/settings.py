"""What the Erasure accordion asks for, as one frozen value: from the widgets, to and from the infotext.

A1111 hands an AlwaysVisible script the values of its ``ui()`` components positionally; the
order is ``UI_ARGS``. API callers pass in ``alwayson_scripts["Erasure"]["args"]`` either that list
(shorter lists and ``null`` entries take the defaults, ``UI_DEFAULTS``) or one object with names
from ``UI_ARGS`` (``[{"patch_1": "cat.safetensors", "strength_1": 0.8}]``; "enabled" then defaults
to true).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shared_core import nlce
from shared_core.common import check_strength, split_list
from shared_core.errors import HirmError, NlceError

MAX_PATCHES = 3
NO_PATCH = "None"
SCHEDULES = ("single-pass", "faithful")
UI_ARGS = ("enabled", *[f"{k}_{i}" for i in range(1, MAX_PATCHES + 1) for k in ("patch", "strength")],
           "nlce", "concepts", "neighbors", "preset", "beta", "gamma", "schedule")
UI_DEFAULTS = {"enabled": False, **{k: v for i in range(1, MAX_PATCHES + 1) for k, v in ((f"patch_{i}", NO_PATCH),
                                                                                   (f"strength_{i}", 1.0))},
               "nlce": False, "concepts": "", "neighbors": "auto", "preset": "object", "beta": 1.0, "gamma": None,
               "schedule": SCHEDULES[0]}  # gamma None: the preset's

# infotext keys (A1111 quotes values that hold commas or colons)
PATCHES_KEY = "Erasure patches"
NLCE_KEY = "Erasure NLCE"
NLCE_KEYS = {"neighbors": "Erasure NLCE neighbors", "preset": "Erasure NLCE preset", "beta": "Erasure NLCE beta",
             "gamma": "Erasure NLCE gamma", "schedule": "Erasure NLCE schedule"}


def _number(value, what: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise HirmError(f"{what} must be a number, got {value!r}") from None
    if x != x or x in (float("inf"), float("-inf")):
        raise HirmError(f"{what} must be a finite number, got {value!r}")
    return x


@dataclass(frozen=True)
class ErasureSettings:
    """Patches to apply (file name relative to models/erasure_patches, strength) and NLCE settings."""

    patches: tuple[tuple[str, float], ...] = ()
    nlce: bool = False
    concepts: tuple[str, ...] = ()
    neighbors: str = ""        # "auto" (mined), a list ("a, b"), or "" (none)
    preset: str = "object"
    beta: float = 1.0
    gamma: float | None = None  # None: the preset's
    schedule: str = "single-pass"

    @property
    def active(self) -> bool:
        return bool(self.patches) or self.nlce

    @classmethod
    def from_args(cls, args, overrides: dict | None = None) -> "ErasureSettings":
        """From the accordion's values (see the module doc for the API forms); a disabled accordion gives inactive
        settings. ``overrides`` (X/Y/Z plot axis values by ``UI_ARGS`` name) go over them and turn erasure on."""
        values = widget_values(args)
        if overrides:
            values.update(overrides, enabled=True)
        if not values["enabled"]:
            return cls()
        patches = []
        for i in range(1, MAX_PATCHES + 1):
            name = (values[f"patch_{i}"] or "").strip()
            if name and name != NO_PATCH:
                strength = check_strength(values[f"strength_{i}"], f"strength of erasure patch {i}")
                if strength != 0.0:
                    patches.append((name, strength))
        return cls.build(patches=patches, nlce=bool(values["nlce"]), concepts=values["concepts"],
                         neighbors=values["neighbors"], preset=values["preset"], beta=values["beta"],
                         gamma=values["gamma"], schedule=values["schedule"])

    @classmethod
    def build(cls, *, patches=(), nlce=False, concepts="", neighbors="", preset="object", beta=1.0, gamma=None,
              schedule="single-pass") -> "ErasureSettings":
        """Checked settings; every problem is one HirmError line."""
        concept_list = tuple(split_list(concepts) if isinstance(concepts, str) else [c.strip() for c in concepts if c.strip()])
        if not nlce:  # NLCE widgets are ignored while NLCE is off
            return cls(patches=tuple(patches))
        if not concept_list:
            raise NlceError("NLCE is on but no concept is given: type the concepts to erase (one per line) or turn NLCE off")
        neighbors = (neighbors or "").strip()
        neighbors = "auto" if neighbors.lower() == "auto" else ", ".join(split_list(neighbors))
        if schedule not in SCHEDULES:
            raise NlceError(f"unknown NLCE schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
        gamma = None if gamma is None or gamma == "" else _number(gamma, "NLCE gamma")
        settings = cls(patches=tuple(patches), nlce=True, concepts=concept_list, neighbors=neighbors, preset=preset,
                       beta=_number(beta, "NLCE beta"), gamma=gamma, schedule=schedule)
        settings.nlce_config()  # range checks (beta, gamma, preset) now, before any job starts
        return settings

    def nlce_config(self):
        return nlce.make_nlce_config(self.preset, beta=self.beta, gamma=self.gamma, schedule=self.schedule)

    # -- infotext ------------------------------------------------------------------------------

    def infotext(self) -> dict[str, str]:
        """Generation parameters written into the PNG info (what "send to txt2img" reads back)."""
        out = {}
        if self.patches:
            out[PATCHES_KEY] = ", ".join(f"{name}:{strength:g}" for name, strength in self.patches)
        if self.nlce:
            config = self.nlce_config()
            out[NLCE_KEY] = ", ".join(self.concepts)
            if self.neighbors:
                out[NLCE_KEYS["neighbors"]] = self.neighbors
            out[NLCE_KEYS["preset"]] = self.preset
            out[NLCE_KEYS["beta"]] = f"{config.beta:g}"
            out[NLCE_KEYS["gamma"]] = f"{config.gamma:g}"
            out[NLCE_KEYS["schedule"]] = self.schedule
        return out

    @classmethod
    def from_infotext(cls, params: dict) -> "ErasureSettings":
        """The settings an infotext describes (parsed A1111 generation parameters)."""
        patches = parse_patch_list(params.get(PATCHES_KEY, ""))
        if NLCE_KEY not in params:
            return cls.build(patches=patches)
        get = lambda k, default: params.get(NLCE_KEYS[k], default)  # noqa: E731
        return cls.build(patches=patches, nlce=True, concepts=params[NLCE_KEY], neighbors=get("neighbors", ""),
                         preset=get("preset", "object"), beta=get("beta", 1.0), gamma=get("gamma", None),
                         schedule=get("schedule", "single-pass"))


def widget_values(args) -> dict:
    """``UI_ARGS`` name -> value from the script's arguments: the positional list (shorter, or with None where
    Forge fills in a widget without a default, both take ``UI_DEFAULTS``) or one mapping of names."""
    args = list(args)
    if args and isinstance(args[0], Mapping):  # the webui fills the rest of the list with the widgets' values: ignored
        unknown = sorted(set(args[0]) - set(UI_ARGS))
        if unknown:
            raise HirmError(f"the Erasure script has no argument {', '.join(map(repr, unknown))}; its names are "
                            f"{', '.join(UI_ARGS)}")
        return {**UI_DEFAULTS, "enabled": True, **{k: v for k, v in args[0].items() if v is not None}}
    if len(args) > len(UI_ARGS):
        raise HirmError(f"the Erasure script takes at most {len(UI_ARGS)} arguments ({', '.join(UI_ARGS)}), got {len(args)}")
    return {**UI_DEFAULTS, **{k: v for k, v in zip(UI_ARGS, args) if v is not None}}


def parse_patch_list(text: str) -> list[tuple[str, float]]:
    """``"a.safetensors:1, sub/b.safetensors:0.8"`` -> [(name, strength), ...]."""
    out = []
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, strength = item.rpartition(":")
        if not sep or not name.strip():
            raise HirmError(f"cannot read erasure patch entry {item!r}; expected file:strength")
        out.append((name.strip(), check_strength(_number(strength, f"strength of {name.strip()}"), f"strength of {name.strip()}")))
    return out


def paste_values(params: dict) -> dict[str, object] | None:
    """Widget values (by ``UI_ARGS`` name) for a pasted infotext; None when it has no erasure settings.

    Fields missing from the infotext get their defaults, so pasting sets the whole accordion.
    """
    if PATCHES_KEY not in params and NLCE_KEY not in params:
        return None
    s = ErasureSettings.from_infotext(params)
    values: dict[str, object] = {"enabled": True, "nlce": s.nlce, "concepts": "\n".join(s.concepts),
                                 "neighbors": s.neighbors, "preset": s.preset, "beta": s.beta,
                                 "gamma": (s.nlce_config() if s.nlce else nlce.make_nlce_config()).gamma, "schedule": s.schedule}
    for i in range(1, MAX_PATCHES + 1):
        name, strength = s.patches[i - 1] if i <= len(s.patches) else (NO_PATCH, 1.0)
        values[f"patch_{i}"], values[f"strength_{i}"] = name, strength
    return values
