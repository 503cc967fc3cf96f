"""NLCE on a tiny offline diffusers SD pipeline: install, sample, remove."""

import pytest
import torch
from tiny_pipeline import render, tiny_pipeline

from shared_core.nlce import NlceError, apply_nlce
from shared_core.nlce.pipeline import NlceAttnProcessor

LOW = {"live_floor": 0.1}  # tiny random encoders give small rows; let the ratio rule decide


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def state(pipe):
    return dict(pipe.unet.attn_processors), pipe.unet.__dict__.get("forward"), pipe.__dict__.get("encode_prompt")


def test_remove_restores_processors_and_output_bit_for_bit(pipe):
    before_state = state(pipe)
    before = render(pipe, "a photo of a cat")
    handle = apply_nlce(pipe, ["cat"], ["dog"], **LOW)
    assert sum(isinstance(p, NlceAttnProcessor) for p in pipe.unet.attn_processors.values()) == 7
    erased = render(pipe, "a photo of a cat")
    handle.remove()
    after = render(pipe, "a photo of a cat")
    assert not torch.equal(before, erased)
    assert torch.equal(before, after)
    now = state(pipe)
    assert now[0].keys() == before_state[0].keys() and all(now[0][k] is before_state[0][k] for k in now[0])
    assert now[1:] == before_state[1:] == (None, None)


def test_outside_the_timestep_window_the_processors_compute_diffusers_attention(pipe):
    before = render(pipe, "a photo of a cat")
    with apply_nlce(pipe, ["cat"], t_max=0.0, **LOW):
        assert torch.equal(render(pipe, "a photo of a cat"), before)


@pytest.mark.parametrize("schedule", ["single-pass", "faithful"])
@pytest.mark.parametrize("guidance,per_prompt", [(7.5, 2), (1.0, 1)])
def test_both_schedules_sample_finite_images_with_and_without_guidance(pipe, schedule, guidance, per_prompt):
    with apply_nlce(pipe, ["cat", "car"], schedule=schedule, **LOW) as h:
        images = render(pipe, ["a cat on a car", "a red car"], guidance_scale=guidance, num_images_per_prompt=per_prompt)
    assert images.shape[0] == 2 * per_prompt and torch.isfinite(images).all()
    real = [d for d in h.diagnostics if not d["dry"]]
    dry = [d for d in h.diagnostics if d["dry"]]
    assert len(real) == 3 and len(dry) == (3 if schedule == "faithful" else 0)  # all 3 steps are inside t <= 900
    batch = len(real[0]["live_tokens"])
    assert batch == 2 * per_prompt * (2 if guidance > 1 else 1)


def test_live_tokens_are_found_only_in_the_conditional_prompt(pipe):
    prompt = "a photo of a cat"
    with apply_nlce(pipe, ["cat"], **LOW) as h:
        render(pipe, prompt, negative_prompt="a cat, a cat")  # the concept in the negative prompt is not erased there
    n_words = len(pipe.tokenizer(prompt)["input_ids"]) - 2
    for d in h.diagnostics:
        uncond, cond = d["live_tokens"]
        assert uncond == [] and cond and set(cond) <= set(range(1, n_words + 1))
        assert d["active"] == [[], ["cat"]]


def test_a_prompt_without_the_concept_gets_no_gate(pipe):
    with apply_nlce(pipe, ["cat"], live_floor=1e6) as h:  # nothing can reach the floor
        render(pipe, "a photo of a cat")
    assert all(d["gate"] is None and d["active"] == [[], []] for d in h.diagnostics)


def test_single_pass_equals_faithful_when_only_stage_one_is_on(pipe):
    outs = {}
    for schedule in ("single-pass", "faithful"):
        with apply_nlce(pipe, ["cat"], ["dog"], schedule=schedule, stage2=False, stage3=False, **LOW):
            outs[schedule] = render(pipe, "a photo of a cat")
    assert torch.equal(outs["single-pass"], outs["faithful"])


