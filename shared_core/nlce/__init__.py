"""NLCE: training-free, neighbour-aware concept erasure in a UNet's cross-attention (SPEC section 2).

Host-agnostic maths (``operators``, ``session``) plus the diffusers adapter (``apply_nlce``).
"""

from ..errors import NlceError
from .config import NLCE_PRESETS, NlceConfig, make_nlce_config
from .mining import mine_neighbors, vocabulary_words
from .operators import ConceptSet, build_concept_set, clip_row_encoder
from .session import NlceSession, PreparedContext, infer_token_mask, spatial_shape_for

# where the gate is read (SPEC: SD1.x, the second cross-attention of down block 2, 1/32 of the image)
GATING_LAYERS = {
    "sd1": {"diffusers": "down_blocks.2.attentions.1.transformer_blocks.0.attn2.processor",
            "ldm": "input_blocks.8.1.transformer_blocks.0.attn2", "comfy": ("input", 8, 0)},
}


def apply_nlce(pipe, concepts=None, neighbors=None, **kwargs):
    """See ``shared_core.nlce.pipeline.apply_nlce`` (imported lazily: diffusers is heavy)."""
    from .pipeline import apply_nlce as apply

    return apply(pipe, concepts, neighbors, **kwargs)


__all__ = ["NlceError", "NlceConfig", "NLCE_PRESETS", "make_nlce_config", "ConceptSet", "build_concept_set",
           "clip_row_encoder", "mine_neighbors", "vocabulary_words", "NlceSession", "PreparedContext",
           "infer_token_mask", "spatial_shape_for", "apply_nlce", "GATING_LAYERS"]
