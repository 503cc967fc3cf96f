"""HiRM training on tiny and real-size CLIP encoders."""

import pytest
import torch
from tiny import clip_l_config, random_clip, same_weights, snapshot, tiny_clip

from shared_core.errors import Cancelled, HirmError, TrainingError
from shared_core.hirm import METHODS, SUPERVISION_POINTS, average_patches, make_config, train_patch
from shared_core.tokenizer import clip_tokenizer


@pytest.fixture(scope="module")
def clip():
    return tiny_clip(seed=1)


def test_loss_falls_only_layer0_changes_and_the_model_is_restored(clip):
    model, tok = clip
    before = snapshot(model)
    losses = []
    patch = train_patch(model, tok, concepts=["Van Gogh"], steps=15, lr=1e-3, report=False,
                        progress=lambda step, total, loss: losses.append((step, total, loss)))
    assert [s for s, _, _ in losses] == list(range(1, 16)) and losses[0][1] == 15
    assert losses[-1][2] < losses[0][2]
    assert same_weights(model, before)
    assert patch.deltas and all(n.startswith("text_model.encoder.layers.0.") for n in patch.deltas)
    assert not any("layer_norm" in n for n in patch.deltas)
    assert all(d.abs().max() > 0 for d in patch.deltas.values())
    assert len(patch.deltas) == 12  # q, k, v, out, fc1, fc2: weight + bias


def test_training_is_deterministic(clip):
    model, tok = clip
    a = train_patch(model, tok, concepts=["church"], preset="object", steps=4, seed=7, report=False)
    b = train_patch(model, tok, concepts=["church"], preset="object", steps=4, seed=7, report=False)
    c = train_patch(model, tok, concepts=["church"], preset="object", steps=4, seed=8, report=False)
    assert all(torch.equal(a.deltas[k], b.deltas[k]) for k in a.deltas)
    assert not all(torch.equal(a.deltas[k], c.deltas[k]) for k in a.deltas)


