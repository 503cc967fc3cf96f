"""Save / Load Erasure Patch (models/erasure_patches, also listed by the stock LoRA loaders) and Load from Hub."""

from __future__ import annotations

import os

from comfy_api.latest import io, ui

from . import core, host
from .types import CATEGORY, ErasurePatch


def _report_text(patch) -> str:
    return patch.describe() + "\n" + core.report.format_report(patch.report)


class SaveErasurePatch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HirmSaveErasurePatch", display_name="Save Erasure Patch (HiRM)", category=CATEGORY, is_output_node=True,
            description="Write the patch into models/erasure_patches (atomically). The stock LoRA loaders list that folder "
                        "too: a saved patch can also be applied with Load LoRA (strength_clip).",
            inputs=[ErasurePatch.Input("patch", tooltip="the patch to save"),
                    io.String.Input("filename", default="erasure-patch",
                                    tooltip="file name in models/erasure_patches (a subfolder like 'styles/van-gogh' works)"),
                    io.Boolean.Input("overwrite", default=False, label_on="replace", label_off="new name",
                                     tooltip="replace: an erasure patch of that name is replaced (any other file is left "
                                             "alone); new name: a number (_00001) is added when the name is taken")],
            outputs=[io.String.Output(display_name="path", tooltip="where the patch was written")],
        )

    @classmethod
    def execute(cls, patch, filename, overwrite) -> io.NodeOutput:
        folder = host.save_folder()
        path = host.free_patch_path(folder, filename, overwrite)
        core.patches.save_patch(patch, path, overwrite=overwrite)
        shown = os.path.relpath(path, os.path.dirname(folder))
        host.log.info("[hirm] saved %s", path)
        return io.NodeOutput(path, ui=ui.PreviewText(f"saved {shown}"))


class LoadErasurePatch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HirmLoadErasurePatch", display_name="Load Erasure Patch (HiRM)", category=CATEGORY,
            description="Load a patch from models/erasure_patches (validated).",
            inputs=[io.Combo.Input("patch_name", options=host.patch_files(), tooltip="a patch in models/erasure_patches")],
            outputs=[ErasurePatch.Output(display_name="ERASURE_PATCH", tooltip="connect it to Apply Erasure Patch"),
                     io.String.Output(display_name="report", tooltip="what the patch erases and its text-level report")],
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
        text = _report_text(patch)
        return io.NodeOutput(patch, text, ui=ui.PreviewText(text))


class LoadErasurePatchFromHub(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HirmLoadErasurePatchFromHub", display_name="Load Erasure Patch from Hub (HiRM)", category=CATEGORY,
            description="Download a patch from a Hugging Face repo through the Hub cache (validated; works offline from the "
                        "cache). A concept name only ever returns a file whose own header names that concept.",
            inputs=[io.String.Input("repo_id", default="user/erasure-patches", tooltip="the Hub repo, e.g. someone/erasure-patches"),
                    io.String.Input("concept_or_filename", default="van-gogh.safetensors",
                                    tooltip="a file in the repo, or a concept name"),
                    io.String.Input("revision", default="", tooltip="branch, tag or commit to pin; empty: main"),
                    io.Boolean.Input("save_to_patch_folder", default=False, label_on="also save into models/erasure_patches",
                                     label_off="keep it in the Hub cache only",
                                     tooltip="saving makes it appear in Load Erasure Patch and the stock LoRA loaders"),
                    io.Float.Input("timeout", default=core.hub.DEFAULT_TIMEOUT, min=1.0, max=3600.0, step=1.0,
                                   tooltip="seconds to wait for the Hub in all")],
            outputs=[ErasurePatch.Output(display_name="ERASURE_PATCH", tooltip="connect it to Apply Erasure Patch"),
                     io.String.Output(display_name="report", tooltip="what the patch erases and its text-level report")],
        )

    @classmethod
    def execute(cls, repo_id, concept_or_filename, revision, save_to_patch_folder, timeout) -> io.NodeOutput:
        patch = core.hub.pull(repo_id.strip(), concept_or_filename.strip(), revision=revision.strip() or None,
                              dest=host.save_folder() if save_to_patch_folder else None, timeout=timeout)
        source = patch.metadata["source"]
        note = core.hub.checksum_note(patch)
        text = f"{source['repo']}/{source['filename']} @ {str(source['revision'])[:12]}\n" + (f"{note}\n" if note else "") \
            + _report_text(patch)
        if note:
            host.log.warning("[hirm] %s", note)
        return io.NodeOutput(patch, text, ui=ui.PreviewText(text))
