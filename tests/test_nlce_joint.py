"""NLCE on joint-attention transformers (Flux, SD3; docs/nlce-joint-attention.md): tiny offline pipelines and the
block math against an explicit attention-matrix reference."""

import pytest
import torch
from tiny import HostReads, assert_unchanged, grid_record
from tiny_pipeline import render_joint, tiny_flux_pipeline, tiny_pipeline, tiny_sd3_pipeline

from shared_core.adapters import apply_nlce
from shared_core.adapters.diffusers_joint import JointProcessor
from shared_core.nlce import NlceError, make_nlce_config
from shared_core.nlce.session import NlceSession
from shared_core.nlce.stages import Operators, Prepared

LOW = {"live_floor": 0.1}  # tiny random encoders give small rows; let the ratio rule decide
PROMPT = "a photo of cat on sofa"


@pytest.fixture(scope="module", params=["flux", "sd3"])
def case(request):
    if request.param == "flux":
        return "flux", tiny_flux_pipeline(), render_joint
    return "sd3", tiny_sd3_pipeline(), render_joint


def state(pipe):
    return (dict(pipe.transformer.attn_processors), pipe.transformer.__dict__.get("forward"),
            pipe.__dict__.get("encode_prompt"), pipe.__dict__.get("check_inputs"))


def test_remove_restores_the_pipeline_bit_for_bit(case):
    family, pipe, render = case
    before_state, before = state(pipe), render(pipe, PROMPT)
    handle = apply_nlce(pipe, ["cat"], ["dog", "tiger"], t_max=1000.0, **LOW)
    assert handle.concept_set.family == family
    assert sum(isinstance(p, JointProcessor) for p in pipe.transformer.attn_processors.values()) == (4 if family == "flux" else 2)
    erased = render(pipe, PROMPT)
    handle.remove()
    assert not torch.equal(before, erased)
    assert torch.equal(render(pipe, PROMPT), before)
    now = state(pipe)
    assert all(now[0][k] is before_state[0][k] for k in before_state[0]) and now[1:] == before_state[1:] == (None, None, None)


@pytest.mark.parametrize("settings", [{"stage1": False, "stage2": False, "stage3": False}, {"t_max": 0.0}],
                         ids=["stages-off", "outside-window"])
def test_with_nothing_to_do_the_output_is_unchanged(case, settings):
    _, pipe, render = case
    before = render(pipe, PROMPT)
    with apply_nlce(pipe, ["cat"], ["dog"], **{**LOW, **settings}):
        if settings.get("stage2") is False:  # no stage on: the host's own attention runs
            assert torch.equal(render(pipe, PROMPT), before)
        else:  # outside the window the masked attention runs with an all-zero mask
            assert_unchanged(render(pipe, PROMPT), before)


def test_stage1_changes_the_encoder_rows_by_the_concept_operator(case):
    family, pipe, render = case
    seen = []
    hook = pipe.transformer.context_embedder.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        render(pipe, PROMPT, steps=1)
        plain = seen.pop()
        with apply_nlce(pipe, ["cat"], ["dog"], t_max=1000.0, stage2=False, stage3=False, **LOW) as h:
            render(pipe, PROMPT, steps=1)
            cfg = h.session.config
            op = h.concept_set.modulation(0, cfg.beta, cfg.gamma).T
    finally:
        hook.remove()
    changed = seen.pop()
    assert torch.allclose(changed, (plain.float() @ op).to(plain.dtype), atol=1e-5)
    assert not torch.allclose(changed, plain)


def test_live_tokens_only_on_the_prompt_words(case):
    family, pipe, render = case
    with apply_nlce(pipe, ["cat"], ["dog"], **LOW) as h:
        render(pipe, PROMPT, steps=1, negative_prompt="a photo of cat")
        live = h.diagnostics[-1]["live_tokens"]
    words = set(range(6)) if family == "flux" else set(range(1, 7)) | set(range(77, 83))  # T5's; SD3: CLIP's, then T5's
    if family == "flux":  # guidance-distilled: the prompt alone
        assert len(live) == 1 and live[0] and set(live[0]) <= words
    else:  # [negative, prompt]: the negative prompt's "cat" is never live
        assert live[0] == [] and live[1] and set(live[1]) <= words


