"""Apply Erasure Patch: CLIP + ERASURE_PATCH -> a patched CLIP clone (the input is never changed)."""

from __future__ import annotations

from comfy_api.latest import io

from . import core, host
from .types import CATEGORY, ErasurePatch


class ApplyEncoderPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        lo, hi = core.common.STRENGTH_RANGE
        return io.Schema(
            node_id="HirmApplyEncoderPatch", display_name="Apply Erasure Patch (HiRM)", category=CATEGORY,
            description="Add an erasure patch to the CLIP's clip_l (SD1.x, SDXL, Flux) and/or clip_g (SDXL), like a LoRA on "
                        "the text encoders: a patch trained on SDXL changes both. The input CLIP is not changed.",
            inputs=[io.Clip.Input("clip", tooltip="the CLIP to patch (a clone is patched)"),
                    ErasurePatch.Input("patch", tooltip="from Train, Load or Load from Hub"),
                    io.Float.Input("strength", default=1.0, min=lo, max=hi, step=0.05,
                                   tooltip=core.common.STRENGTH_HELP)],
            outputs=[io.Clip.Output(tooltip="the CLIP with the patch; connect it to CLIP Text Encode")],
        )

    @classmethod
    def execute(cls, clip, patch, strength) -> io.NodeOutput:
        strength = core.common.check_strength(strength)
        patches, notes = core.patcher.clip_patches(host.clip_state_dict(clip), patch)
        for note in notes:
            host.log.warning("[hirm] %s", note)
        patched = clip.clone()
        added = patched.add_patches(patches, strength)
        if len(added) != len(patches):
            raise core.PatchMismatchError("this CLIP did not accept every tensor of the patch; use a patch trained on its encoder")
        return io.NodeOutput(patched)
