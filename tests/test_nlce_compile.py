"""NLCE under torch.compile: one denoiser call with NLCE is one graph (no break, ``fullgraph=True`` compiles), a compiled
run equals the eager one, and a second run compiles nothing new, on all four families (tiny offline pipelines).

``aot_eager`` traces exactly what inductor would (dynamo + AOT autograd) without generating code; one test runs the
inductor backend itself where a C++ compiler is present.
"""

import shutil

import pytest
import torch
from tiny_pipeline import render, render_joint, tiny_flux_pipeline, tiny_pipeline, tiny_sd3_pipeline, tiny_sdxl_pipeline

from shared_core.adapters import apply_nlce

TORCH = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
pytestmark = pytest.mark.skipif(TORCH < (2, 4), reason="fullgraph torch.compile of diffusers' denoisers needs torch 2.4 or newer")

LOW = {"live_floor": 0.1}  # tiny random encoders give small rows; let the ratio rule decide
FAMILIES = {
    "sd1": (tiny_pipeline, render, "unet", "a photo of a cat", "a photo of a dog"),
    "sdxl": (tiny_sdxl_pipeline, render, "unet", "a photo of a cat", "a photo of a dog"),
    "flux": (tiny_flux_pipeline, render_joint, "transformer", "a photo of cat", "a photo of dog"),
    "sd3": (tiny_sd3_pipeline, render_joint, "transformer", "a photo of cat", "a photo of dog"),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def case(request):
    make, draw, attr, prompt, other = FAMILIES[request.param]
    return request.param, make(), draw, attr, prompt, other


@pytest.fixture(autouse=True)
def fresh_dynamo():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def one_call(pipe, attr, draw, prompt):
    """The arguments of the denoiser's first call in a sampling run."""
    seen = []
    hook = getattr(pipe, attr).register_forward_pre_hook(lambda m, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
    try:
        draw(pipe, prompt, steps=1)
    finally:
        hook.remove()
    return seen[0]


@pytest.mark.parametrize("schedule", ["single-pass", "faithful"])
def test_one_denoiser_call_with_nlce_is_one_graph(case, schedule):
    family, pipe, draw, attr, prompt, _ = case
    with apply_nlce(pipe, ["cat"], ["dog"], schedule=schedule, **LOW):
        args, kwargs = one_call(pipe, attr, draw, prompt)
        explained = torch._dynamo.explain(getattr(pipe, attr))(*args, **kwargs)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def test_a_list_of_concepts_is_one_graph_and_compiled_equals_eager(case, monkeypatch):
    """Several concepts take stage 1's chunks (a triangular solve for a chunk of several concepts, one update for a
    chunk of one; masked per row): still one graph, and the compiled denoiser draws what the eager one does."""
    import shared_core.nlce.stages as stages
    from shared_core.adapters import pipeline_concept_set
    from shared_core.nlce import make_nlce_config

    family, pipe, draw, attr, prompt, _ = case
    concepts, neighbors = ["cat", "house", "tree"], {"cat": ["dog"], "house": ["car"], "tree": ["bush"]}
    cs = pipeline_concept_set(pipe, concepts, neighbors, make_nlce_config(**LOW))
    monkeypatch.setattr(stages, "CHUNK_ROWS", cs.bases[0][0].shape[1] + cs.bases[1][0].shape[1])  # [cat, house], [tree]
    assert [c[-1] for c in stages.Operators(cs, cs.config, "cpu").chunks] == [2, 1]
    with apply_nlce(pipe, concept_set=cs, **LOW):
        args, kwargs = one_call(pipe, attr, draw, prompt)
        explained = torch._dynamo.explain(getattr(pipe, attr))(*args, **kwargs)
        eager = draw(pipe, prompt, steps=2)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    torch._dynamo.reset()
    denoiser = getattr(pipe, attr)
    with apply_nlce(pipe, concept_set=cs, **LOW):
        setattr(pipe, attr, torch.compile(denoiser, fullgraph=True, backend="aot_eager"))
        try:
            compiled = draw(pipe, prompt, steps=2)
        finally:
            setattr(pipe, attr, denoiser)
    assert torch.allclose(compiled, eager, atol=1e-5)


@pytest.mark.parametrize("schedule,suppression", [("single-pass", "mask"), ("single-pass", "scale"), ("faithful", "mask")])
def test_compiled_nlce_equals_eager_and_a_second_run_compiles_nothing(case, schedule, suppression):
    family, pipe, draw, attr, prompt, other = case
    settings = dict(schedule=schedule, suppression=suppression, **LOW)
    with apply_nlce(pipe, ["cat"], ["dog"], **settings) as h:
        eager = draw(pipe, prompt, steps=3)
        eager_other = draw(pipe, other, steps=3)
        assert any(d["live_tokens"] and d["live_tokens"][-1] for d in h.diagnostics)  # the gate really runs
    denoiser = getattr(pipe, attr)
    with apply_nlce(pipe, ["cat"], ["dog"], **settings):  # compiled after NLCE is applied
        setattr(pipe, attr, torch.compile(denoiser, fullgraph=True, backend="aot_eager"))
        try:
            first = draw(pipe, prompt, steps=3)
            graphs = compiled_graphs()
            second = draw(pipe, other, steps=3)  # another prompt of the same length: the same graph
            third = draw(pipe, prompt, steps=3)
        finally:
            setattr(pipe, attr, denoiser)
    assert graphs == 1 and compiled_graphs() == 1
    for compiled, reference in ((first, eager), (second, eager_other), (third, eager)):
        assert torch.allclose(compiled, reference, atol=1e-5)  # to float rounding (measured: at most 6e-7)


def test_nlce_applied_to_an_already_compiled_denoiser_and_removed_from_it(case):
    family, pipe, draw, attr, prompt, _ = case
    plain = draw(pipe, prompt, steps=2)
    with apply_nlce(pipe, ["cat"], ["dog"], **LOW):
        erased = draw(pipe, prompt, steps=2)
    denoiser = getattr(pipe, attr)
    setattr(pipe, attr, torch.compile(denoiser, fullgraph=True, backend="aot_eager"))
    try:
        assert torch.allclose(draw(pipe, prompt, steps=2), plain, atol=1e-5)
        handle = apply_nlce(pipe, ["cat"], ["dog"], **LOW)
        assert torch.allclose(draw(pipe, prompt, steps=2), erased, atol=1e-5)
        handle.remove()
        assert torch.allclose(draw(pipe, prompt, steps=2), plain, atol=1e-5)  # the compiled model works as before
    finally:
        setattr(pipe, attr, denoiser)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("clang++") is None, reason="inductor needs a C++ compiler on the CPU")
def test_the_inductor_backend_compiles_nlce_and_equals_eager():
    pipe = tiny_pipeline()
    with apply_nlce(pipe, ["cat"], ["dog"], **LOW):
        eager = render(pipe, "a photo of a cat", steps=2)
        unet = pipe.unet
        pipe.unet = torch.compile(unet, fullgraph=True, backend="inductor")
        try:
            compiled = render(pipe, "a photo of a cat", steps=2)
        finally:
            pipe.unet = unet
    assert compiled_graphs() == 1 and torch.allclose(compiled, eager, atol=1e-5)
