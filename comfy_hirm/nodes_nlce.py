"""NLCE Gate: MODEL + CLIP -> MODEL erasing concepts in cross-attention at sampling time (no training)."""

from __future__ import annotations

from comfy_api.latest import io

from . import core, host
from .types import CATEGORY


class NlceGate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HirmNlceGate", display_name="NLCE Gate", category=CATEGORY,
            description="Training-free erasure inside the UNet's cross-attention (SD1.x). The input MODEL is not changed.",
            inputs=[
                io.Model.Input("model"), io.Clip.Input("clip"),
                io.String.Input("concepts", multiline=True, default="Van Gogh", tooltip="one per line (or comma-separated)"),
                io.String.Input("neighbors", multiline=True, default="auto",
                                tooltip="concepts to keep intact, one per line; 'auto' mines them offline; empty: none"),
                io.Combo.Input("preset", options=list(core.nlce.NLCE_PRESETS), default="object"),
                io.Float.Input("beta", default=1.0, min=0.0, max=1.5, step=0.05),
                io.Float.Input("gamma", default=-1.0, min=-1.0, max=1.5, step=0.05, tooltip="-1: from the preset"),
                io.Combo.Input("suppression", options=["mask", "scale"], default="mask"),
                io.Combo.Input("schedule", options=["single-pass", "faithful"], default="single-pass",
                               tooltip="single-pass: about vanilla cost; faithful: the reference schedule, 2x cost"),
            ],
            outputs=[io.Model.Output(), io.String.Output(display_name="neighbors")],
        )

    @classmethod
    def execute(cls, model, clip, concepts, neighbors, preset, beta, gamma, suppression, schedule) -> io.NodeOutput:
        config = core.nlce.make_nlce_config(preset, beta=beta, gamma=None if gamma < 0 else gamma, suppression=suppression,
                                            schedule=schedule)
        weights = core.patcher.encoder_weights(host.clip_state_dict(clip))
        concept_set = core.hosting.concept_set_for(weights, core.common.split_list(concepts, "concept"), neighbors, config,
                                                   device=host.compute_device())
        patched, _ = core.patcher.install_nlce(model, concept_set, config, model.get_model_object("model_sampling").timestep)
        return io.NodeOutput(patched, "\n".join(f"{c}: {', '.join(ns) or '(none)'}" for c, ns in concept_set.neighbors.items()))
