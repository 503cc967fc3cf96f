"""Tokenising prompts and running a CLIP text encoder the way SD pipelines do."""

from __future__ import annotations

import torch

from .errors import HirmError


def tokenize(tokenizer, prompts: list[str], max_length: int = 77, what: str = "prompt") -> torch.Tensor:
    """Token ids padded to ``max_length``; refuses (does not truncate) a prompt that is too long."""
    for p in prompts:
        if not p or not p.strip():
            raise HirmError(f"empty {what}: give some text")
        n = len(tokenizer(p, truncation=False, add_special_tokens=True)["input_ids"])
        if n > max_length:
            raise HirmError(f"{what} {p[:40]!r}... is {n - 2} tokens; CLIP reads at most {max_length - 2}: shorten it")
    out = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return out["input_ids"]


def real_token_mask(tokenizer, input_ids: torch.Tensor) -> torch.Tensor:
    """True for start, word and the first end token; False for padding (SPEC: 'real tokens')."""
    eos = tokenizer.eos_token_id
    is_eos = input_ids == eos
    first_eos = torch.cumsum(is_eos.int(), dim=1) == 1
    before_eos = torch.cumsum(is_eos.int(), dim=1) == 0
    return before_eos | (is_eos & first_eos)


@torch.no_grad()
def encode(model, input_ids: torch.Tensor, batch_size: int = 16, done=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(final hidden states after the final layer norm, pooled end-token rows), fp32 on CPU.

    ``done()`` (optional) is called after each batch (progress for hosts)."""
    device = next(model.parameters()).device
    runner = getattr(model, "text_model", model)  # a CLIPTextModelWithProjection's own output is projected: use its encoder
    hidden, pooled = [], []
    for i in range(0, input_ids.shape[0], batch_size):
        out = runner(input_ids=input_ids[i : i + batch_size].to(device))
        hidden.append(out.last_hidden_state.float().cpu())
        pooled.append(out.pooler_output.float().cpu())
        if done is not None:
            done()
    return torch.cat(hidden), torch.cat(pooled)


@torch.no_grad()
def layer_rows(model, input_ids: torch.Tensor, layer: int = -2) -> tuple[torch.Tensor, torch.Tensor]:
    """(the output of transformer layer ``layer`` (SDXL reads the penultimate, -2), the unprojected pooled rows), fp32 on
    CPU. The layer's output is caught by a hook: no tuple of every layer's states is kept."""
    from .encoders import encoder_layers

    seen = {}
    handle = encoder_layers(model)[layer].register_forward_hook(lambda m, i, o: seen.update(h=o[0] if isinstance(o, tuple) else o))
    try:
        out = getattr(model, "text_model", model)(input_ids=input_ids.to(next(model.parameters()).device))
    finally:
        handle.remove()
    return seen["h"].float().cpu(), out.pooler_output.float().cpu()
