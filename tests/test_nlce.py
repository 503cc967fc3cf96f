"""NLCE maths on tensors: operators, live tokens, gates, composition, files, mining."""

import pytest
import torch
from tiny import HostReads, assert_unchanged, open_pass, tiny_clip

from shared_core.nlce import (ConceptSet, NlceError, NlceSession, build_concept_set, clip_row_encoder, derive_nlce_config,
                              make_nlce_config, mine_neighbors, prompt_token_mask, spatial_shape_for)
from shared_core.nlce.operators import projector, subspace
from shared_core.nlce.stages import live_token_mask

D = 6


def fixed_encoder(table):
    """encode() over hand-made rows: {text: (n, D) tensor}."""
    return lambda texts: [table[t] for t in texts]


def basis_rows(*dims, n=3):
    rows = torch.zeros(n, D)
    for i, d in enumerate(dims):
        rows[i % n, d] = 30.0 + i
    return rows


@pytest.fixture()
def table():
    return {"cat": basis_rows(0, 1), "dog": basis_rows(1, 2), "car": basis_rows(3, 4), "road": basis_rows(4, 5)}


def prepared(cs, context, cond=None, mask=None, t=500.0, record_maps=True, **cfg):
    s = NlceSession(cs, make_nlce_config(**cfg), record_maps=record_maps)
    p = open_pass(s, t, context=context, conditional=cond, words=mask)
    return s, p


def attend(s, p, q, k, v, shape, gating):
    return s.cross_attention(p, q, k, v, 2, shape, is_gating_layer=gating)


def plain_attention(q, k, v, heads=2):
    B, N, C = q.shape
    out = torch.nn.functional.scaled_dot_product_attention(*(t.reshape(B, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v)))
    return out.transpose(1, 2).reshape(B, N, C)


# ------------------------------------------------------------------------------ operators

def test_beta_one_gamma_zero_removes_the_concept_component_of_every_row(table):
    cs = build_concept_set(fixed_encoder(table), ["cat"], ["dog"], make_nlce_config(gamma=0.0))
    x = torch.randn(2, 5, D)
    _, p = prepared(cs, x, gamma=0.0)
    pf = cs.concept_projector(0)
    assert torch.allclose(p.prepared.context @ pf, torch.zeros_like(x), atol=1e-5)
    assert torch.allclose(p.prepared.context[..., 2:], x[..., 2:])  # outside the concept span nothing moves


def test_gamma_restores_the_neighbour_part_of_the_concept_component(table):
    cs = build_concept_set(fixed_encoder(table), ["cat"], ["dog"])
    x = torch.randn(1, 4, D)
    pf, pn = cs.concept_projector(0), projector(*cs.neighbor_bases[0])
    for gamma in (0.0, 0.5, 1.0):
        _, p = prepared(cs, x, gamma=gamma)
        expected = x - x @ pf + gamma * (x @ pf) @ pn  # rows: x' = x - beta P_F x + gamma P_N P_F x
        assert torch.allclose(p.prepared.context, expected, atol=1e-5)
    # the shared direction (dim 1) comes back with gamma, the concept-only one (dim 0) does not
    _, off = prepared(cs, x, gamma=0.0)
    _, on = prepared(cs, x, gamma=1.0)
    assert on.prepared.context[..., 1].abs().sum() > off.prepared.context[..., 1].abs().sum() + 1e-3
    assert torch.allclose(on.prepared.context[..., 0], torch.zeros(1, 4), atol=1e-5)


def test_spectral_weights_follow_the_formula():
    rows = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    basis, w = subspace(rows, rank=None, spectral=True, a=200.0)
    r = torch.tensor([9.0, 4.0, 1.0]) / 14
    assert torch.allclose(w, 200 * r / (199 * r + 1), atol=1e-5)
    assert subspace(rows, rank=2, spectral=False, a=1.0)[1].tolist() == [1.0, 1.0]


# ------------------------------------------------------------------------------ live tokens

def test_live_tokens_need_the_ratio_and_the_floor():
    scores = torch.tensor([[[0.0, 30.0, 19.0, 25.0, 40.0, 5.0]]])
    cand = torch.tensor([[[False, True, True, True, True, False]]])
    live = live_token_mask(scores, cand, ratio=0.6, floor=20.0)
    assert live.tolist() == [[[False, True, False, True, True, False]]]  # 19 < 24 = 0.6 * 40; 5 not a candidate
    low = live_token_mask(scores / 4, cand, ratio=0.6, floor=20.0)
    assert not low.any()  # nothing reaches the floor


