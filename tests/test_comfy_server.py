"""The example workflows through a headless ComfyUI server (``main.py --cpu``) and its HTTP API.

Opt-in (minutes, and several GB of random-weight models): set COMFYUI_PATH to a ComfyUI checkout
and HIRM_COMFY_MODELS to a folder outside the repository for the models, and run with ComfyUI's
own Python, e.g.:
    COMFYUI_PATH=/path/to/ComfyUI HIRM_COMFY_MODELS=/tmp/hirm-comfy-models \\
        /path/to/comfy-venv/bin/python -m pytest tests/test_comfy_server.py -s
The models are generated once (random weights, the real architectures: an SD1.5 checkpoint,
Flux's CLIP-L, T5-XXL (fp8) and VAE, and a Flux transformer with one double and one single
block at full width). Each graph is converted from its UI form to the API form with the
server's /object_info, shrunk to 64 px and 2 sampling steps, posted to /prompt and followed in
/history. Workflow 1 saves the patch that workflows 2 and 3 load.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

COMFY = os.environ.get("COMFYUI_PATH")
MODELS = os.environ.get("HIRM_COMFY_MODELS")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = ["hirm_train_apply_sd15.json", "hirm_patch_plus_nlce_sd15.json", "hirm_compare_seeds_sd15.json",
             "hirm_clip_l_patch_flux.json", "hirm_nlce_flux.json"]
T5_FILE = "t5xxl_fp8_e4m3fn.safetensors"  # the fp8 variant people also use: half the size of t5xxl_fp16
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def ui_to_api(graph: dict, input_types: dict) -> dict:
    """A UI workflow (``nodes`` + ``links``, as saved by the ComfyUI page) in the API form /prompt takes.

    ``input_types``: node type -> its ``INPUT_TYPES()`` (the ``input`` of /object_info). Widget
    values are matched to widget inputs in order; an INT widget with a "control after generate"
    companion (``control_after_generate``, or by the page's rule an input named seed/noise_seed)
    has one extra value in ``widgets_values``.
    """
    links = {link[0]: link for link in graph["links"]}
    prompt = {}
    for n in graph["nodes"]:
        if n["type"] in ("Note", "MarkdownNote"):
            continue
        spec = input_types[n["type"]]
        values = list(n.get("widgets_values") or [])
        inputs = {}
        for name, entry in {**spec.get("required", {}), **spec.get("optional", {})}.items():
            kind, options = entry[0], (entry[1] if len(entry) > 1 else {})
            if not (isinstance(kind, list) or kind in WIDGET_TYPES) or options.get("forceInput"):
                continue
            inputs[name] = values.pop(0)
            control = options.get("control_after_generate")
            if kind == "INT" and (control if control is not None else name in ("seed", "noise_seed")):
                values.pop(0)
        assert not values, f"node {n['id']} ({n['type']}) has {len(values)} widget values too many"
        for socket_ in n.get("inputs", []):
            if socket_.get("link") is not None:
                _, source, slot, *_ = links[socket_["link"]]
                inputs[socket_["name"]] = [str(source), slot]
        prompt[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return prompt


def test_ui_to_api_maps_widgets_links_and_seed_controls():
    graph = {"nodes": [{"id": 1, "type": "Loader", "inputs": [], "widgets_values": ["m.safetensors"]},
                       {"id": 2, "type": "Sampler", "inputs": [{"name": "model", "type": "MODEL", "link": 7}],
                        "widgets_values": [5, "fixed", 20, 7]},
                       {"id": 3, "type": "Note", "widgets_values": ["hello"]}],
             "links": [[7, 1, 0, 2, 0, "MODEL"]]}
    types = {"Loader": {"required": {"name": (["m.safetensors"],)}},
             "Sampler": {"required": {"model": ("MODEL",), "seed": ("INT", {}), "steps": ("INT", {}),
                                      "mine": ("INT", {"control_after_generate": False})}}}
    assert ui_to_api(graph, types) == {"1": {"class_type": "Loader", "inputs": {"name": "m.safetensors"}},
                                       "2": {"class_type": "Sampler", "inputs": {"seed": 5, "steps": 20, "mine": 7, "model": ["1", 0]}}}


# ------------------------------------------------------------------------ random-weight models

def _random_like(shapes: dict, dtype, seed: int) -> dict:
    """Random values for a state dict's shapes: weights ~ N(0, 1/fan_in), biases 0, norm scales 1."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if len(shape) >= 2:
            fan_in = max(1, int(torch.Size(shape[1:]).numel()))
            t = torch.randn(shape, generator=g) * fan_in ** -0.5
        elif name.endswith("bias"):
            t = torch.zeros(shape)
        else:
            t = torch.ones(shape)
        out[name] = t.to(dtype)
    return out


def random_clip_sd(hidden, layers, inter, act="quick_gelu", seed=0):
    """Random weights of a CLIP text encoder under checkpoint names, fp16, with a text projection."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from shared_core.encoders import canonical_parameters

    config = CLIPTextConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                            num_attention_heads=hidden // 64, hidden_act=act)
    with torch.device("meta"):
        shapes = {k: p.shape for k, p in canonical_parameters(CLIPTextModel(config)).items()}
    shapes["text_projection.weight"] = torch.Size([hidden, hidden])
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in shapes.items():
        if "layer_norm" in name:
            t = torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
        elif "embedding" in name:
            t = torch.randn(shape, generator=g) * 0.02
        elif name.endswith("bias"):
            t = torch.zeros(shape)
        else:
            t = torch.randn(shape, generator=g) * (0.5 / shape[1] ** 0.5)
        sd[name] = t.half()
    return sd


def _vae_sd(latent_channels: int) -> dict:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    quant = latent_channels == 4  # SD1.x has quant convs, Flux's VAE has none
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=latent_channels,
                        use_quant_conv=quant, use_post_quant_conv=quant)
    return {k: v.half() for k, v in vae.state_dict().items()}


def make_sd15_checkpoint(path: str) -> None:
    """A single-file SD1.5 checkpoint (LDM names) written by ComfyUI's own conversion, fp16."""
    import comfy.sd
    import safetensors.torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768)
    model = comfy.sd.load_diffusion_model_state_dict({k: v.half() for k, v in unet.state_dict().items()})
    del unet
    clip = comfy.sd.load_text_encoder_state_dicts([random_clip_sd(768, 12, 3072)], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
    vae = comfy.sd.VAE(sd=_vae_sd(4))
    sd = model.model.state_dict_for_saving(clip.get_sd(), vae.get_sd(), None)
    safetensors.torch.save_file({k: v.half().contiguous() for k, v in sd.items()}, path + ".tmp")
    os.replace(path + ".tmp", path)


def make_sdxl_checkpoint(path: str) -> None:
    """A single-file SDXL base checkpoint (the UNet, CLIP-L, OpenCLIP bigG, the VAE), random weights (about 7 GB)."""
    _checkpoint(path, dict(sample_size=128, cross_attention_dim=2048, block_out_channels=(320, 640, 1280),
                           down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                           up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                           transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                           addition_embed_type="text_time", addition_time_embed_dim=256,
                           projection_class_embeddings_input_dim=2816),
                [random_clip_sd(768, 12, 3072), random_clip_sd(1280, 32, 5120, "gelu", 1)])


def _checkpoint(path: str, unet_config: dict, clip_sds: list, clip_type: str = "STABLE_DIFFUSION") -> None:
    """A single-file checkpoint (LDM names) of a random diffusers-config UNet, these CLIP state dicts and an SD VAE,
    written by ComfyUI's own conversion, fp16."""
    import comfy.sd
    import safetensors.torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in UNet2DConditionModel(**unet_config).state_dict().items()}
    model = comfy.sd.load_diffusion_model_state_dict(_random_like(shapes, torch.float16, 0), model_options={"dtype": torch.float16})
    clip = comfy.sd.load_text_encoder_state_dicts(clip_sds, clip_type=getattr(comfy.sd.CLIPType, clip_type))
    vae = comfy.sd.VAE(sd=_vae_sd(4))
    sd = model.model.state_dict_for_saving(clip.get_sd(), vae.get_sd(), None)
    del model, clip, vae
    safetensors.torch.save_file({k: v.half().contiguous() for k, v in sd.items()}, path + ".tmp")
    os.replace(path + ".tmp", path)


