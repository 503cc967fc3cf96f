"""HiRM: erase a concept by updating the first CLIP block while misdirecting the last one."""

from .config import METHODS, NUDITY_KEYWORDS, PRESETS, SUPERVISION_POINTS, HirmConfig, make_config
from .train import average_patches, train_model_patch, train_patch

__all__ = ["METHODS", "NUDITY_KEYWORDS", "PRESETS", "SUPERVISION_POINTS", "HirmConfig", "make_config",
           "average_patches", "train_model_patch", "train_patch"]