def test_a_score_exactly_at_the_threshold_is_not_live():
    """The reference's rule is strict: score > max(ratio * max, floor)."""
    scores = torch.tensor([[[0.0, 20.0, 24.0, 40.0]]])
    live = live_token_mask(scores, torch.tensor([[[False, True, True, True]]]), ratio=0.6, floor=20.0)
    assert live.tolist() == [[[False, False, False, True]]]  # 20 == floor, 24 == 0.6 * 40


def test_live_tokens_only_on_conditional_rows_and_real_tokens(table):
    cs = build_concept_set(fixed_encoder(table), ["cat"])
    x = torch.zeros(2, 5, D)
    x[:, :, 0] = 40.0  # every row of both halves points at the concept
    mask = torch.tensor([[False, True, True, False, False]] * 2)
    _, p = prepared(cs, x, cond=torch.tensor([False, True]), mask=mask)
    assert p.prepared.live[0].tolist() == [False] * 5  # unconditional half: never
    assert p.prepared.live[1].tolist() == [False, True, True, False, False]  # start, end, padding: never


def test_the_scores_through_the_bases_equal_the_reference_projectors(table):
    cs = build_concept_set(fixed_encoder(table), ["cat", "car"], {"cat": ["dog"], "car": ["road"]})
    x = torch.randn(2, 5, D) * 20
    _, p = prepared(cs, x)
    reference = torch.einsum("bsd,cde->bcse", x, torch.stack([cs.concept_projector(i) for i in range(2)])).norm(dim=-1)
    assert torch.allclose(p.prepared.scores, reference, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------ gates

def attention_inputs(B=2, N=16, S=5, heads=2, dh=4, hot=1):
    torch.manual_seed(0)
    q, k, v = torch.randn(B, N, heads * dh), torch.randn(B, S, heads * dh), torch.randn(B, S, heads * dh)
    k[:, hot] = q.mean(1) * 3  # the live token attracts attention
    return q, k, v


def test_gate_is_read_at_the_gating_layer_and_resized_elsewhere(table):
    cs = build_concept_set(fixed_encoder(table), ["cat"])
    x = torch.zeros(2, 5, D)
    x[1, 1, 0] = 40.0
    s, p = prepared(cs, x, cond=torch.tensor([False, True]), mask=torch.tensor([[0, 1, 1, 0, 0]] * 2).bool())
    q, k, v = attention_inputs(N=16)
    out = attend(s, p, q, k, v, (4, 4), gating=True)
    assert out.shape == (2, 16, 8) and torch.isfinite(out).all()
    gate = s.diagnostics[-1]["gate_map"]
    assert gate.shape == (2, 4, 4) and gate[0].abs().sum() == 0 and gate[1].min() > 0
    q2, k2, v2 = attention_inputs(N=64)
    out2 = attend(s, p, q2, k2, v2, (8, 8), gating=False)  # a finer layer uses the resized gate
    assert out2.shape == (2, 64, 8)
    plain = plain_attention(q2, k2, v2)
    assert torch.allclose(out2[0], plain[0], atol=1e-6)  # the unconditional row is untouched
    assert not torch.allclose(out2[1], plain[1])


def test_soft_scrub_scales_the_output_by_one_minus_the_gate(table):
    cs = build_concept_set(fixed_encoder(table), ["cat"])
    x = torch.zeros(1, 5, D)
    x[0, 1, 0] = 40.0
    mask = torch.tensor([[0, 1, 1, 0, 0]]).bool()
    q, k, v = attention_inputs(B=1)
    s, p = prepared(cs, x, mask=mask, stage2=False)
    out = attend(s, p, q, k, v, (4, 4), gating=True)
    s2, p2 = prepared(cs, x, mask=mask, stage2=False, stage3=False)
    plain = attend(s2, p2, q, k, v, (4, 4), gating=True)
    g = s.diagnostics[-1]["gate_map"].reshape(1, 16, 1)
    assert torch.allclose(out, plain * (1 - g), atol=1e-6)


def test_mask_mode_blocks_live_tokens_where_the_gate_is_high(table):
    cs = build_concept_set(fixed_encoder(table), ["cat"])
    x = torch.zeros(1, 5, D)
    x[0, 1, 0] = 40.0
    mask = torch.tensor([[0, 1, 1, 0, 0]]).bool()
    q, k, v = attention_inputs(B=1)
    v = torch.zeros_like(v)
    v[:, 1] = 1.0  # only the live token carries a value: its share of attention is visible in the output
    s, p = prepared(cs, x, mask=mask, stage3=False, gate_threshold=1e-6)
    out = attend(s, p, q, k, v, (4, 4), gating=True)
    assert out.abs().max() < 1e-6  # everywhere the gate exceeds the threshold the live token gets no attention


def test_scale_mode_multiplies_the_live_tokens_probabilities_by_one_minus_the_gate(table):
    cs = build_concept_set(fixed_encoder(table), ["cat"])
    x = torch.zeros(1, 5, D)
    x[0, 1, 0] = 40.0
    mask = torch.tensor([[0, 1, 1, 0, 0]]).bool()
    q, k, v = attention_inputs(B=1)
    v = torch.zeros_like(v)
    v[:, 1] = 1.0  # only the live token carries a value: the output is its attention probability
    s, p = prepared(cs, x, mask=mask, stage3=False, suppression="scale")
    scaled = attend(s, p, q, k, v, (4, 4), gating=True)
    s2, p2 = prepared(cs, x, mask=mask, stage2=False, stage3=False)
    plain = attend(s2, p2, q, k, v, (4, 4), gating=True)
    g = s.diagnostics[-1]["gate_map"].reshape(1, 16, 1)
    assert torch.allclose(scaled, plain * (1 - g), atol=1e-6)


def test_binary_scrub_zeroes_the_output_where_the_gate_exceeds_its_threshold(table):
    cs = build_concept_set(fixed_encoder(table), ["cat"])
    x = torch.zeros(1, 5, D)
    x[0, 1, 0] = 40.0
    mask = torch.tensor([[0, 1, 1, 0, 0]]).bool()
    q, k, v = attention_inputs(B=1)
    s, p = prepared(cs, x, mask=mask, stage2=False, scrub="binary", scrub_threshold=0.2)
    out = attend(s, p, q, k, v, (4, 4), gating=True)
    g = s.diagnostics[-1]["gate_map"].reshape(16)
    hot = g > 0.2
    assert hot.any() and (~hot).any()  # the threshold splits the map
    assert out[0, hot].abs().max() == 0 and out[0, ~hot].abs().min() > 0


def test_outside_the_timestep_window_nothing_changes(table):
    cs = build_concept_set(fixed_encoder(table), ["cat"])
    x = torch.randn(1, 5, D) * 20
    s, p = prepared(cs, x, t=950.0)
    assert torch.equal(p.prepared.context, x)
    q, k, v = attention_inputs(B=1)
    assert_unchanged(attend(s, p, q, k, v, (4, 4), True), plain_attention(q, k, v))


def scrub_only(table):
    """A session with stage 3 alone, a context whose word rows 1-2 hold "cat" (row 1), and attention inputs."""
    cs = build_concept_set(fixed_encoder(table), ["cat"])
    x = torch.zeros(1, 5, D)
    x[0, 1, 0] = 40.0
    mask = torch.tensor([[0, 1, 1, 0, 0]]).bool()
    return NlceSession(cs, make_nlce_config(stage1=False, stage2=False), record_maps=True), x, mask, *attention_inputs(B=1)


def test_single_pass_uses_the_previous_gate_before_the_gating_layer_and_a_new_run_drops_it(table):
    s, x, mask, q, k, v = scrub_only(table)
    plain = plain_attention(q, k, v)
    p = open_pass(s, 500.0, context=x, words=mask)
    assert torch.equal(attend(s, p, q, k, v, (4, 4), gating=False), plain)  # first step: no gate yet
    attend(s, p, q, k, v, (4, 4), gating=True)
    first = s.diagnostics[-1]["gate_map"].reshape(1, 16, 1)
    p = open_pass(s, 400.0, context=x, words=mask)
    before_gating = attend(s, p, q, k, v, (4, 4), gating=False)
    assert torch.allclose(before_gating, plain * (1 - first), atol=1e-6)  # soft scrub with the previous step's gate
    assert s.diagnostics[-1]["gate"]["source"] == "previous pass" and s.diagnostics[-1]["step"] == 1
    p = open_pass(s, 500.0, context=x, words=mask)  # the timestep went up: a new sampling run
    assert torch.equal(attend(s, p, q, k, v, (4, 4), gating=False), plain)
    assert (s.diagnostics[-1]["run"], s.diagnostics[-1]["step"]) == (1, 0)


def test_another_batch_layout_carries_its_own_gate(table):
    """ComfyUI may run the conditional and the unconditional rows as two calls: each layout keeps its own gate."""
    s, x, mask, q, k, v = scrub_only(table)
    for t in (500.0, 400.0):
        p = open_pass(s, t, context=x, words=mask, key="cond")
        cond_before = attend(s, p, q, k, v, (4, 4), gating=False)
        attend(s, p, q, k, v, (4, 4), gating=True)
        p = open_pass(s, t, context=x, conditional=torch.tensor([False]), words=mask, key="uncond")
        assert torch.equal(attend(s, p, q, k, v, (4, 4), gating=False), plain_attention(q, k, v))
        attend(s, p, q, k, v, (4, 4), gating=True)
    assert not torch.allclose(cond_before, plain_attention(q, k, v))  # the second step's cond call kept its own gate


@pytest.mark.parametrize("suppression,concepts", [("mask", ["cat"]), ("scale", ["cat"]), ("mask", ["cat", "car", "road"])])
def test_a_pass_reads_nothing_back_from_the_device(table, suppression, concepts):
    """A pass is a pure tensor program: from its start to its last layer, no value goes back to the host (a GPU never
    waits for its host, CUDA graphs can replay it), a list's stage 1 (its triangular solve) included; the rows NLCE
    leaves alone still get the plain attention."""
    cs = build_concept_set(fixed_encoder(table), concepts)
    x = torch.zeros(2, 5, D)
    x[1, 1, 0] = 40.0
    s = NlceSession(cs, make_nlce_config(suppression=suppression, gate_threshold=1e-6))
    with HostReads() as reads:
        for t in (torch.tensor(500.0), torch.tensor(400.0)):
            p = open_pass(s, t, context=x, conditional=torch.tensor([False, True]), words=torch.tensor([[0, 1, 1, 0, 0]] * 2).bool())
            outs = [attend(s, p, *attention_inputs(N=n), shape, gating=g) for n, shape, g in
                    ((64, (8, 8), False), (16, (4, 4), True), (64, (8, 8), False))]
    assert reads.ops == []
    for out, n in zip(outs, (64, 16, 64)):
        plain = plain_attention(*attention_inputs(N=n))
        assert torch.allclose(out[0], plain[0], atol=1e-6) and not torch.allclose(out[1], plain[1])


def test_the_gate_is_read_from_the_keys_before_stage_one_when_the_host_passes_them(table):
    cs = build_concept_set(fixed_encoder(table), ["cat"])
    x = torch.zeros(1, 5, D)
    x[0, 1, 0] = 40.0
    mask = torch.tensor([[0, 1, 1, 0, 0]]).bool()
    q, k, v = attention_inputs(B=1)
    k_stage1 = k * 0.1  # what the modulated context would give: far less attention to the concept
    gates = []
    for dry, keys, incoming in ((True, k, None), (False, k_stage1, k), (False, k_stage1, None)):
        s = NlceSession(cs, record_maps=True)
        p = open_pass(s, 500.0, context=x, words=mask, dry=dry)
        s.cross_attention(p, q, keys, v, 2, (4, 4), True, incoming_keys=None if incoming is None else (lambda: incoming))
        gates.append(s.diagnostics[-1]["gate_map"])
    assert torch.equal(gates[0], gates[1])  # the same gate as the faithful schedule's dry pass
    assert not torch.allclose(gates[0], gates[2])


def test_spatial_shapes_follow_the_latent():
    assert spatial_shape_for(64 * 48, (64, 48)) == (64, 48)
    assert spatial_shape_for(16 * 12, (64, 48)) == (16, 12)
    assert spatial_shape_for(8 * 7, (63, 50)) == (8, 7)  # ceil rounding of odd sizes


# ------------------------------------------------------------------------------ several concepts

def test_only_concepts_present_in_the_prompt_are_active_and_their_operators_compose(table):
    cs = build_concept_set(fixed_encoder(table), ["cat", "car"], {"cat": ["dog"], "car": ["road"]})
    x = torch.zeros(2, 5, D)
    x[:, 1, 0] = 40.0  # both prompts mention cat
    x[1, 2, 3] = 40.0  # only the second mentions car
    x[:, 3] = torch.randn(D)
    mask = torch.tensor([[0, 1, 1, 1, 0]] * 2).bool()
    _, p = prepared(cs, x, mask=mask)
    assert p.prepared.live_by_concept.any(-1).tolist() == [[True, False], [True, True]]
    pc = [cs.modulation(i, 1.0, 1.0) for i in range(2)]
    assert torch.allclose(p.prepared.context[0], x[0] @ pc[0].T, atol=1e-4)
    assert torch.allclose(p.prepared.context[1], x[1] @ (pc[0] @ pc[1]).T, atol=1e-4)
    # no active concept: stage 1 still applies (all concepts), and no token is live
    _, none = prepared(cs, torch.zeros(1, 5, D) + 0.1, mask=mask[:1])
    assert not none.prepared.live.any()
    assert torch.allclose(none.prepared.context[0], (torch.zeros(5, D) + 0.1) @ (pc[0] @ pc[1]).T, atol=1e-5)


def test_gates_of_several_concepts_combine_by_maximum(table):
    x = torch.zeros(1, 5, D)
    x[0, 1, 0] = 40.0
    x[0, 2, 3] = 40.0
    mask = torch.tensor([[0, 1, 1, 0, 0]]).bool()
    q, k, v = attention_inputs(B=1)
    gates = []
    for concepts in (["cat"], ["car"], ["cat", "car"]):
        sub = build_concept_set(fixed_encoder(table), concepts)
        s, p = prepared(sub, x, mask=mask)
        attend(s, p, q, k, v, (4, 4), True)
        gates.append(s.diagnostics[-1]["gate_map"])
    assert torch.allclose(gates[2], torch.maximum(gates[0], gates[1]))


# ------------------------------------------------------------------------------ bad input, files

@pytest.mark.parametrize("kwargs,words", [
    ({"beta": 1.6}, "beta"), ({"gamma": -0.1}, "gamma"), ({"gate_threshold": 1.0}, "gate_threshold"),
    ({"live_ratio": 0.0}, "live_ratio"), ({"scrub_threshold": 0}, "scrub_threshold"), ({"schedule": "twice"}, "schedule"),
])
def test_settings_out_of_range_are_refused(kwargs, words):
    with pytest.raises(NlceError, match=words) as e:
        make_nlce_config(**kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kwargs", [{"beta": "1"}, {"stage1": 1}, {"neighbor_rank": 2.5}, {"concept_rank": True},
                                    {"gamma": float("nan")}, {"scrub": None, "schedule": 2}])
