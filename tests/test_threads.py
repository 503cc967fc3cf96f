"""Patching from several threads: no deadlock, nothing left applied, readers that hold the model see whole weights."""

import threading

import torch
from tiny import random_clip, same_weights, snapshot, tiny_clip, tiny_config

from shared_core.hirm import train_patch
from shared_core.patch import PatchLockError, applied_patches, apply_patch, holding, patched


def _patch(model, tok, concept):
    return train_patch(model, tok, concepts=[concept], preset="object", steps=2, report=False)


def run_threads(*targets, timeout=60.0):
    """Run ``targets`` in threads; the exceptions they raised (a thread still alive after ``timeout`` is a deadlock)."""
    errors, threads = [], []

    def wrap(fn):
        def run():
            try:
                fn()
            except Exception as e:  # noqa: BLE001 (collected and checked by the test)
                errors.append(e)
        return run

    for fn in targets:
        threads.append(threading.Thread(target=wrap(fn), daemon=True))
        threads[-1].start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "deadlock: a thread never finished"
    return errors


def test_nesting_patched_blocks_on_two_models_in_opposite_orders_never_deadlocks():
    (a, tok), b = tiny_clip(0), random_clip(tiny_config(), seed=1)
    pa, pb = _patch(a, tok, "cat"), _patch(b, tok, "dog")
    before = snapshot(a), snapshot(b)
    both_inside = threading.Barrier(2, timeout=10)

    def nest(first, p1, second, p2):
        def run():
            with patched(first, p1):
                both_inside.wait()  # each thread holds its first model: the second block would close a cycle
                with patched(second, p2):
                    pass
        return run

    for _ in range(3):
        errors = run_threads(nest(a, pa, b, pb), nest(b, pb, a, pa))
        assert len(errors) <= 1 and all(isinstance(e, PatchLockError) for e in errors)  # one is refused, at once
        assert same_weights(a, before[0]) and same_weights(b, before[1])  # both models as they were
        assert applied_patches(a) == [] and applied_patches(b) == []
        both_inside.reset()


def test_bare_apply_and_remove_from_four_threads_leave_nothing_applied():
    model, tok = tiny_clip()
    patches = [_patch(model, tok, c) for c in ("cat", "dog", "car", "tree")]
    before = snapshot(model)

    def churn(p):
        def run():
            for _ in range(20):
                apply_patch(model, p, 0.5).remove()  # another thread's patch may sit on top: removed all the same
        return run

    assert run_threads(*(churn(p) for p in patches)) == []
    assert applied_patches(model) == [] and same_weights(model, before)


def test_a_thread_holding_the_model_never_sees_half_written_weights():
    model, tok = tiny_clip()
    patch = _patch(model, tok, "cat")
    ids = tok(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        plain = model(input_ids=ids).last_hidden_state
    seen, stop = [], threading.Event()

    def patcher():
        while not stop.is_set():
            with patched(model, patch):
                pass

    def reader():
        for _ in range(60):
            with holding(model), torch.no_grad():  # between the other thread's blocks: the model's own weights
                seen.append(torch.equal(model(input_ids=ids).last_hidden_state, plain))
        stop.set()

    assert run_threads(patcher, reader) == []
    assert len(seen) == 60 and all(seen)