def make_sd2_checkpoint(path: str) -> None:
    """SD2.x (768-v UNet shapes, OpenCLIP ViT-H text encoder), random weights (about 2.6 GB): a model the erasure refuses."""
    _checkpoint(path, dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
                [random_clip_sd(1024, 23, 4096, "gelu", 3)])


def make_sdxl_refiner_checkpoint(path: str) -> None:
    """An SDXL refiner (its UNet shapes, OpenCLIP bigG only), random weights (about 6 GB): no CLIP-L to patch."""
    _checkpoint(path, dict(sample_size=128, cross_attention_dim=1280, block_out_channels=(384, 768, 1536, 1536),
                           down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                           transformer_layers_per_block=4, attention_head_dim=(6, 12, 24, 24), use_linear_projection=True,
                           addition_embed_type="text_time", addition_time_embed_dim=256,
                           projection_class_embeddings_input_dim=2560),
                [random_clip_sd(1280, 32, 5120, "gelu", 1)])


def make_flux_files(diffusion_models: str, text_encoders: str, vae: str) -> None:
    """Flux: transformer (1 double + 1 single block, full width, bf16), CLIP-L, T5-XXL (fp8), VAE."""
    import comfy.supported_models
    import safetensors.torch

    config = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 768,
              "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 1,
              "depth_single_blocks": 1, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True, "guidance_embed": True}
    meta = comfy.supported_models.Flux(config).get_model({}, device="meta").diffusion_model
    files = {
        os.path.join(diffusion_models, "flux1-dev.safetensors"): lambda: _random_like(
            {k: tuple(v.shape) for k, v in meta.state_dict().items()}, torch.bfloat16, 1),
        os.path.join(text_encoders, "clip_l.safetensors"): lambda: random_clip_sd(768, 12, 3072, seed=2),
        os.path.join(text_encoders, T5_FILE): _t5xxl_sd,
        os.path.join(vae, "ae.safetensors"): lambda: _vae_sd(16),
    }
    for path, make in files.items():
        if not os.path.isfile(path):
            safetensors.torch.save_file(make(), path + ".tmp")
            os.replace(path + ".tmp", path)