def test_settings_of_the_wrong_type_are_refused(kwargs):
    with pytest.raises(NlceError, match="not valid") as e:
        make_nlce_config(**kwargs)
    assert "\n" not in str(e.value)


def test_presets_and_overrides():
    nudity = make_nlce_config("nudity", beta=1.2, gamma=None)  # None: keep the preset's value
    assert (nudity.gamma, nudity.beta, nudity.concept_rank, nudity.scrub) == (0.5, 1.2, 16, "binary")
    assert make_nlce_config(neighbor_rank=4.0).neighbor_rank == 4 and isinstance(make_nlce_config(beta=1).beta, float)
    assert derive_nlce_config(nudity, gamma=0.7).concept_rank == 16 and derive_nlce_config(nudity, "object").concept_rank is None
    with pytest.raises(NlceError, match="unknown NLCE preset"):
        make_nlce_config("van gogh")


def test_spectral_weights_over_all_values_or_the_kept_ones():
    rows = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    _, over_all = subspace(rows, rank=2, spectral=True, a=200.0, weights_over="all")
    _, over_kept = subspace(rows, rank=2, spectral=True, a=200.0, weights_over="kept")
    r_all, r_kept = torch.tensor([9.0, 4.0]) / 14, torch.tensor([9.0, 4.0]) / 13
    assert torch.allclose(over_all, 200 * r_all / (199 * r_all + 1), atol=1e-6)
    assert torch.allclose(over_kept, 200 * r_kept / (199 * r_kept + 1), atol=1e-6)


