"""NLCE on a tiny offline diffusers SD pipeline: install, sample, remove."""

import pytest
import torch
from tiny import assert_unchanged, grid_record, open_pass
from tiny_pipeline import render, tiny_pipeline

from shared_core.adapters import apply_nlce
from shared_core.adapters.diffusers_unet import NlceAttnProcessor, cross_attention_names
from shared_core.nlce import ConceptSet, NlceError, gating_layer

SD1_GATING = "down_blocks.2.attentions.1.transformer_blocks.0.attn2"  # SPEC: the second cross-attention of down block 2

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
        assert_unchanged(render(pipe, "a photo of a cat"), before)


def test_without_intervention_the_processor_computes_attnprocessor2_0(pipe):
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=32, heads=2, dim_head=4, norm_num_groups=2, residual_connection=True,
                     rescale_output_factor=2.0).eval()
    hidden, context = torch.randn(2, 8, 4, 5), torch.randn(2, 7, 32) * 30
    expected = AttnProcessor2_0()(attn, hidden, encoder_hidden_states=context)
    # outside the timestep window; inside it with no live token and stage 1 (which is global) off
    for t, settings in ((950.0, LOW), (500.0, {"live_floor": 1e6, "stage1": False})):
        with apply_nlce(pipe, ["cat"], **settings) as h:
            open_pass(h.session, t, context=context, gating_shape=(4, 5))
            assert_unchanged(NlceAttnProcessor(h, "attn2", is_gating_layer=True)(attn, hidden, encoder_hidden_states=context), expected)


@pytest.mark.parametrize("schedule", ["single-pass", "faithful"])
@pytest.mark.parametrize("guidance,per_prompt", [(7.5, 2), (1.0, 1)])
def test_both_schedules_sample_finite_images_with_and_without_guidance(pipe, schedule, guidance, per_prompt):
    with apply_nlce(pipe, ["cat", "car"], schedule=schedule, **LOW) as h:
        images = render(pipe, ["a cat on a car", "a red car"], guidance_scale=guidance, num_images_per_prompt=per_prompt)
    assert images.shape[0] == 2 * per_prompt and torch.isfinite(images).all()
    real = [d for d in h.diagnostics if not d["dry"]]
    dry = [d for d in h.diagnostics if d["dry"]]
    assert len(real) == 3 and len(dry) == (3 if schedule == "faithful" else 0)  # all 3 steps are inside t <= 900
    assert [d["step"] for d in real] == [0, 1, 2] and all(d["gate"] for d in real)
    sources = {d["gate"]["source"] for d in real}
    assert sources == ({"dry pass"} if schedule == "faithful" else {"this pass"})
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


def test_single_pass_reads_the_same_gate_as_the_faithful_dry_pass_where_their_queries_agree(pipe):
    # with the gating layer first, the queries there are those of an unmodified pass at the first step; the gate is
    # read from the keys before stage 1, so both schedules see the same gate although stage 1 is on
    first = cross_attention_names(pipe.unet)[0][: -len(".processor")]
    gates = {}
    for schedule in ("single-pass", "faithful"):
        with apply_nlce(pipe, ["cat"], ["dog"], schedule=schedule, gating_layer=first, record_maps=True, **LOW) as h:
            render(pipe, "a photo of a cat", steps=2)
        gates[schedule] = next(d["gate_map"] for d in h.diagnostics if d["gate"])
    assert torch.equal(gates["single-pass"], gates["faithful"])


def test_prompt_rows_are_recorded_exactly_with_negative_prompts_copies_and_textual_inversion():
    pipe = tiny_pipeline()
    pipe.load_textual_inversion({"<toy>": torch.randn(2, 32)}, token="<toy>")  # one word, two token rows
    with apply_nlce(pipe, ["cat"], **LOW) as h:
        cond_embeds, negative = pipe.encode_prompt(["a photo of <toy> cat", "a cat"], "cpu", 2, True, ["a cat", "a photo"])
        cond, mask = h.prompts.rows(torch.cat([negative, cond_embeds]))  # the negative "a cat" equals the second prompt
        assert cond.tolist() == [False] * 4 + [True] * 4
        words = [mask[b].nonzero().flatten().tolist() for b in range(8)]
        assert words == [[]] * 4 + [[1, 2, 3, 4, 5, 6]] * 2 + [[1, 2]] * 2
        cond, mask = h.prompts.rows(torch.cat([cond_embeds[:2], negative[2:]]))  # another layout: matched row by row
        assert cond.tolist() == [True, True, False, False] and mask[0].nonzero().flatten().tolist() == [1, 2, 3, 4, 5, 6]


def test_the_default_gating_layer_of_the_sd15_unet_is_the_second_cross_attention_of_down_block_2():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # the SD1.5 architecture without allocating its weights
        unet = UNet2DConditionModel(cross_attention_dim=768)
    assert gating_layer(cross_attention_names(unet)) == SD1_GATING + ".processor"


def test_gating_layer_names_with_or_without_processor_are_accepted(pipe):
    name = SD1_GATING.replace("down_blocks.2", "down_blocks.1").replace("attentions.1", "attentions.0")
    for given in (name, name + ".processor"):
        with apply_nlce(pipe, ["cat"], gating_layer=given) as h:
            assert h.gating_layer == name + ".processor"
    with pytest.raises(NlceError, match="not a cross-attention layer"):
        apply_nlce(pipe, ["cat"], gating_layer=SD1_GATING)  # the tiny UNet has no down block 2


