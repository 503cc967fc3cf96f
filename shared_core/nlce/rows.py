"""What NLCE reads about a text encoder: the rows a denoiser reads for a text, and which of them are words.

A ``RowEncoder`` turns texts into their real rows (start, words, end; never padding) of the context the denoiser
reads, fp32 on the CPU, and says what the operators and the miner need to know about those rows. Hosts build one from
their own encoders (``clip_row_encoder``, ``sdxl_row_encoder`` here; the joint-attention adapters for Flux and SD3);
a plain function ``texts -> rows`` is read as an SD1.x-style encoder (``RowEncoder.of``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import HirmError, NlceError


def _inner(rows: torch.Tensor) -> torch.Tensor:
    return rows[1:-1]


def _after_start(rows: torch.Tensor) -> torch.Tensor:
    return rows[1:]


@dataclass
class RowEncoder:
    """``encoder(texts)`` -> per text its real rows (n_i, width), fp32 on the CPU.

    ``family``: the model family the rows belong to (``families.FAMILIES``); ``word_rows(rows)``: the words among a
    text's real rows (default: all but the start and the end row); ``without_start(rows)``: the rows without the start
    row(s) (the nudity preset's subspaces); ``tokenizer`` and ``token_embedding``: CLIP-L's vocabulary, for mining
    neighbours; ``reference``: CLIP-L's rows as SD1.x reads them (the live-token floor's scale on other families).
    """

    encode: Callable[[list[str]], list[torch.Tensor]]
    family: str = "sd1"
    tokenizer: object = None
    token_embedding: torch.Tensor | None = None
    reference: "RowEncoder | None" = None
    word_rows: Callable[[torch.Tensor], torch.Tensor] = _inner
    without_start: Callable[[torch.Tensor], torch.Tensor] = _after_start

    def __call__(self, texts) -> list[torch.Tensor]:
        return self.encode(list(texts))

    @classmethod
    def of(cls, encoder) -> "RowEncoder":
        """``encoder`` itself, or a plain ``texts -> rows`` function read as an SD1.x-style encoder."""
        return encoder if isinstance(encoder, RowEncoder) else cls(encoder)


def clip_row_encoder(text_model, tokenizer, device=None) -> RowEncoder:
    """Per text, its real-token rows (start, words, end) of the final-layer-norm output, fp32: what an SD1.x UNet
    cross-attends to. The encoder runs where ``text_model`` lives (it is never moved); rows are returned on ``device``
    (default CPU). A text longer than 77 tokens is refused."""
    from ..textenc import encode

    return _clip_rows(lambda texts, ids: encode(text_model, ids, batch_size=64)[0], tokenizer, text_model, "sd1", device)


def sdxl_row_encoder(clip_l, tokenizer_l, clip_g, tokenizer_g, device=None) -> RowEncoder:
    """Per text, its real-token rows of what SDXL's UNet cross-attends to: CLIP-L's and CLIP-G's penultimate-layer
    outputs side by side (768 + 1280 = 2048 wide), fp32; ``reference`` gives the same texts' rows as an SD1.x model would
    read them from this CLIP-L."""
    from ..textenc import layer_rows, tokenize

    def rows(texts, ids):
        ids_g = tokenize(tokenizer_g, texts)[:, : ids.shape[1]]  # bigG's own tokenizer (it pads with "!")
        return torch.cat([layer_rows(clip_l, ids)[0], layer_rows(clip_g, ids_g)[0]], dim=-1)

    encoder = _clip_rows(rows, tokenizer_l, clip_l, "sdxl", device)
    encoder.reference = clip_row_encoder(clip_l, tokenizer_l, device)
    return encoder


def _clip_rows(rows: Callable[[list[str], torch.Tensor], torch.Tensor], tokenizer, text_model, family: str, device) -> RowEncoder:
    from ..encoders import text_module
    from ..textenc import real_token_mask, tokenize

    def encode(texts: list[str]) -> list[torch.Tensor]:
        try:
            ids = tokenize(tokenizer, list(texts), what="NLCE concept")
        except HirmError as e:
            raise NlceError(str(e)) from None
        mask = real_token_mask(tokenizer, ids)
        # attention is causal: rows up to the end token do not depend on the padding after it
        hidden = rows(list(texts), ids[:, : int(mask.sum(1).max())])
        return [hidden[i][mask[i][: hidden.shape[1]]].to(device or "cpu") for i in range(len(texts))]

    return RowEncoder(encode, family, tokenizer, text_module(text_model).embeddings.token_embedding.weight.detach())


def prompt_token_mask(tokenizer, prompts: list[str], length: int = 77) -> torch.Tensor:
    """(len(prompts), length) bool: True on the rows of the prompts' words (not start, end or padding).

    For hosts that know the prompt text: pass the rows of each prompt as the word mask of a pass. Prompts are
    truncated to ``length`` like the pipelines do.
    """
    from ..textenc import real_token_mask

    ids = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="pt")["input_ids"]
    words = real_token_mask(tokenizer, ids) & (ids != tokenizer.eos_token_id)
    words[:, 0] = False
    return words
