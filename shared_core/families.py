"""One record per model family: what each family is made of and what every feature does with it.

Every adapter and message that depends on the family reads it here: the text encoders and their widths, the rows the
denoiser reads, where NLCE reads its gate, the timestep scale a host passes, and, per feature, whether the family is
supported. Adding a family is one record here plus its adapter functions; ``tests/test_families.py`` fails until every
feature has said whether it supports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# the features a family record must answer for (tests/test_families.py checks every record has them all)
FEATURES = {
    "patch": "apply a HiRM patch to the model's text encoders",
    "train": "train a HiRM patch on the model's text encoders",
    "nlce-diffusers": "NLCE on a diffusers pipeline (apply_nlce, hirm nlce, hirm eval)",
    "nlce-comfyui": "NLCE Erasure Gate in ComfyUI",
    "nlce-a1111": "NLCE in AUTOMATIC1111's accordion",
    "nlce-forge": "NLCE in Forge's accordion",
}
SUPPORT = ("yes", "experimental", "no")


@dataclass(frozen=True)
class Family:
    key: str                 # the name used in files and settings ("sd1", "sdxl", ...)
    name: str                # as people call it
    encoders: tuple          # (component, width) of its CLIP text encoders, in context order
    rows: str                # what its denoiser reads of the text, for messages and operator files
    context_width: int       # width of those rows (0: not supported)
    denoiser: str            # "unet" (cross-attention) or "joint" (joint attention over text and image tokens)
    supports: dict = field(default_factory=dict)  # feature -> "yes" / "experimental" / "no"
    refused_because: str = ""  # why a feature says "no", for the refusal
    timestep_scale: float = 1.0  # a host's timestep times this is on NLCE's 0..1000 scale (Flux passes sigma)
    text_rows: int = 77      # rows of text the pipelines encode by default (joint families: T5's max_sequence_length)


def _all(value: str, **overrides) -> dict:
    return {feature: overrides.get(feature.replace("-", "_"), value) for feature in FEATURES}


FAMILIES: dict[str, Family] = {f.key: f for f in (
    Family("sd1", "SD1.x", (("clip_l", 768),), "CLIP-L's final output, 768 wide", 768, "unet", _all("yes")),
    Family("sdxl", "SDXL", (("clip_l", 768), ("clip_g", 1280)), "CLIP-L and CLIP-G penultimate rows, 2048 wide", 2048, "unet",
           _all("yes")),
    Family("flux", "Flux", (("clip_l", 768),), "T5 rows, 4096 wide", 4096, "joint",
           _all("yes", nlce_diffusers="experimental", nlce_comfyui="experimental", nlce_a1111="no", nlce_forge="no"),
           "NLCE on Flux runs in diffusers and ComfyUI only", timestep_scale=1000.0, text_rows=512),
    Family("sd3", "SD3", (("clip_l", 768), ("clip_g", 1280)), "CLIP-L and CLIP-G rows, then T5 rows, 4096 wide", 4096, "joint",
           _all("yes", nlce_diffusers="experimental", nlce_comfyui="experimental", nlce_a1111="no", nlce_forge="no"),
           "NLCE on SD3 runs in diffusers and ComfyUI only", text_rows=256),
    Family("sd2", "SD2.x", (("clip_h", 1024),), "OpenCLIP-H rows, 1024 wide", 0, "unet", _all("no"),
           "SD2.x uses an OpenCLIP-H text encoder, which neither HiRM patches nor NLCE support"),
)}


def unet_family_of(widths: dict, context_width: int) -> Family | None:
    """The UNet family whose text encoders are ``widths`` ({component: width}) side by side in a ``context_width``-wide
    context (by structure, so that small test models of the same layout are recognised too), or None."""
    for f in FAMILIES.values():
        if f.denoiser == "unet" and f.context_width and [c for c, _ in f.encoders] == list(widths) \
                and sum(widths.values()) == context_width:
            return f
    return None


def family(key: str) -> Family:
    return FAMILIES[key]


def supported(feature: str, levels=("yes", "experimental")) -> list[Family]:
    """The families ``feature`` supports (at ``levels``)."""
    return [f for f in FAMILIES.values() if f.supports[feature] in levels]


def supported_names(feature: str) -> str:
    """'SD1.x and SDXL' / 'SD1.x, SDXL and Flux (experimental)': what ``feature`` supports, for a refusal."""
    names = [f.name + (" (experimental)" if f.supports[feature] == "experimental" else "") for f in supported(feature)]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def refusal(feature: str, family_key: str | None, what: str) -> str:
    """One line saying that ``what`` (e.g. "this model", naming it) cannot use ``feature`` and what can."""
    fam = FAMILIES.get(family_key or "")
    reason = f" ({fam.refused_because})" if fam is not None and fam.refused_because and fam.supports[feature] == "no" else ""
    kind = f" is {fam.name}{reason}" if fam is not None else " is not a model family it knows"
    return f"{FEATURES[feature]} supports {supported_names(feature)}; {what}{kind}"


def joint_gating_block(double_blocks: int) -> int:
    """The joint block whose attention NLCE reads its gate from: the middle double (text + image) block, the joint
    architectures' counterpart of a UNet's deepest cross-attention (docs/nlce-joint-attention.md)."""
    return double_blocks // 2
