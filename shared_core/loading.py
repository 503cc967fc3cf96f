"""Text encoders from what a user has: a single-file checkpoint, a ComfyUI state dict, a transformers / diffusers
folder, or a Hub id (downloaded once, then read from the Hugging Face cache). Names, layouts and building the model from
weights are ``encoders.py``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .common import short_error
from .encoders import (_TOKEN_EMBEDDING, build_text_model, extract_text_encoder, text_components, text_projection)
from .errors import EncoderSourceError, HirmError


@dataclass
class LoadedEncoder:
    """A text encoder ready for training: model, tokenizer and where they came from."""

    model: Any  # transformers CLIPTextModel
    tokenizer: Any
    source: str
    component: str = "clip_l"
    prefix: str = ""  # where the encoder sat in a single-file checkpoint
    projection: torch.Tensor | None = None  # the pooled output's projection (a Linear weight), where the model uses one (SDXL's CLIP-G)


class SafetensorsFile(Mapping):
    """The tensors of a .safetensors file as a read-only mapping; each tensor is read when first asked for
    (only the header is read up front), so taking one encoder out of a 7 GB checkpoint reads only it."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        try:
            self._file = safe_open(path, framework="pt")
            self._keys = list(self._file.keys())
        except Exception as e:  # safetensors raises several types
            raise EncoderSourceError(f"{path}: not a readable safetensors file ({short_error(e)})") from None

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        try:
            return self._file.get_tensor(key)
        except Exception as e:
            raise EncoderSourceError(f"{self.path}: tensor {key} cannot be read ({short_error(e)}); the file is truncated or damaged") from None

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key) -> bool:
        return key in self._keys

    def metadata(self) -> dict[str, str]:
        return dict(self._file.metadata() or {})

    def info(self, key: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype code, shape) of a tensor, from the header only."""
        piece = self._file.get_slice(key)
        return str(piece.get_dtype()), tuple(int(n) for n in piece.get_shape())


def load_state_dict_file(path: str) -> Mapping[str, torch.Tensor]:
    """Tensors of a .safetensors / .ckpt / .pt / .bin file, with clear errors for bad files.

    A safetensors file comes back as a ``SafetensorsFile`` (tensors read on first use); ``dict()`` it
    for a full copy."""
    if not os.path.isfile(path):
        raise EncoderSourceError(f"{path}: no such file")
    if path.endswith(".safetensors") or path.endswith(".sft"):
        return SafetensorsFile(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise EncoderSourceError(f"{path}: not a readable checkpoint ({short_error(e)}); convert it to .safetensors") from None
    while isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise EncoderSourceError(f"{path}: holds no state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _folder_state_dict(folder: str) -> dict[str, torch.Tensor]:
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        files = sorted(f for f in os.listdir(folder) if f.endswith(".bin") and "pytorch_model" in f)
    if not files:
        raise EncoderSourceError(f"{folder}: no weight files (*.safetensors or pytorch_model*.bin)")
    sd = {}
    for f in files:
        loaded = load_state_dict_file(os.path.join(folder, f))
        sd.update({k: loaded[k] for k in loaded})
    return sd


def _tokenizer_from_folder(folder: str | None, component: str):
    from .tokenizer import clip_tokenizer

    if folder and os.path.isfile(os.path.join(folder, "vocab.json")):
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(folder)
    return clip_tokenizer("!" if component == "clip_g" else "<|endoftext|>")


def load_text_encoder(source: str, component: str = "clip_l", device="cpu",
                      dtype: torch.dtype = torch.float32, local_files_only: bool | None = None) -> LoadedEncoder:
    """Load a CLIP text encoder and its tokenizer from whatever the user has.

    ``source`` is a diffusers model folder, a transformers model folder, a single-file
    checkpoint (SD1.x, SDXL, SD3/Flux ``clip_l``, a ComfyUI state dict) or a Hub repo id.
    ``component`` is ``clip_l`` (default) or ``clip_g`` (SDXL's second encoder; an SDXL refiner's only one).
    """
    if component not in ("clip_l", "clip_g"):
        raise HirmError(f"unknown text encoder component {component!r}; use clip_l or clip_g")
    source = os.path.expanduser(str(source))
    if os.path.isdir(source):
        return _load_folder(source, component, device, dtype)
    if os.path.isfile(source):
        sd = load_state_dict_file(source)
        prefix, canon = extract_text_encoder(sd, component, source=source)
        model = build_text_model(canon, device=device, dtype=dtype)
        projection = text_projection(sd, prefix) if component == "clip_g" else None
        return LoadedEncoder(model, _tokenizer_from_folder(None, component), source, component, prefix,
                             None if projection is None else projection.to(device, dtype))
    if _looks_like_repo_id(source):
        return _load_folder(_download(source, local_files_only), component, device, dtype, source)
    raise EncoderSourceError(f"{source}: no such file or folder; pass a checkpoint file, a diffusers model folder or a Hub repo id (org/name)")


def source_components(source: str, local_files_only: bool | None = None) -> list[str]:
    """Which text encoders (``clip_l``, ``clip_g``) a model source holds, read from file headers only."""
    source = os.path.expanduser(str(source))
    if os.path.isfile(source):
        return text_components(load_state_dict_file(source).keys())
    if not os.path.isdir(source) and _looks_like_repo_id(source):
        source = _download(source, local_files_only)
    if os.path.isdir(source):
        found = [c for c, sub in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2")) if os.path.isdir(os.path.join(source, sub))]
        if found:
            return found
        if os.path.isfile(os.path.join(source, "config.json")):  # a transformers model folder: one encoder
            return [_component_by_width(_folder_state_dict(source))]
    return []


def load_text_encoders(source: str, components: list[str] | None = None, device="cpu", dtype: torch.dtype = torch.float32,
                       local_files_only: bool | None = None) -> dict[str, LoadedEncoder]:
    """Every text encoder of a model source (SDXL: clip_l and clip_g), or the ``components`` asked for."""
    components = components or source_components(source, local_files_only)
    if not components:
        raise EncoderSourceError(f"{source}: no CLIP text encoder found; pass an SD1.x/SDXL/Flux checkpoint, a diffusers model "
                                 "folder or a CLIP-L file")
    return {c: load_text_encoder(source, c, device, dtype, local_files_only) for c in components}


def _looks_like_repo_id(s: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", s)) and not re.search(r"\.(safetensors|ckpt|pt|bin|sft)$", s)


def _download(repo_id: str, local_files_only: bool | None) -> str:
    from huggingface_hub import snapshot_download

    from .hub_errors import hub_error, unreachable_error, unresolvable

    no_name = None if local_files_only else unresolvable()  # no network at all: the cache only, not 24 s of retries
    patterns = ["model_index.json", "text_encoder/*", "tokenizer/*", "text_encoder_2/*", "tokenizer_2/*",
                "config.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                "model.safetensors"]
    try:
        return snapshot_download(repo_id, allow_patterns=patterns, local_files_only=bool(local_files_only) or no_name is not None)
    except Exception as e:  # one line per kind of failure (not found, access, offline, ...), as for patches on the Hub
        error = unreachable_error(repo_id, no_name, "its text encoder") if no_name else hub_error(e, repo_id, "its text encoder")
        raise EncoderSourceError(str(error)) from None


def _load_folder(folder: str, component: str, device, dtype, source: str | None = None) -> LoadedEncoder:
    source = source or folder
    sub = {"clip_l": ("text_encoder", "tokenizer"), "clip_g": ("text_encoder_2", "tokenizer_2")}[component]
    if os.path.isdir(os.path.join(folder, sub[0])):
        enc_dir, tok_dir = os.path.join(folder, sub[0]), os.path.join(folder, sub[1])
    elif os.path.isfile(os.path.join(folder, "config.json")):
        enc_dir = tok_dir = folder
    else:
        raise EncoderSourceError(f"{source}: neither a diffusers model folder (no {sub[0]}/) nor a transformers model folder (no config.json)")
    sd = _folder_state_dict(enc_dir)
    _, canon = extract_text_encoder(sd, _component_by_width(sd), source=source)
    config = None
    if os.path.isfile(os.path.join(enc_dir, "config.json")):
        from transformers import CLIPTextConfig

        config = CLIPTextConfig.from_pretrained(enc_dir)
    model = build_text_model(canon, config=config, device=device, dtype=dtype)
    projection = sd.get("text_projection.weight") if component == "clip_g" else None
    return LoadedEncoder(model, _tokenizer_from_folder(tok_dir if os.path.isdir(tok_dir) else None, component), source, component,
                         projection=None if projection is None else projection.to(device, dtype))


def _component_by_width(sd) -> str:
    """A model folder holds one encoder: accept it whatever its width."""
    width = next((int(v.shape[1]) for k, v in sd.items() if k.endswith(_TOKEN_EMBEDDING)), 768)
    return "clip_g" if width == 1280 else "clip_l"
