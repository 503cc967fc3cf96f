"""Apply Encoder Patch: CLIP + ERASURE_PATCH -> patched CLIP clone (the input is never changed)."""

from __future__ import annotations

from comfy_api.latest import io

from . import core, host
from .types import CATEGORY, ErasurePatch


class ApplyEncoderPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HirmApplyEncoderPatch", display_name="Apply Encoder Patch", category=CATEGORY,
            description="Add an erasure patch to the CLIP's clip_l (SD1.x, SDXL, Flux) or clip_g (SDXL), like a LoRA.",
            inputs=[io.Clip.Input("clip"), ErasurePatch.Input("patch"),
                    io.Float.Input("strength", default=1.0, min=-2.0, max=2.0, step=0.05)],
            outputs=[io.Clip.Output()],
        )

    @classmethod
    def execute(cls, clip, patch, strength) -> io.NodeOutput:
        patches, warning = core.patcher.clip_patches(host.clip_state_dict(clip), patch)
        if warning:
            host.log.warning("[hirm] %s", warning)
        patched = clip.clone()
        added = patched.add_patches(patches, strength)
        if len(added) != len(patches):
            raise core.PatchMismatchError("this CLIP did not accept every tensor of the patch; use a patch trained on its encoder")
        return io.NodeOutput(patched)
