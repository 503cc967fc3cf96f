"""NLCE: training-free, neighbour-aware concept erasure in a denoiser's attention (SPEC section 2), the method only.

Settings (``config``), concept operators and their files (``operators``), what NLCE reads of a text encoder
(``rows``), neighbour mining (``mining``), the per-pass tensor program (``stages``), the session over a denoiser's
passes (``session``) and the pass driver (``driver``). Nothing here knows a host: the adapters that install NLCE in
diffusers, ComfyUI / Forge and A1111 are in ``shared_core.adapters`` (``apply_nlce`` for diffusers). See docs/nlce.md.
"""

from ..errors import NlceError
from .config import NLCE_PRESETS, NUDITY_TERMS, OPERATOR_SETTINGS, NlceConfig, derive_nlce_config, make_nlce_config
from .driver import gating_layer, run_pass
from .mining import mine_neighbors, neighbor_table, operators_with_progress, vocabulary_words
from .operators import ConceptSet, build_concept_set, concept_terms
from .rows import RowEncoder, clip_row_encoder, prompt_token_mask, sdxl_row_encoder
from .session import NlceSession, Pass, spatial_shape_for
from .stages import infer_token_mask

__all__ = ["NlceError", "NlceConfig", "NLCE_PRESETS", "NUDITY_TERMS", "OPERATOR_SETTINGS", "make_nlce_config", "derive_nlce_config",
           "ConceptSet", "build_concept_set", "concept_terms", "operators_with_progress", "RowEncoder", "clip_row_encoder",
           "sdxl_row_encoder",
           "prompt_token_mask", "mine_neighbors", "neighbor_table", "vocabulary_words", "NlceSession", "Pass",
           "spatial_shape_for", "infer_token_mask", "gating_layer", "run_pass"]
