"""NLCE: training-free, neighbour-aware concept erasure in a UNet's cross-attention (SPEC section 2).

Host-agnostic maths (``config``, ``operators``, ``session``, ``mining``) plus the diffusers
adapter (``apply_nlce`` in ``shared_core.nlce.diffusers``). See docs/nlce.md.
"""

from ..errors import NlceError
from .config import NLCE_PRESETS, NUDITY_TERMS, OPERATOR_SETTINGS, NlceConfig, derive_nlce_config, make_nlce_config
from .diffusers import NlceHandle, apply_nlce
from .driver import cross_attention, gate_key, gating_layer, run_unet_pass
from .mining import mine_neighbors, neighbor_table, vocabulary_words
from .operators import ConceptSet, build_concept_set, clip_row_encoder, concept_terms, prompt_token_mask, sdxl_row_encoder
from .session import NlceSession, PreparedContext, infer_token_mask, spatial_shape_for

__all__ = ["NlceError", "NlceConfig", "NLCE_PRESETS", "NUDITY_TERMS", "OPERATOR_SETTINGS", "make_nlce_config", "derive_nlce_config",
           "ConceptSet", "build_concept_set", "clip_row_encoder", "sdxl_row_encoder", "concept_terms", "prompt_token_mask", "mine_neighbors",
           "neighbor_table", "vocabulary_words",
           "NlceSession", "PreparedContext", "infer_token_mask", "spatial_shape_for", "apply_nlce", "NlceHandle",
           "cross_attention", "gate_key", "gating_layer", "run_unet_pass"]