def test_a_model_as_transformers_loads_it_trains_the_same_and_keeps_its_flags_and_no_gradients(clip):
    """from_pretrained gives every parameter requires_grad=True: only the trained block may take gradients, the patch
    must be the one a frozen model gives, and the model is handed back with its own flags and no .grad tensors."""
    model, tok = clip
    frozen = train_patch(model, tok, concepts=["church"], steps=3, report=False)
    model.requires_grad_(True)
    try:
        loaded = train_patch(model, tok, concepts=["church"], steps=3, report=False)
        assert all(p.requires_grad and p.grad is None for p in model.parameters())
    finally:
        model.requires_grad_(False)
    assert all(torch.equal(frozen.deltas[k], loaded.deltas[k]) for k in frozen.deltas)
    train_patch(model, tok, concepts=["church"], steps=1, report=False)
    assert not any(p.requires_grad or p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_moves_the_target(clip, method):
    model, tok = clip
    patch = train_patch(model, tok, concepts=["nudity"], method=method, anchor="person", steps=5, lr=1e-3)
    report = patch.report
    assert report["target_cosine_mean"] < 1.0
    assert report["n_nontarget_prompts"] >= 50
    assert patch.metadata["config"]["method"] == method


@pytest.mark.parametrize("point", SUPERVISION_POINTS)
def test_supervision_points(clip, point):
    model, tok = clip
    patch = train_patch(model, tok, concepts=["cat"], steps=2, supervision=point, report=False)
    assert patch.metadata["config"]["supervision"] == point


def test_trainable_layers_setting(clip):
    model, tok = clip
    patch = train_patch(model, tok, concepts=["cat"], steps=2, trainable_layers=[0, 1], report=False)
    assert {n.split(".")[3] for n in patch.deltas} == {"0", "1"}
    with pytest.raises(HirmError, match="does not exist"):
        train_patch(model, tok, concepts=["cat"], steps=1, trainable_layers=[7], report=False)
    with pytest.raises(HirmError, match="0 and -3 are the same layer of this 3-layer encoder"):  # stepped twice, before
        train_patch(model, tok, concepts=["cat"], steps=1, trainable_layers=[0, -3], report=False)


def test_multi_concept_joint_and_average(clip):
    model, tok = clip
    joint = train_patch(model, tok, concepts=["cat", "dog"], steps=3, report=False)
    avg = train_patch(model, tok, concepts=["cat", "dog"], steps=3, multi="average", report=False)
    single = [train_patch(model, tok, concepts=[c], steps=3, report=False) for c in ("cat", "dog")]
    assert joint.concepts == avg.concepts == ["cat", "dog"]
    manual = average_patches(single)
    # the averaged patch of separately trained concepts equals delta averaging by hand
    assert all(torch.allclose(avg.deltas[k], manual.deltas[k], atol=1e-7) for k in avg.deltas)
    assert not all(torch.allclose(joint.deltas[k], avg.deltas[k]) for k in avg.deltas)


def test_presets_give_the_paper_numbers():
    assert (make_config("x").lr, make_config("x").steps) == (5e-5, 40)
    assert make_config("x", method="superordinate", anchor="painting").steps == 30
    assert (make_config("x", preset="object").steps, make_config("x", preset="object", method="superordinate", anchor="a").steps) == (25, 15)
    assert (make_config("x", preset="nudity").lr, make_config("x", preset="nudity").steps) == (1e-4, 50)
    assert make_config("x", preset="nudity", method="superordinate", anchor="a").steps == 25
    assert make_config("x", steps=3, lr=1e-3).steps == 3
    assert make_config("Nudity", preset="nudity").concepts[0].startswith("naked, nude")


@pytest.mark.parametrize("kwargs, message", [
    ({"concepts": ["  "]}, "empty concept"),
    ({"concepts": []}, "empty concept"),
    ({"concepts": ["x"], "method": "magic"}, "unknown method"),
    ({"concepts": ["x"], "preset": "faces"}, "unknown preset"),
    ({"concepts": ["x"], "method": "superordinate"}, "needs an anchor"),
    ({"concepts": ["x"], "lr": -1}, "learning rate"),
    ({"concepts": ["x"], "templates": ["no slot"]}, "exactly one '{}'"),
])
def test_bad_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(HirmError, match=message) as e:
        make_config(kwargs.pop("concepts"), **kwargs)
    assert "\n" not in str(e.value)


def test_too_long_concept_is_refused_not_truncated(clip):
    model, tok = clip
    with pytest.raises(HirmError, match="at most 75"):
        train_patch(model, tok, concepts=["word " * 80], steps=1, report=False)


def test_non_finite_training_stops_and_restores(clip):
    model, tok = clip
    before = snapshot(model)
    with pytest.raises(TrainingError, match="diverged"):
        train_patch(model, tok, concepts=["cat"], steps=3, target_scale=1e38, report=False)
    assert same_weights(model, before)


def test_cancel_leaves_the_encoder_untouched(clip):
    model, tok = clip
    before = snapshot(model)
    calls = []
    with pytest.raises(Cancelled):
        train_patch(model, tok, concepts=["cat"], steps=10, report=False,
                    should_cancel=lambda: calls.append(1) or len(calls) > 3)
    assert same_weights(model, before)


def test_cancel_is_heard_within_a_step_of_a_long_list(clip):
    """A list's step runs many batches: a cancel asked during one ends it at the next batch, not at the next step."""
    model, tok = clip
    before = snapshot(model)
    calls = []
    with pytest.raises(Cancelled):
        train_patch(model, tok, concepts=["cat", "dog", "tree"], steps=1, batch_prompts=1, report=False,
                    should_cancel=lambda: calls.append(1) or len(calls) > 1)
    assert len(calls) == 2 and same_weights(model, before)


def test_real_clip_l_architecture_smoke():
    model = random_clip(clip_l_config(), seed=0)
    patch = train_patch(model, clip_tokenizer(), concepts=["Van Gogh"], steps=2, report=False)
    assert patch.deltas["text_model.encoder.layers.0.mlp.fc1.weight"].shape == (3072, 768)
    assert patch.metadata["encoder"]["family"] == "clip-l"
    assert sum(t.numel() for t in patch.deltas.values()) * 2 < 15e6  # fp16 file under 15 MB