def test_linearly_dependent_rows_add_no_arbitrary_directions():
    rows = torch.zeros(4, D)
    rows[0, 0] = rows[2, 0] = 30.0  # a term given twice
    rows[1, 1] = rows[3, 1] = 20.0
    basis, weights = subspace(rows, rank=None, spectral=False, a=1.0)
    assert basis.shape == (D, 2) and torch.allclose(projector(basis, weights), torch.diag(torch.tensor([1.0, 1, 0, 0, 0, 0])), atol=1e-6)


def test_a_term_list_is_one_subspace_and_can_drop_start_rows():
    start = torch.zeros(D)
    start[5] = 50.0  # the start row is the same for every text
    enc = fixed_encoder({t: torch.stack([start, *rows]) for t, rows in {
        "naked": [torch.eye(D)[0] * 30, torch.eye(D)[4] * 9], "nude": [torch.eye(D)[1] * 25, torch.eye(D)[4] * 8],
        "dressed": [torch.eye(D)[2] * 20, torch.eye(D)[4] * 7]}.items()})
    with_start = build_concept_set(enc, [["naked", "nude"]], ["dressed"])
    assert with_start.concepts == ["naked | nude"] and with_start.terms["naked | nude"] == ["naked", "nude"]
    assert with_start.concept_projector(0)[5, 5] > 0.99  # the start direction is part of the subspace
    same = build_concept_set(enc, ["naked | nude"], ["dressed"])
    assert torch.equal(same.concept_projector(0), with_start.concept_projector(0))
    without = build_concept_set(enc, [["naked", "nude"]], ["dressed"], make_nlce_config(drop_start_row=True))
    pf = without.concept_projector(0)
    assert pf[5, 5].abs() < 1e-6 and pf[0, 0] > 0.99 and pf[1, 1] > 0.99
    assert projector(*without.neighbor_bases[0])[5, 5].abs() < 1e-6  # neighbours lose their start row too