def test_flux_true_cfg_negative_call_changes_nothing_but_stage1_and_keeps_the_prompts_gate():
    pipe = tiny_flux_pipeline()
    seen = []
    for extra in ({}, {"negative_prompt": "a photo of cat", "true_cfg_scale": 2.0}):
        with apply_nlce(pipe, ["cat"], ["dog"], t_max=1000.0, record_maps=True, **LOW) as h:
            render_joint(pipe, PROMPT, steps=2, **extra)
            seen.append(h.diagnostics)
            carried = h.session._carries["batch"].buffer
    plain, cfg = seen
    assert len(plain) == 2 and len(cfg) == 4  # a pass per call: prompt, negative, prompt, negative
    assert [d["live_tokens"] for d in cfg[::2]] == [d["live_tokens"] for d in plain] and plain[0]["live_tokens"][0]
    assert all(d["live_tokens"] == [[]] and d["gate"] is None for d in cfg[1::2])  # the negative prompt's "cat" is never live
    last = cfg[2]["gate_map"]
    assert torch.equal(carried[: last.numel()].reshape(last.shape), last)  # the last negative call kept the prompt's gate


def test_faithful_and_single_pass_read_the_same_first_gate_without_stage1(case):
    _, pipe, render = case
    gates = {}
    for schedule in ("faithful", "single-pass"):
        with apply_nlce(pipe, ["cat"], ["dog"], t_max=1000.0, stage1=False, schedule=schedule, record_maps=True, **LOW) as h:
            render(pipe, PROMPT, steps=1)
            gates[schedule] = next(d["gate_map"] for d in h.diagnostics if d["gate"] is not None)
    assert gates["faithful"].abs().max() > 0
    assert torch.allclose(gates["faithful"], gates["single-pass"], atol=1e-6)


def test_bad_input_is_refused_before_anything_changes():
    pipe = tiny_flux_pipeline()
    before = state(pipe)
    sd1_set = apply_nlce(tiny_pipeline(), ["cat"], **LOW)
    sd1_set.remove()
    with pytest.raises(NlceError, match="SD1.x"):
        apply_nlce(pipe, concept_set=sd1_set.concept_set)
    with pytest.raises(NlceError, match="gating block"):
        apply_nlce(pipe, ["cat"], gating_layer="single_transformer_blocks.9.attn")
    with pytest.raises(NlceError, match="no concept"):
        apply_nlce(pipe, ["   "])
    assert state(pipe)[1:] == before[1:] and state(pipe)[0].keys() == before[0].keys()
    with apply_nlce(pipe, ["cat"], **LOW):
        with pytest.raises(NlceError, match="already applied"):
            apply_nlce(pipe, ["dog"], **LOW)


# ---------------------------------------------------------------------------------------------- the block math


def reference_block(q, k, v, text, by_concept, cfg):
    """Stages 2 and 3 on one joint block with the attention matrix written out (the definition in the design doc)."""
    B, H, L, D = q.shape
    image = torch.ones(L, dtype=torch.bool)
    image[text] = False
    live = by_concept.any(1)  # (B, L)
    logits = (q @ k.transpose(-1, -2)) * D ** -0.5
    p = logits.softmax(-1)
    within = p[..., text] / p[..., text].sum(-1, keepdim=True)  # the softmax over the text keys alone
    lbc = by_concept[:, :, text].to(q.dtype)
    per_concept = torch.einsum("bnt,bct->bnc", within.mean(1), lbc) / lbc.sum(-1)[:, None, :].clamp(min=1)
    g = per_concept.amax(-1)[:, image]  # (B, image tokens)
    hit = torch.zeros(B, L, L, dtype=torch.bool)
    hit[:, image] = live[:, None, :].expand(B, int(image.sum()), L)
    gi = torch.zeros(B, L, dtype=q.dtype)
    gi[:, image] = g
    if cfg.stage2 and cfg.suppression == "mask":
        blocked = hit & (gi > cfg.gate_threshold)[:, :, None]
        p = logits.masked_fill(blocked[:, None], float("-inf")).softmax(-1)
    elif cfg.stage2:
        p = p * torch.where(hit, 1 - gi[:, :, None], torch.ones((), dtype=q.dtype))[:, None]
    out = p @ v
    if cfg.stage3:
        c = (p * live[:, None, None, :].to(q.dtype)) @ v
        keep = gi if cfg.scrub == "soft" else (gi > cfg.scrub_threshold).to(q.dtype)
        out = out - (keep * image)[:, None, :, None] * c
    return out, g


