"""Lists of concepts: read from a file with every problem said first, trained a batch at a time (memory does not grow
with the list), held off the prompts that must not change, reported per concept."""

import pytest
import torch
from tiny import snapshot, same_weights, tiny_clip

from shared_core.errors import HirmError
from shared_core.hirm import train_patch
from shared_core.hirm.train import retain_prompts
from shared_core.hirm.config import make_config, preservation_weight
from shared_core.lists import read_list
from shared_core.patch import load_patch, save_patch

CONCEPTS = ["cat", "dog", "car", "tree", "house"]


@pytest.fixture(scope="module")
def clip():
    return tiny_clip()


def test_a_concept_file_skips_comments_and_blank_lines_and_names_each_problem_with_its_line(tmp_path):
    good = tmp_path / "artists.txt"
    good.write_text("# artists to erase\nVan Gogh\n\n  Claude   Monet \nnaked | nude\n", encoding="utf-8")
    assert read_list(str(good)) == ["Van Gogh", "Claude Monet", "naked | nude"]
    cases = {"Van Gogh\nmonet\nvan gogh\n": "line 3: 'van gogh' is given twice (first on line 1)",
             "cat\n" + "word " * 80 + "\n": "line 2: the concept is 80 tokens, CLIP reads at most 75",
             "cat\nca\u200bt\n": "line 2: the concept holds an invisible format character",
             "cat\nsee \x1b[31mred\n": "line 2: the concept holds a control character",
             "# only a comment\n\n": "no concept in the file"}
    for i, (text, words) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.txt"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(HirmError, match=words.replace("(", r"\(").replace(")", r"\)")) as e:
            read_list(str(path))
        assert "\n" not in str(e.value)
    with pytest.raises(HirmError, match="no such concept list file"):
        read_list(str(tmp_path / "missing.txt"))
    with pytest.raises(HirmError, match="'Cat' is given twice"):
        make_config(["cat", "Cat"])


def test_a_step_in_batches_is_the_step_over_the_whole_list(clip):
    """Gradients accumulated over batches of 2 prompts give the patch one batch of every prompt gives (to rounding)."""
    model, tok = clip
    one = train_patch(model, tok, concepts=CONCEPTS, steps=3, report=False, preservation=0)
    batched = train_patch(model, tok, concepts=CONCEPTS, steps=3, report=False, preservation=0, batch_prompts=2)
    for name, delta in one.deltas.items():
        if name.endswith("k_proj.bias"):  # its true gradient is exactly 0: its delta is float noise either way
            assert batched.deltas[name].abs().max() < 1e-4
            continue
        assert (batched.deltas[name] - delta).norm() <= 1e-4 * delta.norm(), name


def test_preservation_is_off_for_one_concept_on_for_several_and_holds_the_retain_prompts(clip):
    model, tok = clip
    assert preservation_weight(make_config(["cat"])) == 0.0 and preservation_weight(make_config(CONCEPTS)) == 0.003
    assert preservation_weight(make_config(["cat"], preservation=2.0)) == 2.0
    kept = retain_prompts(make_config(["lion"]), ("lion",))
    assert kept and not any("lion" in p for p in kept)  # a retain prompt that names an erased concept is left out
    with_neighbors = retain_prompts(make_config(["lion"], neighbors=["tiger", "sea lion"], preserve=["my lion"]), ("lion",))
    assert "tiger" in with_neighbors and "sea lion" not in with_neighbors and "my lion" in with_neighbors  # given: kept
    ids = tok(kept[:16], padding="max_length", max_length=77, return_tensors="pt").input_ids
    before = snapshot(model)
    with torch.no_grad():
        plain = model(input_ids=ids).last_hidden_state

    def drift(patch):
        from shared_core.patch import patched

        with patched(model, patch), torch.no_grad():
            return float(((model(input_ids=ids).last_hidden_state - plain).norm() / plain.norm()))

    lr = make_config(CONCEPTS).lr  # the same rate for both (the default raises it only where preservation is on)
    free = train_patch(model, tok, concepts=CONCEPTS, steps=6, report=False, preservation=0, lr=lr)
    held = train_patch(model, tok, concepts=CONCEPTS, steps=6, report=False, lr=lr)
    assert drift(held) < drift(free)
    assert same_weights(model, before)


def test_the_learning_rate_rises_with_a_list_trained_together_and_nowhere_else():
    from shared_core.hirm.config import LIST_LR_CAP, PRESETS

    style = PRESETS["style"][0]
    assert make_config(["cat"]).lr == style  # one concept: the authors' HiRM exactly
    assert make_config(CONCEPTS, multi="average").lr == style  # each patch of the average is trained alone
    assert make_config(CONCEPTS, lr=1e-4).lr == 1e-4  # given: used as given
    assert make_config(CONCEPTS, preservation=0).lr == style  # nothing holds the rest: not raised
    ten = [f"thing {i}" for i in range(10)]
    assert make_config(ten).lr == pytest.approx(style * 10 ** 0.4)
    many = [f"thing {i}" for i in range(LIST_LR_CAP + 50)]
    assert make_config(many).lr == pytest.approx(style * LIST_LR_CAP ** 0.4)  # no further than measured


def test_the_report_has_a_per_concept_table_least_erased_first_stored_in_the_file(clip, tmp_path):
    model, tok = clip
    patch = train_patch(model, tok, concepts=CONCEPTS, steps=3)
    table = patch.report["per_concept"]
    assert [row[0] for row in table] and sorted(row[0] for row in table) == sorted(CONCEPTS)
    assert [row[1] for row in table] == sorted((row[1] for row in table), reverse=True)  # least erased first
    assert patch.report["per_concept_total"] == len(CONCEPTS)
    back = load_patch(save_patch(patch, str(tmp_path / "five.safetensors")))
    assert back.report["per_concept"] == table
    from shared_core.report import format_report

    assert f"least erased of {len(CONCEPTS)} concepts" in format_report(patch.report)


def test_hirm_train_takes_a_concept_file_and_a_preserve_file(clip, tmp_path, capsys):
    from shared_core.cli import main
    from tiny import canonical_state_dict
    from safetensors.torch import save_file

    model, _ = clip
    checkpoint = tmp_path / "model.safetensors"
    save_file(canonical_state_dict(model, "cond_stage_model.transformer."), str(checkpoint))
    (tmp_path / "concepts.txt").write_text("cat\ndog\n# skipped\ncar\n", encoding="utf-8")
    (tmp_path / "keep.txt").write_text("a photo of a bridge\n", encoding="utf-8")
    out = tmp_path / "list.safetensors"
    assert main(["train", str(checkpoint), "--concepts", str(tmp_path / "concepts.txt"), "--preserve", str(tmp_path / "keep.txt"),
                 "--steps", "2", "--out", str(out), "--quiet", "--batch-prompts", "2"]) == 0
    patch = load_patch(str(out))
    assert patch.concepts == ["cat", "dog", "car"]
    assert patch.metadata["config"]["preserve"] == ["a photo of a bridge"] and patch.metadata["config"]["batch_prompts"] == 2
    (tmp_path / "twice.txt").write_text("cat\nCat\n", encoding="utf-8")
    assert main(["train", str(checkpoint), "--concepts", str(tmp_path / "twice.txt"), "--out", str(tmp_path / "x.safetensors")]) != 0
    assert "given twice" in capsys.readouterr().err