def test_nudity_stands_for_the_shipped_term_list():
    from shared_core.nlce import NUDITY_TERMS, concept_terms

    assert concept_terms("Nudity") == ("nudity", list(NUDITY_TERMS)) and len(NUDITY_TERMS) >= 16
    assert concept_terms(" naked |  nude ") == ("naked | nude", ["naked", "nude"])
    assert concept_terms("Van Gogh") == ("Van Gogh", ["Van Gogh"])
    for bad in (5, None, ["cat", 3]):
        with pytest.raises(NlceError, match="a text or a list"):
            concept_terms(bad)


def test_bad_concepts_are_refused(table):
    enc = fixed_encoder({**table, "": torch.zeros(2, D)})
    with pytest.raises(NlceError, match="no concept"):
        build_concept_set(enc, [])
    with pytest.raises(NlceError, match="no concept"):
        build_concept_set(enc, ["  "])
    with pytest.raises(NlceError, match="itself a concept"):
        build_concept_set(enc, ["cat"], ["dog", " Cat "])
    short = fixed_encoder({"x": torch.ones(2, D)})
    with pytest.raises(NlceError, match="no real tokens"):
        build_concept_set(short, ["x"])
    with pytest.raises(NlceError, match="twice"):
        build_concept_set(enc, ["cat", " CAT"])
    with pytest.raises(NlceError, match="itself a concept"):
        build_concept_set(enc, [["cat", "car"]], ["car"])  # a term of a term-list concept


