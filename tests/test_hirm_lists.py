"""Lists of concepts: read from a file with every problem said first, trained a batch at a time (memory does not grow
with the list), held off the prompts that must not change, reported per concept."""

import pytest
import torch
from tiny import snapshot, same_weights, tiny_clip

from shared_core.errors import HirmError
from shared_core.hirm import train_patch
from shared_core.hirm.train import retain_prompts
from shared_core.hirm.config import make_config, preservation_weight, step_prompt_count
from shared_core.lists import read_list
from shared_core.patch import load_patch, save_patch
from shared_core.textenc import tokenize

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


@pytest.mark.parametrize("method,size", [("random", 2), ("safety", 1)])
def test_a_step_in_batches_is_the_step_over_the_whole_list(clip, method, size):
    """Gradients accumulated over batches of a few prompts give the patch one batch of every prompt gives (to
    rounding), with a target every prompt shares (random) and with one target per prompt (safety)."""
    model, tok = clip
    one = train_patch(model, tok, concepts=CONCEPTS, method=method, steps=3, report=False, preservation=0)
    batched = train_patch(model, tok, concepts=CONCEPTS, method=method, steps=3, report=False, preservation=0,
                          batch_prompts=size)
    for name, delta in one.deltas.items():
        if name.endswith("k_proj.bias"):  # its true gradient is exactly 0: its delta is float noise either way
            assert batched.deltas[name].abs().max() < 1e-4
            continue
        assert (batched.deltas[name] - delta).norm() <= 1e-4 * delta.norm(), name


def test_a_long_list_trains_a_bounded_window_a_step_and_every_prompt_at_least_once(clip):
    """Past ``step_prompts``, a step trains the next prompts of a seeded shuffle (time does not grow with the list), as
    many as the steps need to go through every prompt; one concept, however many prompts, and a short list train all of
    them every step."""
    model, tok = clip
    words = ["cat", "dog", "car", "tree", "house", "boat", "bird", "fish", "lamp", "road", "hill", "rock"]
    seen = []  # per trained forward: the rows' token ids (the retain prompts are told apart by their ids)
    hook = model.register_forward_pre_hook(
        lambda m, args, kw: seen.append(kw.get("input_ids", args[0] if args else None)) if torch.is_grad_enabled() else None,
        with_kwargs=True)
    try:
        def trained(concepts, **settings):
            seen.clear()
            patch = train_patch(model, tok, concepts=concepts, report=False, preservation=0, **settings)
            return patch, [len(ids) for ids in seen], {tuple(r.tolist()) for ids in seen for r in ids}

        window, sizes, rows = trained(words, steps=3, batch_prompts=2, step_prompts=4)
        assert sizes == [2, 2] * 3  # 12 prompts in 6 batches: 2 batches a step (4 prompts), not 6
        everything, all_sizes, _ = trained(words, steps=3, batch_prompts=2, step_prompts=0)
        assert all_sizes == [2] * 18 and window.metadata["config"]["step_prompts"] == 4
        assert any(not torch.equal(window.deltas[n], everything.deltas[n]) for n in window.deltas)
        _, sizes, rows = trained(words, steps=2, batch_prompts=2, step_prompts=4)
        assert sizes == [2, 2, 2] * 2  # two steps must still go through 12 prompts: 6 a step
        assert {tuple(r.tolist()) for r in tokenize(tok, words, what="concept")} <= rows  # every prompt trained
        _, sizes, rows = trained(words, steps=5, batch_prompts=2, step_prompts=2)
        assert sizes == [2, 1] * 5  # 12 prompts in 5 steps: 3 a step (not two whole batches), going round the list
        assert {tuple(r.tolist()) for r in tokenize(tok, words, what="concept")} <= rows
        _, sizes, _ = trained(["cat"], steps=2, batch_prompts=2, step_prompts=4, templates=[f"{{}} {i}" for i in range(9)])
        assert sizes == [2, 2, 2, 2, 1] * 2  # one concept: every prompt at every step (the authors' step)
        _, sizes, _ = trained(words[:3], steps=2, batch_prompts=2, step_prompts=4)
        assert sizes == [2, 1] * 2  # within the window: all, in list order
    finally:
        hook.remove()
    assert step_prompt_count(make_config(words), 12, 100) == 16  # the default window
    assert step_prompt_count(make_config(words, steps=5), 12, 100) == 20  # raised: 5 steps go through 100 prompts
    assert step_prompt_count(make_config(words), 12, 10) == 10 and step_prompt_count(make_config(["cat"]), 1, 100) == 100
    with pytest.raises(HirmError, match="prompts per step"):
        make_config(words, step_prompts=-1)


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


def test_a_short_training_holds_the_given_prompts_first_and_encodes_only_the_retain_prompts_it_uses(clip):
    model, tok = clip
    mine = "a watercolour of my own garden"
    assert retain_prompts(make_config(CONCEPTS, preserve=[mine], neighbors=["tiger"]), tuple(CONCEPTS))[:2] == [mine, "tiger"]
    seen = []  # (trained?, rows) of every forward pass
    hook = model.register_forward_pre_hook(lambda m, args, kw: seen.append((torch.is_grad_enabled(), kw["input_ids"])),
                                           with_kwargs=True)
    try:
        train_patch(model, tok, concepts=CONCEPTS, steps=1, report=False, preserve=[mine])
    finally:
        hook.remove()
    mine_ids = tuple(tokenize(tok, [mine], what="prompt")[0].tolist())
    encoded = [len(ids) for trained, ids in seen if not trained]
    assert encoded == [4]  # one step holds 4 retain prompts (a batch of 8 or not): only those are encoded, not the 80-odd
    assert [len(ids) for trained, ids in seen if trained] == [5, 4]  # the step: its 5 prompts, then the 4 retain ones
    assert any(mine_ids == tuple(r.tolist()) for trained, ids in seen if trained for r in ids)  # and it holds mine


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
