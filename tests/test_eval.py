"""``hirm eval`` on tiny random pipelines: one command gives grid, metrics and report; reruns, shards and
``accelerate launch`` processes share the work and give the same metrics."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from tiny_pipeline import saved_sd1, sdxl_encoders, tiny_flux_pipeline, tiny_sdxl_pipeline

from shared_core.cli import main
from shared_core.evaluation import cases as cases_lib
from shared_core.evaluation.suites import read_csv
from shared_core.hirm import train_model_patch, train_patch
from shared_core.pipelines import pipeline_dtype
from shared_core.patch import save_patch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--steps", "1", "--size", "16", "--suite", "target,nontarget", "--nontarget", "2", "--quiet"]


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return saved_sd1(tmp_path_factory.mktemp("sd1"), steps=3)


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def run_eval(sd1, out, *extra):
    return main(["eval", sd1["model"], "--concept", "cat", "--patch", sd1["patch"], "--nlce", "--out", str(out), *FAST, *extra])


def scores(out) -> list:
    """What must not depend on how the work was split: every case and its scores, the summary, the sweep."""
    m = load(os.path.join(out, "metrics.json"))
    cases = [{k: v for k, v in c.items() if not k.endswith("_seconds")} for c in m["cases"]]  # timings differ, nothing else
    return [cases, m["summary"], m["strength_sweep"]]


def test_one_command_gives_grid_metrics_and_report_and_a_rerun_renders_nothing(sd1, tmp_path, capsys):
    out = tmp_path / "eval"
    assert run_eval(sd1, out) == 0
    assert "7 prompts" not in capsys.readouterr().err
    for name in ("grid.png", "strength.png", "metrics.json", "report.html", "eval.json"):
        assert (out / name).is_file(), name
    m = load(out / "metrics.json")
    assert m["settings"]["defences"] == ["none", "patch", "nlce", "both"] and m["family"] == "sd1"
    assert {"hirm", "torch", "diffusers", "transformers"} <= set(m["versions"])
    groups = {c["group"] for c in m["cases"]}
    assert groups == {"target", "nontarget"} and len(m["cases"]) == 7 * 4 + 3  # 5 target + 2 non-target prompts; the sweep
    assert all("pixel_change" in c["scores"] for c in m["cases"] if c["defence"] != "none")
    assert m["summary"]["target"]["nlce"]["pixel_change"] > 0  # NLCE changes the target images
    assert [p["strength"] for p in m["strength_sweep"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert set(m["text_reports"]) == {sd1["patch"]} and "target_cosine_mean" in m["text_reports"][sd1["patch"]]
    assert 0 <= m["timing"]["overhead_ratio"] and m["timing"]["this_run_rendered"] == 31
    stamp = {f: os.path.getmtime(out / "cases" / f) for f in os.listdir(out / "cases")}
    assert run_eval(sd1, out) == 0
    assert "0 rendered now" in capsys.readouterr().out
    assert {f: os.path.getmtime(out / "cases" / f) for f in os.listdir(out / "cases")} == stamp


def test_an_interrupted_run_renders_only_the_missing_images_when_run_again(sd1, tmp_path, capsys, monkeypatch):
    out = tmp_path / "eval"
    real_save, saved = cases_lib.Store.save, []

    def save_then_stop(self, case, image, record):
        if len(saved) == 10:
            raise KeyboardInterrupt
        real_save(self, case, image, record)
        saved.append(case.id)

    monkeypatch.setattr(cases_lib.Store, "save", save_then_stop)
    assert run_eval(sd1, out) == 130
    assert "the finished images are kept in --out: run the same command again" in capsys.readouterr().err
    monkeypatch.setattr(cases_lib.Store, "save", real_save)
    assert len([f for f in os.listdir(out / "cases") if f.endswith(".json")]) == 10 and not (out / "metrics.json").exists()
    capsys.readouterr()
    assert run_eval(sd1, out) == 0
    assert "21 rendered now" in capsys.readouterr().out  # 31 - 10


def test_shards_share_a_folder_and_give_the_metrics_of_one_run(sd1, tmp_path, capsys):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run_eval(sd1, whole) == 0
    assert run_eval(sd1, split, "--shard", "0/2") == 0
    assert "still missing" in capsys.readouterr().out and not (split / "metrics.json").exists()
    assert run_eval(sd1, split, "--shard", "1/2") == 0
    assert scores(split) == scores(whole)


def test_two_accelerate_processes_give_the_metrics_of_one(sd1, tmp_path):
    pytest.importorskip("accelerate")
    whole, two = tmp_path / "whole", tmp_path / "two"
    assert run_eval(sd1, whole) == 0
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    command = [launcher, "launch", "--num_processes", "2", "--num_machines", "1", "--cpu", "--mixed_precision", "no",
               "--dynamo_backend", "no", "-m", "shared_core.cli", "eval", sd1["model"], "--concept", "cat", "--patch",
               sd1["patch"], "--nlce", "--out", str(two), *FAST]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert scores(two) == scores(whole)
    records = [load(two / "cases" / f) for f in os.listdir(two / "cases") if f.endswith(".json")]
    assert len(records) == 31


def test_sdxl_pipelines_are_evaluated_with_their_both_encoder_patch(tmp_path):
    pipe = tiny_sdxl_pipeline(seed=5)
    assert pipeline_dtype(pipe, "cuda") is torch.float16
    pipe.save_pretrained(str(tmp_path / "xl"))
    patch = save_patch(train_model_patch(sdxl_encoders(pipe), concepts=["cat"], steps=2, report=False), str(tmp_path / "p.safetensors"))
    out = tmp_path / "eval"
    assert main(["eval", str(tmp_path / "xl"), "--concept", "cat", "--patch", patch, "--out", str(out), "--strengths", "",
                 *FAST]) == 0
    m = load(out / "metrics.json")
    assert m["family"] == "sdxl" and m["text_reports"][patch]["measured_on"] == "sdxl"
    assert m["settings"]["defences"] == ["none", "patch"] and m["strength_sweep"] == []
    assert not (out / "strength.png").exists()


def test_flux_pipelines_are_evaluated_with_a_clip_l_patch_and_nlce_in_their_joint_attention(tmp_path, capsys):
    pipe = tiny_flux_pipeline(seed=6)
    pipe.save_pretrained(str(tmp_path / "flux"))
    patch = save_patch(train_patch(pipe.text_encoder, pipe.tokenizer, concepts=["cat"], steps=2, report=False),
                       str(tmp_path / "p.safetensors"))
    out = tmp_path / "eval"
    assert main(["eval", str(tmp_path / "flux"), "--concept", "cat", "--neighbor", "dog", "--patch", patch, "--nlce",
                 "--out", str(out), "--strengths", "", *FAST]) == 0
    m = load(out / "metrics.json")
    assert m["family"] == "flux" and m["settings"]["defences"] == ["none", "patch", "nlce", "both"]
    first = m["cases"][0]
    assert {c["defence"] for c in m["cases"] if (c["prompt"], c["seed"]) == (first["prompt"], first["seed"])} == \
        {"none", "patch", "nlce", "both"}
    assert (out / "report.html").exists() and (out / "grid.png").exists()
    assert pipeline_dtype(pipe, "cuda") is torch.bfloat16 and pipeline_dtype(pipe, "cpu") is torch.float32
    other = tmp_path / "negative"  # Flux renders without one: refused before any folder is made
    assert main(["eval", str(tmp_path / "flux"), "--concept", "cat", "--nlce", "--negative-prompt", "blurry",
                 "--out", str(other), *FAST]) == 2
    assert "leave out --negative-prompt" in capsys.readouterr().err and not other.exists()


def test_nudenet_scores_record_the_detector_threshold_and_classes(sd1, tmp_path):
    pytest.importorskip("nudenet", reason="NudeNet is the optional 'eval' extra; not installed here")
    out = tmp_path / "eval"
    assert run_eval(sd1, out, "--nudenet", "--nudenet-threshold", "0.5", "--strengths", "") == 0
    m = load(out / "metrics.json")
    detector = m["scorers"]["nudenet"]
    assert detector["threshold"] == 0.5 and "FEMALE_BREAST_EXPOSED" in detector["classes"] and detector["version"]
    assert all(isinstance(c["scores"]["nudenet"]["nude"], bool) for c in m["cases"])
    assert "nude_rate" in m["summary"]["target"]["none"]


def test_a_clip_model_gives_clip_scores_and_concept_probabilities(sd1, tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from shared_core.tokenizer import clip_tokenizer

    torch.manual_seed(0)
    config = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2,
                                     "vocab_size": 49408, "max_position_embeddings": 77},
                        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8}, projection_dim=16)
    CLIPModel(config).save_pretrained(str(tmp_path / "clip"))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                              tokenizer=clip_tokenizer())
    processor.save_pretrained(str(tmp_path / "clip"))
    out = tmp_path / "eval"
    assert run_eval(sd1, out, "--clip", str(tmp_path / "clip"), "--neighbor", "dog", "--strengths", "") == 0
    m = load(out / "metrics.json")
    assert m["scorers"]["clip"]["labels"] == ["a photo of cat", "a photo of dog"]
    case = m["cases"][0]["scores"]["clip"]
    assert case["clip_score"] >= 0 and 0 <= case["concept_probability"] <= 1
    assert "clip_score" in m["summary"]["target"]["patch"]


def test_the_text_attack_is_repeatable_and_records_its_settings(sd1, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    extra = ["--attack", "text", "--attack-generations", "3", "--attack-population", "6", "--attack-seed", "7", "--strengths", ""]
    assert run_eval(sd1, first, *extra) == 0 and run_eval(sd1, second, *extra) == 0
    a, b = (load(p / "metrics.json")["attack"] for p in (first, second))
    assert a == b and a["settings"]["seed"] == 7 and a["settings"]["generations"] == 3 and len(a["best"]) == 5
    assert all("cat" not in p["prompt"].split() for p in a["best"])  # the concept's own words are not candidates
    assert a["best"][0]["cosine"] >= a["best"][-1]["cosine"] and len(a["best_per_generation"]) == 3


def test_prompts_from_an_i2p_csv_keep_their_seed_and_guidance(sd1, tmp_path):
    csv = tmp_path / "i2p.csv"
    csv.write_text('prompt,evaluation_seed,evaluation_guidance,categories\n"a cat, on a roof",3,5.5,"sexual,violence"\n'
                   "a dog,,,\n", encoding="utf-8")
    prompts = read_csv(str(csv))
    assert [(p.text, p.group, p.seed, p.guidance) for p in prompts] == [("a cat, on a roof", "sexual", 3, 5.5),
                                                                         ("a dog", "csv", None, None)]
    out = tmp_path / "eval"
    assert run_eval(sd1, out, "--prompts-csv", str(csv), "--strengths", "") == 0
    rows = [c for c in load(out / "metrics.json")["cases"] if c["prompt"] == "a cat, on a roof"]
    assert {(c["seed"], c["guidance"]) for c in rows} == {(3, 5.5)}


@pytest.mark.parametrize("args, message", [
    ([], "no --concept given"),
    (["--concept", "cat"], "nothing to evaluate"),
    (["--concept", "cat", "--nlce", "--shard", "2/2"], "i must be from 0 to n-1"),
    (["--concept", "cat", "--nlce", "--seeds", "x"], "comma-separated numbers"),
    (["--concept", "cat", "--nlce", "--prompts-csv", "/nonexistent.csv"], "no such file"),
    (["--concept", "cat", "--patch", "/nonexistent.safetensors"], "no such file"),
])
def test_bad_input_is_one_line_and_writes_nothing(sd1, tmp_path, capsys, args, message):
    out = tmp_path / "eval"
    assert main(["eval", sd1["model"], "--out", str(out), *FAST, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())


def test_a_folder_of_someone_else_or_of_other_settings_is_never_written_into(sd1, tmp_path, capsys):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    assert run_eval(sd1, theirs) == 2
    assert "did not make" in capsys.readouterr().err and os.listdir(theirs) == ["notes.txt"]
    out = tmp_path / "eval"
    assert run_eval(sd1, out, "--strengths", "") == 0
    assert run_eval(sd1, out, "--strengths", "", "--seeds", "1") == 2
    assert "holds an evaluation with other settings" in capsys.readouterr().err


def test_the_report_page_renders_in_a_real_headless_browser(sd1, tmp_path):
    """Chromium draws the page offline (every image and plot is inside it); the screenshot is kept for a look."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not browser:
        pytest.skip("no Chromium here (Debian: apt-get install chromium)")
    out = tmp_path / "eval"
    assert run_eval(sd1, out) == 0
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1600", f"--screenshot={shot}",
                    (out / "report.html").as_uri()], capture_output=True, timeout=120)
    from PIL import Image

    with Image.open(shot) as image:
        colours = image.convert("RGB").resize((120, 160)).getcolors(120 * 160)
    assert image.size == (1200, 1600) and colours and len(colours) > 50  # text, tables, plots and images, not a blank page
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page  # self-contained