def test_operator_files_round_trip_and_bad_files_are_refused(table, tmp_path):
    cs = build_concept_set(fixed_encoder(table), ["cat", "car"], {"cat": ["dog"]}, make_nlce_config("celebrity"))
    path = cs.save(str(tmp_path / "ops.safetensors"))
    back = ConceptSet.load(path)
    assert back.concepts == cs.concepts and back.neighbors == cs.neighbors and back.config == cs.config
    assert back.terms == cs.terms
    assert torch.equal(back.modulation(0, 1.0, 0.9), cs.modulation(0, 1.0, 0.9)) and back.neighbor_bases[1] is None
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a file")
    for bad in (str(junk), str(tmp_path / "missing.safetensors")):
        with pytest.raises(NlceError) as e:
            ConceptSet.load(bad)
        assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------ real encoder, mining

def test_clip_rows_are_the_real_tokens_and_mining_ranks_words():
    model, tok = tiny_clip()
    enc = clip_row_encoder(model, tok)
    rows = enc(["a cat", "cat"])
    assert [r.shape[0] for r in rows] == [4, 3]  # start, words, end
    found = mine_neighbors(enc, "Van Gogh", candidates=["monet", "goghs", "painter", "gogh"], top_k=3)
    words = [w for w, _ in found]
    assert len(found) == 3 and "gogh" not in words and "goghs" not in words and "van" not in words
    assert [s for _, s in found] == sorted((s for _, s in found), reverse=True)
    with pytest.raises(NlceError):
        mine_neighbors(enc, " ")
    plain = lambda texts: enc(texts)  # noqa: E731  (an encoder without the vocabulary pre-filter's token table)
    with pytest.raises(NlceError, match="vocabulary=False"):
        mine_neighbors(plain, "cat")
    assert [w for w, _ in mine_neighbors(plain, "cat", candidates=["dog", "cats"], vocabulary=False)] == ["dog"]