def test_saved_operators_bring_their_settings_and_keep_their_bases(pipe, tmp_path):
    path = str(tmp_path / "cat.nlce.safetensors")
    with apply_nlce(pipe, ["cat"], ["dog"], preset="celebrity", **LOW) as h:
        h.concept_set.save(path)
        erased = render(pipe, "a photo of a cat")
    loaded = ConceptSet.load(path)
    with apply_nlce(pipe, concept_set=loaded) as h:
        assert h.session.config.gamma == 0.9 and h.session.config.live_floor == 0.1
        assert torch.equal(render(pipe, "a photo of a cat"), erased)
    with apply_nlce(pipe, concept_set=loaded, gamma=0.5) as h:
        assert h.session.config.gamma == 0.5
    with pytest.raises(NlceError, match="neighbor_rank .* built into"):
        apply_nlce(pipe, concept_set=loaded, neighbor_rank=2)


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


def test_custom_cross_attention_processors_are_refused(pipe):
    class IPAdapterLikeProcessor:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
            raise AssertionError("never called")

    original = dict(pipe.unet.attn_processors)
    custom = {**original, cross_attention_names(pipe.unet)[0]: IPAdapterLikeProcessor()}
    pipe.unet.set_attn_processor(dict(custom))
    try:
        with pytest.raises(NlceError, match="IPAdapterLikeProcessor .* unload it first"):
            apply_nlce(pipe, ["cat"])
        assert all(pipe.unet.attn_processors[k] is custom[k] for k in custom)
    finally:
        pipe.unet.set_attn_processor(original)


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
    with pytest.raises(NlceError, match="supports SD1.x, SDXL.*its UNet reads 16-wide rows; its CLIP encoders: clip_l 32"):
        apply_nlce(pipe, ["cat"])
    assert all(pipe.unet.attn_processors[k] is before[k] for k in before)


def test_applying_twice_is_refused(pipe):
    with apply_nlce(pipe, ["cat"]):
        with pytest.raises(NlceError, match="already applied"):
            apply_nlce(pipe, ["dog"])


# ------------------------------------------------------------------------------ CLI

def test_cli_renders_a_side_by_side_grid_with_settings_in_the_png(tmp_path, capsys):
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
    record, size = grid_record(out)
    assert size == (32, 32)  # two columns (without, with), one row per prompt
    assert record["concepts"] == ["cat"] and record["neighbors"] == {"cat": ["dog"]} and record["settings"]["gamma"] == 0.9
    assert record["patches"] == [{"file": patch, "strength": 0.5}] and record["prompts"] == ["a cat", "a dog"]
    capsys.readouterr()
    assert main(["nlce"]) == 2
    err = capsys.readouterr().err
    assert "no model given" in err and len(err.strip().splitlines()) == 1


def test_cli_shares_operators_and_checks_everything_before_rendering(tmp_path, capsys):
    from shared_core.cli import main

    tiny_pipeline().save_pretrained(str(tmp_path / "sd"))
    model, ops = str(tmp_path / "sd"), str(tmp_path / "cat.nlce.safetensors")
    common = ["--steps", "1", "--size", "16"]
    assert main(["nlce", model, "--concept", "cat", "--neighbors", "auto", "--preset", "celebrity", "--save-operators", ops,
                 "--out", str(tmp_path / "a.png")] + common) == 0
    saved = ConceptSet.load(ops)
    assert saved.concepts == ["cat"] and len(saved.neighbors["cat"]) == 8 and saved.config.gamma == 0.9
    assert main(["nlce", model, "--operators", ops, "--prompt", "a cat", "--out", str(tmp_path / "b.png")] + common) == 0
    record, _ = grid_record(tmp_path / "b.png")
    assert record["neighbors"] == saved.neighbors and record["settings"]["gamma"] == 0.9 and record["operators"] == ops
    terms = tmp_path / "terms.txt"
    terms.write_text("# nudity terms\nnaked\nnude\n\ntopless\n", encoding="utf-8")
    assert main(["nlce", model, "--concept-terms", str(terms), "--preset", "nudity", "--save-operators", ops,
                 "--out", str(tmp_path / "c.png")] + common) == 2  # the operator file exists: --force replaces it
    assert main(["nlce", model, "--concept-terms", str(terms), "--preset", "nudity", "--save-operators", ops, "--force",
                 "--out", str(tmp_path / "c.png")] + common) == 0
    assert ConceptSet.load(ops).terms == {"naked | nude | topless": ["naked", "nude", "topless"]}
    capsys.readouterr()
    (tmp_path / "latin1.txt").write_bytes("nu\xe9\n".encode("latin-1"))
    bad = [["--concept", "cat", "--neighbor", "Cat"], ["--concept", "cat", "--size", "20"], ["--concept", "cat", "--beta", "2"],
           ["--operators", ops, "--concept", "dog"], ["--operators", str(tmp_path / "missing.safetensors")],
           ["--concept-terms", str(tmp_path / "missing.txt")], ["--concept-terms", str(tmp_path / "latin1.txt")]]
    for args in bad:
        assert main(["nlce", model, "--out", str(tmp_path / "bad.png"), "--steps", "1", "--size", "16"] + args) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if "hirm" in line]  # (model loading prints a progress bar)
        assert len(err) == 1 and err[0].startswith("hirm: error:"), args
    assert not (tmp_path / "bad.png").exists()
