"""Sparse attention over per-token selected key blocks (SSA spec step 5), forward and backward.

Layout ``[B, T, H, D]``; ``idx [B, T, HKV, K]`` names, per token and KV head, the key blocks the
token attends to (``-1`` = unused slot); keys after the token are masked, so the own block is
causal and any block past it contributes nothing.

GQA: the ``G = HQ / HKV`` query heads of a KV group share one selection, so every kernel treats a
token's ``G`` heads as the rows of one matmul and reads each selected key block once for all of
them (never once per head).

* ``sparse_fwd_kernel`` — one program per (token, KV head): rows = the group's heads (padded to
  ``GP >= 16`` for the tensor cores), the token's selected keys streamed ``BN`` at a time (a chunk
  gathers ``BN / block_size`` blocks, or part of one), online softmax in base 2; stores ``o`` and the
  base-2 log-sum-exp for the backward.
* ``sparse_bwd_dq_kernel`` — the same walk for dq; it also computes ``delta = rowsum(dO * O)``.
* ``sparse_bwd_dkdv_kernel`` — key-block-major: the backward never scans all later queries per
  key block. An inverse index (``inverse.build_inverse_index``: a counting sort of the selection by
  (batch, KV head, block), 4 Triton launches, no host sync) lists, per key block, the tokens that
  selected it; the list is cut into work items of at most 128 tokens (so a block every token picks,
  like a sink block, spreads over many programs); each item recomputes P and dS for ``TB`` tokens x
  ``G`` heads at a time against the block's keys and adds its dK/dV partial with fp32 atomics (one
  ``[block_size, D]`` add per item; the summation order, hence the last bits of dK/dV, is not
  deterministic).

Deterministic mode (``deterministic=True``, ``ssa.deterministic``): the same kernels with every
summation order fixed, so two runs on the same inputs give the same bits. The inverse index is
stable (each block's tokens in increasing order, hence the same work items every run); each dK/dV
item stores its partial in its own slot (the ``DETERMINISTIC`` variant of the kernel, no atomics)
and ``sparse_bwd_dkdv_reduce_kernel`` sums a block's slots in item order and writes dK/dV in the
input dtype; every kernel runs its first autotune candidate (``_utils.launch(pinned=True)``), since
the tile sizes fix the order of the online softmax and of the dot accumulations. Forward and dQ have
no atomics (one program owns each output row); selection and the alignment loss are deterministic
in either mode (``docs/kernels.md``). Cost: a second small kernel, a sort of the selection, and
``[items, block_size, D]`` fp32 partials (~3 KB per token for the 1B layer) instead of the fp32
dK/dV accumulators.

Every kernel reads q/k/v/dO through batch/sequence/head strides (head dim contiguous), so
Megatron's ``[s, b, h, d]`` tensors seen as ``[b, s, h, d]`` need no copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ssa_kernels._utils import (
    LOG2E,
    cdiv,
    check_device,
    configs,
    dot_precision,
    interpreter_upcast,
    kernel_dtype_ok,
    last_dim_contiguous,
    launch,
    next_pow2,
    softmax_scale,
)
from ssa_kernels.inverse import ITEM_TOKENS, InverseIndex, build_inverse_index

# Token ranges of the inverse index (0: none). Measured on the H100 (docs/kernels.md): binning
# the selecting tokens by 2k-token ranges to keep q/dO rows in L2 did not pay (more, smaller work
# items and atomics), so the default is one range. Deterministic mode always uses one range (each
# key block's partials are then summed by one reduction).
RANGE_TOKENS = 0


_TOKEN_MAJOR_CONFIGS = configs(
    [
        triton.Config({"BN": 64}, num_warps=4, num_stages=2),
        triton.Config({"BN": 64}, num_warps=2, num_stages=3),
        triton.Config({"BN": 128}, num_warps=4, num_stages=2),
        triton.Config({"BN": 32}, num_warps=2, num_stages=3),
    ]
)


@triton.autotune(configs=_TOKEN_MAJOR_CONFIGS, key=["GP", "D", "BS"])
@triton.jit(do_not_specialize=["T", "TOPK"])
def sparse_fwd_kernel(
    q,
    k,
    v,
    idx,
    o,
    lse,
    T,
    TOPK,
    scale2,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    PREC: tl.constexpr,
    BN: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HKV, i_bh % HKV
    o_g = tl.arange(0, GP)
    m_g = o_g < G
    o_d = tl.arange(0, D)
    p_q = q + i_b.to(tl.int64) * stride_qb + i_t.to(tl.int64) * stride_qt + (i_h * G + o_g)[:, None] * stride_qh
    # [GP, D]
    b_q = tl.load(p_q + o_d[None, :], mask=m_g[:, None], other=0.0)
    p_idx = idx + ((i_b * T + i_t).to(tl.int64) * HKV + i_h) * TOPK
    p_k = k + i_b.to(tl.int64) * stride_kb + i_h * stride_kh
    p_v = v + i_b.to(tl.int64) * stride_vb + i_h * stride_vh

    b_m = tl.full([GP], -1.0e30, dtype=tl.float32)
    b_l = tl.zeros([GP], dtype=tl.float32)
    b_acc = tl.zeros([GP, D], dtype=tl.float32)
    for n0 in range(0, TOPK * BS, BN):
        # the BN keys of this step: slot n // BS of the selection, offset n % BS in its block
        o_n = n0 + tl.arange(0, BN)
        o_slot = o_n // BS
        b_blk = tl.load(p_idx + o_slot, mask=o_slot < TOPK, other=-1).to(tl.int32)
        o_key = b_blk * BS + o_n % BS
        m_n = (b_blk >= 0) & (o_key <= i_t)
        # [BN, D]
        b_k = tl.load(p_k + o_key[:, None].to(tl.int64) * stride_kt + o_d[None, :], mask=m_n[:, None], other=0.0)
        b_v = tl.load(p_v + o_key[:, None].to(tl.int64) * stride_vt + o_d[None, :], mask=m_n[:, None], other=0.0)
        # [GP, BN]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * scale2
        b_s = tl.where(m_n[None, :], b_s, float("-inf"))
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        b_alpha = tl.exp2(b_m - b_mn)
        b_p = tl.exp2(b_s - b_mn[:, None])
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PREC)
        b_m = b_mn
    # a row always sees its own token; the guard only keeps a malformed idx from writing NaN
    b_acc = b_acc / tl.where(b_l > 0, b_l, 1.0)[:, None]
    o_row = (i_b * T + i_t).to(tl.int64) * HQ + i_h * G + o_g
    tl.store(o + o_row[:, None] * D + o_d[None, :], b_acc.to(o.dtype.element_ty), mask=m_g[:, None])
    tl.store(lse + o_row, b_m + tl.log2(b_l), mask=m_g)


@triton.autotune(configs=_TOKEN_MAJOR_CONFIGS, key=["GP", "D", "BS"])
@triton.jit(do_not_specialize=["T", "TOPK"])
def sparse_bwd_dq_kernel(
    q,
    k,
    v,
    idx,
    o,
    do,
    lse,
    delta,
    dq,
    T,
    TOPK,
    scale2,
    scale,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_ob,
    stride_ot,
    stride_oh,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    PREC: tl.constexpr,
    BN: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HKV, i_bh % HKV
    o_g = tl.arange(0, GP)
    m_g = o_g < G
    o_d = tl.arange(0, D)
    p_q = q + i_b.to(tl.int64) * stride_qb + i_t.to(tl.int64) * stride_qt + (i_h * G + o_g)[:, None] * stride_qh
    # [GP, D]
    b_q = tl.load(p_q + o_d[None, :], mask=m_g[:, None], other=0.0)
    p_do = do + i_b.to(tl.int64) * stride_ob + i_t.to(tl.int64) * stride_ot + (i_h * G + o_g)[:, None] * stride_oh
    b_do = tl.load(p_do + o_d[None, :], mask=m_g[:, None], other=0.0)
    o_row = (i_b * T + i_t).to(tl.int64) * HQ + i_h * G + o_g
    b_o = tl.load(o + o_row[:, None] * D + o_d[None, :], mask=m_g[:, None], other=0.0)
    # [GP] delta = rowsum(dO * O), reused by the dK/dV kernel
    b_delta = tl.sum(b_do.to(tl.float32) * b_o.to(tl.float32), 1)
    tl.store(delta + o_row, b_delta, mask=m_g)
    b_lse = tl.load(lse + o_row, mask=m_g, other=0.0)

    p_idx = idx + ((i_b * T + i_t).to(tl.int64) * HKV + i_h) * TOPK
    p_k = k + i_b.to(tl.int64) * stride_kb + i_h * stride_kh
    p_v = v + i_b.to(tl.int64) * stride_vb + i_h * stride_vh
    b_dq = tl.zeros([GP, D], dtype=tl.float32)
    for n0 in range(0, TOPK * BS, BN):
        o_n = n0 + tl.arange(0, BN)
        o_slot = o_n // BS
        b_blk = tl.load(p_idx + o_slot, mask=o_slot < TOPK, other=-1).to(tl.int32)
        o_key = b_blk * BS + o_n % BS
        m_n = (b_blk >= 0) & (o_key <= i_t)
        # [BN, D]
        b_k = tl.load(p_k + o_key[:, None].to(tl.int64) * stride_kt + o_d[None, :], mask=m_n[:, None], other=0.0)
        b_v = tl.load(p_v + o_key[:, None].to(tl.int64) * stride_vt + o_d[None, :], mask=m_n[:, None], other=0.0)
        # [GP, BN]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * scale2
        b_p = tl.where(m_n[None, :], tl.exp2(b_s - b_lse[:, None]), 0.0)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PREC)
    b_dq = b_dq * scale
    tl.store(dq + o_row[:, None] * D + o_d[None, :], b_dq.to(dq.dtype.element_ty), mask=m_g[:, None])


@triton.jit
def _key_block(i_bin, n_rows, T, NB, NR, HKV: tl.constexpr, BS: tl.constexpr, BSP: tl.constexpr):
    """Batch, KV head and the ``BSP`` (padded) key rows of bin ``i_bin``'s block; ``m_s``: the first
    ``n_rows`` rows that exist."""
    i_bh, i_j = i_bin // (NB * NR), i_bin % NB
    o_s = tl.arange(0, BSP)
    o_key = i_j * BS + o_s
    return i_bh // HKV, i_bh % HKV, o_key, (o_s < n_rows) & (o_key < T)


@triton.jit
def _kv_rows(i_b, i_h, o_key, T, HKV: tl.constexpr, D: tl.constexpr):
    """``[BSP, D]`` offsets of keys ``o_key`` of KV head ``i_h`` in a contiguous ``[B, T, HKV, D]``."""
    return ((i_b * T + o_key).to(tl.int64) * HKV + i_h)[:, None] * D + tl.arange(0, D)[None, :]


@triton.autotune(
    configs=configs(
        [
            triton.Config({"BR": 64}, num_warps=4, num_stages=2),
            triton.Config({"BR": 128}, num_warps=8, num_stages=2),
            triton.Config({"BR": 64}, num_warps=4, num_stages=3),
            triton.Config({"BR": 128}, num_warps=4, num_stages=2),
        ]
    ),
    key=["G2", "D", "BSP"],
    reset_to_zero=["dk", "dv"],
)
@triton.jit(do_not_specialize=["T", "NB", "NR"])
def sparse_bwd_dkdv_kernel(
    q,
    k,
    v,
    do,
    lse,
    delta,
    tok,
    item_bin,
    item_start,
    item_end,
    n_items,
    dk,
    dv,
    T,
    NB,
    NR,
    scale2,
    scale,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_ob,
    stride_ot,
    stride_oh,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    G2: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    BSP: tl.constexpr,
    PREC: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    BR: tl.constexpr,
):
    """dK/dV of one work item: its tokens' rows against one key block. Default: ``atomic_add`` into the
    fp32 ``dk``/``dv [B, T, HKV, D]``; ``DETERMINISTIC``: ``dk``/``dv`` are ``[items, BSP, D]`` fp32
    partials, the item stores its own slot (summed in item order by ``sparse_bwd_dkdv_reduce_kernel``)."""
    # tokens per step; rows = TB tokens x G2 heads (G2 = G rounded up to a power of two)
    TB: tl.constexpr = (BR + G2 - 1) // G2
    R: tl.constexpr = TB * G2
    i_item = tl.program_id(0)
    i_bin = tl.load(item_bin + i_item)
    i_start = tl.load(item_start + i_item)
    # items past the true count (the grid is a static upper bound) are empty
    i_end = tl.where(i_item < tl.load(n_items), tl.load(item_end + i_item), i_start)
    # an empty item (start == end) writes nothing
    i_b, i_h, o_key, m_s = _key_block(i_bin, tl.where(i_end > i_start, BS, 0), T, NB, NR, HKV, BS, BSP)
    o_d = tl.arange(0, D)
    p_k = k + i_b.to(tl.int64) * stride_kb + o_key[:, None].to(tl.int64) * stride_kt + i_h * stride_kh
    p_v = v + i_b.to(tl.int64) * stride_vb + o_key[:, None].to(tl.int64) * stride_vt + i_h * stride_vh
    # [BSP, D]
    b_k = tl.load(p_k + o_d[None, :], mask=m_s[:, None], other=0.0)
    b_v = tl.load(p_v + o_d[None, :], mask=m_s[:, None], other=0.0)
    b_dk = tl.zeros([BSP, D], dtype=tl.float32)
    b_dv = tl.zeros([BSP, D], dtype=tl.float32)

    o_r = tl.arange(0, R)
    o_tb = o_r // G2
    o_hd = o_r % G2
    m_hd = o_hd < G
    p_qb = q + i_b.to(tl.int64) * stride_qb + (i_h * G + o_hd)[:, None] * stride_qh + o_d[None, :]
    p_ob = do + i_b.to(tl.int64) * stride_ob + (i_h * G + o_hd)[:, None] * stride_oh + o_d[None, :]
    for i0 in range(i_start, i_end, TB):
        m_tb = i0 + o_tb < i_end
        m_row = m_tb & m_hd
        # [R] the selecting token of each row
        b_tok = tl.load(tok + i0 + o_tb, mask=m_tb, other=0)
        # [R, D]
        b_q = tl.load(p_qb + b_tok[:, None].to(tl.int64) * stride_qt, mask=m_row[:, None], other=0.0)
        b_do = tl.load(p_ob + b_tok[:, None].to(tl.int64) * stride_ot, mask=m_row[:, None], other=0.0)
        o_lrow = (i_b * T + b_tok).to(tl.int64) * HQ + i_h * G + o_hd
        b_lse = tl.load(lse + o_lrow, mask=m_row, other=0.0)
        b_delta = tl.load(delta + o_lrow, mask=m_row, other=0.0)
        # [R, BSP]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * scale2
        m_c = m_row[:, None] & m_s[None, :] & (o_key[None, :] <= b_tok[:, None])
        b_p = tl.where(m_c, tl.exp2(b_s - b_lse[:, None]), 0.0)
        # [BSP, D]
        b_dv += tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do, input_precision=PREC)
        # [R, BSP]
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dk += tl.dot(tl.trans(b_ds.to(b_q.dtype)), b_q, input_precision=PREC)
    b_dk = b_dk * scale
    if DETERMINISTIC:
        o_p = (i_item.to(tl.int64) * BSP + tl.arange(0, BSP))[:, None] * D + o_d[None, :]
        tl.store(dk + o_p, b_dk, mask=m_s[:, None])
        tl.store(dv + o_p, b_dv, mask=m_s[:, None])
    else:
        o_w = _kv_rows(i_b, i_h, o_key, T, HKV, D)
        tl.atomic_add(dk + o_w, b_dk, mask=m_s[:, None], sem="relaxed")
        tl.atomic_add(dv + o_w, b_dv, mask=m_s[:, None], sem="relaxed")


@triton.jit(do_not_specialize=["T", "NB"])
def sparse_bwd_dkdv_reduce_kernel(
    part_k, part_v, counts, item_first, dk, dv, T, NB,
    CT: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BSP: tl.constexpr,
):
    """Deterministic mode: one key block's dK/dV = its work items' partials summed in item order
    (the stable index fixes which tokens each item holds), written once in dk/dv's dtype; a block
    nobody selected gets zeros."""
    i_bin = tl.program_id(0)
    i_b, i_h, o_key, m_s = _key_block(i_bin, BS, T, NB, 1, HKV, BS, BSP)
    i_first = tl.load(item_first + i_bin)
    n = (tl.load(counts + i_bin) + CT - 1) // CT
    o_p = tl.arange(0, BSP)[:, None] * D + tl.arange(0, D)[None, :]
    b_dk = tl.zeros([BSP, D], dtype=tl.float32)
    b_dv = tl.zeros([BSP, D], dtype=tl.float32)
    for j in range(n):
        p = (i_first + j).to(tl.int64) * BSP * D + o_p
        b_dk += tl.load(part_k + p, mask=m_s[:, None], other=0.0)
        b_dv += tl.load(part_v + p, mask=m_s[:, None], other=0.0)
    o_w = _kv_rows(i_b, i_h, o_key, T, HKV, D)
    tl.store(dk + o_w, b_dk.to(dk.dtype.element_ty), mask=m_s[:, None])
    tl.store(dv + o_w, b_dv.to(dv.dtype.element_ty), mask=m_s[:, None])


def _strides(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


def sparse_attention_fwd(q, k, v, idx, block_size, deterministic=False):
    """Launcher: -> (o ``[B, T, HQ, D]`` contiguous, lse ``[B, T, HQ]`` fp32, base 2)."""
    b, t, hq, d = q.shape
    hkv, top_k = k.shape[2], idx.shape[-1]
    g = hq // hkv
    o = torch.empty(b, t, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, t, hq, dtype=torch.float32, device=q.device)
    launch(
        sparse_fwd_kernel,
        (t, b * hkv),
        q,
        k,
        v,
        idx,
        o,
        lse,
        t,
        top_k,
        softmax_scale(d) * LOG2E,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        pinned=deterministic,
        HQ=hq,
        HKV=hkv,
        G=g,
        GP=max(16, next_pow2(g)),
        D=d,
        BS=block_size,
        PREC=dot_precision(q.dtype),
    )
    return o, lse


def sparse_attention_bwd_dq(q, k, v, idx, o, lse, do, block_size, deterministic=False):
    """Launcher: dq ``[B, T, HQ, D]`` and delta ``[B, T, HQ]`` fp32, token-major."""
    b, t, hq, d = q.shape
    hkv, top_k = k.shape[2], idx.shape[-1]
    g = hq // hkv
    scale = softmax_scale(d)
    delta = torch.empty(b, t, hq, dtype=torch.float32, device=q.device)
    dq = torch.empty(b, t, hq, d, dtype=q.dtype, device=q.device)
    launch(
        sparse_bwd_dq_kernel,
        (t, b * hkv),
        q,
        k,
        v,
        idx,
        o,
        do,
        lse,
        delta,
        dq,
        t,
        top_k,
        scale * LOG2E,
        scale,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(do),
        pinned=deterministic,
        HQ=hq,
        HKV=hkv,
        G=g,
        GP=max(16, next_pow2(g)),
        D=d,
        BS=block_size,
        PREC=dot_precision(q.dtype),
    )
    return dq, delta


def sparse_attention_bwd_dkdv(q, k, v, do, lse, delta, inverse: InverseIndex, block_size):
    """Launcher: dk, dv ``[B, T, HKV, D]`` (fp32 accumulation), key-block-major over ``inverse``.

    A stable ``inverse`` (one token range) takes the deterministic path: per-item partials, then
    their sum in item order.
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    scale = softmax_scale(d)
    nb, bsp = cdiv(t, block_size), max(16, next_pow2(block_size))
    deterministic = inverse.stable
    if deterministic:
        if inverse.n_ranges != 1:
            raise ValueError("the deterministic dK/dV needs an inverse index with one token range")
        n_slots = inverse.item_bin.numel()
        dk = torch.empty(n_slots, bsp, d, dtype=torch.float32, device=q.device)
        dv = torch.empty_like(dk)
    else:
        dk = torch.zeros(b, t, hkv, d, dtype=torch.float32, device=q.device)
        dv = torch.zeros(b, t, hkv, d, dtype=torch.float32, device=q.device)
    launch(
        sparse_bwd_dkdv_kernel,
        (inverse.item_bin.numel(),),
        q,
        k,
        v,
        do,
        lse,
        delta,
        inverse.tok,
        inverse.item_bin,
        inverse.item_start,
        inverse.item_end,
        inverse.n_items,
        dk,
        dv,
        t,
        nb,
        inverse.n_ranges,
        scale * LOG2E,
        scale,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(do),
        pinned=deterministic,
        HQ=hq,
        HKV=hkv,
        G=g,
        G2=next_pow2(g),
        D=d,
        BS=block_size,
        BSP=bsp,
        PREC=dot_precision(q.dtype),
        DETERMINISTIC=deterministic,
    )
    if not deterministic:
        return dk.to(k.dtype), dv.to(v.dtype)
    part_k, part_v = dk, dv
    dk = torch.empty(b, t, hkv, d, dtype=k.dtype, device=q.device)
    dv = torch.empty(b, t, hkv, d, dtype=v.dtype, device=q.device)
    sparse_bwd_dkdv_reduce_kernel[(b * hkv * nb,)](
        part_k, part_v, inverse.counts, inverse.item_first, dk, dv, t, nb,
        CT=inverse.chunk, HKV=hkv, D=d, BS=block_size, BSP=bsp,
    )
    return dk, dv


