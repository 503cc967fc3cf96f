"""Every number and term list the methods' defaults and presets carry, pinned: a one-constant change anywhere fails here.

Where a value differs from the authors' code, docs/fidelity.md ("Defaults that differ") says so and why; change both
together. The golden tests (test_golden.py) check what the defaults compute; this file checks what they are.
"""

import dataclasses

import torch

from shared_core.hirm.config import DEFAULT_PRESERVATION, DEFAULT_SCALE, NUDITY_KEYWORDS, PRESETS, HirmConfig, make_config
from shared_core.hirm.methods import METHODS, SUPERVISION_POINTS
from shared_core.nlce import NLCE_PRESETS, NUDITY_TERMS, NlceConfig, make_nlce_config

HIRM_DEFAULTS = {"concepts": (), "method": "random", "preset": "style", "lr": 5e-05, "steps": 40, "seed": 42, "anchor": "",
                 "trainable_layers": (0,), "supervision": "attn_out", "target_scale": 5000.0, "eta": 1.0, "templates": (),
                 "multi": "joint", "neighbors": (), "pairs": (), "preserve": (), "preservation": None, "batch_prompts": 8,
                 "step_prompts": 16}
HIRM_PRESETS = {"style": (5e-05, {"random": 40, "random-gaussian": 40, "superordinate": 30, "safety": 30}),
                "object": (5e-05, {"random": 25, "random-gaussian": 25, "superordinate": 15, "safety": 15}),
                "nudity": (1e-04, {"random": 50, "random-gaussian": 50, "superordinate": 25, "safety": 25})}
NLCE_DEFAULTS = {"concept_spectral": False, "concept_a": 200.0, "concept_rank": None, "concept_weights_over": "all",
                 "neighbor_rank": 16, "neighbor_a": 100.0, "drop_start_row": False, "beta": 1.0, "gamma": 1.0, "live_ratio": 0.6,
                 "live_floor": 20.0, "gate_threshold": 0.025, "suppression": "mask", "scrub": "soft", "scrub_threshold": 0.01,
                 "stage1": True, "stage2": True, "stage3": True, "t_max": 900.0, "schedule": "single-pass"}
NLCE_PRESET_VALUES = {"object": {}, "artist": {}, "celebrity": {"gamma": 0.9},
                      "nudity": {"gamma": 0.5, "concept_spectral": True, "concept_a": 200.0, "concept_rank": 16,
                                 "concept_weights_over": "all", "neighbor_rank": 1, "drop_start_row": True, "live_floor": 14.0,
                                 "gate_threshold": 0.01, "scrub": "binary"}}


def test_hirm_defaults_presets_scales_and_the_nudity_prompt_are_pinned():
    assert {f.name: f.default for f in dataclasses.fields(HirmConfig)} == HIRM_DEFAULTS
    assert PRESETS == HIRM_PRESETS
    assert DEFAULT_SCALE == {"random": 5000.0, "random-gaussian": 500.0, "superordinate": 1.0, "safety": 1.0}
    assert list(METHODS) == ["random", "random-gaussian", "superordinate", "safety"]
    assert SUPERVISION_POINTS == ("attn_out", "mlp_out", "residual", "final_norm")
    assert NUDITY_KEYWORDS == "naked, nude, bare, exposed, topless, nsfw, unclothed, bare breasts, genitalia"
    assert DEFAULT_PRESERVATION == 0.003
    safety = make_config(["nudity"], method="safety")
    assert (safety.preset, safety.lr, safety.steps, safety.eta, safety.concepts) == ("nudity", 1e-4, 25, 1.0, (NUDITY_KEYWORDS,))


def test_the_optimiser_is_the_references():
    import inspect

    from shared_core.hirm import train

    source = inspect.getsource(train.train_deltas)
    assert "torch.optim.AdamW(trainable, lr=config.lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=1e-8" in source


def test_nlce_defaults_presets_and_the_nudity_terms_are_pinned():
    assert NlceConfig().to_dict() == NLCE_DEFAULTS
    assert NLCE_PRESETS == NLCE_PRESET_VALUES
    assert NUDITY_TERMS == ("naked", "nude", "nudity", "topless", "bottomless", "undressed", "unclothed", "bare skin",
                            "no clothes", "nude model", "naked body", "erotic", "explicit", "nsfw", "bare chest", "skinny dipping")
    nudity = make_nlce_config("nudity")
    assert (nudity.live_floor, nudity.gate_threshold, nudity.scrub_threshold, nudity.live_ratio) == (14.0, 0.01, 0.01, 0.6)


def test_the_single_pass_gate_carries_to_the_next_step_of_a_run_only():
    """The carry-over rule itself (its numbers: none; its behaviour: the previous real pass of the same layout, at a
    strictly lower timestep); test_nlce.py checks the gate it applies."""
    from shared_core.nlce.session import NlceSession
    from shared_core.nlce import build_concept_set

    rows = torch.zeros(3, 6)
    rows[0, 0] = 30.0
    session = NlceSession(build_concept_set(lambda texts: [rows for _ in texts], ["cat"]), make_nlce_config())
    carried = []
    for t in (800.0, 700.0, 700.0, 900.0):
        p = session.begin(t, key="k", batch=1, gating_shape=(2, 2), device="cpu")
        p.carry.buffer[:4] = 1.0  # what a gating layer left
        carried.append(float(p.previous.sum()))
    assert carried == [0.0, 4.0, 0.0, 4.0 * 0]  # first pass; next step; the same timestep again; a new run
