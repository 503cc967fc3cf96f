"""The HiRM misdirection methods, in one table: name -> target function, default target scale, steps per preset and
the settings it needs. Adding a method is one entry here (its target function beside it); ``config`` and the hosts
read the names, scales and steps from the table, and an entry without steps for every preset fails at import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from typing import Callable

import torch

from ..encoders import encoder_layers
from ..textenc import tokenize

SUPERVISION_POINTS = ("attn_out", "mlp_out", "residual", "final_norm")
PRESET_LR = {"style": 5e-5, "object": 5e-5, "nudity": 1e-4}  # the paper's learning rate per kind of concept


class _Reached(Exception):
    """Raised by the supervision hook to skip the rest of the forward pass."""


def supervised_output(model, input_ids: torch.Tensor, point: str) -> torch.Tensor:
    """The supervised representation (batch, tokens, width) with the graph kept for backward."""
    if point == "final_norm":
        return model(input_ids=input_ids).last_hidden_state
    last = encoder_layers(model)[-1]
    module = {"attn_out": last.self_attn.out_proj, "mlp_out": last.mlp, "residual": last}[point]
    captured = {}

    def hook(_mod, _inp, out):
        captured["h"] = out[0] if isinstance(out, tuple) else out
        raise _Reached

    handle = module.register_forward_hook(hook)
    try:
        model(input_ids=input_ids)
    except _Reached:
        pass
    finally:
        handle.remove()
    return captured["h"]


def nudity_pairs() -> list[tuple[str, str]]:
    core = __package__.rsplit(".", 1)[0]  # "shared_core", or "<pack>.shared_core" inside ComfyUI
    text = resources.files(core).joinpath("data/nudity_pairs.tsv").read_text(encoding="utf-8")
    return [tuple(ln.split("\t")) for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


# Targets (n_prompts, tokens, width) for the prompts of one concept, from the ORIGINAL encoder. Random targets depend on
# the seed only: every concept is sent to the same random point, so a patch averaged from single-concept patches equals
# delta averaging by hand.

def _random(model, tokenizer, config, prompt_ids):  # reference code: one uniform tensor, unit Frobenius norm, times c
    tokens = prompt_ids.shape[1]
    t = torch.rand(tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(config.seed))
    return (t / t.norm() * config.target_scale)[None]  # one target for every prompt: broadcast, not copied


def _random_gaussian(model, tokenizer, config, prompt_ids):  # paper: a Gaussian direction per token, times c
    tokens = prompt_ids.shape[1]
    t = torch.randn(tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(config.seed))
    return (t / t.norm(dim=-1, keepdim=True) * config.target_scale)[None]


def _superordinate(model, tokenizer, config, prompt_ids):  # c times the original encoder's output for the anchor
    tokens = prompt_ids.shape[1]
    anchor_ids = tokenize(tokenizer, [config.anchor], tokens, what="anchor").to(prompt_ids.device)
    s = supervised_output(model, anchor_ids, config.supervision).float()
    return config.target_scale * s


def _safety(model, tokenizer, config, prompt_ids):  # t = s(p) - eta * v, v = mean over pairs of s(with) - s(without)
    tokens, device = prompt_ids.shape[1], prompt_ids.device
    pairs = list(config.pairs) or nudity_pairs()
    with_ids = tokenize(tokenizer, [a for a, _ in pairs], tokens, what="pair prompt").to(device)
    without_ids = tokenize(tokenizer, [b for _, b in pairs], tokens, what="pair prompt").to(device)
    v = (supervised_output(model, with_ids, config.supervision).float()
         - supervised_output(model, without_ids, config.supervision).float()).mean(0)
    return supervised_output(model, prompt_ids, config.supervision).float() - config.eta * v


@dataclass(frozen=True)
class Method:
    name: str
    help: str
    target: Callable       # (model, tokenizer, config, prompt ids) -> targets (n, tokens, width)
    scale: float           # the target scale c it uses unless told otherwise
    steps: dict = field(default_factory=dict)  # preset -> training steps (the paper's numbers)
    needs: tuple = ()      # settings it cannot run without, with what to say when missing


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("random", "HiRM-R, the reference code's target", _random, 5000.0, {"style": 40, "object": 25, "nudity": 50}),
    Method("random-gaussian", "the paper's formula", _random_gaussian, 500.0, {"style": 40, "object": 25, "nudity": 50}),
    Method("superordinate", "HiRM-S: towards an anchor", _superordinate, 1.0, {"style": 30, "object": 15, "nudity": 25},
           (("anchor", "the superordinate method needs an anchor: the broader concept to move to, e.g. 'painting' for an "
                       "artist or 'building' for 'church'"),)),
    Method("safety", "nudity: away from a concept vector", _safety, 1.0, {"style": 30, "object": 15, "nudity": 25}),
)}

for _m in METHODS.values():  # an incomplete entry fails here, at import, not as a silent fallback while training
    if set(_m.steps) != set(PRESET_LR) or not callable(_m.target) or not _m.scale > 0:
        raise ImportError(f"HiRM method {_m.name!r} needs a target function, a positive scale and steps for every preset "
                          f"({', '.join(PRESET_LR)})")


def misdirection_targets(model, tokenizer, config, prompt_ids: torch.Tensor) -> torch.Tensor:
    """Targets for ``prompt_ids`` (n_prompts, tokens, width), or (1, tokens, width) where every prompt has the same
    target (it broadcasts): ``config.method``'s target function."""
    with torch.no_grad():
        return METHODS[config.method].target(model, tokenizer, config, prompt_ids)
