"""The Erasure tab: train on the loaded model's CLIP-L (the model is not touched), save, progress, cancel."""

import pytest
import torch
from test_a1111_support import ForgeSd1, LoraStandIn, Sd1Model, forge_text_encoder, same, snapshot, text_model

from a1111_extension import training
from shared_core.encoders import canonical_parameters, model_signature, signatures_match
from shared_core.errors import HirmError
from shared_core.patch import check_compatible, load_patch


def settings(folder, **kw):
    return {"concepts": "cat", "method": "random", "anchor": "", "preset": "object", "steps": 2, "seed": 0, "name": "no cat",
            "overwrite": False, "folder": str(folder), **kw}


def test_training_saves_a_patch_for_the_loaded_encoder_and_leaves_the_model_as_it_was(tmp_path):
    model = Sd1Model()
    before = snapshot(model)
    steps = []
    path, report = training.train(model, progress=lambda s, t, loss: steps.append((s, t, loss is None)), **settings(tmp_path))
    assert path == str(tmp_path / "no cat.safetensors")
    assert [s for s, _, measuring in steps if not measuring] == [1, 2] and steps[-1][0] == steps[-1][1]  # then the report
    patch = load_patch(path)
    check_compatible(patch, text_model(model))
    assert patch.concepts == ["cat"] and "target displacement" in report
    assert same(snapshot(model), before)


def test_training_uses_the_checkpoints_weights_not_a_lora_the_webui_merged_into_them(tmp_path):
    model = Sd1Model(seed=3)
    te = text_model(model)
    base = model_signature(te)
    lora = LoraStandIn(te)
    lora.add("style", te, scale=0.5)
    lora.wanted = ("style",)
    model.get_learned_conditioning(["merge it"])
    assert not signatures_match(model_signature(te), base)  # the LoRA is merged into the weights right now
    path, _ = training.train(model, **settings(tmp_path))
    assert signatures_match(load_patch(path).metadata["base_signature"], base)


def test_forge_training_reads_the_encoder_behind_its_patcher_without_lora(tmp_path):
    model = ForgeSd1(seed=4)
    clip = model.forge_objects_original.clip
    te = forge_text_encoder(clip)
    base = model_signature(te)
    lora = clip.clone()
    key = "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    lora.add_patches(filename="style", patches={key: (torch.ones_like(dict(lora.cond_stage_model.named_parameters())[key]),)})
    lora.patcher.refresh_loras()  # merged into the shared module, original kept in the LoraLoader's backup
    path, _ = training.train(model, **settings(tmp_path))
    assert signatures_match(load_patch(path).metadata["base_signature"], base)


def test_cancel_stops_training_and_writes_nothing(tmp_path):
    model = Sd1Model(seed=5)
    before = {k: v.clone() for k, v in canonical_parameters(text_model(model)).items()}
    with pytest.raises(HirmError, match="cancelled"):
        training.train(model, should_cancel=lambda: True, **settings(tmp_path))
    assert list(tmp_path.iterdir()) == []
    assert all(torch.equal(v, before[k]) for k, v in canonical_parameters(text_model(model)).items())


@pytest.mark.parametrize("name, message", [("", "not a plain file name"), ("../x", "not a plain file name"),
                                           ("a/b", "not a plain file name"), ("taken", "already exists")])
def test_bad_output_names_are_refused_before_training(tmp_path, name, message):
    (tmp_path / "taken.safetensors").write_bytes(b"")
    with pytest.raises(HirmError, match=message):
        training.output_path(str(tmp_path), name, overwrite=False)
    assert training.output_path(str(tmp_path), "taken.safetensors", overwrite=True).endswith("taken.safetensors")


def test_bad_training_input_is_one_line(tmp_path):
    for kw, message in (({"concepts": " , "}, "no concept"), ({"method": "superordinate"}, "needs an anchor")):
        with pytest.raises(HirmError, match=message):
            training.train(Sd1Model(), **settings(tmp_path, **kw))
    sd2 = Sd1Model()
    sd2.is_sd1, sd2.is_sd2 = False, True
    # in the webui's words: which checkpoint, and where to pick another
    with pytest.raises(HirmError, match=r"the loaded checkpoint 'tiny-sd15.safetensors \[0123456789\]' is an SD2.x model .*"
                                        "'Stable Diffusion checkpoint' menu"):
        training.train(sd2, **settings(tmp_path))
    no_text = Sd1Model()
    no_text.cond_stage_model = None
    with pytest.raises(HirmError, match=r"'tiny-sd15.safetensors \[0123456789\]' has no CLIP text encoder HiRM can train"):
        training.train(no_text, **settings(tmp_path))
    with pytest.raises(HirmError, match="no Stable Diffusion model is loaded; pick a checkpoint"):
        training.train(None, **settings(tmp_path))


def test_the_background_runner_reports_progress_then_the_result_or_the_error():
    def work(progress):
        progress(1, 2, 0.5)
        progress(2, 2, 0.25)
        return "/x/p.safetensors", "report"
    updates = list(training.run_in_background(work, poll=0.01))
    assert updates[-1] == ("saved x/p.safetensors", "report")

    def fails(progress):
        raise HirmError("training cancelled; no patch was made and the encoder is unchanged")
    assert list(training.run_in_background(fails, poll=0.01))[-1][0].startswith("training cancelled")

    def crashes(progress):
        raise RuntimeError("CUDA error")
    assert "RuntimeError: CUDA error" in list(training.run_in_background(crashes, poll=0.01))[-1][0]
