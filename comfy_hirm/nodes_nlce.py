"""NLCE Erasure Gate: MODEL + CLIP -> MODEL erasing concepts in cross-attention at sampling time (no training)."""

from __future__ import annotations

from comfy_api.latest import io, ui

from . import core, host
from .types import CATEGORY

h = core.nlce.config.setting_help


class NlceGate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HirmNlceGate", display_name="NLCE Erasure Gate", category=CATEGORY,
            description="Training-free erasure (NLCE) inside the UNet's cross-attention of SD1.x and SDXL models (Flux and "
                        "SD3: experimental, in their joint attention), while sampling. The input MODEL is not changed. "
                        "Apply it after other nodes that patch attention.",
            inputs=[
                io.Model.Input("model", tooltip="an SD1.x or SDXL MODEL; Flux or SD3 experimentally (other nodes' attention "
                                                "patches are kept)"),
                io.Clip.Input("clip", tooltip="the CLIP the prompts go through: the concepts are encoded with it (SDXL: both "
                                              "of its encoders, as the UNet reads them)"),
                io.String.Input("concepts", multiline=True, default="Van Gogh",
                                placeholder="concepts to erase, one per line (e.g. Van Gogh)",
                                tooltip="concepts to erase, one per line; 'a | b | c' is one concept made of several terms; "
                                        "'nudity' stands for the shipped nudity term list"),
                io.String.Input("neighbors", default="auto",  # one line, so its name shows beside it (never mistaken for
                                placeholder="concepts to keep intact",  # the concepts box)
                                tooltip="concepts to keep intact, separated by commas; 'auto' mines them offline from the CLIP "
                                        "vocabulary (never another erased concept); empty: none"),
                io.Combo.Input("preset", options=list(core.nlce.NLCE_PRESETS), default="object",
                               tooltip="the reference code's settings for this kind of concept (object, artist, celebrity, "
                                       "nudity)"),
                io.Float.Input("beta", default=1.0, min=0.0, max=1.5, step=0.05, tooltip=h("beta")),
                io.Boolean.Input("gamma_source", default=True, label_on="from the preset", label_off="custom",
                                 tooltip="gamma as the preset sets it (1.0; celebrity 0.9; nudity 0.5), or the value below"),
                io.Float.Input("gamma", default=1.0, min=0.0, max=1.5, step=0.05,
                               tooltip=h("gamma") + " (used when the gamma source is custom)"),
                io.Combo.Input("suppression", options=list(core.nlce.config.SUPPRESSIONS), default="mask",
                               tooltip=h("suppression")),
                io.Combo.Input("schedule", options=list(core.nlce.config.SCHEDULES), default="single-pass",
                               tooltip=h("schedule")),
            ],
            outputs=[io.Model.Output(tooltip="the MODEL with NLCE; connect it to the sampler"),
                     io.String.Output(display_name="neighbors", tooltip="the neighbours used per concept")],
        )

    @classmethod
    def execute(cls, model, clip, concepts, neighbors, preset, beta, gamma_source, gamma, suppression, schedule) -> io.NodeOutput:
        # every widget first, before any weights are read or loaded
        config = core.nlce.make_nlce_config(preset, beta=beta, gamma=None if gamma_source else gamma, suppression=suppression,
                                            schedule=schedule)
        names = core.common.split_list(concepts, "concept")
        progress = host.steps_callback(f"[hirm] NLCE: building the operators of {len(names)} concept(s) with this CLIP")
        weights = {c: w for c, (w, _) in core.patcher.model_encoders(host.clip_state_dict(clip)).items()}
        timestep = model.get_model_object("model_sampling").timestep
        family = core.joint_patcher.joint_model_family(model)
        if family is None:
            concept_set = core.hosting.concept_set_for(weights, names, neighbors, config, device=host.compute_device(),
                                                       progress=progress)
            patched, _ = core.patcher.install_nlce(model, concept_set, config, timestep)
        else:  # Flux / SD3: experimental (docs/nlce-joint-attention.md)
            if "clip_l" not in weights:
                raise core.NlceError("this CLIP has no CLIP-L, which NLCE reads its live-token scale and neighbours from; load "
                                     "the model's CLIP with DualCLIPLoader (flux) or TripleCLIPLoader (sd3)")
            concept_set = core.joint_patcher.joint_concept_set(clip, weights["clip_l"], family, names, neighbors, config,
                                                               device=host.compute_device(), progress=progress)
            patched, _ = core.joint_patcher.install_joint_nlce(model, concept_set, config, timestep)
        text = "\n".join(f"{c}: {', '.join(ns) or '(no neighbours)'}" for c, ns in concept_set.neighbors.items())
        return io.NodeOutput(patched, text, ui=ui.PreviewText(text))
