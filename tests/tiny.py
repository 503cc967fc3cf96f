"""Tiny offline models for tests: nothing is downloaded, weights are random.

``tiny_clip`` uses the package's own (real, offline) CLIP tokenizer with a 32-wide, 3-layer
encoder; ``tiny_tokenizer_files`` writes a character-level vocabulary like a test would; the
real CLIP-L configuration is available for smoke tests.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import CLIPTextConfig, CLIPTextModel

from shared_core.encoders import canonical_parameters
from shared_core.tokenizer import clip_tokenizer


def _zero_mask_is_free() -> bool:
    g = torch.Generator().manual_seed(0)  # its own: importing this module leaves torch's global seed alone
    for sq, sk in (((2, 2, 16, 4), (2, 2, 5, 4)), ((2, 4, 64, 8), (2, 4, 77, 8))):
        q, k, v = (torch.randn(*shape, generator=g) for shape in (sq, sk, sk))
        zero = torch.zeros(sq[0], 1, sq[2], sk[2])
        if not torch.equal(F.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v, attn_mask=zero)):
            return False
    return True


# NLCE's steps always pass their attention mask (no host read decides to skip it): where this torch computes SDPA
# with an all-zero mask as without one (CPU since torch 2.3 or so) "nothing changes" holds to the bit; elsewhere (torch
# 2.1 takes another kernel for a masked call) it holds to that kernel's rounding.
ZERO_MASK_IS_FREE = _zero_mask_is_free()


def assert_unchanged(out: torch.Tensor, before: torch.Tensor, atol: float = 1e-5) -> None:
    """``out`` is ``before``: bit for bit where a zero mask is free, else within ``atol`` (fp32 rounding)."""
    if ZERO_MASK_IS_FREE:
        assert torch.equal(out, before)
    else:
        torch.testing.assert_close(out, before, rtol=0, atol=atol)


# heads = width // 64, as in every real CLIP (and as checkpoint loading infers it)
def tiny_config(hidden=32, layers=3, vocab=49408, positions=77, intermediate=64):
    return CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                          num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64), max_position_embeddings=positions,
                          hidden_act="quick_gelu", bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=1)


def clip_l_config():
    return CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                          bos_token_id=49406, eos_token_id=49407, pad_token_id=1)


def random_clip(config=None, seed=0):
    torch.manual_seed(seed)
    model = CLIPTextModel(config or tiny_config())
    # random init gives tiny layer weights; widen them so the encoder is not nearly the identity
    with torch.no_grad():
        for name, p in canonical_parameters(model).items():
            if name.endswith("weight") and p.ndim == 2 and "embedding" not in name:
                p.normal_(0, 0.5 / p.shape[1] ** 0.5)
    return model.eval().requires_grad_(False)


def tiny_clip(seed=0):
    return random_clip(tiny_config(), seed), clip_tokenizer()


def canonical_state_dict(model, prefix=""):
    """The encoder's weights under checkpoint names (``text_model.*``) behind ``prefix``."""
    return {prefix + k: v.detach().clone() for k, v in canonical_parameters(model).items()}


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(model, snap) -> bool:
    now = model.state_dict()
    return now.keys() == snap.keys() and all(torch.equal(now[k], snap[k]) for k in snap)


def openclip_state_dict(canonical: dict, prefix: str) -> dict:
    """A canonical CLIP state dict in the layout SDXL single files keep bigG in (an OpenCLIP text tower behind
    ``prefix``: fused q/k/v ``attn.in_proj_*``, ``ln_1``/``ln_2``, ``mlp.c_fc``/``c_proj``), written out by hand so that
    the core's own mapping is checked against it."""
    out = {prefix + "token_embedding.weight": canonical["text_model.embeddings.token_embedding.weight"],
           prefix + "positional_embedding": canonical["text_model.embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": canonical["text_model.final_layer_norm.weight"],
           prefix + "ln_final.bias": canonical["text_model.final_layer_norm.bias"]}
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc",
             "mlp.fc2": "mlp.c_proj"}
    layers = 1 + max(int(k.split(".")[3]) for k in canonical if k.startswith("text_model.encoder.layers."))
    for i in range(layers):
        base = f"text_model.encoder.layers.{i}."
        for hf, oc in names.items():
            for kind in ("weight", "bias"):
                out[f"{prefix}transformer.resblocks.{i}.{oc}.{kind}"] = canonical[base + hf + "." + kind]
        for kind in ("weight", "bias"):
            out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                [canonical[f"{base}self_attn.{n}.{kind}"] for n in ("q_proj", "k_proj", "v_proj")])
    return out


def grid_record(path) -> tuple[dict, tuple[int, int]]:
    """The record ``hirm nlce`` writes into its grid PNG, and the grid's size (width, height)."""
    import json

    from PIL import Image

    with Image.open(path) as grid:
        return json.loads(grid.text["hirm-nlce"]), grid.size


class HostReads(TorchDispatchMode):
    """Records the operators that make a GPU wait for its host (a value read back: ``item``, ``bool(tensor)``,
    ``nonzero``, ``equal``) while active: ``with HostReads() as reads: ...; reads.ops``."""

    READS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal"}

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __enter__(self):
        super().__enter__()
        return self

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.READS:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def open_pass(session, t=500.0, *, context, conditional=None, words=None, gating_shape=(4, 4), dry=False, given=None,
              key="test", latent_hw=None):
    """Open a pass of an NLCE ``session`` as a host adapter does around a denoiser call (``nlce.run_pass``): begin it,
    make it ``session.current`` and hand it the context rows. Returns the pass."""
    batch = context.shape[0]
    p = session.begin(t, key=key, batch=batch, gating_shape=gating_shape, device=context.device, dry=dry, given=given)
    session.current = p
    p.host["latent_hw"] = latent_hw or gating_shape
    session.prepare(p, context, torch.ones(batch, dtype=torch.bool) if conditional is None else conditional, words)
    return p


def patch_files(folder, concepts, steps: int = 2) -> dict:
    """{concept: path} of a patch per concept trained on ``tiny_clip()``, saved in ``folder`` under the name the Hub
    stores it by (``hub.concept_slug``)."""
    from shared_core import hub
    from shared_core.hirm import train_patch
    from shared_core.patch import save_patch

    model, tok = tiny_clip()
    return {c: save_patch(train_patch(model, tok, concepts=[c], steps=steps), str(folder / f"{hub.concept_slug(c)}.safetensors"))
            for c in concepts}
