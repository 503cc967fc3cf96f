"""Stand-ins for the parts of AUTOMATIC1111 / Forge the extension touches (no tests here).

A1111 cannot be installed from a registry, so these mirror the real interfaces, read from the
webuis' sources, with tiny sizes:

- ``CrossAttention``: ldm.modules.attention.CrossAttention (to_q, to_k, to_v, to_out, heads, scale,
  ``forward(x, context=None, mask=None)``), inside a tiny LDM UNet whose module names match SD1.x
  (``input_blocks.8.1.transformer_blocks.0.attn2`` ...) and whose blocks also honour Forge's
  ``transformer_options`` patches (attn2_patch, attn2 replace, model_function_wrapper).
- ``HijackedClip``: modules.sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords (``wrapped.transformer``
  is a real transformers CLIPTextModel; ``process_texts`` returns 77-token chunks; ``forward(texts)``).
- ``LoraStandIn``: the weight bookkeeping of A1111's built-in Lora extension (networks.py:
  network_apply_weights), which merges LoRAs into Linear weights with backups.
- ``Processing`` + ``run_job``: StableDiffusionProcessing and the order in which
  modules.processing.process_images calls the scripts (exceptions from script hooks are logged
  and swallowed, as modules.scripts.ScriptRunner does; ``with closing(p)`` as txt2img does).
- Forge: ``ModelPatcher`` / ``Clip`` / ``LoraLoader`` with backend/patcher semantics
  (keyword-only ``add_patches``, hash-based refresh with backups) and ``run_forge_job``.
"""

from __future__ import annotations

import copy
from contextlib import closing
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tiny import random_clip, tiny_config

from a1111_extension import jobs
from shared_core.encoders import canonical_parameters, model_signature, text_module
from shared_core.patch import ErasurePatch, make_metadata, save_patch
from shared_core.tokenizer import clip_tokenizer

WIDTH = 32  # text width of the tiny CLIP and context width of the tiny UNet
CHANNELS = 8


# ---------------------------------------------------------------------------------------------- LDM UNet


