"""The family record: every feature says, for every family, whether it supports it; refusals are built from it."""

import pytest

from shared_core.families import FAMILIES, FEATURES, SUPPORT, joint_gating_block, refusal, supported_names, unet_family_of


@pytest.mark.parametrize("key", list(FAMILIES))
def test_every_feature_says_whether_it_supports_the_family(key):
    family = FAMILIES[key]
    assert set(family.supports) == set(FEATURES), f"{key}: say for every feature whether it is supported"
    assert all(v in SUPPORT for v in family.supports.values())
    assert family.denoiser in ("unet", "joint") and family.timestep_scale > 0
    if "no" in family.supports.values():
        assert family.refused_because  # a refusal says why
    assert (family.context_width > 0) == any(v != "no" for k, v in family.supports.items() if k.startswith("nlce"))


def test_refusals_name_what_is_supported_from_the_record():
    message = refusal("nlce-a1111", "sd2", "the loaded checkpoint 'v2.safetensors'")
    assert message.startswith("NLCE in AUTOMATIC1111's accordion supports SD1.x and SDXL;")
    assert "the loaded checkpoint 'v2.safetensors' is SD2.x (SD2.x uses an OpenCLIP-H text encoder" in message
    assert "\n" not in message
    assert supported_names("nlce-comfyui") == "SD1.x, SDXL, Flux (experimental) and SD3 (experimental)"
    assert "is not a model family it knows" in refusal("nlce-diffusers", None, "this pipeline")


def test_unet_families_are_recognised_by_their_encoders_layout_at_any_width():
    assert unet_family_of({"clip_l": 768}, 768).key == "sd1"
    assert unet_family_of({"clip_l": 32}, 32).key == "sd1"  # a small test model of the same layout
    assert unet_family_of({"clip_l": 768, "clip_g": 1280}, 2048).key == "sdxl"
    assert unet_family_of({"clip_g": 1280}, 1280) is None  # an SDXL refiner's UNet reads CLIP-G alone
    assert joint_gating_block(19) == 9 and joint_gating_block(24) == 12
