"""The text-level report (SPEC section 3)."""

from tiny import same_weights, snapshot, tiny_clip

from shared_core.hirm import train_patch
from shared_core.patch import ErasurePatch
from shared_core.report import format_report, nontarget_prompts, text_report


def test_shipped_nontarget_prompts_are_many_and_skip_concept_words():
    prompts = nontarget_prompts()
    assert len(prompts) >= 50 and len(set(prompts)) == len(prompts)
    without_dogs = nontarget_prompts(["dog"])
    assert all("dog" not in p.split() for p in without_dogs) and len(without_dogs) < len(prompts)


def test_zero_patch_reports_no_change_and_leaves_the_encoder():
    model, tok = tiny_clip(seed=2)
    patch = train_patch(model, tok, concepts=["Van Gogh"], steps=1, report=False)
    zero = ErasurePatch({k: v * 0 for k, v in patch.deltas.items()}, patch.metadata)
    before = snapshot(model)
    report = text_report(model, tok, zero, neighbors=["Monet"])
    assert same_weights(model, before)
    assert report["target_cosine_mean"] > 0.9999 and report["nontarget_drift_max"] < 1e-6
    assert report["neighbors"] == ["Monet"] and report["n_nontarget_prompts"] >= 50


def test_a_stronger_patch_displaces_the_target_more():
    model, tok = tiny_clip(seed=2)
    patch = train_patch(model, tok, concepts=["Van Gogh"], steps=10, lr=1e-3, report=False)
    weak = text_report(model, tok, patch, strength=0.2)
    strong = text_report(model, tok, patch, strength=1.0)
    assert strong["target_cosine_mean"] < weak["target_cosine_mean"]
    table = format_report(strong)
    assert "target displacement" in table and "non-target drift" in table and "neighbour drift" in table


def test_progress_counts_every_batch_and_ends_at_its_total_whether_or_not_base_encodings_are_cached():
    from shared_core.report import BATCH, report_batches, report_prompt_count

    model, tok = tiny_clip(seed=2)
    concepts = [f"thing{i}" for i in range(BATCH // 2)]  # five templates each: several batches of target prompts
    patch = train_patch(model, tok, concepts=concepts[:2], steps=1, report=False)
    total = report_batches(*report_prompt_count(tok, concepts, None, "object"))
    for run in ("encodes the shared prompts", "finds them cached"):
        seen = []
        text_report(model, tok, patch, concepts=concepts, progress=lambda done, of: seen.append((done, of)))
        assert {of for _, of in seen} == {total}, run
        assert [d for d, _ in seen] == sorted(d for d, _ in seen) and seen[-1][0] == total, run