def test_the_first_gate_of_both_schedules_agrees_without_stage_one(pipe):
    gates = {}
    for schedule in ("single-pass", "faithful"):
        with apply_nlce(pipe, ["cat"], schedule=schedule, stage1=False, record_maps=True, **LOW) as h:
            render(pipe, "a photo of a cat", steps=2)
        gated = [d for d in h.diagnostics if d["gate"] is not None]
        gates[schedule] = gated[0]["gate_map"]
    # before any gate exists, single-pass runs the layers before the gating layer unchanged, like the dry pass
    assert torch.allclose(gates["single-pass"], gates["faithful"], atol=1e-6)


def test_auto_neighbours_are_mined_and_recorded(pipe):
    with apply_nlce(pipe, ["cat"], "auto", mine_top_k=3) as h:
        pass
    assert len(h.concept_set.neighbors["cat"]) == 3 and "cat" not in h.concept_set.neighbors["cat"]


# ------------------------------------------------------------------------------ bad input

def test_bad_input_leaves_the_pipeline_untouched(pipe):
    before = state(pipe)
    cases = [
        (dict(concepts=[]), "no concept"),
        (dict(concepts=["cat"], neighbors=["cat"]), "itself a concept"),
        (dict(concepts=["cat"], beta=2.0), "beta"),
        (dict(concepts=["cat"], schedule="twice"), "schedule"),
        (dict(concepts=["x" * 400]), "tokens"),
    ]
    for kwargs, words in cases:
        with pytest.raises(NlceError, match=words) as e:
            apply_nlce(pipe, **kwargs)
        assert "\n" not in str(e.value)
        now = state(pipe)
        assert all(now[0][k] is before[0][k] for k in now[0]) and now[1:] == before[1:]


def test_a_unet_without_cross_attention_is_refused():
    from diffusers import UNet2DConditionModel

    pipe = tiny_pipeline()
    pipe.unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=16, cross_attention_dim=32,
                                     down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                                     mid_block_type=None, norm_num_groups=4)
    with pytest.raises(NlceError, match="cross-attention"):
        apply_nlce(pipe, ["cat"])


def test_a_text_encoder_of_another_width_is_refused():
    pipe = tiny_pipeline(unet_width=16)
    before = dict(pipe.unet.attn_processors)
    with pytest.raises(NlceError, match="32 wide .* expects 16"):
        apply_nlce(pipe, ["cat"])
    assert all(pipe.unet.attn_processors[k] is before[k] for k in before)


def test_applying_twice_is_refused(pipe):
    with apply_nlce(pipe, ["cat"]):
        with pytest.raises(NlceError, match="already applied"):
            apply_nlce(pipe, ["dog"])


# ------------------------------------------------------------------------------ CLI

def test_cli_renders_a_side_by_side_grid_with_settings_in_the_png(tmp_path, capsys):
    import json

    from PIL import Image

    from shared_core.cli import main
    from shared_core.hirm import train_patch
    from shared_core.patch import save_patch

    pipe = tiny_pipeline()
    pipe.save_pretrained(str(tmp_path / "sd"))
    patch = save_patch(train_patch(pipe.text_encoder, pipe.tokenizer, concepts=["cat"], steps=2, report=False),
                       str(tmp_path / "cat.safetensors"))
    out = tmp_path / "grid.png"
    assert main(["nlce", str(tmp_path / "sd"), "--concept", "cat", "--neighbor", "dog", "--prompt", "a cat", "--prompt", "a dog",
                 "--patch", f"{patch}:0.5", "--steps", "2", "--size", "16", "--gamma", "0.9", "--out", str(out)]) == 0
    image = Image.open(out)
    assert image.size == (32, 32)  # two columns (without, with), one row per prompt
    record = json.loads(image.text["hirm-nlce"])
    assert record["concepts"] == ["cat"] and record["neighbors"] == {"cat": ["dog"]} and record["settings"]["gamma"] == 0.9
    assert record["patches"] == [{"file": patch, "strength": 0.5}] and record["prompts"] == ["a cat", "a dog"]
    capsys.readouterr()
    assert main(["nlce"]) == 2
    err = capsys.readouterr().err
    assert "no model given" in err and len(err.strip().splitlines()) == 1
