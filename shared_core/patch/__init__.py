"""Erasure patches: the value and its file (``format``), and applying it to text encoders (``apply``).

Everything public of both is here, so ``from shared_core.patch import load_patch, apply_patch, patched`` keeps working.
"""

from ..common import check_strength
from .apply import (AppliedPatch, BaseMismatchWarning, PatchLockError, PatchNote, applied_patches, apply_patch,
                    base_mismatch_note, check_compatible, forget_applied, holding, merged_state_dict, patched,
                    patched_pipeline, pipeline_encoders, route_parts)
from .format import (COMPONENT_KEY_PREFIX, FORMAT_NAME, FORMAT_VERSION, META_PREFIX, PART_FIELDS, ErasurePatch,
                     canonical_name, check_finite, component_of_family, decode_metadata, encoder_signatures, file_key,
                     header_family, is_patch_file, load_patch, make_metadata, read_header, read_metadata, save_patch,
                     validate_patch)

__all__ = ["AppliedPatch", "BaseMismatchWarning", "PatchLockError", "PatchNote", "applied_patches", "apply_patch",
           "base_mismatch_note", "check_compatible", "forget_applied", "holding", "merged_state_dict", "patched",
           "patched_pipeline", "pipeline_encoders", "route_parts", "COMPONENT_KEY_PREFIX", "FORMAT_NAME", "FORMAT_VERSION",
           "META_PREFIX", "PART_FIELDS", "ErasurePatch", "canonical_name", "check_finite", "component_of_family",
           "decode_metadata", "encoder_signatures", "file_key", "header_family", "is_patch_file", "load_patch",
           "make_metadata", "read_header", "read_metadata", "save_patch", "validate_patch", "check_strength"]
