"""Fidelity: the project computes what the authors' own code computed on the same tiny models.

The golden numbers (tests/data/golden, described in docs/fidelity.md) come from the reference
implementations run on random-weight models; these tests rebuild the models with public calls and
hold the project's defaults and presets to the tolerances stored in golden.json.
"""

import copy

import golden
import pytest
import torch

from shared_core.cli import main
from shared_core.hirm import train_patch
from shared_core.adapters import apply_nlce
from shared_core.nlce import NUDITY_TERMS
from shared_core.patch import apply_patch, load_patch
from shared_core.tokenizer import clip_tokenizer

G = golden.settings()
TOL = G["tolerances"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The goldens were computed on one CPU thread; more threads reorder float sums (HiRM deltas move by ~2e-5)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_tokenizer_gives_the_golden_token_ids():
    tok = clip_tokenizer()
    for table in G["token_ids"].values():
        for text, ids in table.items():
            assert tok(text).input_ids == ids, text


# ---------------------------------------------------------------------------------------------- HiRM

# AdamW divides each update by sqrt(v) + eps, so last-bit differences in near-zero gradients grow into
# visible ones: on another CPU the reference's OWN deltas move by up to 1.7e-5 (mlp.fc1.weight, measured
# on an AMD EPYC with AVX-512, one thread) from the stored numbers, and HiRM-S's losses by ~1e-6. The
# stored numbers are therefore held to these cross-machine bounds; the bit-for-bit claim is checked
# against the reference's training loop run here, in this process (below).
DELTA_ACROSS_MACHINES = 5e-5
LOSS_ACROSS_MACHINES = 1e-5


def _check_deltas(deltas, reference):
    names = [k[len("delta."):] for k in reference if k.startswith("delta.")]
    assert sorted(names) == sorted(deltas)
    for name in names:
        if name.endswith("self_attn.k_proj.bias"):  # its true gradient is 0: float noise only
            assert deltas[name].abs().max() <= 1e-4, name
        else:
            assert golden.rel(deltas[name], reference["delta." + name]) <= DELTA_ACROSS_MACHINES, name


def _losses_match(losses, reference):
    assert len(losses) == len(reference)
    return max(abs(a - b) / abs(b) for a, b in zip(losses, reference.tolist())) <= LOSS_ACROSS_MACHINES


def reference_hirm_r_deltas(model, concept: str) -> dict[str, torch.Tensor]:
    """The reference's HiRM-R loop as golden.json describes it, written out step by step (canonical names).

    The whole encoder's parameters go to AdamW (betas 0.9/0.98, eps 1e-6, weight decay 1e-8,
    lr 5e-5), only layer 0's attention projections and MLP require grad; the target is the first
    draw of torch.rand(1, 77, width) after manual_seed(42), over its Frobenius norm, times 5000;
    each of 40 steps runs one full forward (unused, as the reference does), then the forward whose
    last out_proj output is compared with the target by MSE.
    """
    from shared_core.encoders import canonical_parameters, encoder_layers

    params = canonical_parameters(model)
    before = {n: p.detach().clone() for n, p in params.items()}
    for n, p in params.items():
        p.requires_grad_(".layers.0.self_attn." in n and "layer_norm" not in n or ".layers.0.mlp." in n)
    optimizer = torch.optim.AdamW(model.parameters(), 5e-5, (0.9, 0.98), 1e-6, 1e-8)
    torch.manual_seed(42)
    target = torch.rand(1, 77, model.config.hidden_size)[0]
    target = target / target.norm() * 5000
    ids = clip_tokenizer()(concept, padding="max_length", truncation=True, max_length=77, return_tensors="pt").input_ids
    out_proj = encoder_layers(model)[-1].self_attn.out_proj
    for _ in range(40):
        model(ids)
        seen = []
        hook = out_proj.register_forward_hook(lambda module, args, output: seen.append(output))
        model(input_ids=ids)
        hook.remove()
        loss = torch.nn.functional.mse_loss(seen[0], target[None])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {n: (p.detach() - before[n]) for n, p in params.items() if p.requires_grad}


def test_hirm_r_with_default_settings_is_the_reference_training():
    ref, s = golden.tensors("hirm_R"), G["hirm_R"]
    model, losses = golden.text_encoder("hirm"), []
    patch = train_patch(model, clip_tokenizer(), concepts=[s["concept"]], preset="style", report=False,
                        progress=lambda step, total, loss: losses.append(loss))  # no seed, lr or steps: the defaults
    assert patch.metadata["config"]["seed"] == s["seed"] == 42
    _check_deltas(patch.deltas, ref)
    assert _losses_match(losses, ref["loss"])
    apply_patch(model, patch)
    ids = clip_tokenizer()(s["concept"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert golden.rel(model(ids).last_hidden_state[0], ref["encoder_output"]) < 1e-5


def test_hirm_s_matches_the_straight_implementation():
    ref, s = golden.tensors("hirm_S"), G["hirm_S"]
    losses = []
    patch = train_patch(golden.text_encoder("hirm"), clip_tokenizer(), concepts=[s["concept"]], method="superordinate",
                        anchor=s["anchor"], preset="style", report=False,
                        progress=lambda step, total, loss: losses.append(loss))
    assert patch.metadata["config"]["steps"] == s["steps"]
    _check_deltas(patch.deltas, ref)
    assert _losses_match(losses, ref["loss"])


def test_hirm_train_without_a_seed_gives_the_reference_deltas_bit_for_bit(tmp_path):
    folder = tmp_path / "encoder"
    golden.text_encoder("hirm").save_pretrained(folder)
    out = tmp_path / "vangogh.safetensors"
    assert main(["train", str(folder), "--concept", "Van Gogh", "--dtype", "fp32", "--quiet", "--out", str(out)]) == 0
    reference = reference_hirm_r_deltas(golden.text_encoder("hirm"), "Van Gogh")
    stored = load_patch(str(out)).deltas
    assert sorted(stored) == sorted(reference)
    for name, delta in stored.items():
        assert torch.equal(delta, reference[name]), name
    _check_deltas(stored, golden.tensors("hirm_R"))


# ---------------------------------------------------------------------------------------------- NLCE


@pytest.fixture(scope="module")
def pipe():
    return golden.pipeline()


def _sample(pipe, prompt, init):
    c = G["nlce_common"]
    with torch.no_grad():
        return pipe(prompt, num_inference_steps=c["steps"], guidance_scale=c["guidance_scale"], height=init.shape[-2],
                    width=init.shape[-1], latents=init.clone(), output_type="latent").images


def _projector(basis_weights):
    b, w = basis_weights
    return (b * w) @ b.T


def _check_nlce(pipe, tag, concepts, neighbors, **settings):
    ref, s = golden.tensors(f"nlce_{tag}"), G[f"nlce_{tag}"]
    tol = TOL["nlce_latents_rel_l2"]
    for k, prompt in enumerate(s["prompts"]):
        with apply_nlce(pipe, concepts, neighbors, schedule="faithful", live_floor=G["nlce_common"]["live_floor"],
                        record_maps=True, **settings) as handle:
            cs, cfg = handle.concept_set, handle.session.config
            assert golden.rel(cs.concept_projector(0), ref["P_F"]) < TOL["nlce_operator_rel_l2"]
            assert golden.rel(cs.modulation(0, cfg.beta, cfg.gamma), ref["P_c"]) < TOL["nlce_operator_rel_l2"]
            if "P_N" in ref:
                assert golden.rel(_projector(cs.neighbor_bases[0]), ref["P_N"]) < TOL["nlce_operator_rel_l2"]
            latents = _sample(pipe, prompt, ref["init_latents"])
            live = next(d["live_tokens"][-1] for d in handle.diagnostics if d["live_tokens"] is not None)
            # a dry pass runs at every step; the reference reads gates inside the timestep window only
            dry_gates = [d["gate_map"][-1] for d in handle.diagnostics if d["dry"] and d["timestep"] <= cfg.t_max]
        assert live == s["per_prompt"][k]["live_tokens"]
        assert golden.rel(latents, ref[f"prompt{k}.latents"]) < tol, prompt
        assert len(dry_gates) == ref[f"prompt{k}.gate_cond"].shape[0]
        assert max(golden.rel(a, b) for a, b in zip(dry_gates, ref[f"prompt{k}.gate_cond"])) < 1e-5


def test_nlce_object_faithful_matches_the_reference(pipe):
    s = G["nlce_object"]
    _check_nlce(pipe, "object", [s["concept"]], {s["concept"]: s["neighbors"]})


def test_nlce_nudity_preset_matches_the_reference(pipe):
    s = G["nlce_nudity"]
    assert list(NUDITY_TERMS) == s["terms"]  # "nudity" stands for this term list: ONE subspace
    _check_nlce(pipe, "nudity", ["nudity"], {"nudity": s["neighbors"]}, preset="nudity")


def test_nlce_nudity_from_an_explicit_term_list_is_the_same_subspace(pipe):
    s = G["nlce_nudity"]
    terms = list(s["terms"])
    handle = apply_nlce(pipe, [terms], s["neighbors"], preset="nudity")
    try:
        ref = golden.tensors("nlce_nudity")
        assert golden.rel(handle.concept_set.concept_projector(0), ref["P_F"]) < TOL["nlce_operator_rel_l2"]
        assert handle.concept_set.terms[handle.concept_set.concepts[0]] == terms
    finally:
        handle.remove()


def test_the_reference_as_published_differs_only_by_the_unconditional_half(pipe):
    """The one intended difference (SPEC section 2): the reference also gates the unconditional rows."""
    ref, s = golden.tensors("nlce_object"), G["nlce_object"]
    with apply_nlce(copy.deepcopy(pipe), [s["concept"]], {s["concept"]: s["neighbors"]}, schedule="faithful",
                    live_floor=G["nlce_common"]["live_floor"]) as handle:
        latents = _sample(handle.pipe, s["prompts"][0], ref["init_latents"])
    difference = golden.rel(latents, ref["prompt0.latents_reference_as_published"])
    assert 1e-3 < difference < 1e-2  # measured 3.8e-3: small against the erasure's own 0.088
