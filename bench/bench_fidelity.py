"""How far the project is from the authors' code on the golden models, and what its deliberate differences cost.

    python bench/bench_fidelity.py [--threads 1]

Prints, per golden check, the measured difference against the stored reference numbers
(tests/data/golden, docs/fidelity.md), then the size of the two deliberate differences: the
unconditional half left alone (against the reference as published) and the single-pass schedule
(against faithful), as relative L2 of the final latents next to the erasure's own effect.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]


def sample(pipe, prompt, init, common):
    with torch.no_grad():
        return pipe(prompt, num_inference_steps=common["steps"], guidance_scale=common["guidance_scale"],
                    height=init.shape[-2], width=init.shape[-1], latents=init.clone(), output_type="latent").images


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (the goldens were computed on 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import golden
    from shared_core.hirm import train_patch
    from shared_core.adapters import apply_nlce
    from shared_core.tokenizer import clip_tokenizer

    G, rel = golden.settings(), golden.rel
    rows = []
    for tag, kw in (("hirm_R", {}), ("hirm_S", {"method": "superordinate", "anchor": G["hirm_S"]["anchor"]})):
        ref = golden.tensors(tag)
        patch = train_patch(golden.text_encoder("hirm"), clip_tokenizer(), concepts=[G[tag]["concept"]], preset="style",
                            report=False, **kw)
        worst = max(rel(d, ref["delta." + n]) for n, d in patch.deltas.items() if not n.endswith("k_proj.bias"))
        rows.append((f"{tag} deltas (worst tensor)", worst, ""))
    pipe = golden.pipeline()
    common = G["nlce_common"]
    for tag, concepts, extra in (("object", [G["nlce_object"]["concept"]], {}), ("nudity", ["nudity"], {"preset": "nudity"})):
        s, ref = G[f"nlce_{tag}"], golden.tensors(f"nlce_{tag}")
        neighbors = {concepts[0]: s["neighbors"]}
        for k, prompt in enumerate(s["prompts"]):
            out = {}
            for schedule in ("faithful", "single-pass"):
                with apply_nlce(pipe, concepts, neighbors, schedule=schedule, live_floor=common["live_floor"], **extra):
                    out[schedule] = sample(pipe, prompt, ref["init_latents"], common)
            vanilla = sample(pipe, prompt, ref["init_latents"], common)
            effect = rel(out["faithful"], vanilla)
            rows.append((f"nlce {tag} '{prompt}' faithful vs reference", rel(out["faithful"], ref[f"prompt{k}.latents"]),
                         f"erasure's own effect {effect:.3g}"))
            rows.append((f"nlce {tag} '{prompt}' single-pass vs faithful", rel(out["single-pass"], out["faithful"]), ""))
            if f"prompt{k}.latents_reference_as_published" in ref:
                rows.append((f"nlce {tag} '{prompt}' vs reference as published (uncond half)",
                             rel(out["faithful"], ref[f"prompt{k}.latents_reference_as_published"]), ""))
    width = max(len(r[0]) for r in rows)
    print(f"{'comparison':<{width}}  rel L2")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:.2e}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