@pytest.mark.parametrize("text_first", [True, False], ids=["flux-order", "sd3-order"])
@pytest.mark.parametrize("suppression,scrub", [("mask", "soft"), ("scale", "soft"), ("mask", "binary"), ("scale", "binary")])
def test_the_block_matches_the_explicit_attention_matrix(text_first, suppression, scrub):
    torch.manual_seed(0)
    B, H, T, N, D = 2, 3, 6, 16, 8
    q, k, v = (torch.randn(B, H, T + N, D, dtype=torch.float64) for _ in range(3))
    text = slice(0, T) if text_first else slice(N, N + T)
    by_concept = torch.zeros(B, 2, T + N, dtype=torch.bool)
    by_concept[0, 0, text.start + 2] = by_concept[0, 1, text.start + 4] = by_concept[1, 1, text.start + 1] = True
    _, g = reference_block(q, k, v, text, by_concept, make_nlce_config(stage2=False, stage3=False))
    ranked = g.flatten().sort().values
    median = float(ranked[len(ranked) // 2 - 1: len(ranked) // 2 + 1].mean())  # between two gates: fp32 cannot flip a side
    cfg = make_nlce_config(suppression=suppression, scrub=scrub, gate_threshold=median, scrub_threshold=median)
    expected, _ = reference_block(q, k, v, text, by_concept, cfg)
    session = NlceSession(None, cfg)
    p = session.begin(500.0, key="test", batch=B, gating_shape=(4, 4), device="cpu")
    live = by_concept[:, :, text]
    p.prepared = Prepared(torch.zeros(B, T, 4), torch.zeros(B, T, 4), live.any(1), live, torch.zeros(B, 2, T),
                          torch.ones(B, dtype=torch.bool))
    out = session.joint_attention(p, q, k, v, text, (4, 4), is_gating_block=True)
    assert torch.allclose(p.gate.reshape(B, -1).double(), g, atol=1e-7)  # the gate is kept in fp32
    assert torch.allclose(out, expected, atol=1e-6)
    # a later block in the same pass uses that gate, and reads nothing back from the device
    with HostReads() as reads:
        later = session.joint_attention(p, q, k, v, text, (4, 4), is_gating_block=False)
    assert torch.allclose(later, expected, atol=1e-6) and reads.ops == []


def test_the_scores_and_stage1_through_the_bases_equal_the_reference_matrices():
    pipe = tiny_flux_pipeline()
    with apply_nlce(pipe, ["cat", "house"], {"cat": ["dog"], "house": ["car"]}, gamma=0.7, **LOW) as h:
        cs, cfg = h.concept_set, h.session.config
    ops = Operators(cs, cfg, "cpu")
    x = torch.randn(2, 9, cs.width)
    full = torch.einsum("bsd,cde->bcse", x, torch.stack([cs.concept_projector(i) for i in range(2)])).norm(dim=-1)
    assert torch.allclose(ops.scores(x), full, atol=1e-5)
    pc = [cs.modulation(i, cfg.beta, cfg.gamma) for i in range(2)]
    for active, product in (([True, False], pc[0]), ([False, True], pc[1]), ([True, True], pc[0] @ pc[1]),
                            ([False, False], pc[0] @ pc[1])):  # no active concept: all of them
        rows = ops.stage1(x[:1], torch.tensor([active]))
        assert torch.allclose(rows[0], x[0] @ product.T, atol=1e-5)


def test_a_list_s_stage1_solved_in_chunks_equals_the_concepts_applied_one_after_another(monkeypatch):
    """Stage 1 of a list: each chunk's triangular solve gives what applying its concepts one by one (the last first,
    each to what the later ones left) gives, in fp64, with chunk boundaries, ranks that differ, a rank larger than a
    chunk, neighbours or none, and rows that skip some concepts."""
    from types import SimpleNamespace

    import shared_core.nlce.stages as stages

    monkeypatch.setattr(stages, "CHUNK_ROWS", 10)
    g = torch.Generator().manual_seed(0)
    d, ranks = 24, [3, 1, 4, 2, 12, 3, 3, 2, 1, 4, 3, 2, 3]
    bases = [(torch.linalg.qr(torch.randn(d, r, generator=g))[0], torch.rand(r, generator=g) + 0.5) for r in ranks]
    neighbors = [None if i % 4 == 1 else (torch.linalg.qr(torch.randn(d, 2, generator=g))[0], torch.rand(2, generator=g))
                 for i in range(len(ranks))]
    cs = SimpleNamespace(concepts=[f"c{i}" for i in range(len(ranks))], bases=bases, neighbor_bases=neighbors,
                         live_floor_scale=1.0)
    cfg = make_nlce_config(beta=0.9, gamma=0.7)
    ops = Operators(cs, cfg, "cpu")
    assert len(ops.chunks) > 3 and any(c[-1] == 1 for c in ops.chunks) and any(c[-1] > 2 for c in ops.chunks)
    x = torch.randn(4, 7, d, generator=g)
    active = torch.rand(4, len(ranks), generator=g) < 0.5
    active[0] = False  # no active concept: every one applies
    active[1] = True
    out = ops.stage1(x, active)
    for b in range(4):
        rows = x[b].double()
        for i in reversed(range(len(ranks))):
            if active[b, i] or not active[b].any():
                u, lam = (t.double() for t in bases[i])
                k = -cfg.beta * u.T
                if neighbors[i] is not None:
                    v, mu = (t.double() for t in neighbors[i])
                    k = k + cfg.gamma * ((u.T @ v) * mu) @ v.T
                rows = rows + (rows @ (lam[:, None] * u.T).T) @ k
        assert torch.allclose(out[b].double(), rows, atol=2e-6), (b, float((out[b].double() - rows).abs().max()))


def test_the_processors_compute_the_blocks_own_attention_when_the_math_is_plain(case, monkeypatch):
    """Projections, q/k norms, rotary embedding, token order and output projections as the model's own processors:
    with stages 2 and 3 replaced by plain attention, the picture is the vanilla one (to rounding)."""
    import torch.nn.functional as F

    _, pipe, render = case
    before = render(pipe, PROMPT)
    with apply_nlce(pipe, ["cat"], ["dog"], t_max=1000.0, stage1=False, **LOW) as h:
        calls = []

        def plain(q, k, v, *args):
            calls.append(q.shape)
            return F.scaled_dot_product_attention(q, k, v)

        monkeypatch.setattr(h.session, "joint_attention", lambda p, q, k, v, *rest: plain(q, k, v))
        after = render(pipe, PROMPT)
    assert len(calls) == 2 * len([n for n in pipe.transformer.attn_processors if n.endswith(".attn.processor")])
    assert torch.allclose(after, before, atol=1e-5)


def test_hirm_nlce_renders_a_flux_folder(tmp_path):
    from shared_core.cli import main

    tiny_flux_pipeline().save_pretrained(str(tmp_path / "flux"))
    out = tmp_path / "grid.png"
    assert main(["nlce", str(tmp_path / "flux"), "--concept", "cat", "--neighbor", "dog", "--prompt", PROMPT, "--steps", "2",
                 "--size", "16", "--out", str(out)]) == 0
    record, size = grid_record(out)
    assert record["concepts"] == ["cat"] and size == (32, 16)