def sparse_attention_bwd(q, k, v, idx, o, lse, do, block_size, deterministic=False):
    """Launcher: dq via the token-major kernel, dk/dv via the key-block-major one."""
    dq, delta = sparse_attention_bwd_dq(q, k, v, idx, o, lse, do, block_size, deterministic)
    inverse = build_inverse_index(
        idx, q.shape[1], block_size, ITEM_TOKENS, range_tokens=0 if deterministic else RANGE_TOKENS, stable=deterministic
    )
    dk, dv = sparse_attention_bwd_dkdv(q, k, v, do, lse, delta, inverse, block_size)
    return dq, dk, dv


class SparseAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, block_size, deterministic):
        o, lse = sparse_attention_fwd(q, k, v, idx, block_size, deterministic)
        ctx.save_for_backward(q, k, v, idx, o, lse)
        ctx.block_size = block_size
        ctx.deterministic = deterministic
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, idx, o, lse = ctx.saved_tensors
        dq, dk, dv = sparse_attention_bwd(
            q, k, v, idx, o, lse, last_dim_contiguous(do), ctx.block_size, ctx.deterministic
        )
        return dq, dk, dv, None, None, None


def sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, block_size: int,
    deterministic: bool = False,
) -> torch.Tensor:
    """Softmax attention of each query over the keys of its selected blocks, causal.

    Args:
        q: ``[B, T, HQ, D]`` queries, fp16/bf16/fp32; any batch/seq/head strides, head dim contiguous.
        k, v: ``[B, T, HKV, D]``, same dtype and device, ``HQ % HKV == 0``.
        idx: ``[B, T, HKV, K]`` int32/int64 block indices (from ``select_blocks``; -1 = unused slot;
            distinct blocks per row; blocks past the token are fully masked).
        block_size: tokens per key block (any int >= 1).
        deterministic: fix every summation order (stable inverse index, dK/dV without atomics,
            pinned kernel configs): the same inputs give bitwise-identical outputs and gradients on
            the same GPU and software; costs some backward time and ``[items, block, D]`` fp32 partials.

    Returns:
        o ``[B, T, HQ, D]`` in q's dtype, differentiable w.r.t. q, k and v (fp32 accumulation).
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("idx", idx)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor, got {getattr(t, 'shape', type(t))}")
    b, t, hq, d = q.shape
    if k.shape[:2] != (b, t) or k.shape[3] != d or v.shape != k.shape:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if hq % k.shape[2] != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({k.shape[2]})")
    if idx.shape[:3] != (b, t, k.shape[2]) or idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"idx must be int32/int64 [B, T, HKV, K] = [{b}, {t}, {k.shape[2]}, K], got {idx.dtype} {tuple(idx.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device == idx.device):
        raise ValueError("q, k, v must share dtype and device, and idx must be on their device")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r}: must be a positive int")
    if d < 16 or d & (d - 1):
        raise ValueError(f"head_dim={d}: the Triton kernels need a power of two >= 16")
    if not isinstance(deterministic, bool):
        raise ValueError(f"deterministic={deterministic!r}: must be True or False")
    kernel_dtype_ok(q, k, v)
    check_device(q, k, v, idx)
    dtype = interpreter_upcast(q.dtype)
    if dtype != q.dtype:
        return sparse_attention(q.to(dtype), k.to(dtype), v.to(dtype), idx, block_size, deterministic).to(q.dtype)
    q, k, v = (last_dim_contiguous(x) for x in (q, k, v))
    return SparseAttentionFunction.apply(q, k, v, idx.contiguous(), block_size, deterministic)
