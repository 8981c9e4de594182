"""The SSA ops (``backend="torch"``) against brute force written independently here (issue 2).

Every brute force below is float64, plain loops or dense ``[query, key]`` masks, and follows
SSA_SPEC.md steps 2-5 and 7 directly; none of them calls ``ssa_megatron.ops.reference``.
Layout everywhere: ``[batch, seq, heads, head_dim]``; query head ``h`` belongs to KV head ``h // g``.
"""

from __future__ import annotations

import math

import pytest
import torch

from ssa_megatron import ops

# Importances closer than this count as a tie: either block may be picked (see _check_selection).
TIE_TOL = 1e-6


# ----------------------------------------------------------------------------- helpers


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def _qkv(seed: int, b: int, s: int, hq: int, hkv: int, d: int, dtype: torch.dtype = torch.float32, q_scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    q = _randn(gen, b, s, hq, d, dtype=dtype, scale=q_scale)
    k = _randn(gen, b, s, hkv, d, dtype=dtype)
    v = _randn(gen, b, s, hkv, d, dtype=dtype)
    return q, k, v


def _bruteforce_importance(q: torch.Tensor, k: torch.Tensor, block_size: int) -> torch.Tensor:
    """Spec steps 2-3 in float64 loops -> ``[b, s, hkv, s // bs]``; NaN where block j is not strictly earlier."""
    q64, k64 = q.double(), k.double()
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d)
    imp = torch.full((b, s, hkv, s // block_size), float("nan"), dtype=torch.float64)
    for bi in range(b):
        for h in range(hkv):
            # k_cmp[j] = mean of the keys of block j, for every complete block of the sequence
            means = [k64[bi, j * block_size : (j + 1) * block_size, h].sum(0) / block_size for j in range(s // block_size)]
            for t in range(s):
                n_complete = (t + 1) // block_size  # blocks in the LSE (own block too at its last token)
                n_earlier = t // block_size  # blocks that can be picked
                if n_earlier == 0:
                    continue
                k_cmp = torch.stack(means[:n_complete])  # [n_complete, d]
                total = torch.zeros(n_earlier, dtype=torch.float64)
                for qh in range(h * g, (h + 1) * g):
                    logits = scale * (k_cmp @ q64[bi, t, qh])  # [n_complete]
                    m = logits.max()
                    lse = m + torch.log(torch.exp(logits - m).sum())
                    total += torch.exp(logits[:n_earlier] - lse)
                imp[bi, t, h, :n_earlier] = total
    return imp


def _check_selection(idx: torch.Tensor, imp: torch.Tensor, block_size: int, top_k: int) -> int:
    """Assert ``idx`` is the exact top-k selection for the brute-force importance ``imp``.

    Per (batch, token, KV head): slot 0 is the own block; then ``min(top_k - 1, t // bs)`` distinct
    earlier blocks in descending importance; then -1. The picked blocks are compared as a SET with
    the brute-force top-(k-1). Ties: when the sets differ, the sorted importances of the two sets
    must agree within TIE_TOL (so only equally important blocks were swapped). Returns the number
    of rows resolved as ties.
    """
    b, s, hkv, _ = idx.shape
    assert idx.shape[-1] == top_k and idx.dtype == torch.int64
    ties = 0
    rows = idx.tolist()
    for bi in range(b):
        for t in range(s):
            own, n_earlier = t // block_size, t // block_size
            n_pick = min(top_k - 1, n_earlier)
            for h in range(hkv):
                row = rows[bi][t][h]
                where = f"(b={bi}, t={t}, kv_head={h}): idx={row}"
                assert row[0] == own, f"slot 0 is not the own block {own} {where}"
                picks, pads = row[1 : 1 + n_pick], row[1 + n_pick :]
                assert pads == [-1] * (top_k - 1 - n_pick), f"expected {top_k - 1 - n_pick} trailing -1 {where}"
                assert all(0 <= p < n_earlier for p in picks), f"picked a block not strictly earlier {where}"
                assert len(set(picks)) == n_pick, f"duplicate block {where}"
                if n_pick == 0:
                    continue
                values = imp[bi, t, h, :n_earlier].tolist()
                expected = sorted(range(n_earlier), key=lambda j: -values[j])[:n_pick]
                got_vals = [values[p] for p in picks]
                assert all(a >= b_ - TIE_TOL for a, b_ in zip(got_vals, got_vals[1:])), f"not descending {where}"
                if set(picks) != set(expected):
                    exp_vals = sorted((values[j] for j in expected), reverse=True)
                    diff = max(abs(a - e) for a, e in zip(sorted(got_vals, reverse=True), exp_vals))
                    assert diff <= TIE_TOL, f"not the top-{n_pick} (expected {sorted(expected)}, gap {diff:.2e}) {where}"
                    ties += 1
    return ties


def _token_mask(idx: torch.Tensor, s: int, block_size: int) -> torch.Tensor:
    """Dense mask ``[b, query, hkv, key]`` from idx: key in a selected block AND key <= query."""
    key_block = torch.arange(s) // block_size  # [key]
    in_selected = (idx[..., :, None] == key_block).any(dim=-2)  # [b, s, hkv, top_k, key] -> [b, s, hkv, key]
    causal = torch.arange(s)[None, :] <= torch.arange(s)[:, None]  # [query, key]
    return in_selected & causal[None, :, None, :]


def _dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Float64 softmax attention under a ``[b, query, hkv, key]`` mask, GQA by repeating k/v per group."""
    g = q.shape[2] // k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1])
    k_rep = k.double().repeat_interleave(g, dim=2)  # [b, s, hq, d]
    v_rep = v.double().repeat_interleave(g, dim=2)
    m_rep = mask.repeat_interleave(g, dim=2)  # [b, query, hq, key]
    scores = torch.einsum("bqhd,bkhd->bqhk", q.double(), k_rep) * scale
    scores = scores.masked_fill(~m_rep, float("-inf"))
    p = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    p = p / p.sum(dim=-1, keepdim=True)
    return torch.einsum("bqhk,bkhd->bqhd", p, v_rep)


def _causal_mask(b: int, s: int, hkv: int) -> torch.Tensor:
    causal = torch.arange(s)[None, :] <= torch.arange(s)[:, None]
    return causal[None, :, None, :].expand(b, s, hkv, s)


def _random_idx(seed: int, b: int, s: int, hkv: int, block_size: int, top_k: int) -> torch.Tensor:
    """A valid idx with earlier blocks in random (not importance) order, independent of select_blocks."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.full((b, s, hkv, top_k), -1, dtype=torch.int64)
    for bi in range(b):
        for t in range(s):
            own = t // block_size
            for h in range(hkv):
                earlier = torch.randperm(own, generator=gen)[: min(top_k - 1, own)]
                idx[bi, t, h, 0] = own
                idx[bi, t, h, 1 : 1 + earlier.numel()] = earlier
    return idx


# Tolerances against the float64 brute force. The reference sparse_attention computes in float32
# even for float64 inputs (see test_sparse_attention_float64_inputs_keep_float64_precision), so
# float64 is held to float32-level agreement there.
_TOL = {torch.float32: dict(atol=2e-6, rtol=1e-5), torch.float64: dict(atol=2e-6, rtol=1e-5)}


# ----------------------------------------------------------------------------- full_attention

FULL_CASES = [
    pytest.param(2, 37, 2, 2, 16, id="s37-g1"),
    pytest.param(1, 70, 4, 2, 8, id="s70-g2"),
    pytest.param(2, 129, 4, 1, 16, id="s129-g4"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("b,s,hq,hkv,d", FULL_CASES)
def test_full_attention_matches_dense_causal_softmax_with_gqa(b, s, hq, hkv, d, dtype):
    q, k, v = _qkv(0, b, s, hq, hkv, d, dtype)
    expected = _dense_attention(q, k, v, _causal_mask(b, s, hkv))
    out = ops.full_attention(q, k, v, backend="torch")
    assert out.shape == (b, s, hq, d) and out.dtype == dtype
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(out.double(), expected, **tol)


def test_full_attention_pairs_each_query_head_with_its_own_kv_group():
    # Query heads 0,1 -> KV head 0 and 2,3 -> KV head 1; the interleaved mapping h % hkv must differ.
    q, k, v = _qkv(1, 1, 20, 4, 2, 8, torch.float64)
    wrong = _dense_attention(q, k.repeat(1, 1, 2, 1), v.repeat(1, 1, 2, 1), _causal_mask(1, 20, 4))
    out = ops.full_attention(q, k, v, backend="torch")
    torch.testing.assert_close(out, _dense_attention(q, k, v, _causal_mask(1, 20, 2)), atol=1e-12, rtol=1e-12)
    assert not torch.allclose(out, wrong, atol=1e-3)


# ----------------------------------------------------------------------------- select_blocks

SELECT_CASES = [
    # b, s, hq, hkv, d, block_size, top_k, dtype
    pytest.param(2, 37, 2, 2, 16, 4, 3, torch.float32, id="s37-g1-bs4-k3"),
    pytest.param(1, 70, 4, 2, 16, 8, 2, torch.float32, id="s70-g2-bs8-k2"),
    pytest.param(1, 129, 8, 2, 16, 16, 3, torch.float32, id="s129-g4-bs16-k3"),
    pytest.param(1, 129, 4, 1, 8, 4, 6, torch.float32, id="s129-g4-bs4-k6-many-blocks"),
    pytest.param(2, 70, 4, 2, 16, 8, 1, torch.float32, id="s70-g2-bs8-k1-own-only"),
    pytest.param(1, 70, 4, 2, 16, 8, 12, torch.float32, id="s70-g2-bs8-k12-exceeds-blocks"),
    pytest.param(1, 300, 4, 2, 16, 8, 5, torch.float32, id="s300-g2-bs8-k5"),
    pytest.param(1, 5, 2, 1, 8, 8, 3, torch.float32, id="s5-shorter-than-one-block"),
    pytest.param(2, 37, 4, 2, 16, 4, 4, torch.bfloat16, id="s37-g2-bs4-k4-bf16"),
]


@pytest.mark.parametrize("b,s,hq,hkv,d,block_size,top_k,dtype", SELECT_CASES)
def test_select_blocks_matches_bruteforce_exact_topk(b, s, hq, hkv, d, block_size, top_k, dtype):
    # q_scale 3 makes the block softmax peaked, so the ranking is decisive and ties improbable.
    q, k, _ = _qkv(2, b, s, hq, hkv, d, dtype, q_scale=3.0)
    idx = ops.select_blocks(q, k, block_size, top_k, backend="torch")
    assert idx.shape == (b, s, hkv, top_k) and idx.dtype == torch.int64
    ties = _check_selection(idx, _bruteforce_importance(q, k, block_size), block_size, top_k)
    assert ties <= max(1, b * s * hkv // 100), f"{ties} tie-resolved rows: too many to be genuine near-ties"


def test_select_blocks_checker_rejects_a_perturbed_selection():
    b, s, hq, hkv, d, bs, top_k = 1, 70, 4, 2, 16, 4, 3
    q, k, _ = _qkv(3, b, s, hq, hkv, d, q_scale=3.0)
    imp = _bruteforce_importance(q, k, bs)
    idx = ops.select_blocks(q, k, bs, top_k, backend="torch")
    _check_selection(idx, imp, bs, top_k)

    # Swap the weakest pick of the last token for a clearly less important unpicked earlier block.
    t, h = s - 1, 0
    picks = idx[0, t, h, 1:].tolist()
    values = imp[0, t, h, : t // bs]
    unpicked = [j for j in range(t // bs) if j not in picks]
    worst = min(unpicked, key=lambda j: values[j].item())
    assert values[picks[-1]] - values[worst] > 1e-3
    perturbed = idx.clone()
    perturbed[0, t, h, -1] = worst
    with pytest.raises(AssertionError, match="not the top"):
        _check_selection(perturbed, imp, bs, top_k)

    own_moved = idx.clone()
    own_moved[0, t, h, 0] = t // bs - 1
    with pytest.raises(AssertionError, match="own block"):
        _check_selection(own_moved, imp, bs, top_k)

    future = idx.clone()
    future[0, 10, h, 1] = 10 // bs  # the own block again, i.e. not strictly earlier
    with pytest.raises(AssertionError, match="not strictly earlier"):
        _check_selection(future, imp, bs, top_k)


def test_select_blocks_own_block_always_present_and_no_future_block_on_a_long_sequence():
    b, s, hq, hkv, d, bs, top_k = 2, 300, 4, 2, 16, 16, 4
    q, k, _ = _qkv(4, b, s, hq, hkv, d)
    idx = ops.select_blocks(q, k, bs, top_k, backend="torch")
    own = (torch.arange(s) // bs)[None, :, None]
    assert torch.equal(idx[..., 0], own.expand(b, s, hkv))
    rest = idx[..., 1:]
    assert bool(((rest == -1) | ((rest >= 0) & (rest < own[..., None]))).all())
    n_pad = (rest == -1).sum(-1)
    assert torch.equal(n_pad, (top_k - 1 - torch.clamp(own, max=top_k - 1)).expand(b, s, hkv))


def test_select_blocks_normalises_over_the_own_block_at_its_last_token():
    """Spec step 3: the LSE covers blocks j < (t+1)//bs, so the own block enters at the block's last token.

    One KV head, two query heads, block_size 4; every key of block j is 2*e_j, so with scale 1/2
    the logit of block j is q[j]. Head A (logits 2, 0, own 10) prefers block 0, head B (0, 1, own 0)
    block 1. Tokens 8-10 (own block 2 incomplete): imp = 0.88+0.27 vs 0.12+0.73, block 0 wins.
    Token 11 (own block complete, in A's LSE): A's mass drains into its own block, B decides: block 1.
    """
    bs, s, d = 4, 12, 4
    k = torch.zeros(1, s, 1, d)
    for j in range(3):
        k[0, j * bs : (j + 1) * bs, 0, j] = 2.0
    q = torch.zeros(1, s, 2, d)
    q[0, :, 0] = torch.tensor([2.0, 0.0, 10.0, 0.0])
    q[0, :, 1] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    idx = ops.select_blocks(q, k, bs, 2, backend="torch")
    assert idx[0, 8:12, 0].tolist() == [[2, 0], [2, 0], [2, 0], [2, 1]]
    _check_selection(idx, _bruteforce_importance(q, k, bs), bs, 2)


# ----------------------------------------------------------------------------- sparse_attention

SPARSE_CASES = [
    # b, s, hq, hkv, d, block_size, top_k (None: covers every block)
    pytest.param(2, 37, 2, 2, 16, 4, 3, id="s37-g1-bs4-k3"),
    pytest.param(2, 70, 4, 2, 16, 8, 2, id="s70-g2-bs8-k2"),
    pytest.param(1, 129, 8, 2, 16, 16, 3, id="s129-g4-bs16-k3"),
    pytest.param(2, 37, 4, 2, 8, 16, 1, id="s37-g2-bs16-k1"),
    pytest.param(1, 70, 4, 1, 16, 4, 2, id="s70-g4-bs4-k2"),
    pytest.param(1, 129, 2, 2, 16, 8, None, id="s129-g1-bs8-kall"),
    pytest.param(2, 37, 8, 2, 8, 8, None, id="s37-g4-bs8-kall"),
    pytest.param(1, 64, 4, 2, 16, 16, 3, id="s64-g2-bs16-k3-divisible"),
]


@pytest.mark.parametrize("idx_source", ["selected", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("b,s,hq,hkv,d,block_size,top_k", SPARSE_CASES)
def test_sparse_attention_matches_dense_masked_attention(b, s, hq, hkv, d, block_size, top_k, dtype, idx_source):
    top_k = top_k or -(-s // block_size)
    q, k, v = _qkv(5, b, s, hq, hkv, d, dtype)
    if idx_source == "selected":
        idx = ops.select_blocks(q, k, block_size, top_k, backend="torch")
    else:
        idx = _random_idx(6, b, s, hkv, block_size, top_k)
    expected = _dense_attention(q, k, v, _token_mask(idx, s, block_size))
    out = ops.sparse_attention(q, k, v, idx, block_size, backend="torch")
    assert out.shape == (b, s, hq, d) and out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, **_TOL[dtype])


@pytest.mark.parametrize(
    "s,hq,hkv,block_size,extra",
    [
        pytest.param(37, 4, 2, 4, 0, id="s37-g2-bs4-k=blocks"),
        pytest.param(70, 4, 1, 16, 3, id="s70-g4-bs16-k>blocks"),
        pytest.param(129, 2, 2, 8, 0, id="s129-g1-bs8-k=blocks"),
    ],
)
def test_sparse_attention_equals_full_attention_when_top_k_covers_every_block(s, hq, hkv, block_size, extra):
    top_k = -(-s // block_size) + extra
    q, k, v = _qkv(7, 2, s, hq, hkv, 16)
    idx = ops.select_blocks(q, k, block_size, top_k, backend="torch")
    assert torch.equal(_token_mask(idx, s, block_size), _causal_mask(2, s, hkv))
    out = ops.sparse_attention(q, k, v, idx, block_size, backend="torch")
    torch.testing.assert_close(out, ops.full_attention(q, k, v, backend="torch"), atol=2e-6, rtol=1e-5)


def test_sparse_attention_bruteforce_detects_a_perturbed_idx():
    b, s, hq, hkv, d, bs, top_k = 1, 70, 4, 2, 16, 8, 3
    q, k, v = _qkv(8, b, s, hq, hkv, d)
    idx = ops.select_blocks(q, k, bs, top_k, backend="torch")
    expected = _dense_attention(q, k, v, _token_mask(idx, s, bs))
    t, h = s - 1, 1
    perturbed = idx.clone()
    perturbed[0, t, h, 1] = next(j for j in range(t // bs) if j not in idx[0, t, h].tolist())
    out = ops.sparse_attention(q, k, v, perturbed, bs, backend="torch")
    g = hq // hkv
    heads = slice(h * g, (h + 1) * g)
    # The perturbed token's group differs from the brute force of the original idx ...
    assert (out[0, t, heads].double() - expected[0, t, heads]).abs().max() > 1e-3
    # ... everything else is untouched, and the brute force of the perturbed idx agrees again.
    keep = torch.ones(s, hq, dtype=torch.bool)
    keep[t, heads] = False
    torch.testing.assert_close(out[0][keep].double(), expected[0][keep], **_TOL[torch.float32])
    torch.testing.assert_close(out.double(), _dense_attention(q, k, v, _token_mask(perturbed, s, bs)), **_TOL[torch.float32])


def test_sparse_attention_float64_inputs_keep_float64_precision():
    q, k, v = _qkv(9, 1, 37, 4, 2, 16, torch.float64)
    idx = _random_idx(9, 1, 37, 2, 4, 3)
    out = ops.sparse_attention(q, k, v, idx, 4, backend="torch")
    torch.testing.assert_close(out, _dense_attention(q, k, v, _token_mask(idx, 37, 4)), atol=1e-12, rtol=1e-12)


# ----------------------------------------------------------------------------- sparse_attention gradients


@pytest.mark.parametrize("queries", [[13], [13, 45, 66]], ids=["one-token", "three-tokens"])
def test_sparse_attention_grads_reach_only_selected_keys_and_values(queries):
    """With a loss on a few query tokens, dk/dv are exactly zero outside their selected, causal keys."""
    b, s, hq, hkv, d, bs, top_k = 2, 70, 4, 2, 16, 8, 3
    q, k, v = _qkv(10, b, s, hq, hkv, d, torch.float64)
    idx = _random_idx(10, b, s, hkv, bs, top_k)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = ops.sparse_attention(q, k, v, idx, bs, backend="torch")
    w = _randn(torch.Generator().manual_seed(11), b, len(queries), hq, d, dtype=torch.float64)
    dq, dk, dv = torch.autograd.grad((out[:, queries] * w).sum(), (q, k, v))

    reached = _token_mask(idx, s, bs)[:, queries].any(dim=1).transpose(1, 2)  # [b, hkv, key] -> [b, key, hkv]
    assert 0 < int(reached.sum()) < reached.numel()
    for grad in (dk, dv):
        assert bool((grad[~reached] == 0).all()), "gradient leaked to a key/value no token selected"
        assert bool((grad[reached].abs().amax(-1) > 0).all()), "a selected key/value got no gradient"
    if queries == [13]:
        # Token 13 sits mid-block (block 1 = keys 8..15): keys 8..13 are reached, 14 and 15 are masked.
        assert reached[:, 8:14].all() and not reached[:, 14:16].any()
    others = torch.ones(s, dtype=torch.bool)
    others[queries] = False
    assert bool((dq[:, others] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("idx_source", ["selected", "random"])
def test_sparse_attention_grads_match_bruteforce_autograd(dtype, idx_source):
    b, s, hq, hkv, d, bs, top_k = 2, 37, 4, 2, 8, 4, 3
    q, k, v = _qkv(12, b, s, hq, hkv, d, dtype)
    if idx_source == "selected":
        idx = ops.select_blocks(q, k, bs, top_k, backend="torch")
    else:
        idx = _random_idx(12, b, s, hkv, bs, top_k)
    do = _randn(torch.Generator().manual_seed(13), b, s, hq, d, dtype=torch.float64)

    inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    out = ops.sparse_attention(*inputs, idx, bs, backend="torch")
    grads = torch.autograd.grad(out, inputs, do.to(dtype))

    ref_inputs = [x.double().requires_grad_() for x in (q, k, v)]
    ref_out = _dense_attention(*ref_inputs, _token_mask(idx, s, bs))
    ref_grads = torch.autograd.grad(ref_out, ref_inputs, do)

    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert got.dtype == dtype, name
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


# ----------------------------------------------------------------------------- alignment_loss


def _smooth_l1(x: torch.Tensor) -> torch.Tensor:
    """Elementwise SmoothL1 with beta 1 of a difference: 0.5 x^2 if |x| < 1 else |x| - 0.5."""
    return torch.where(x.abs() < 1, 0.5 * x * x, x.abs() - 0.5)


def _streams(seed: int, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    o_full = _randn(gen, 2, 9, 4, 8, dtype=dtype, scale=1.5)  # differences straddle |x| = 1
    o_sparse = _randn(gen, 2, 9, 4, 8, dtype=dtype, scale=1.5)
    return o_full, o_sparse


def test_alignment_loss_value_is_sum_of_both_smooth_l1_terms():
    o_full, o_sparse = _streams(20)
    diff = o_full.double() - o_sparse.double()
    assert (diff.abs() < 1).any() and (diff.abs() >= 1).any()  # both branches of SmoothL1 exercised
    expected = _smooth_l1(diff).mean() + _smooth_l1(-diff).mean()
    loss = ops.alignment_loss(o_full, o_sparse, backend="torch")
    assert loss.dim() == 0 and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, atol=1e-6, rtol=1e-6)
    assert float(ops.alignment_loss(o_full, o_full.clone(), backend="torch")) == 0.0


def test_alignment_loss_each_term_sends_gradient_to_exactly_one_side():
    """d/d o_full is the sparsity term's gradient only; d/d o_sparse the commitment term's only.

    Built by hand, SmoothL1(o_full, sg(o_sparse)) reaches only o_full and SmoothL1(sg(o_full), o_sparse)
    only o_sparse; the op's gradients must equal exactly those (not twice them, as with no stopgrad).
    """
    o_full, o_sparse = (x.requires_grad_() for x in _streams(21))
    g_full, g_sparse = torch.autograd.grad(ops.alignment_loss(o_full, o_sparse, backend="torch"), (o_full, o_sparse))

    sparsity = _smooth_l1(o_full.double() - o_sparse.double().detach()).mean()
    commitment = _smooth_l1(o_full.double().detach() - o_sparse.double()).mean()
    s_full, s_sparse = torch.autograd.grad(sparsity, (o_full, o_sparse), allow_unused=True)
    c_full, c_sparse = torch.autograd.grad(commitment, (o_full, o_sparse), allow_unused=True)
    assert s_sparse is None and c_full is None and s_full is not None and c_sparse is not None

    torch.testing.assert_close(g_full, s_full, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(g_sparse, c_sparse, atol=1e-7, rtol=1e-6)
    # Closed form: d/dx SmoothL1 = clamp(x, -1, 1) / N, with x = o_full - o_sparse.
    diff = (o_full - o_sparse).detach().double()
    torch.testing.assert_close(g_full.double(), diff.clamp(-1, 1) / diff.numel(), atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(g_sparse.double(), -diff.clamp(-1, 1) / diff.numel(), atol=1e-8, rtol=1e-6)


def test_alignment_loss_with_one_side_detached_reaches_only_the_other():
    o_full, o_sparse = _streams(22)
    o_full.requires_grad_()
    (g_full,) = torch.autograd.grad(ops.alignment_loss(o_full, o_sparse, backend="torch"), (o_full,))
    diff = (o_full - o_sparse).detach().double()
    torch.testing.assert_close(g_full.double(), diff.clamp(-1, 1) / diff.numel(), atol=1e-8, rtol=1e-6)


def test_alignment_loss_bf16_inputs_return_a_float32_scalar():
    o_full, o_sparse = (x.requires_grad_() for x in _streams(23, torch.bfloat16))
    loss = ops.alignment_loss(o_full, o_sparse, backend="torch")
    assert loss.dim() == 0 and loss.dtype == torch.float32
    diff = o_full.detach().double() - o_sparse.detach().double()
    torch.testing.assert_close(loss.double(), 2 * _smooth_l1(diff).mean(), atol=1e-6, rtol=1e-6)
    g_full, g_sparse = torch.autograd.grad(loss, (o_full, o_sparse))
    assert g_full.dtype == torch.bfloat16 and g_sparse.dtype == torch.bfloat16
    assert g_full.abs().sum() > 0


def test_sparse_attention_torch_backend_takes_deterministic_and_repeats_bit_for_bit():
    """The torch path is deterministic already: the flag changes nothing, two backwards give the same bits
    (under torch's deterministic mode, which on CPU is what makes the gather's backward deterministic;
    the CUDA check at a real size is kernels/tests/test_kernel_deterministic.py)."""
    q, k, v = (t.requires_grad_() for t in _qkv(11, 2, 40, 4, 2, 8))
    idx = ops.select_blocks(q.detach(), k.detach(), 8, 3, backend="torch")
    do = torch.randn(2, 40, 4, 8, generator=torch.Generator().manual_seed(12))
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for deterministic in (False, True, True):
            o = ops.sparse_attention(q, k, v, idx, 8, backend="torch", deterministic=deterministic)
            runs.append((o, *torch.autograd.grad(o, (q, k, v), do)))
    finally:
        torch.use_deterministic_algorithms(previous)
    for run in runs[1:]:
        for x, ref in zip(run, runs[0]):
            assert torch.equal(x, ref)
