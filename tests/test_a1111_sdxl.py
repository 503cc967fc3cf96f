"""A1111 SDXL: the erasure patch's bigG half on the open_clip tower A1111 loads (fused q/k/v, Lora backups as tuples).

The tower stand-in mirrors open_clip's names and sgm's forward (tests/test_a1111_support.py); the first test checks it
computes what a transformers CLIPTextModel with the same weights computes, so the mapping tested here is the real one.
The real-A1111 test (tests/test_a1111_server.py) runs the same on a real SDXL checkpoint.
"""

import torch
from test_a1111_support import OpenClipTextTower, hijacked_bigg, no_job_left  # noqa: F401
from tiny import canonical_state_dict, random_clip, tiny_config
from transformers import CLIPTextConfig

from a1111_extension.webui_model import OpenClipPatches, openclip_slots, openclip_tower, openclip_weights
from shared_core.hirm import train_patch
from shared_core.patch import patched
from shared_core.tokenizer import clip_tokenizer


def bigg_like(seed=0):
    """A tiny CLIP with bigG's activation (gelu) and the open_clip tower holding the same weights."""
    config = tiny_config(hidden=48)
    config = CLIPTextConfig(**{**config.to_dict(), "hidden_act": "gelu"})
    model = random_clip(config, seed)
    return model, OpenClipTextTower(canonical_state_dict(model))


def ids(text="a photo of a cat"):
    return clip_tokenizer("!")(text, padding="max_length", max_length=77, return_tensors="pt").input_ids


def test_the_tower_stand_in_computes_what_the_clip_with_its_weights_computes():
    model, tower = bigg_like()
    with torch.no_grad():
        want = model(ids(), output_hidden_states=True).hidden_states[-2]
        got = tower.layer_outputs(ids())[-2]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    weights = openclip_weights(tower)
    assert weights.keys() == canonical_state_dict(model).keys()
    assert all(torch.equal(weights[k], v) for k, v in canonical_state_dict(model).items())


def test_a_patch_on_the_tower_gives_the_patched_clips_rows_and_comes_off_bit_for_bit():
    model, tower = bigg_like()
    embedder = hijacked_bigg(tower)
    assert openclip_tower(embedder) is tower and "text_model.embeddings.token_embedding.weight" in openclip_slots(tower)
    patch = train_patch(model, clip_tokenizer("!"), concepts=["cat"], steps=2, report=False)
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    with torch.no_grad(), patched(model, patch):
        want = model(ids(), output_hidden_states=True).hidden_states[-2]
    patches = OpenClipPatches(tower, [(patch, 1.0)]).apply()
    with torch.no_grad():
        torch.testing.assert_close(tower.layer_outputs(ids())[-2], want, atol=1e-5, rtol=1e-5)
    patches.remove()
    after = tower.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_the_lora_extensions_tuple_backups_carry_the_patch_and_come_back_as_they_were():
    """networks.py keeps (in_proj_weight, out_proj.weight) for a MultiheadAttention, a tensor for a Linear."""
    model, tower = bigg_like()
    attn, fc = tower.transformer.resblocks[0].attn, tower.transformer.resblocks[0].mlp.c_fc
    backup = (attn.in_proj_weight.detach().clone(), attn.out_proj.weight.detach().clone())
    attn.network_weights_backup, fc.network_weights_backup = backup, fc.weight.detach().clone()
    original_fc = fc.network_weights_backup
    patch = train_patch(model, clip_tokenizer("!"), concepts=["cat"], steps=2, report=False)
    patches = OpenClipPatches(tower, [(patch, 0.5)]).apply()
    width = attn.out_proj.weight.shape[0]
    dk = patch.deltas["text_model.encoder.layers.0.self_attn.k_proj.weight"]
    torch.testing.assert_close(attn.network_weights_backup[0][width:2 * width], backup[0][width:2 * width] + 0.5 * dk)
    torch.testing.assert_close(attn.network_weights_backup[0][:width], backup[0][:width]
                               + 0.5 * patch.deltas["text_model.encoder.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(fc.network_weights_backup, original_fc)
    assert openclip_weights(tower).keys() == openclip_slots(tower).keys()
    patches.remove()
    assert attn.network_weights_backup is backup and fc.network_weights_backup is original_fc
