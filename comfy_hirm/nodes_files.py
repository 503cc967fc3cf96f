"""Save / Load Erasure Patch (models/erasure_patches) and Load Erasure Patch from Hub."""

from __future__ import annotations

import os

from comfy_api.latest import io

from . import core, host
from .types import CATEGORY, ErasurePatch


class SaveErasurePatch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HirmSaveErasurePatch", display_name="Save Erasure Patch", category=CATEGORY, is_output_node=True,
            description="Write the patch into models/erasure_patches (atomically; an existing file is replaced only when complete).",
            inputs=[ErasurePatch.Input("patch"), io.String.Input("filename", default="erasure-patch")],
            outputs=[io.String.Output(display_name="path")],
        )

    @classmethod
    def execute(cls, patch, filename) -> io.NodeOutput:
        name = os.path.basename(filename.strip())
        if not name or name in (".", ".."):
            raise core.HirmError("give the patch a file name")
        if not name.endswith(".safetensors"):
            name += ".safetensors"
        path = core.patches.save_patch(patch, os.path.join(host.save_folder(), name))
        return io.NodeOutput(path, ui={"text": [f"saved {path}"]})


class LoadErasurePatch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HirmLoadErasurePatch", display_name="Load Erasure Patch", category=CATEGORY,
            description="Load a patch from models/erasure_patches (validated).",
            inputs=[io.Combo.Input("patch_name", options=host.patch_files())],
            outputs=[ErasurePatch.Output(display_name="ERASURE_PATCH"), io.String.Output(display_name="report")],
        )

    @classmethod
    def fingerprint_inputs(cls, patch_name):
        try:
            return os.path.getmtime(host.patch_path(patch_name))
        except Exception:
            return patch_name

    @classmethod
    def execute(cls, patch_name) -> io.NodeOutput:
        patch = core.patches.load_patch(host.patch_path(patch_name))
        return io.NodeOutput(patch, patch.describe() + "\n" + core.report.format_report(patch.report))


class LoadErasurePatchFromHub(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HirmLoadErasurePatchFromHub", display_name="Load Erasure Patch from Hub", category=CATEGORY,
            description="Download a patch from a Hugging Face repo through the Hub cache (works offline from the cache).",
            inputs=[io.String.Input("repo_id", default="user/erasure-patches"),
                    io.String.Input("concept_or_filename", default="van-gogh.safetensors",
                                    tooltip="a file in the repo, a concept folder, or a concept name"),
                    io.String.Input("revision", default="", tooltip="branch, tag or commit; empty: main"),
                    io.Boolean.Input("save_to_patch_folder", default=False)],
            outputs=[ErasurePatch.Output(display_name="ERASURE_PATCH"), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, repo_id, concept_or_filename, revision, save_to_patch_folder) -> io.NodeOutput:
        patch = core.hub.pull(repo_id.strip(), concept_or_filename.strip(), revision=revision.strip() or None,
                              dest=host.save_folder() if save_to_patch_folder else None)
        return io.NodeOutput(patch, patch.describe() + "\n" + core.report.format_report(patch.report))
