"""Train Erasure Patch (HiRM): the CLIP's own CLIP-L in, an erasure patch and its report out."""

from __future__ import annotations

from comfy_api.latest import io, ui

from . import core, host
from .types import CATEGORY, ErasurePatch

h = core.hirm.config.setting_help


class TrainErasurePatch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HirmTrainErasurePatch", display_name="Train Erasure Patch (HiRM)", category=CATEGORY,
            description="Train a HiRM erasure patch for this CLIP's text encoders: CLIP-L (SD1.x, Flux), or CLIP-L and "
                        "CLIP-G together in one patch (SDXL). Only each encoder's first block changes. The input CLIP is not "
                        "changed; connect the patch to Apply Erasure Patch, Save Erasure Patch, or both. The text-level report "
                        "(on SDXL: of what its UNet reads) shows on the node.",
            inputs=[
                io.Clip.Input("clip", tooltip="the CLIP whose CLIP-L (and CLIP-G on SDXL) is trained on (its LoRAs and patches "
                                              "included)"),
                io.String.Input("concepts", multiline=True, default="Van Gogh",
                                tooltip=h("concepts", False) + "; one per line (or comma-separated)"),
                io.Combo.Input("method", options=list(core.hirm.METHODS), default="random", tooltip=h("method", False)),
                io.String.Input("anchor", default="", tooltip=h("anchor", False) + " (superordinate method only)"),
                io.Combo.Input("preset", options=sorted(core.hirm.PRESETS), default="style", tooltip=h("preset")),
                io.Boolean.Input("schedule", default=True, label_on="from the preset", label_off="custom steps and rate",
                                 tooltip="train with the preset's steps and learning rate, or with the two values below"),
                io.Int.Input("steps", default=40, min=1, max=100000, tooltip=h("steps") + " (used when the schedule is custom)"),
                io.Float.Input("learning_rate", default=5e-5, min=1e-9, max=1.0, step=1e-6, round=1e-9,
                               tooltip=h("lr") + " (used when the schedule is custom)"),
                # no "randomize after run" widget (the UI adds one to any input named seed): a new seed would retrain
                io.Int.Input("seed", default=42, min=0, max=2**63 - 1, control_after_generate=False, tooltip=h("seed")),
            ],
            outputs=[ErasurePatch.Output(display_name="ERASURE_PATCH", tooltip="the trained patch (also kept in memory: the "
                                         "same CLIP and settings do not retrain)"),
                     io.String.Output(display_name="report", tooltip="the text-level report: how far the concept moved, "
                                      "how little everything else did")],
        )

    @classmethod
    def execute(cls, clip, concepts, method, anchor, preset, schedule, steps, learning_rate, seed) -> io.NodeOutput:
        config = core.hirm.make_config(core.common.split_list(concepts, "concept"), method=method, anchor=anchor.strip() or None,
                                       preset=preset, steps=None if schedule else steps, lr=None if schedule else learning_rate,
                                       seed=seed)
        encoders = core.patcher.model_encoders(host.clip_state_dict(clip))
        patch = core.hosting.train_on_encoders(encoders, config, device=host.compute_device(), progress=host.progress_callback(),
                                               should_cancel=host.check_interrupted)
        text = patch.describe() + "\n" + core.report.format_report(patch.report)
        host.log.info("[hirm] %s", patch.describe())
        return io.NodeOutput(patch, text, ui=ui.PreviewText(text))
