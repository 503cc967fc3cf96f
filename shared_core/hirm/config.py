"""HiRM settings: one frozen dataclass, named presets with the paper's numbers."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..common import check_text, describe, setting
from ..errors import HirmError

from .methods import METHODS as METHOD_TABLE, PRESET_LR, SUPERVISION_POINTS

METHODS = tuple(METHOD_TABLE)
MULTI_MODES = ("joint", "average")
# Paper numbers (lr, steps per method), from the methods table. random-gaussian follows random; safety follows
# superordinate (both anchored on the original encoder's own representation).
PRESETS = {preset: (lr, {m.name: m.steps[preset] for m in METHOD_TABLE.values()}) for preset, lr in PRESET_LR.items()}
DEFAULT_SCALE = {m.name: m.scale for m in METHOD_TABLE.values()}
# The keywords that form the single nudity prompt (SPEC: multi-keyword concepts are one prompt).
NUDITY_KEYWORDS = "naked, nude, bare, exposed, topless, nsfw, unclothed, bare breasts, genitalia"


@dataclass(frozen=True)
class HirmConfig:
    """Everything that determines a HiRM patch; serialised into the patch metadata. Each field is described
    once (``setting_help``) for the CLI help, the ComfyUI tooltips and the A1111 labels."""

    concepts: tuple[str, ...] = setting((), "the concepts to erase, e.g. 'Van Gogh'; 'nudity' stands for the nudity keyword prompt")
    method: str = setting("random", "misdirection target: " + ", ".join(f"{m.name} ({m.help})" for m in METHOD_TABLE.values()),
                          choices=METHODS)
    preset: str = setting("style", "the paper's learning rate and steps for a kind of concept", choices=tuple(PRESETS))
    lr: float = setting(5e-5, "AdamW learning rate (when not given: the preset's, raised for several concepts trained "
                               "together with the preservation term)", lo=1e-9, hi=1.0)
    steps: int = setting(40, "training steps, one AdamW update each (from the preset when not given)", lo=1, hi=100000)
    seed: int = setting(42, "seed of the random target (42: the reference code's)", lo=0)
    anchor: str = setting("", "superordinate method: the broader concept the target moves to, e.g. 'painting' for an artist")
    trainable_layers: tuple[int, ...] = setting((0,), "the encoder layers that are trained (HiRM trains the first one)")
    supervision: str = setting("attn_out", "where the loss is measured in the last layer", choices=SUPERVISION_POINTS)
    target_scale: float = setting(5000.0, "scale c of the target (5000 random, 500 random-gaussian, 1 otherwise)", lo=0.0,
                                  open_range=True)
    eta: float = setting(1.0, "safety method: how far the concept vector is subtracted")
    templates: tuple[str, ...] = setting((), "prompt templates with {} for the concept (default: the bare concept)")
    multi: str = setting("joint", "several concepts: one joint patch, or the average of one patch per concept",
                         choices=MULTI_MODES)
    neighbors: tuple[str, ...] = setting((), "neighbour concepts measured in the report (default: a list per preset)")
    pairs: tuple[tuple[str, str], ...] = setting((), "safety method: prompt pairs with and without the concept")
    preserve: tuple[str, ...] = setting((), "prompts to keep unchanged besides the shipped ones (several concepts: the "
                                        "preservation term)")
    preservation: float | None = setting(None, "weight of the preservation term, against the first step's misdirection loss: "
                                         "0 turns it off; none: off for one concept (the authors' exact HiRM), 0.003 for "
                                         "several", lo=0.0, hi=1000.0)
    batch_prompts: int = setting(8, "prompts per forward and backward pass (a step's prompts go through in batches of "
                                 "this size: memory does not grow with the list)", lo=1, hi=4096)
    step_prompts: int = setting(16, "several concepts: prompts of the list each step trains (the next ones of a seeded "
                                "shuffle, raised so that the steps go through every prompt; 0: every prompt at every step). "
                                "Time grows with this, not with the list", lo=0, hi=100000)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["pairs"] = [list(p) for p in self.pairs]
        return d


def setting_help(name: str, with_range: bool = True) -> str:
    """The one description of HiRM setting ``name``, as the CLI, ComfyUI and A1111 show it."""
    return describe(HirmConfig, name, with_range)


def make_config(concepts, *, method: str = "random", preset: str | None = None, steps: int | None = None,
                lr: float | None = None, anchor: str | None = None, **settings) -> HirmConfig:
    """Build a checked ``HirmConfig``: the preset fills lr/steps that are not given.

    Raises ``HirmError`` with a one-line message for any bad value.
    """
    if isinstance(concepts, str):
        concepts = [concepts]
    if not all(isinstance(c, str) for c in concepts):
        raise HirmError("concepts must be texts, e.g. 'Van Gogh'")
    for c in concepts:
        check_text(c, "concept")
    for key in ("neighbors", "templates", "preserve"):
        for t in settings.get(key) or ():
            check_text(t, key[:-1].replace("neighbor", "neighbour"))
    for a, b in settings.get("pairs") or ():
        check_text(a, "pair prompt"), check_text(b, "pair prompt")
    if anchor:
        check_text(anchor, "anchor")
    concepts = tuple(" ".join(c.split()) for c in concepts)
    # "nudity" is shorthand for the keyword prompt (SPEC: a multi-keyword concept is one prompt)
    concepts = tuple(NUDITY_KEYWORDS if c.lower() == "nudity" else c for c in concepts)
    if not concepts or any(not c for c in concepts):
        raise HirmError("empty concept: give the concept to erase, e.g. 'Van Gogh'")
    from ..tokenizer import clip_tokenizer

    for c in concepts:  # here, before any model is read (a list's 1,000th concept as much as its first)
        n = len(clip_tokenizer()(c, add_special_tokens=False, verbose=False)["input_ids"])
        if n > 75:
            raise HirmError(f"concept {c[:40]!r}... is {n} tokens; CLIP reads at most 75: shorten it")
    if method not in METHODS:
        raise HirmError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    preset = preset or ("nudity" if method == "safety" else "style")
    if preset not in PRESETS:
        raise HirmError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    anchor = (anchor or "").strip()
    for name, missing in METHOD_TABLE[method].needs:
        if not {"anchor": anchor}.get(name, settings.get(name)):
            raise HirmError(missing)
    p_lr, p_steps = PRESETS[preset]
    together = settings.get("multi", "joint") == "joint" and settings.get("preservation") != 0  # held by preservation
    lr = p_lr * list_lr_factor(len(concepts) if together else 1) if lr is None else float(lr)
    steps = p_steps[method] if steps is None else int(steps)
    if not (math.isfinite(lr) and 1e-9 <= lr < 1):
        raise HirmError(f"learning rate must be from 1e-9 to below 1 (the presets use 5e-5 and 1e-4), got {lr:g}")
    if not 1 <= steps <= 100000:
        raise HirmError(f"steps must be between 1 and 100000, got {steps}")
    settings.setdefault("target_scale", DEFAULT_SCALE[method])
    if settings.get("target_scale") is None:
        settings["target_scale"] = DEFAULT_SCALE[method]
    for key in ("trainable_layers", "templates", "neighbors", "preserve"):
        if key in settings and settings[key] is not None:
            settings[key] = tuple(settings[key])
        elif key in settings:
            del settings[key]
    if "pairs" in settings:
        settings["pairs"] = tuple((str(a), str(b)) for a, b in settings["pairs"] or ())
    cfg = HirmConfig(concepts=concepts, method=method, preset=preset, lr=lr, steps=steps, anchor=anchor, **settings)
    if cfg.supervision not in SUPERVISION_POINTS:
        raise HirmError(f"unknown supervision point {cfg.supervision!r}; choose one of {', '.join(SUPERVISION_POINTS)}")
    if cfg.multi not in MULTI_MODES:
        raise HirmError(f"unknown multi-concept mode {cfg.multi!r}; choose joint or average")
    if not cfg.trainable_layers:
        raise HirmError("trainable_layers is empty; the default is [0]")
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in cfg.trainable_layers):
        raise HirmError(f"trainable layers must be whole numbers, got {list(cfg.trainable_layers)}")
    if len(set(cfg.trainable_layers)) != len(cfg.trainable_layers):
        raise HirmError(f"a trainable layer is given twice ({list(cfg.trainable_layers)}); give each layer once")
    if not (isinstance(cfg.seed, int) and not isinstance(cfg.seed, bool) and 0 <= cfg.seed < 2**63):
        raise HirmError(f"seed must be a whole number from 0 to 2^63-1, got {cfg.seed!r}")
    for t in cfg.templates:
        if not isinstance(t, str) or t.count("{}") != 1 or t.replace("{}", "").count("{") or t.replace("{}", "").count("}"):
            raise HirmError(f"template {t!r} must hold exactly one '{{}}' where the concept goes, and no other braces")
    if not (math.isfinite(cfg.target_scale) and cfg.target_scale > 0) or not math.isfinite(cfg.eta):
        raise HirmError("target scale must be a positive number and eta a finite number")
    if cfg.preservation is not None and not (isinstance(cfg.preservation, (int, float)) and not isinstance(cfg.preservation, bool)
                                             and math.isfinite(cfg.preservation) and 0 <= cfg.preservation <= 1000):
        raise HirmError(f"the preservation weight must be a number from 0 to 1000 (0: off), got {cfg.preservation!r}")
    _check_count(cfg, "batch_prompts", "prompts per batch")
    _check_count(cfg, "step_prompts", "prompts per step", " (all)")
    if len(set(c.lower() for c in cfg.concepts)) != len(cfg.concepts):
        seen = set()
        twice = next(c for c in cfg.concepts if c.lower() in seen or seen.add(c.lower()))
        raise HirmError(f"concept {twice!r} is given twice; give each concept once")
    return cfg


def _check_count(cfg: HirmConfig, name: str, what: str, zero: str = "") -> None:
    """A whole-number setting within the range its field describes (the CLI help says the same range), or HirmError."""
    value, m = getattr(cfg, name), next(f.metadata for f in dataclasses.fields(cfg) if f.name == name)
    if not (isinstance(value, int) and not isinstance(value, bool) and m["lo"] <= value <= m["hi"]):
        raise HirmError(f"{what} must be a whole number from {m['lo']}{zero} to {m['hi']}, "
                        f"got {value!r}")


# bench/bench_proxy.py: at n ** 0.4 the mean target displacement of 10 concepts trained together is that of each erased
# alone (0.625 vs 0.620); measured up to 100 concepts, so the factor stops there.
LIST_LR_EXPONENT = 0.4
LIST_LR_CAP = 100


def list_lr_factor(n_concepts: int) -> float:
    """How much the preset's learning rate is raised for ``n_concepts`` trained together (1 for one concept: the authors'
    HiRM). Each AdamW step moves the weights about as far whatever the list's length, and that move is shared by the
    concepts; raising the rate with the list gives each concept about the displacement it gets alone
    (docs/hirm-lists.md). Only with the preservation term on: without it, at 100 concepts, this rate moves everything
    (bench/bench_proxy.py: non-target drift 5.6x a single concept's)."""
    return float(min(n_concepts, LIST_LR_CAP) ** LIST_LR_EXPONENT)


def step_prompt_count(config: HirmConfig, trained_together: int, prompts: int) -> int:
    """How many of the ``prompts`` one step trains: all of them for one concept (the authors' step) and with
    ``step_prompts`` 0; else ``step_prompts``, raised to ``ceil(prompts / steps)`` so that the steps go through every
    prompt at least once, and at most all of them (docs/hirm-lists.md)."""
    if trained_together == 1 or not config.step_prompts:
        return prompts
    return min(prompts, max(config.step_prompts, -(-prompts // config.steps)))


# bench/bench_proxy.py: holding 4 retain prompts a step instead of a whole batch of 8 kept non-target drift where it was
# at 10, 100 and 1,000 concepts (1.17x / 1.34x / 1.39x a single concept's; docs/hirm-lists.md) and made a list's step a
# sixth to a quarter faster
RETAIN_BATCH = 4


def preservation_weight(config: HirmConfig, trained_together: int | None = None) -> float:
    """The preservation term's weight: as set, else 0 where one concept is trained at a time (the authors' HiRM
    exactly, and each patch ``multi="average"`` averages) and ``DEFAULT_PRESERVATION`` where several are trained
    together."""
    if config.preservation is not None:
        return float(config.preservation)
    return 0.0 if (trained_together or len(config.concepts)) == 1 else DEFAULT_PRESERVATION


DEFAULT_PRESERVATION = 0.003  # bench/bench_proxy.py: non-target drift back to a single concept's at 10 and 100 concepts
