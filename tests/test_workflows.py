"""The example ComfyUI workflows are well-formed UI graphs whose links join matching sockets."""

import glob
import re
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(glob.glob(os.path.join(ROOT, "example_workflows", "*.json")))


def test_the_examples_are_the_ones_workflows_readme_lists():
    listed = re.findall(r"^- `([^`]+\.json)`", open(os.path.join(ROOT, "workflows", "README.md")).read(), re.M)
    assert sorted(listed) == [os.path.basename(f) for f in FILES] and len(FILES) == 5


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_links_join_matching_sockets_and_every_step_is_explained(path):
    graph = json.load(open(path))
    nodes = {n["id"]: n for n in graph["nodes"]}
    for lid, src, out, dst, slot, typ in graph["links"]:
        assert nodes[src]["outputs"][out]["type"] == typ and lid in nodes[src]["outputs"][out]["links"]
        assert nodes[dst]["inputs"][slot]["type"] in (typ, "*") and nodes[dst]["inputs"][slot]["link"] == lid
    for n in nodes.values():  # every socket input is connected
        assert all(i["link"] is not None for i in n["inputs"]), n["type"]
    notes = [n for n in nodes.values() if n["type"] == "Note"]
    assert notes and len(notes[0]["widgets_values"][0]) > 100
    assert any(n["type"].startswith("Hirm") for n in nodes.values())
    for n in nodes.values():  # the report / neighbours / path outputs are shown, not left dangling
        if n["type"].startswith("Hirm"):
            assert all(o["links"] for o in n["outputs"] if o["type"] == "STRING"), n["type"]


@pytest.mark.parametrize("name", ["hirm_train_apply_sd15.json", "hirm_patch_plus_nlce_sd15.json", "hirm_nlce_flux.json"])
def test_the_examples_save_the_original_beside_the_erased_image(name):
    graph = json.load(open(os.path.join(ROOT, "example_workflows", name)))
    nodes = {n["id"]: n for n in graph["nodes"]}
    links = {lid: (src, dst) for lid, src, _, dst, _, _ in graph["links"]}

    def upstream(nid):
        seen, todo = set(), [nid]
        while todo:
            n = todo.pop()
            seen.add(n)
            todo += [links[i["link"]][0] for i in nodes[n]["inputs"] if i["link"] is not None]
        return {nodes[n]["type"] for n in seen}

    stitch = next(n for n in nodes.values() if n["type"] == "ImageStitch")
    original, erased = (links[i["link"]][0] for i in stitch["inputs"])
    assert not any(t.startswith("Hirm") for t in upstream(original))
    assert upstream(erased) & {"HirmApplyEncoderPatch", "HirmNlceGate"}
    assert any(links[lid][1] == stitch["id"] for lid in links) and "SaveImage" in {nodes[links[l][1]]["type"] for l in stitch["outputs"][0]["links"]}


def test_the_seed_comparison_samples_each_seed_without_and_with_the_erasure_into_one_saved_image():
    graph = json.load(open(os.path.join(ROOT, "example_workflows", "hirm_compare_seeds_sd15.json")))
    nodes = {n["id"]: n for n in graph["nodes"]}
    samplers = [n for n in nodes.values() if n["type"] == "KSampler"]
    seeds = sorted(n["widgets_values"][0] for n in samplers)
    assert seeds == [0, 0, 1, 1] and all(n["widgets_values"][1] == "fixed" for n in samplers)
    by_model = {n["id"]: nodes[next(l[1] for l in graph["links"] if l[0] == n["inputs"][0]["link"])]["type"] for n in samplers}
    assert sorted(by_model.values()) == ["CheckpointLoaderSimple"] * 2 + ["HirmNlceGate"] * 2
    assert [n["type"] for n in nodes.values()].count("SaveImage") == 1


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_no_node_covers_another_on_the_canvas(path):
    title = 30  # the page draws each node's title bar above its pos
    boxes = [(n["type"], n["pos"][0], n["pos"][1] - title, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in json.load(open(path))["nodes"]]
    overlapping = [(a[0], b[0]) for i, a in enumerate(boxes) for b in boxes[i + 1:]
                   if a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]]
    assert not overlapping