class CrossAttention(torch.nn.Module):
    """The interface of ldm.modules.attention.CrossAttention (SD1.x), plain attention."""

    def __init__(self, query_dim, context_dim=None, heads=2, dim_head=4):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.scale = dim_head ** -0.5
        self.heads = heads
        self.to_q = torch.nn.Linear(query_dim, inner, bias=False)
        self.to_k = torch.nn.Linear(context_dim, inner, bias=False)
        self.to_v = torch.nn.Linear(context_dim, inner, bias=False)
        self.to_out = torch.nn.Sequential(torch.nn.Linear(inner, query_dim), torch.nn.Dropout(0.0))

    def forward(self, x, context=None, mask=None):
        h = self.heads
        q = self.to_q(x)
        context = x if context is None else context
        k, v = self.to_k(context), self.to_v(context)
        q, k, v = (t.reshape(t.shape[0], t.shape[1], h, -1).transpose(1, 2) for t in (q, k, v))
        sim = (q @ k.transpose(-1, -2)) * self.scale
        if mask is not None:
            sim = sim.masked_fill(~mask[:, None, None, :], -torch.finfo(sim.dtype).max)
        out = sim.softmax(dim=-1) @ v
        return self.to_out(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class SgmCrossAttention(CrossAttention):
    """sgm.modules.attention.CrossAttention (SDXL): the same projections; its forward also takes ``additional_tokens``
    and ``n_times_crossframe_attn_in_self``, which SDXL's BasicTransformerBlock passes as None / 0."""

    def forward(self, x, context=None, mask=None, additional_tokens=None, n_times_crossframe_attn_in_self=0):
        assert additional_tokens is None and not n_times_crossframe_attn_in_self
        return super().forward(x, context=context, mask=mask)


class BasicTransformerBlock(torch.nn.Module):
    def __init__(self, dim, context_dim, sgm=False):
        super().__init__()
        self.sgm = sgm
        self.attn1 = CrossAttention(dim)
        self.attn2 = (SgmCrossAttention if sgm else CrossAttention)(dim, context_dim)
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.n_heads, self.d_head = self.attn2.heads, dim // self.attn2.heads

    def forward(self, x, context=None, transformer_options=None):
        x = x + self.attn1(self.norm1(x))
        n = self.norm2(x)
        options = transformer_options or {}
        patches, replace = options.get("patches", {}), options.get("patches_replace", {}).get("attn2", {})
        extra = {k: v for k, v in options.items() if k not in ("patches", "patches_replace")}
        extra.update(n_heads=self.n_heads, dim_head=self.d_head)
        block = options.get("block")
        key = (block[0], block[1], options.get("block_index", 0)) if block else None
        value = context
        for patch in patches.get("attn2_patch", []):  # Forge/ComfyUI: before the projections
            n, context, value = patch(n, context, value, extra)
        if key in replace:  # Forge/ComfyUI: between the projections and to_out
            out = replace[key](self.attn2.to_q(n), self.attn2.to_k(context), self.attn2.to_v(value), extra)
            return x + self.attn2.to_out(out)
        if self.sgm:  # sgm's BasicTransformerBlock: self.attn2(self.norm2(x), context=context, additional_tokens=...)
            return x + self.attn2(n, context=context, additional_tokens=None)
        return x + self.attn2(n, context=context)


class SpatialTransformer(torch.nn.Module):
    def __init__(self, channels, context_dim, sgm=False):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList([BasicTransformerBlock(channels, context_dim, sgm)])

    def forward(self, x, context, transformer_options=None):
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        for i, block in enumerate(self.transformer_blocks):
            if transformer_options is not None:
                transformer_options["block_index"] = i
            tokens = block(tokens, context=context, transformer_options=transformer_options)
        return tokens.transpose(1, 2).reshape(b, c, h, w)


# SD1.x: which input/output blocks hold a cross-attention, and where the resolution halves / doubles
_INPUT_ATTN, _OUTPUT_ATTN = {1, 2, 4, 5, 7, 8}, {3, 4, 5, 6, 7, 8, 9, 10, 11}
_DOWN_AFTER, _UP_AFTER = {3, 6, 9}, {2, 5, 8}


class TinyUNet(torch.nn.Module):
    """SD1.x's LDM UNet layout (input_blocks / middle_block / output_blocks, attn2 at 1, 1/2, 1/4, 1/8
    of the latent) with tiny, random layers; ``forward(x, timesteps=None, context=None, y=None)``."""

    def __init__(self, context_dim=WIDTH, seed=0, sgm=False):
        super().__init__()
        torch.manual_seed(seed)
        c = CHANNELS

        def block(has_attn):
            return torch.nn.ModuleList([torch.nn.Conv2d(c, c, 3, padding=1)]
                                       + ([SpatialTransformer(c, context_dim, sgm)] if has_attn else []))

        self.conv_in = torch.nn.Conv2d(4, c, 3, padding=1)
        self.time = torch.nn.Linear(1, c)
        self.input_blocks = torch.nn.ModuleList([block(i in _INPUT_ATTN) for i in range(12)])
        self.middle_block = torch.nn.ModuleList([torch.nn.Conv2d(c, c, 3, padding=1), SpatialTransformer(c, context_dim, sgm)])
        self.output_blocks = torch.nn.ModuleList([block(i in _OUTPUT_ATTN) for i in range(12)])
        self.conv_out = torch.nn.Conv2d(c, 4, 3, padding=1)

    def _run(self, blocks, kind, h, context, options):
        for i, b in enumerate(blocks):
            if options is not None:
                options["block"] = (kind, i)
            h = torch.tanh(b[0](h))
            if len(b) > 1:
                h = b[1](h, context, options)
            if kind == "input" and i in _DOWN_AFTER:
                h = F.avg_pool2d(h, 2, ceil_mode=True)
            if kind == "output" and i in _UP_AFTER:
                h = F.interpolate(h, scale_factor=2, mode="nearest")
        return h

    def forward(self, x, timesteps=None, context=None, y=None, transformer_options=None, **kwargs):
        if transformer_options is not None:
            transformer_options["original_shape"] = list(x.shape)
        h = self.conv_in(x) + self.time(timesteps.float().reshape(-1, 1) / 1000)[:, :, None, None]
        h = self._run(self.input_blocks, "input", h, context, transformer_options)
        if transformer_options is not None:
            transformer_options["block"] = ("middle", 0)
        h = self.middle_block[1](torch.tanh(self.middle_block[0](h)), context, transformer_options)
        h = self._run(self.output_blocks, "output", h, context, transformer_options)
        return self.conv_out(h)


# ---------------------------------------------------------------------------------------------- text encoder


class PromptChunk:
    def __init__(self, tokens):
        self.tokens, self.multipliers, self.fixes = tokens, [1.0] * len(tokens), []


class FrozenCLIPEmbedder(torch.nn.Module):
    """ldm's FrozenCLIPEmbedder: a transformers CLIPTextModel (``transformer``) and its tokenizer."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer, self.tokenizer = transformer, clip_tokenizer()


class HijackedClip(torch.nn.Module):
    """sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords: 75-token chunks with start/end, end-token padding."""

    def __init__(self, transformer):
        super().__init__()
        self.wrapped = FrozenCLIPEmbedder(transformer)
        tok = self.wrapped.tokenizer
        self.id_start, self.id_end = tok.bos_token_id, tok.eos_token_id
        self.id_pad = self.id_end

    def process_texts(self, texts):
        batch, count = [], 0
        for text in texts:
            ids = self.wrapped.tokenizer(text, add_special_tokens=False)["input_ids"]
            chunks = [PromptChunk([self.id_start] + part + [self.id_end] * (76 - len(part)))
                      for part in (ids[i:i + 75] for i in range(0, max(len(ids), 1), 75))]
            batch.append(chunks)
            count = max(count, len(ids))
        return batch, count

    def forward(self, texts):
        batch, _ = self.process_texts(texts)
        n = max(len(c) for c in batch)
        empty = PromptChunk([self.id_start] + [self.id_end] * 76)
        zs = []
        for i in range(n):
            ids = torch.tensor([(c[i] if i < len(c) else empty).tokens for c in batch])
            zs.append(self.wrapped.transformer(input_ids=ids).last_hidden_state)
        return torch.hstack(zs)


def text_encoder(seed=0, hidden=WIDTH):
    """A tiny CLIP whose output rows are long enough (final layer norm x6) for NLCE's live-token floor."""
    model = random_clip(tiny_config(hidden=hidden), seed)
    with torch.no_grad():
        canonical_parameters(model)["text_model.final_layer_norm.weight"].mul_(6.0)
    return model


class EmbeddingsWithFixes(torch.nn.Module):
    """modules/sd_hijack.py EmbeddingsWithFixes: wraps CLIP's token embedding (``wrapped``) to splice in
    textual-inversion vectors (``embeddings.fixes``; none here), so its weight is ``token_embedding.wrapped.weight``."""

    def __init__(self, wrapped, embeddings, textual_inversion_key="clip_l"):
        super().__init__()
        self.wrapped, self.embeddings, self.textual_inversion_key = wrapped, embeddings, textual_inversion_key

    def forward(self, input_ids):
        self.embeddings.fixes = None
        return self.wrapped(input_ids)


class Sd1Model(torch.nn.Module):
    """The LatentDiffusion surface A1111 code uses: cond_stage_model, model.diffusion_model, flags; the text
    encoder's token embedding wrapped as StableDiffusionModelHijack.hijack leaves it."""

    is_sd1, is_sd2, is_sdxl = True, False, False

    def __init__(self, seed=0, text_width=WIDTH):
        super().__init__()
        # modules/sd_models.py load_model sets it: the checkpoint menu's title is "name [short hash]"
        self.sd_checkpoint_info = SimpleNamespace(name="tiny-sd15.safetensors", title="tiny-sd15.safetensors [0123456789]")
        self.cond_stage_model = HijackedClip(text_encoder(seed, text_width))
        embeddings = text_module(self.cond_stage_model.wrapped.transformer).embeddings
        embeddings.token_embedding = EmbeddingsWithFixes(embeddings.token_embedding, SimpleNamespace(fixes=None))
        self.model = torch.nn.Module()
        self.model.diffusion_model = TinyUNet(WIDTH, seed)

    def get_learned_conditioning(self, texts):
        return self.cond_stage_model(texts)


def text_model(sd_model):
    return sd_model.cond_stage_model.wrapped.transformer


# ---------------------------------------------------------------------------------------------- SDXL's OpenCLIP bigG


class ResidualAttentionBlock(torch.nn.Module):
    """open_clip.transformer.ResidualAttentionBlock: ln_1, a torch MultiheadAttention (fused in_proj), ln_2, mlp (c_fc, c_proj)."""

    def __init__(self, width, heads, mlp_width, activation=None):
        super().__init__()
        self.ln_1, self.ln_2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.attn = torch.nn.MultiheadAttention(width, heads)
        self.mlp = torch.nn.Sequential()
        self.mlp.add_module("c_fc", torch.nn.Linear(width, mlp_width))
        self.mlp.add_module("gelu", activation or torch.nn.GELU())
        self.mlp.add_module("c_proj", torch.nn.Linear(mlp_width, width))

    def forward(self, x, attn_mask=None):  # x: (tokens, batch, width), as open_clip 2.20 runs it
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class OpenClipTextTower(torch.nn.Module):
    """The text half of an open_clip CLIP as sgm's FrozenOpenCLIPEmbedder2 holds it (``model``): token_embedding,
    positional_embedding, transformer.resblocks, ln_final, text_projection (applied as ``x @ P``)."""

    def __init__(self, canonical: dict, heads: int = 1, activation=None):
        super().__init__()
        width = canonical["text_model.final_layer_norm.weight"].shape[0]
        layers = 1 + max(int(k.split(".")[3]) for k in canonical if k.startswith("text_model.encoder.layers."))
        mlp = canonical["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
        self.token_embedding = torch.nn.Embedding(*canonical["text_model.embeddings.token_embedding.weight"].shape)
        self.positional_embedding = torch.nn.Parameter(canonical["text_model.embeddings.position_embedding.weight"].clone())
        self.transformer = torch.nn.Module()
        self.transformer.resblocks = torch.nn.ModuleList([ResidualAttentionBlock(width, heads, mlp, activation) for _ in range(layers)])
        self.ln_final = torch.nn.LayerNorm(width)
        self.text_projection = torch.nn.Parameter(torch.randn(width, width, generator=torch.Generator().manual_seed(7)) * width ** -0.5)
        self.register_buffer("attn_mask", torch.full((77, 77), float("-inf")).triu_(1), persistent=False)
        with torch.no_grad():
            self.token_embedding.weight.copy_(canonical["text_model.embeddings.token_embedding.weight"])
            self.ln_final.weight.copy_(canonical["text_model.final_layer_norm.weight"])
            self.ln_final.bias.copy_(canonical["text_model.final_layer_norm.bias"])
            for i, block in enumerate(self.transformer.resblocks):
                c = lambda n: canonical[f"text_model.encoder.layers.{i}.{n}"]  # noqa: E731
                for kind in ("weight", "bias"):
                    getattr(block.attn, f"in_proj_{kind}").copy_(torch.cat([c(f"self_attn.{x}_proj.{kind}") for x in "qkv"]))
                    getattr(block.attn.out_proj, kind).copy_(c(f"self_attn.out_proj.{kind}"))
                    getattr(block.ln_1, kind).copy_(c(f"layer_norm1.{kind}"))
                    getattr(block.ln_2, kind).copy_(c(f"layer_norm2.{kind}"))
                    getattr(block.mlp.c_fc, kind).copy_(c(f"mlp.fc1.{kind}"))
                    getattr(block.mlp.c_proj, kind).copy_(c(f"mlp.fc2.{kind}"))
        self.requires_grad_(False)

    def layer_outputs(self, tokens):
        """sgm FrozenOpenCLIPEmbedder2.encode_with_transformer: every layer's output (batch, tokens, width)."""
        x = (self.token_embedding(tokens) + self.positional_embedding).permute(1, 0, 2)
        outs = []
        for block in self.transformer.resblocks:
            x = block(x, attn_mask=self.attn_mask)
            outs.append(x.permute(1, 0, 2))
        return outs


class FrozenOpenCLIPEmbedder2(torch.nn.Module):
    """sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2 (layer "penultimate", returns the pooled vector too)."""

    def __init__(self, tower):
        super().__init__()
        self.model, self.layer, self.legacy = tower, "penultimate", False


def hijacked_bigg(tower):
    """What sd_hijack does to SDXL's bigG embedder: the token embedding wrapped (EmbeddingsWithFixes, key clip_g), the
    embedder inside FrozenOpenCLIPEmbedder2WithCustomWords (``wrapped``)."""
    tower.token_embedding = EmbeddingsWithFixes(tower.token_embedding, SimpleNamespace(fixes=None), "clip_g")
    hijacked = torch.nn.Module()
    hijacked.wrapped = FrozenOpenCLIPEmbedder2(tower)
    return hijacked


class HijackedClipForSDXL(HijackedClip):
    """sd_hijack_clip.FrozenCLIPEmbedderForSDXLWithCustomWords: the same chunking, rows from the penultimate layer
    (sgm's FrozenCLIPEmbedder with layer "hidden", layer_idx -2), not layer-normed."""

    def forward(self, texts):
        batch, _ = self.process_texts(texts)
        n = max(len(c) for c in batch)
        empty = PromptChunk([self.id_start] + [self.id_end] * 76)
        return torch.hstack([self.wrapped.transformer(input_ids=torch.tensor([(c[i] if i < len(c) else empty).tokens for c in batch]),
                                                      output_hidden_states=True).hidden_states[-2] for i in range(n)])


def bigg_rows(embedder, process_texts, texts):
    """FrozenOpenCLIPEmbedder2WithCustomWords: the same 77-token chunks (open_clip's tokenizer gives CLIP's ids; it pads
    with 0), the penultimate layer's rows, and the pooled vector (end token after ln_final, times the projection)."""
    tower = embedder.wrapped.model
    batch, _ = process_texts(texts)
    start, end = batch[0][0].tokens[0], 49407
    n = max(len(c) for c in batch)
    chunks, pooled = [], None
    for i in range(n):
        ids = torch.tensor([(c[i].tokens if i < len(c) else [start, end] + [end] * 75) for c in batch])
        first_end = (ids == end).int().argmax(dim=1)
        padded = torch.where(torch.arange(77)[None] > first_end[:, None], torch.zeros_like(ids), ids)
        outs = tower.layer_outputs(padded)
        chunks.append(outs[-2])
        if pooled is None:
            pooled = tower.ln_final(outs[-1])[torch.arange(ids.shape[0]), first_end] @ tower.text_projection
    return torch.hstack(chunks), pooled


class Conditioner(torch.nn.Module):
    """sgm's GeneralConditioner as A1111 hijacks it: ``embedders`` (CLIP-L, bigG)."""

    def __init__(self, embedders):
        super().__init__()
        self.embedders = torch.nn.ModuleList(embedders)


class SdxlModel(torch.nn.Module):
    """The DiffusionEngine surface A1111 code uses for SDXL: ``conditioner`` (also ``cond_stage_model``, as sd_hijack
    sets it with two text models), ``model.diffusion_model`` with sgm cross-attention reading both encoders' rows side
    by side, ``get_learned_conditioning`` returning {"crossattn", "vector"} (sd_models_xl)."""

    is_sd1, is_sd2, is_sdxl = False, False, True

    def __init__(self, seed=0, l_width=WIDTH, g_width=48):
        super().__init__()
        self.sd_checkpoint_info = SimpleNamespace(name="tiny-sdxl.safetensors", title="tiny-sdxl.safetensors [abcdef0123]")
        clip = random_clip(tiny_config(hidden=l_width), seed)
        clip_l = HijackedClipForSDXL(clip)
        embeddings = text_module(clip).embeddings
        embeddings.token_embedding = EmbeddingsWithFixes(embeddings.token_embedding, SimpleNamespace(fixes=None))
        # bigG's activation is gelu; the core infers it from the 1280 width, and at this tiny width it infers CLIP-L's
        # quick_gelu, so the stand-in's tower uses that (the real-A1111 test runs the real 1280-wide tower)
        quick_gelu = random_clip(tiny_config(hidden=g_width), seed + 1)
        tower = OpenClipTextTower({k: v.detach() for k, v in canonical_parameters(quick_gelu).items()},
                                  activation=quick_gelu.text_model.encoder.layers[0].mlp.activation_fn
                                  if hasattr(quick_gelu, "text_model") else quick_gelu.encoder.layers[0].mlp.activation_fn)
        self.conditioner = Conditioner([clip_l, hijacked_bigg(tower)])
        self.cond_stage_model = self.conditioner
        self.chunker = clip_l.process_texts  # open_clip's tokenizer gives the same ids and chunks
        self.model = torch.nn.Module()
        self.model.diffusion_model = TinyUNet(l_width + g_width, seed, sgm=True)

    def get_learned_conditioning(self, texts):
        *clip_l, bigg = self.conditioner.embedders  # a refiner has bigG alone
        rows_g, pooled = bigg_rows(bigg, self.chunker, texts)
        return {"crossattn": torch.cat([clip_l[0](texts), rows_g], dim=-1) if clip_l else rows_g, "vector": pooled}


def sdxl_text_model(sd_model):
    return sd_model.conditioner.embedders[0].wrapped.transformer


# ---------------------------------------------------------------------------------------------- patches


def make_patch(model, concept="cat", seed=1, scale=0.05, family=None) -> ErasurePatch:
    """A patch with random layer-0 deltas for ``model`` (what training would produce, without training)."""
    g = torch.Generator().manual_seed(seed)
    params = canonical_parameters(model)
    deltas = {n: torch.randn(p.shape, generator=g) * scale for n, p in params.items()
              if ".layers.0." in n and ("proj" in n or "mlp" in n)}
    meta = make_metadata(method="random", concepts=[concept], config={}, model=model, base_signature=model_signature(model))
    if family:
        meta["encoder"]["family"] = family
    return ErasurePatch(deltas, meta)


def write_patch(folder, name, model, **kw) -> str:
    save_patch(make_patch(model, **kw), str(folder / name))
    return name


def snapshot(*modules) -> list[dict]:
    """Everything a job could leave behind: weights, instance attributes (forward overrides, Lora state)."""
    out = []
    for m in modules:
        for name, sub in m.named_modules():
            attrs = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in sub.__dict__.items()
                     if not k.startswith("_") and k != "training"}
            out.append((name, {k: v.detach().clone() for k, v in sub.state_dict(keep_vars=True).items() if "." not in k}, attrs))
    return out


def same(a, b) -> bool:
    if len(a) != len(b):
        return False
    for (n1, w1, x1), (n2, w2, x2) in zip(a, b):
        if n1 != n2 or w1.keys() != w2.keys() or x1.keys() != x2.keys():
            return False
        if not all(torch.equal(w1[k], w2[k]) for k in w1):
            return False
        for k in x1:
            v1, v2 = x1[k], x2[k]
            if torch.is_tensor(v1) != torch.is_tensor(v2) or (torch.is_tensor(v1) and not torch.equal(v1, v2)) \
                    or (not torch.is_tensor(v1) and v1 != v2):
                return False
    return True


# ---------------------------------------------------------------------------------------------- A1111 Lora


class LoraStandIn:
    """What A1111's Lora extension does to a layer before its forward (networks.network_apply_weights):
    first use of a LoRA backs the weight up; whenever the wanted set changes, weights are restored
    from the backups and the wanted LoRAs are added."""

    def __init__(self, model):
        self.wanted: tuple = ()
        self.deltas: dict[str, dict[str, torch.Tensor]] = {}  # lora name -> {layer name: weight delta}
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                module.network_layer_name = name
                module.register_forward_pre_hook(self._apply)

    def add(self, name, model, scale=0.1, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.deltas[name] = {n: torch.randn(m.weight.shape, generator=g) * scale for n, m in model.named_modules()
                             if isinstance(m, torch.nn.Linear)}

    @torch.no_grad()
    def _apply(self, module, args):
        current = getattr(module, "network_current_names", ())
        if getattr(module, "network_weights_backup", None) is None and self.wanted != ():
            module.network_weights_backup = module.weight.detach().to("cpu", copy=True)
        if getattr(module, "network_bias_backup", None) is None:
            module.network_bias_backup = module.bias.detach().to("cpu", copy=True) if module.bias is not None else None
        if current != self.wanted:
            if module.network_weights_backup is not None:
                module.weight.copy_(module.network_weights_backup)
            if module.network_bias_backup is not None:
                module.bias.copy_(module.network_bias_backup)
            for lora in self.wanted:
                module.weight += self.deltas[lora][module.network_layer_name].to(module.weight.dtype)
            module.network_current_names = self.wanted


# ---------------------------------------------------------------------------------------------- processing


class ScheduledPromptConditioning:
    def __init__(self, end_at_step, cond):
        self.end_at_step, self.cond = end_at_step, cond


class Processing:
    """StableDiffusionProcessing as the scripts see it, with a 3-step Euler-like sampler."""

    cached_c = [None, None]  # class-level, shared between jobs, like A1111's
    cached_uc = [None, None]

    def __init__(self, sd_model, prompt="a photo of a cat", negative_prompt="", n_iter=1, size=16, seed=0,
                 timesteps=(950.0, 600.0, 200.0), fail_at_step=None, interrupt_at_step=None):
        self.sd_model, self.prompt, self.negative_prompt = sd_model, prompt, negative_prompt
        self.n_iter, self.size, self.seed, self.timesteps = n_iter, size, seed, timesteps
        self.fail_at_step, self.interrupt_at_step = fail_at_step, interrupt_at_step
        self.cached_c, self.cached_uc = Processing.cached_c, Processing.cached_uc
        self.extra_generation_params, self.comments = {}, {}
        self.prompts, self.negative_prompts = [prompt], [negative_prompt]
        self.c = self.uc = None
        self.samples = []
        self.closed = False

    def comment(self, text):
        self.comments[text] = 1

    def _conds(self, texts, cache):
        key = (tuple(texts), id(self.sd_model))
        if cache[0] != key:  # the webui's cache: keyed on prompts and model, not on erasure patches
            cache[0], cache[1] = key, self.sd_model.get_learned_conditioning(texts)
        return cache[1]

    @torch.no_grad()
    def setup_conds(self):
        uc = self._conds(self.negative_prompts, self.cached_uc)
        if isinstance(uc, dict):  # SDXL: prompt_parser keeps one {"crossattn", "vector"} per prompt
            uc = [{k: v[i] for k, v in uc.items()} for i in range(len(self.negative_prompts))]
        self.uc = [[ScheduledPromptConditioning(len(self.timesteps), u)] for u in uc]
        self.c = self._conds(self.prompts, self.cached_c)

    @torch.no_grad()
    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        g = torch.Generator().manual_seed(self.seed)
        x = torch.randn(1, 4, self.size, self.size, generator=g)
        extra = {}
        if isinstance(conditioning, dict):  # SDXL: the sampler cats "crossattn" and "vector" of cond and uncond
            extra = {"y": torch.cat([conditioning["vector"], torch.stack([s[0].cond["vector"] for s in unconditional_conditioning])])}
            conditioning = conditioning["crossattn"]
            unconditional_conditioning = [[ScheduledPromptConditioning(s[0].end_at_step, s[0].cond["crossattn"])]
                                          for s in unconditional_conditioning]
        uc = torch.stack([s[0].cond for s in unconditional_conditioning])
        n = max(conditioning.shape[1], uc.shape[1])  # pad_cond_uncond: empty chunks at the end
        pad = lambda t: torch.cat([t, t[:, -1:].expand(-1, n - t.shape[1], -1)], 1) if t.shape[1] < n else t  # noqa: E731
        dm = self.sd_model.model.diffusion_model
        for step, t in enumerate(self.timesteps):
            if step == self.interrupt_at_step:  # the sampler returns what it has (InterruptedException is caught)
                break
            if step == self.fail_at_step:
                raise RuntimeError("CUDA out of memory (simulated)")
            out = dm(torch.cat([x, x]), torch.full((2,), t), context=torch.cat([pad(conditioning), pad(uc)]), **extra)
            cond, uncond = out.chunk(2)
            x = x - 0.3 * (uncond + 5.0 * (cond - uncond))
        self.samples.append(x)
        return x

    def close(self):
        self.closed = True


def call_hook(fn, *args, **kwargs):
    """modules.scripts.ScriptRunner: an exception in a script hook is reported and generation goes on."""
    try:
        fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - mirrors errors.report(...)
        call_hook.reported.append(e)


call_hook.reported = []


@pytest.fixture(autouse=True)
def no_job_left():
    """Imported by each test module of the extension: no job, reported error or cached conditioning
    carries over from one test to the next."""
    call_hook.reported.clear()
    jobs.finish()
    yield
    jobs.finish()
    Processing.cached_c[:] = [None, None]
    Processing.cached_uc[:] = [None, None]


def run_job(script, p, args, before_sample=None):
    """The order of modules.processing.process_images for one job (txt2img runs it in ``with closing(p)``)."""
    with closing(p):
        call_hook(script.process, p, *args)
        for n in range(p.n_iter):
            call_hook(script.process_batch, p, *args, batch_number=n, prompts=p.prompts, seeds=[p.seed], subseeds=[p.seed])
            p.setup_conds()
            if before_sample:
                before_sample(p)
            p.sample(conditioning=p.c, unconditional_conditioning=p.uc, seeds=[p.seed], subseeds=[p.seed],
                     subseed_strength=0.0, prompts=p.prompts)
        call_hook(script.postprocess, p, SimpleNamespace(images=[]), *args)
    return p


# ---------------------------------------------------------------------------------------------- Forge


class LoraLoader:
    """backend/patcher/lora.py LoraLoader: merges the patches of the patcher being loaded into the shared
    model's weights, keeping backups; a different set of patches first restores the backups."""

    def __init__(self, model):
        self.model, self.backup, self.loaded_hash = model, {}, str([])

    @torch.no_grad()
    def refresh(self, lora_patches):
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash:
            return
        params = dict(self.model.named_parameters())
        for key, w in self.backup.items():
            params[key].data.copy_(w)
        self.backup = {}
        for patches in lora_patches.values():
            for key, entries in patches.items():
                self.backup.setdefault(key, params[key].detach().clone())
                for strength, value, strength_model, _offset, _function in entries:
                    kind, (diff,) = value if len(value) == 2 else ("diff", value)
                    assert kind == "diff" and strength_model == 1.0
                    params[key].data += strength * diff.to(params[key].dtype)
        self.loaded_hash = hashes


class ModelPatcher:
    """backend/patcher/base.py ModelPatcher: clone() shares the model, copies patches and options."""

    def __init__(self, model):
        self.model, self.lora_patches, self.model_options = model, {}, {"transformer_options": {}}
        if not hasattr(model, "lora_loader"):
            model.lora_loader = LoraLoader(model)
        self.lora_loader = model.lora_loader

    def clone(self):
        n = type(self).__new__(type(self))
        n.model, n.lora_loader = self.model, self.lora_loader
        n.lora_patches = self.lora_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def add_patches(self, *, filename, patches, strength_patch=1.0, strength_model=1.0, online_mode=False):
        keys = {k for k, _ in self.model.named_parameters()}
        this = {k: [[strength_patch, v, strength_model, None, None]] for k, v in patches.items() if k in keys}
        self.lora_patches[(filename, strength_patch, strength_model, online_mode)] = this
        return set(this)

    def refresh_loras(self):
        self.lora_loader.refresh(self.lora_patches)

    def set_model_unet_function_wrapper(self, fn):
        self.model_options["model_function_wrapper"] = fn

    def set_model_attn2_patch(self, patch):
        to = self.model_options["transformer_options"]
        to.setdefault("patches", {}).setdefault("attn2_patch", []).append(patch)

    def set_model_attn2_replace(self, patch, block_name, number, transformer_index=None):
        to = self.model_options["transformer_options"]
        to.setdefault("patches_replace", {}).setdefault("attn2", {})[(block_name, number, transformer_index)] = patch


class TransformersV4Layout(torch.nn.Module):
    """A CLIPTextModel under transformers 4.x parameter names (``text_model.*``), as Forge holds it."""

    def __init__(self, model):
        super().__init__()
        self.text_model, self.config = model, model.config

    def forward(self, **kwargs):
        return self.text_model(**kwargs)


class IntegratedCLIP(torch.nn.Module):
    def __init__(self, transformer):
        super().__init__()
        # transformers 5.x builds CLIPTextModel flat; 4.x (which Forge pins) already has ``text_model``
        self.transformer = transformer if hasattr(transformer, "text_model") else TransformersV4Layout(transformer)


def forge_text_encoder(clip, key="clip_l"):
    """The transformers CLIPTextModel inside a stand-in Forge CLIP (under either transformers layout)."""
    transformer = clip.cond_stage_model[key].transformer
    return transformer.text_model if isinstance(transformer, TransformersV4Layout) else transformer


class Clip:
    """backend/patcher/clip.py CLIP: cond_stage_model (a ModuleDict: clip_l, ...) behind a patcher."""

    def __init__(self, transformer=None, key="clip_l"):
        if transformer is None:
            return
        self.cond_stage_model = torch.nn.ModuleDict({key: IntegratedCLIP(transformer)})
        self.patcher = ModelPatcher(self.cond_stage_model)

    def clone(self):
        n = Clip()
        n.cond_stage_model, n.patcher = self.cond_stage_model, self.patcher.clone()
        return n

    def add_patches(self, *args, **kwargs):
        return self.patcher.add_patches(*args, **kwargs)


class Predictor:
    def timestep(self, sigma):
        return sigma * 100.0  # a k-diffusion sigma -> 0..1000 timestep stand-in


class KModel(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.diffusion_model, self.predictor = unet, Predictor()

    def apply_model(self, x, t, c_crossattn=None, transformer_options=None, **kwargs):
        return self.diffusion_model(x, self.predictor.timestep(t), context=c_crossattn, transformer_options=transformer_options)


class ForgeObjects:
    def __init__(self, unet, clip, vae=None, clipvision=None):
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, vae, clipvision

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)


class ForgeSd1(torch.nn.Module):
    """backend/diffusion_engine/sd15.py StableDiffusion: forge_objects (+ original, after LoRA), flags."""

    is_sd1, is_sd2, is_sdxl = True, False, False

    def __init__(self, seed=0, key="clip_l"):
        super().__init__()
        self.unet_model = KModel(TinyUNet(WIDTH, seed))
        unet = ModelPatcher(self.unet_model)
        self.forge_objects = ForgeObjects(unet, Clip(text_encoder(seed), key))
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()

    def get_learned_conditioning(self, texts):
        clip = self.forge_objects.clip
        clip.patcher.refresh_loras()  # memory_management.load_model_gpu(clip.patcher)
        hijack = HijackedClip(forge_text_encoder(clip))
        return hijack(texts)


def run_forge_job(script, p, args):
    """The order of Forge's process_images_inner / sample for one job, with Forge's sampling_function calls."""
    model = p.sd_model
    with closing(p):
        call_hook(script.process, p, *args)
        for n in range(p.n_iter):
            model.forge_objects = model.forge_objects_original.shallow_copy()
            model.forge_objects = model.forge_objects_after_applying_lora.shallow_copy()  # after extra networks
            call_hook(script.process_batch, p, *args, batch_number=n, prompts=p.prompts, seeds=[p.seed], subseeds=[p.seed])
            p.setup_conds()
            model.forge_objects = model.forge_objects_after_applying_lora.shallow_copy()  # Forge's sample()
            call_hook(script.process_before_every_sampling, p, *args, x=None, noise=None, c=p.c, uc=p.uc)
            forge_sample(p)
        call_hook(script.postprocess, p, SimpleNamespace(images=[]), *args)
    return p


@torch.no_grad()
def forge_sample(p):
    """backend/sampling/sampling_function.py: cond and uncond chunks through model_function_wrapper / apply_model."""
    unet = p.sd_model.forge_objects.unet
    g = torch.Generator().manual_seed(p.seed)
    x = torch.randn(1, 4, p.size, p.size, generator=g)
    uc = torch.stack([s[0].cond for s in p.uc])
    for sigma in (9.5, 6.0, 2.0):
        options = dict(unet.model_options["transformer_options"])
        options.update(cond_or_uncond=[1, 0], sigmas=torch.tensor([sigma, sigma]))  # uncond first, as Forge batches them
        c = {"c_crossattn": torch.cat([uc, p.c]), "transformer_options": options}
        args = {"input": torch.cat([x, x]), "timestep": torch.full((2,), sigma), "c": c, "cond_or_uncond": [1, 0]}
        wrapper = unet.model_options.get("model_function_wrapper")
        out = wrapper(unet.model.apply_model, args) if wrapper else unet.model.apply_model(args["input"], args["timestep"], **c)
        uncond, cond = out.chunk(2)
        x = x - 0.3 * (uncond + 5.0 * (cond - uncond))
    p.samples.append(x)
    return x



class ScriptHooks:
    """What a1111_extension.script.ErasureScript's hooks do, without importing the webui (tested in test_a1111_entry)."""

    def __init__(self, env):
        self.env = env

    def process(self, p, *args):
        jobs.begin(p, args, self.env)

    def process_batch(self, p, *args, **kwargs):
        jobs.batch(p)

    def process_before_every_sampling(self, p, *args, **kwargs):
        jobs.before_sampling(p)

    def postprocess(self, p, processed, *args):
        jobs.finish(p)


def script_args(patches=(), nlce=False, concepts="", neighbors="", preset="object", beta=1.0, gamma=1.0,
                schedule="single-pass", enabled=True) -> list:
    """The accordion's values in UI_ARGS order."""
    slots = []
    for i in range(3):
        name, strength = patches[i] if i < len(patches) else ("None", 1.0)
        slots += [name, strength]
    return [enabled, *slots, nlce, concepts, neighbors, preset, beta, gamma, schedule]
