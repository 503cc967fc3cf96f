"""Train Erasure Patch: HiRM on the CLIP's own CLIP-L."""

from __future__ import annotations

from comfy_api.latest import io

from . import core, host
from .types import CATEGORY, ErasurePatch


class TrainErasurePatch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HirmTrainErasurePatch", display_name="Train Erasure Patch (HiRM)", category=CATEGORY,
            description="Train a HiRM patch that erases concepts from the CLIP-L text encoder (SD1.x, SDXL, Flux). "
                        "The input CLIP is not changed; connect the patch to Apply Encoder Patch.",
            inputs=[
                io.Clip.Input("clip"),
                io.String.Input("concepts", multiline=True, default="Van Gogh", tooltip="one concept per line (or comma-separated)"),
                io.Combo.Input("method", options=list(core.hirm.METHODS), default="random",
                               tooltip="random (HiRM-R, default), random-gaussian, superordinate (needs an anchor), safety (nudity)"),
                io.String.Input("anchor", default="", tooltip="superordinate method: the broader concept, e.g. painting, building"),
                io.Combo.Input("preset", options=sorted(core.hirm.PRESETS), default="style",
                               tooltip="paper learning rate / steps: style, object, nudity"),
                io.Int.Input("steps", default=0, min=0, max=10000, tooltip="0: from the preset"),
                io.Float.Input("learning_rate", default=0.0, min=0.0, max=1.0, step=1e-6, round=1e-7, tooltip="0: from the preset"),
                # no "randomize after run" widget (the UI adds one to any input named seed): a new seed would retrain
                io.Int.Input("seed", default=42, min=0, max=2**31 - 1, control_after_generate=False),
            ],
            outputs=[ErasurePatch.Output(display_name="ERASURE_PATCH"), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, clip, concepts, method, anchor, preset, steps, learning_rate, seed) -> io.NodeOutput:
        config = core.hirm.make_config(core.common.split_list(concepts, "concept"), method=method, anchor=anchor.strip() or None,
                                       preset=preset, steps=steps or None, lr=learning_rate or None, seed=seed)
        weights = core.patcher.encoder_weights(host.clip_state_dict(clip))
        patch = core.hosting.train_on_weights(weights, config, device=host.compute_device(), progress=host.progress_callback(),
                                              should_cancel=host.check_interrupted)
        return io.NodeOutput(patch, core.report.format_report(patch.report))