def test_a_single_file_that_diffusers_cannot_read_offline_is_one_line(sd1, tmp_path, capsys, monkeypatch):
    from tiny import canonical_state_dict, random_clip, tiny_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    single = tmp_path / "model.safetensors"
    from safetensors.torch import save_file

    save_file(canonical_state_dict(random_clip(tiny_config()), "cond_stage_model.transformer."), str(single))
    assert main(["eval", str(single), "--concept", "cat", "--nlce", "--out", str(tmp_path / "eval"), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "single-file SD1.x checkpoint" in err[0] and "diffusers folder" in err[0]
    assert not (tmp_path / "eval").exists()  # nothing is made before the model loads


def test_the_evaluation_runs_from_python_with_the_settings_a_command_recorded(sd1, tmp_path):
    """The orchestration lives in shared_core.evaluation: what ``hirm eval`` checked and recorded, run_evaluation runs
    without the command line, to the same images and scores (and resumes the command's folder)."""
    from shared_core.evaluation.job import run_evaluation

    by_command, by_python = tmp_path / "cli", tmp_path / "python"
    assert run_eval(sd1, by_command, "--strengths", "") == 0
    settings = load(by_command / "eval.json")["settings"]
    outcome = run_evaluation(settings, str(by_python), progress=False)
    assert outcome.complete and outcome.cases == outcome.rendered == 28 and outcome.missing == 0
    assert scores(by_python) == scores(by_command)
    assert run_evaluation(settings, str(by_command), progress=False).rendered == 0
