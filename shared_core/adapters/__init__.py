"""Host adapters: how each host's denoiser reaches NLCE (and a host's encoders reach the patches), one module per host.

- ``diffusers_unet`` / ``diffusers_joint`` (``diffusers_common``): diffusers pipelines, ``apply_nlce`` below.
- ``patcher`` / ``patcher_joint``: ComfyUI's (and Forge's) ModelPatcher, UNets and joint-attention transformers.
- ``a1111``: AUTOMATIC1111's LDM UNet for the length of one job.

None of them imports its host: each speaks the protocol of the objects the host hands over.
"""

from __future__ import annotations


def apply_nlce(pipe, concepts=None, neighbors=None, *, concept_set=None, preset: str | None = None, gating_layer: str | None = None,
               record_maps: bool = False, mine_top_k: int = 8, **settings):
    """Erase ``concepts`` from a diffusers SD1.x or SDXL pipeline (Flux and SD3: experimental, docs/nlce-joint-attention.md)
    at sampling time; returns a handle (``remove()``, a context manager).

    ``neighbors``: None, a list, {concept: list}, or "auto" (mined offline from the CLIP vocabulary).
    ``concept_set``: operators built or loaded earlier (instead of ``concepts``); its settings are the
    base that ``preset`` / ``settings`` change (operator settings such as ranks cannot change).
    ``settings``: any ``NlceConfig`` field (beta, gamma, schedule, suppression, scrub, t_max, ...).
    ``gating_layer``: a diffusers attn2 module name (default: ``nlce.gating_layer``'s choice).
    Everything is validated before the pipeline is touched. The denoiser may be compiled (``torch.compile``) before or
    after: one call with NLCE is one graph (docs/nlce.md, "Compiled").
    """
    from .diffusers_joint import apply_joint, joint_family
    from .diffusers_unet import apply_unet

    apply = apply_joint if joint_family(pipe) is not None else apply_unet
    return apply(pipe, concepts, neighbors, concept_set=concept_set, preset=preset, gating_layer=gating_layer,
                 record_maps=record_maps, mine_top_k=mine_top_k, settings=settings)


def pipeline_family(pipe) -> str:
    """The family of a diffusers pipeline NLCE can act on ("sd1", "sdxl"; "flux", "sd3" experimentally); NlceError
    naming what is supported otherwise."""
    from .diffusers_joint import joint_family
    from .diffusers_unet import unet_family

    return joint_family(pipe) or unet_family(pipe)


def pipeline_row_encoder(pipe):
    """The row encoder whose rows are what this pipeline's denoiser reads (``nlce.RowEncoder``)."""
    from .diffusers_joint import pipeline_row_encoder as joint_rows
    from .diffusers_unet import unet_row_encoder

    family = pipeline_family(pipe)
    return joint_rows(pipe, family) if family in ("flux", "sd3") else unet_row_encoder(pipe, family)


def pipeline_concept_set(pipe, concepts, neighbors, config, mine_top_k: int = 8):
    """NLCE operators for ``concepts`` built with the pipeline's own text encoders, as its denoiser reads their rows
    (``neighbors`` as ``nlce.neighbor_table`` takes them: a list, a table, or "auto")."""
    from ..nlce import build_concept_set, neighbor_table

    encode = pipeline_row_encoder(pipe)
    return build_concept_set(encode, concepts, neighbor_table(encode, concepts, neighbors, mine_top_k), config)