def test_auto_neighbours_never_mine_another_erased_concept():
    from shared_core.nlce import neighbor_table

    model, tok = tiny_clip()
    enc = clip_row_encoder(model, tok)
    table = neighbor_table(enc, ["cat", "dog | puppy"], "auto", top_k=50)
    assert set(table) == {"cat", "dog | puppy"}
    assert not {"dog", "puppy", "dogs"} & set(table["cat"]) and "cat" not in table["dog | puppy"]
    cs = build_concept_set(enc, ["cat", "dog | puppy"], table)  # and the set builds (no neighbour is a concept)
    assert cs.neighbors == table
    assert neighbor_table(enc, ["cat"], "dog, fox\nlion") == ["dog", "fox", "lion"] and neighbor_table(enc, ["cat"], " ") is None


def test_prompt_token_masks_mark_the_words_only():
    _, tok = tiny_clip()
    mask = prompt_token_mask(tok, ["a photo of a cat", ""], length=10)
    assert mask.tolist() == [[False] + [True] * 5 + [False] * 4, [False] * 10]


def test_hostile_operator_files_get_one_line_refusals_before_anything_is_applied(table, tmp_path):
    """Operator files are checked as patch files are: metadata types, tensor names, dtypes, shapes, values, checksum."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    cs = build_concept_set(fixed_encoder(table), ["cat"], {"cat": ["dog"]})
    good = cs.save(str(tmp_path / "good.safetensors"))
    with safe_open(good, "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    plain = {k: v for k, v in meta.items() if k != "checksum"}  # an older file: no checksum to get in the way

    def variant(name, tensors_=None, **changes):
        path = str(tmp_path / f"{name}.safetensors")
        save_file(tensors_ if tensors_ is not None else tensors, path, metadata={**plain, **changes})
        return path

    cases = {
        variant("concepts-dict", concepts=json.dumps({"cat": 1})): "concepts must be a list of texts",
        variant("neighbors-list", neighbors=json.dumps(["dog"])): "neighbours must map",
        variant("config-list", config=json.dumps([1])): "config must be a JSON object",
        variant("width-text", width="wide"): "metadata is incomplete",
        variant("family", family="sd2"): "family 'sd2' is not one NLCE supports",
        variant("unknown", {**tensors, "extra.0.basis": torch.zeros(2)}): "unexpected tensor 'extra.0.basis'",
        variant("missing", {k: v for k, v in tensors.items() if k != "concept.0.weights"}): "missing",
        variant("huge", {**tensors, "concept.0.basis": tensors["concept.0.basis"] * 3e38}): "not an orthonormal basis",
        variant("nan", {**tensors, "concept.0.weights": tensors["concept.0.weights"] * float("nan")}): "NaN or Inf",
        variant("shape", {**tensors, "concept.0.basis": torch.zeros(D + 1, 2)}): "has shape",
        variant("weights", {**tensors, "concept.0.weights": tensors["concept.0.weights"] + 5}): "between 0 and 1",
    }
    for dtype in (torch.int8, torch.bool, getattr(torch, "float8_e4m3fn", torch.int16)):
        cases[variant(f"dtype-{dtype}", {**tensors, "concept.0.basis": tensors["concept.0.basis"].to(dtype)})] = "operators are float16"
    with safe_open(good, "pt") as f:
        flipped = {k: f.get_tensor(k) for k in f.keys()}
    flipped["concept.0.basis"] = flipped["concept.0.basis"].clone()
    flipped["concept.0.basis"].view(torch.int32).view(-1)[0] ^= 1
    cases[variant("flipped", flipped, checksum=meta["checksum"])] = "checksum"
    for path, words in cases.items():
        with pytest.raises(NlceError, match=words) as e:
            ConceptSet.load(path)
        assert "\n" not in str(e.value), path
    half = {k: (v.half() if k.endswith("basis") else v) for k, v in tensors.items()}  # fp16 bases are read as fp32
    assert ConceptSet.load(variant("half", half)).bases[0][0].dtype == torch.float32
