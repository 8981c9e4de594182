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
    next_pow2,
    softmax_scale,
)
from ssa_kernels.inverse import ITEM_TOKENS, build_inverse_index  # noqa: F401 (ITEM_TOKENS: benchmark)

# Token ranges of the inverse index (0: none). Measured on the H100 (docs/kernels.md): binning
# the selecting tokens by 2k-token ranges to keep q/dO rows in L2 did not pay (more, smaller work
# items and atomics), so the default is one range.
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
    BR: tl.constexpr,
):
    # tokens per step; rows = TB tokens x G2 heads (G2 = G rounded up to a power of two)
    TB: tl.constexpr = (BR + G2 - 1) // G2
    R: tl.constexpr = TB * G2
    i_item = tl.program_id(0)
    i_bin = tl.load(item_bin + i_item)
    i_start = tl.load(item_start + i_item)
    # items past the true count (the grid is a static upper bound) are empty
    i_end = tl.where(i_item < tl.load(n_items), tl.load(item_end + i_item), i_start)
    i_bh, i_j = i_bin // (NB * NR), i_bin % NB
    i_b, i_h = i_bh // HKV, i_bh % HKV

    o_s = tl.arange(0, BSP)
    o_key = i_j * BS + o_s
    # an empty item (start == end) writes nothing
    m_s = (o_s < tl.where(i_end > i_start, BS, 0)) & (o_key < T)
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
    o_w = ((i_b * T + o_key).to(tl.int64) * HKV + i_h)[:, None] * D + o_d[None, :]
    tl.atomic_add(dk + o_w, b_dk, mask=m_s[:, None], sem="relaxed")
    tl.atomic_add(dv + o_w, b_dv, mask=m_s[:, None], sem="relaxed")


def _strides(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


def sparse_attention_fwd(q, k, v, idx, block_size):
    """Launcher: -> (o ``[B, T, HQ, D]`` contiguous, lse ``[B, T, HQ]`` fp32, base 2)."""
    b, t, hq, d = q.shape
    hkv, top_k = k.shape[2], idx.shape[-1]
    g = hq // hkv
    o = torch.empty(b, t, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, t, hq, dtype=torch.float32, device=q.device)
    sparse_fwd_kernel[(t, b * hkv)](
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
        HQ=hq,
        HKV=hkv,
        G=g,
        GP=max(16, next_pow2(g)),
        D=d,
        BS=block_size,
        PREC=dot_precision(q.dtype),
    )
    return o, lse


def sparse_attention_bwd_dq(q, k, v, idx, o, lse, do, block_size):
    """Launcher: dq ``[B, T, HQ, D]`` and delta ``[B, T, HQ]`` fp32, token-major."""
    b, t, hq, d = q.shape
    hkv, top_k = k.shape[2], idx.shape[-1]
    g = hq // hkv
    scale = softmax_scale(d)
    delta = torch.empty(b, t, hq, dtype=torch.float32, device=q.device)
    dq = torch.empty(b, t, hq, d, dtype=q.dtype, device=q.device)
    sparse_bwd_dq_kernel[(t, b * hkv)](
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
        HQ=hq,
        HKV=hkv,
        G=g,
        GP=max(16, next_pow2(g)),
        D=d,
        BS=block_size,
        PREC=dot_precision(q.dtype),
    )
    return dq, delta


def sparse_attention_bwd_dkdv(q, k, v, do, lse, delta, inverse, block_size):
    """Launcher: dk, dv ``[B, T, HKV, D]`` (fp32 accumulation), key-block-major over ``inverse``."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    scale = softmax_scale(d)
    tok, ibin, istart, iend, n_items, n_ranges = inverse
    dk = torch.zeros(b, t, hkv, d, dtype=torch.float32, device=q.device)
    dv = torch.zeros(b, t, hkv, d, dtype=torch.float32, device=q.device)
    sparse_bwd_dkdv_kernel[(ibin.numel(),)](
        q,
        k,
        v,
        do,
        lse,
        delta,
        tok,
        ibin,
        istart,
        iend,
        n_items,
        dk,
        dv,
        t,
        cdiv(t, block_size),
        n_ranges,
        scale * LOG2E,
        scale,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(do),
        HQ=hq,
        HKV=hkv,
        G=g,
        G2=next_pow2(g),
        D=d,
        BS=block_size,
        BSP=max(16, next_pow2(block_size)),
        PREC=dot_precision(q.dtype),
    )
    return dk.to(k.dtype), dv.to(v.dtype)


def sparse_attention_bwd(q, k, v, idx, o, lse, do, block_size):
    """Launcher: dq via the token-major kernel, dk/dv via the key-block-major one."""
    dq, delta = sparse_attention_bwd_dq(q, k, v, idx, o, lse, do, block_size)
    inverse = build_inverse_index(idx, q.shape[1], block_size, range_tokens=RANGE_TOKENS)
    dk, dv = sparse_attention_bwd_dkdv(q, k, v, do, lse, delta, inverse, block_size)
    return dq, dk, dv


class SparseAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, block_size):
        o, lse = sparse_attention_fwd(q, k, v, idx, block_size)
        ctx.save_for_backward(q, k, v, idx, o, lse)
        ctx.block_size = block_size
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, idx, o, lse = ctx.saved_tensors
        dq, dk, dv = sparse_attention_bwd(q, k, v, idx, o, lse, last_dim_contiguous(do), ctx.block_size)
        return dq, dk, dv, None, None


def sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, block_size: int
) -> torch.Tensor:
    """Softmax attention of each query over the keys of its selected blocks, causal.

    Args:
        q: ``[B, T, HQ, D]`` queries, fp16/bf16/fp32; any batch/seq/head strides, head dim contiguous.
        k, v: ``[B, T, HKV, D]``, same dtype and device, ``HQ % HKV == 0``.
        idx: ``[B, T, HKV, K]`` int32/int64 block indices (from ``select_blocks``; -1 = unused slot;
            distinct blocks per row; blocks past the token are fully masked).
        block_size: tokens per key block (any int >= 1).

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
    kernel_dtype_ok(q, k, v)
    check_device(q, k, v, idx)
    dtype = interpreter_upcast(q.dtype)
    if dtype != q.dtype:
        return sparse_attention(q.to(dtype), k.to(dtype), v.to(dtype), idx, block_size).to(q.dtype)
    q, k, v = (last_dim_contiguous(x) for x in (q, k, v))
    return SparseAttentionFunction.apply(q, k, v, idx.contiguous(), block_size)
