"""The CLIP BPE tokenizer, available offline.

The CLIP vocabulary (OpenAI's ``bpe_simple_vocab_16e6``, MIT licence, see
``data/CLIP_BPE_LICENSE.txt``) ships with the package as the original gzipped merge list; the
49408-entry ``vocab.json`` is derived from it exactly the way CLIP defines it (byte symbols,
the same with ``</w>``, one entry per merge, then the two special tokens). The files are written
to a temporary folder once per process and loaded with transformers' own ``CLIPTokenizer``.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import tempfile
from importlib import resources

CLIP_MERGES_COUNT = 49152 - 256 - 2  # the first merges of the list define CLIP's 49408 tokens
CLIP_MAX_LENGTH = 77
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode symbol table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary and merge list, derived from the bundled merge file."""
    raw = resources.files(__package__).joinpath("data/bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = lines[1 : CLIP_MERGES_COUNT + 1]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += [START_TOKEN, END_TOKEN]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer_files(folder: str, pad_token: str = END_TOKEN) -> None:
    """Write vocab.json, merges.txt and tokenizer_config.json for CLIPTokenizer.from_pretrained."""
    vocab, merges = clip_vocab_and_merges()
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "model_max_length": CLIP_MAX_LENGTH,
        "bos_token": START_TOKEN,
        "eos_token": END_TOKEN,
        "unk_token": END_TOKEN,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)


@functools.lru_cache(maxsize=2)
def clip_tokenizer(pad_token: str = END_TOKEN):
    """The CLIP tokenizer with no network access.

    ``pad_token`` is ``<|endoftext|>`` for CLIP-L as used by SD1.x/SDXL/Flux and ``!`` for the
    OpenCLIP bigG tokenizer of SDXL.
    """
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="hirm-tokenizer-") as folder:
        write_tokenizer_files(folder, pad_token=pad_token)
        return CLIPTokenizer.from_pretrained(folder)