def _t5xxl_sd() -> dict:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                      feed_forward_proj="gated-gelu")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in T5EncoderModel(config).state_dict().items() if k != "encoder.embed_tokens.weight"}
    sd = _random_like(shapes, torch.float8_e4m3fn, 3)
    sd["shared.weight"] = torch.randn(shapes["shared.weight"], generator=torch.Generator().manual_seed(4)).to(torch.float8_e4m3fn)
    return sd


# ------------------------------------------------------------------------------- the server

def _get(url: str, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _post(url: str, body: dict):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        pytest.fail(f"/prompt refused the graph: {e.read().decode()[:2000]}")


def shrink(prompt: dict) -> dict:
    """64 px latents and 2 sampling steps (CPU), the random T5 file name; everything else as shipped."""
    for entry in prompt.values():
        inputs = entry["inputs"]
        if entry["class_type"] in ("EmptyLatentImage", "EmptySD3LatentImage"):
            inputs.update(width=64, height=64)
        if entry["class_type"] == "KSampler":
            inputs.update(steps=2)
        if entry["class_type"] == "DualCLIPLoader":
            inputs.update(clip_name2=T5_FILE)
    return prompt


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not (COMFY and MODELS):
        pytest.skip("set COMFYUI_PATH and HIRM_COMFY_MODELS to run the example workflows on a headless ComfyUI")
    sys.path.insert(0, COMFY)
    from comfy.cli_args import args

    args.cpu = True
    folders = {name: os.path.join(MODELS, name) for name in ("checkpoints", "diffusion_models", "text_encoders", "vae")}
    for folder in folders.values():
        os.makedirs(folder, exist_ok=True)
    checkpoint = os.path.join(folders["checkpoints"], "v1-5-pruned-emaonly.safetensors")
    if not os.path.isfile(checkpoint):
        make_sd15_checkpoint(checkpoint)
    make_flux_files(folders["diffusion_models"], folders["text_encoders"], folders["vae"])

    base = tmp_path_factory.mktemp("comfy-base")
    (base / "custom_nodes").mkdir()
    os.symlink(ROOT, base / "custom_nodes" / "hirm_erasure")
    yaml = base / "models.yaml"
    yaml.write_text("random:\n" + "".join(f"    {name}: {path}\n" for name, path in folders.items()))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = base / "comfyui.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                             "--base-directory", str(base), "--extra-model-paths-config", str(yaml),
                             "--database-url", "sqlite:///:memory:"],
                            cwd=COMFY, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                object_info = _get(url + "/object_info", timeout=60)
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, log_path.read_text()[-3000:]
                time.sleep(1)
        else:
            pytest.fail("ComfyUI did not start in 10 minutes")
        yield {"url": url, "object_info": object_info, "log": log_path, "base": base}
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
        print(f"\nComfyUI log: {log_path}")


def test_the_pack_loads_in_the_server_without_errors_or_warnings(server):
    text = server["log"].read_text()
    pack_lines = [line for line in text.splitlines() if "hirm" in line.lower()]
    assert any(re.search(r"\d+\.\d+ seconds: .*hirm_erasure", line) for line in pack_lines), text[-3000:]
    assert not [line for line in pack_lines if re.search(r"IMPORT FAILED|Traceback|WARNING|ERROR", line)]
    assert {"HirmTrainErasurePatch", "HirmNlceGate"} <= set(server["object_info"])


@pytest.mark.parametrize("name", WORKFLOWS)  # in order: the first saves the patch the others load
def test_example_workflow_runs_headless(server, name):
    graph = json.load(open(os.path.join(ROOT, "example_workflows", name)))
    prompt = shrink(ui_to_api(graph, {t: info["input"] for t, info in server["object_info"].items()}))
    queued = _post(server["url"] + "/prompt", {"prompt": prompt, "client_id": "hirm-test"})
    assert not queued.get("node_errors"), queued
    started = time.time()
    while time.time() - started < 1200:
        history = _get(server["url"] + f"/history/{queued['prompt_id']}")
        if history:
            break
        time.sleep(2)
    else:
        pytest.fail(f"{name} did not finish in 20 minutes")
    entry = history[queued["prompt_id"]]
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[-3000:]
    images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    assert images and all(os.path.isfile(server["base"] / "output" / i["subfolder"] / i["filename"]) for i in images)
    print(f"\n{name}: finished in {time.time() - started:.0f} s, images {[i['filename'] for i in images]}")
