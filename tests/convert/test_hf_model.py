"""The exported HF model's attention, cache and generation, checked against the torch oracle
(``ssa_megatron.ops.reference``) and against its own uncached forward. No Megatron involved."""

from __future__ import annotations

import pytest
import torch

from ssa_megatron.convert.hf_model import modeling_ssa as hf
from ssa_megatron.convert.hf_model.configuration_ssa import SSAConfig
from ssa_megatron.ops import reference

# (batch, seq, query heads, KV heads, head dim, block size, top_k)
SHAPES = [
    (1, 37, 4, 2, 16, 4, 3),
    (2, 64, 8, 2, 8, 8, 2),
    (2, 50, 6, 1, 16, 5, 4),
    (1, 33, 4, 4, 8, 16, 1),
    (2, 90, 4, 2, 8, 3, 40),  # top_k above the number of earlier blocks
]


def prefill_sparse(q, k, v, block_size, top_k):
    """The HF model's torch path on a fresh sequence: cache the keys, pool blocks, attend."""
    b, s = q.shape[:2]
    layer = hf.SSALayerCache()
    positions = torch.arange(s).expand(b, s)
    layer.append(k, v, positions, s)
    k_cmp = layer.block_keys(block_size, torch.full((b,), s), s)
    return hf.sparse_attention_at(q, positions, layer.k, layer.v, k_cmp, block_size, top_k), k_cmp, positions


@pytest.mark.parametrize("b,s,hq,hkv,d,bs,top_k", SHAPES, ids=[str(x) for x in SHAPES])
def test_sparse_prefill_matches_the_torch_oracle(b, s, hq, hkv, d, bs, top_k):
    g = torch.Generator().manual_seed(s)
    q, k, v = (torch.randn(b, s, h, d, generator=g) for h in (hq, hkv, hkv))
    got, k_cmp, positions = prefill_sparse(q, k, v, bs, top_k)
    idx = reference.select_blocks(q, k, bs, top_k)
    want = reference.sparse_attention(q, k, v, idx, bs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_cmp, reference.mean_pool_blocks(k, bs), rtol=0, atol=0)
    picked = hf.select_blocks_at(q, positions, k_cmp, bs, top_k)
    width = picked.shape[-1]
    assert torch.equal(picked, idx[..., :width]) and bool((idx[..., width:] == -1).all())


def tiny_model(**overrides) -> hf.SSAForCausalLM:
    values = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rope_theta=10000.0, block_size=4, top_k=3)
    config = SSAConfig(**{**values, **overrides})
    torch.manual_seed(0)
    model = hf.SSAForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # peaked attention: selection matters
    return model


@pytest.mark.parametrize("mode,block_size,top_k", [("full", 4, 3), ("sparse", 4, 3), ("sparse", 3, 2), ("sparse", 8, 5)])
def test_cached_decoding_equals_the_uncached_forward_token_by_token(mode, block_size, top_k):
    model = tiny_model()
    ids = torch.randint(0, 61, (2, 41), generator=torch.Generator().manual_seed(1))
    call = dict(attention_mode=mode, block_size=block_size, top_k=top_k)
    with torch.no_grad():
        full = model(ids, **call).logits
        out = model(ids[:, :9], use_cache=True, **call)
        worst = (out.logits - full[:, :9]).abs().max()
        cache = out.cache
        for t in range(9, 41):
            step = model(ids[:, t : t + 1], cache=cache, use_cache=True, **call)
            worst = max(worst, (step.logits[:, 0] - full[:, t]).abs().max())
            assert torch.equal(step.logits[:, 0].argmax(-1), full[:, t].argmax(-1))
    print(f"{mode} bs={block_size} top_k={top_k}: max |cached - uncached| logit = {worst:.2e}")
    assert worst < 1e-5


@pytest.mark.parametrize("mode", ["full", "sparse"])
def test_generate_matches_greedy_uncached_and_left_padded_batch_matches_single_prompts(mode):
    model = tiny_model()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 61, (n,), generator=g) for n in (13, 6, 9)]
    singles = []
    with torch.no_grad():
        for p in prompts:
            ids = p[None]
            out = model.generate(ids, max_new_tokens=15, do_sample=False, attention_mode=mode, pad_token_id=0)
            ref = ids
            for _ in range(15):  # greedy with uncached forwards over the whole sequence
                ref = torch.cat([ref, model(ref, attention_mode=mode).logits[:, -1:].argmax(-1)], dim=1)
            assert torch.equal(out, ref)
            singles.append(out[0, len(p):])
        width = max(len(p) for p in prompts)
        batch = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros_like(batch)
        for i, p in enumerate(prompts):
            batch[i, width - len(p):], mask[i, width - len(p):] = p, 1
        out = model.generate(batch, attention_mask=mask, max_new_tokens=15, do_sample=False, attention_mode=mode,
                             pad_token_id=0)
    for i, single in enumerate(singles):
        assert torch.equal(out[i, width:], single), f"row {i} of the left-padded batch differs from its own run"


def test_left_padded_forward_equals_each_row_alone():
    model = tiny_model(attention_mode="sparse")
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, 61, (n,), generator=g) for n in (30, 17)]
    batch = torch.zeros(2, 30, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, r in enumerate(rows):
        batch[i, 30 - len(r):], mask[i, 30 - len(r):] = r, 1
    with torch.no_grad():
        logits = model(batch, attention_mask=mask).logits
        for i, r in enumerate(rows):
            alone = model(r[None]).logits[0]
            torch.testing.assert_close(logits[i, 30 - len(r):], alone, rtol=1e-5, atol=1e-5)


def test_per_call_sparse_top_k_in_generate_is_not_the_sampling_top_k():
    model = tiny_model(attention_mode="sparse", top_k=8)
    ids = torch.randint(0, 61, (1, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=6, do_sample=False, sparse_top_k=2, pad_token_id=0)
        ref = ids
        for _ in range(6):
            ref = torch.cat([ref, model(ref, top_k=2).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(got, ref)
    assert model.generation_config.top_k != 8  # the attention budget did not leak into sampling


@pytest.mark.parametrize("field,value", [("top_k", 0), ("block_size", 0), ("block_size", 2.5), ("attention_mode", "dense")])
def test_bad_attention_settings_are_refused_per_call_and_in_the_config(field, value):
    model = tiny_model()
    with pytest.raises(ValueError, match=field):
        model(torch.zeros(1, 4, dtype=torch.long), **{field: value})
    with pytest.raises(ValueError, match=field):
        SSAConfig(**{field: value})


def test_right_padding_is_refused():
    model = tiny_model()
    mask = torch.tensor([[1, 1, 1, 0]])
    with pytest.raises(ValueError, match="left padding"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mask=mask)
