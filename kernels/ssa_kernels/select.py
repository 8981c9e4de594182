"""Block importance + exact top-k block selection (SSA spec steps 2-4) as one Triton kernel.

Per program: ``BT`` query tokens x one KV head. The ``g`` query heads of the head's GQA group are
stacked with the tokens into the matmul's M dimension (``M = BT * GP`` rows, row = token * GP +
head), and the program streams over the mean-pooled block keys ``k_cmp`` in chunks of blocks,
never materialising ``[seq, num_blocks]``:

* pass 1: scores ``scale * q . k_cmp`` against every block complete at the token
  (``j < (t + 1) // bs``), online log-sum-exp per (token, head) in base 2;
* pass 2: the scores again, ``p = exp2(s - lse)`` on the blocks strictly before the token's own
  block, summed over the group's heads (the importance, float32), then an exact streaming top-k.
  Importance and block index are packed into one int64 key (non-negative float32 bits are
  monotone as integers; the index breaks exact ties, higher index first). The program carries the
  best ``KP`` keys per token (``KP`` = top_k - 1 rounded up to a power of two). Chunks run from the
  diagonal backwards, so the carried minimum rises early; per chunk, the keys that beat a row's
  carried minimum are counted: if the worst row has at most ``INS`` of them they are inserted one
  by one (the usual case once the bar is high), else the chunk is bitonic-sorted and merged with
  the carry (``_top_k_merge``). ``INS`` is autotuned (0 = always merge).

Scores use the tensor cores: q in its own dtype against ``k_cmp`` split into ``hi + lo`` parts of
that dtype (``hi = k_cmp.to(dtype)``, ``lo = (k_cmp - hi).to(dtype)``), which makes the score
error ~2^-16 relative, i.e. float32-grade for bf16/fp16 q (exact q, the fp32 mean kept to 16 bits).
fp32 q uses IEEE fp32 dots.

Output slots: 0 = own block, 1.. = earlier blocks by descending importance, -1 = unused — the same
order as the torch reference (ties aside). top_k - 1 > 128 runs the chunked torch path
``select_blocks_torch`` (exact, memory O(chunk * num_blocks)).
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

# Largest carried top-k (top_k - 1, rounded up to a power of two) kept in registers; larger
# budgets use the chunked torch path below (exact, slower, memory O(chunk * num_blocks)).
MAX_KP = 128
# Rows (tokens x padded group heads) per program.
ROWS = 128
# Scores as q . hi + q . lo (float32-grade, two tensor-core dots) rather than q . bf16(k_cmp)
# (one dot, ~4e-3 relative error on k_cmp): the spec computes importance in float32.
SPLIT_SCORES = True


@triton.jit
def _indicator(n_dims: tl.constexpr, j: tl.constexpr):
    """0/1 along the ``j``-th innermost axis of a ``[2] * n_dims`` hypercube, broadcastable."""
    ar = tl.arange(0, 2)
    return tl.reshape(ar, [1] * (n_dims - j - 1) + [2] + [1] * j)


@triton.jit
def _compare_swap(h, flip, n_dims: tl.constexpr, j: tl.constexpr):
    """Bitonic compare-exchange along the ``j``-th innermost axis of hypercube ``h``.

    Each pair ends ascending where ``flip`` is false, descending where it is true.
    """
    lo = tl.min(h, n_dims - 1 - j, keep_dims=True)
    hi = tl.max(h, n_dims - 1 - j, keep_dims=True)
    return tl.where((_indicator(n_dims, j) == 1) != flip, hi, lo)


@triton.jit
def _sort_rows(x, LOG_R: tl.constexpr, LOG_N: tl.constexpr, DESC: tl.constexpr):
    """Bitonic sort of each row of ``x [2**LOG_R, 2**LOG_N]``, on a ``[2] * n`` hypercube view."""
    n_dims: tl.constexpr = LOG_R + LOG_N
    if LOG_N > 0:
        h = tl.reshape(x, [2] * n_dims)
        for i in tl.static_range(1, LOG_N + 1):
            for jj in tl.static_range(i):
                if i < LOG_N:  # stage i: blocks of 2**i alternate direction by bit i of the index
                    h = _compare_swap(h, _indicator(n_dims, i) == 1, n_dims, i - 1 - jj)
                else:
                    h = _compare_swap(h, DESC, n_dims, i - 1 - jj)
        x = tl.reshape(h, [1 << LOG_R, 1 << LOG_N])
    return x


@triton.jit
def _top_k_merge(b_top, b_key, LOG_BT: tl.constexpr, LOG_NC: tl.constexpr, LOG_KP: tl.constexpr):
    """Best ``KP`` of ``b_top [BT, KP]`` and ``b_key [BT, NC]`` (``NC >= KP``), descending.

    Bitonic: sort both (the chunk ascending, the carry descending); the elementwise max over the
    chunk's groups of ``KP`` is its best ``KP``, ascending; the elementwise max of a descending and
    an ascending sequence holds the best ``KP`` of their union as a bitonic sequence, which
    ``LOG_KP`` merge stages sort.
    """
    BT: tl.constexpr = 1 << LOG_BT
    KP: tl.constexpr = 1 << LOG_KP
    NC: tl.constexpr = 1 << LOG_NC
    b_key = _sort_rows(b_key, LOG_BT, LOG_NC, False)
    b_key = tl.max(tl.reshape(b_key, [BT, NC // KP, KP]), 1)
    b_top = tl.maximum(_sort_rows(b_top, LOG_BT, LOG_KP, True), b_key)
    n_dims: tl.constexpr = LOG_BT + LOG_KP
    if LOG_KP > 0:
        h = tl.reshape(b_top, [2] * n_dims)
        for jj in tl.static_range(LOG_KP):
            h = _compare_swap(h, True, n_dims, LOG_KP - 1 - jj)
        b_top = tl.reshape(h, [BT, KP])
    return b_top


@triton.autotune(
    configs=configs(
        [
            triton.Config({"LOG_BC": 6, "INS": 8}, num_warps=8, num_stages=2),
            # INS=0: always bitonic-merge (best for top_k=64 in the H100 runs: 8.5 vs 11.9 ms at 32k)
            triton.Config({"LOG_BC": 6, "INS": 0}, num_warps=8, num_stages=2),
            triton.Config({"LOG_BC": 6, "INS": 4}, num_warps=4, num_stages=2),
            triton.Config({"LOG_BC": 5, "INS": 8}, num_warps=4, num_stages=2),
            triton.Config({"LOG_BC": 7, "INS": 16}, num_warps=8, num_stages=2),
        ]
    ),
    key=["GP", "D", "BS", "KP", "SPLIT"],
)
@triton.jit(do_not_specialize=["T", "NBC", "K1", "TOPK"])
def select_blocks_kernel(
    q,
    kc_hi,
    kc_lo,
    idx,
    T,
    NBC,
    K1,
    TOPK,
    scale2,
    stride_qb,
    stride_qt,
    stride_qh,
    HKV: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    BT: tl.constexpr,
    KP: tl.constexpr,
    LOG_BT: tl.constexpr,
    LOG_KP: tl.constexpr,
    SPLIT: tl.constexpr,
    PREC: tl.constexpr,
    LOG_BC: tl.constexpr,
    INS: tl.constexpr,
):
    BC: tl.constexpr = 1 << LOG_BC
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HKV, i_bh % HKV
    M: tl.constexpr = BT * GP

    # rows of the tile: token-major, the group's heads inside
    o_r = tl.arange(0, M)
    o_tok = i_t * BT + o_r // GP
    o_head = o_r % GP
    m_r = (o_tok < T) & (o_head < G)
    o_d = tl.arange(0, D)
    p_q = (
        q
        + i_b.to(tl.int64) * stride_qb
        + o_tok[:, None].to(tl.int64) * stride_qt
        + (i_h * G + o_head)[:, None] * stride_qh
        + o_d[None, :]
    )
    # [M, D]
    b_q = tl.load(p_q, mask=m_r[:, None], other=0.0)

    t_last = tl.minimum(i_t * BT + BT, T) - 1
    p_kc = i_bh.to(tl.int64) * NBC * D
    o_c = tl.arange(0, BC)

    # ---- pass 1: log-sum-exp over the blocks complete at each token (base 2) ----
    n_cmp = (t_last + 1) // BS
    b_m = tl.full([M], -1.0e30, dtype=tl.float32)
    b_l = tl.zeros([M], dtype=tl.float32)
    for c0 in range(0, n_cmp, BC):
        o_j = c0 + o_c
        m_j = o_j < n_cmp
        p_hi = kc_hi + p_kc + o_j[:, None] * D + o_d[None, :]
        # [BC, D]
        b_kh = tl.load(p_hi, mask=m_j[:, None], other=0.0)
        # [M, BC]
        b_s = tl.dot(b_q, tl.trans(b_kh), input_precision=PREC)
        if SPLIT:
            b_kl = tl.load(kc_lo + p_kc + o_j[:, None] * D + o_d[None, :], mask=m_j[:, None], other=0.0)
            b_s += tl.dot(b_q, tl.trans(b_kl), input_precision=PREC)
        b_s = b_s * scale2
        m_c = o_j[None, :] < ((o_tok + 1) // BS)[:, None]
        b_s = tl.where(m_c, b_s, float("-inf"))
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        b_l = b_l * tl.exp2(b_m - b_mn) + tl.sum(tl.exp2(b_s - b_mn[:, None]), 1)
        b_m = b_mn
    # rows with no complete block have no earlier block either: their lse is never used
    b_lse = tl.where(b_l > 0, b_m + tl.log2(tl.where(b_l > 0, b_l, 1.0)), float("inf"))

    # ---- pass 2: importance summed over the group, exact streaming top-k ----
    # chunk width of pass 2: BC blocks, at least KP (the merge takes the chunk's best KP)
    LOG_NC: tl.constexpr = LOG_BC + (LOG_KP - LOG_BC) * (LOG_KP > LOG_BC)
    NC: tl.constexpr = 1 << LOG_NC
    o_nc = tl.arange(0, NC)
    o_kp = tl.arange(0, KP)
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    # [BT, KP] carried best keys (any order); -1 = nothing yet
    b_top = tl.full([BT, KP], -1, dtype=tl.int64)
    n_ear = t_last // BS
    n_chunk = tl.cdiv(n_ear, NC)
    for i_c in range(n_chunk):
        # from the diagonal backwards: the recent blocks set a high bar early
        o_j = (n_chunk - 1 - i_c) * NC + o_nc
        m_j = o_j < n_ear
        p_hi = kc_hi + p_kc + o_j[:, None] * D + o_d[None, :]
        # [NC, D]
        b_kh = tl.load(p_hi, mask=m_j[:, None], other=0.0)
        # [M, NC]
        b_s = tl.dot(b_q, tl.trans(b_kh), input_precision=PREC)
        if SPLIT:
            b_kl = tl.load(kc_lo + p_kc + o_j[:, None] * D + o_d[None, :], mask=m_j[:, None], other=0.0)
            b_s += tl.dot(b_q, tl.trans(b_kl), input_precision=PREC)
        b_s = b_s * scale2
        m_e = (o_j[None, :] < (o_tok // BS)[:, None]) & m_r[:, None]
        b_p = tl.where(m_e, tl.exp2(b_s - b_lse[:, None]), 0.0)
        # [BT, NC] importance: sum over the group's heads
        b_imp = tl.sum(tl.reshape(b_p, [BT, GP, NC]), 1)
        m_te = (o_j[None, :] < (o_t // BS)[:, None]) & m_t[:, None]
        b_key = (b_imp.to(tl.int32, bitcast=True).to(tl.int64) << 32) | o_j[None, :].to(tl.int64)
        b_key = tl.where(m_te, b_key, -1)
        # keys of the chunk that beat a row's carried minimum: few -> insert them one by one (the
        # usual case past the first chunks); many -> bitonic merge
        b_thr = tl.min(b_top, 1)
        n_cand = tl.max(tl.sum((b_key > b_thr[:, None]).to(tl.int32), 1))
        if n_cand > INS:
            b_top = _top_k_merge(b_top, b_key, LOG_BT, LOG_NC, LOG_KP)
        else:
            for _ in range(n_cand):
                b_cmax = tl.max(b_key, 1)
                b_cmin = tl.min(b_top, 1)
                m_ins = b_cmax > b_cmin
                # first slot holding the row's minimum
                b_pos = tl.min(tl.where(b_top == b_cmin[:, None], o_kp[None, :], KP), 1)
                b_top = tl.where((o_kp[None, :] == b_pos[:, None]) & m_ins[:, None], b_cmax[:, None], b_top)
                b_key = tl.where(b_key == b_cmax[:, None], -1, b_key)

    # ---- output: own block, then the carried keys by descending importance ----
    p_idx = idx + ((i_b * T + o_t).to(tl.int64) * HKV + i_h) * TOPK
    tl.store(p_idx, (o_t // BS).to(tl.int64), mask=m_t)
    b_top = _sort_rows(b_top, LOG_BT, LOG_KP, True)
    b_blk = tl.where(b_top >= 0, b_top.to(tl.int32).to(tl.int64), -1)
    tl.store(p_idx[:, None] + 1 + o_kp[None, :], b_blk, mask=m_t[:, None] & (o_kp[None, :] < K1))


def mean_pool_blocks(k: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of every complete block's keys, float32: ``[b, s, hkv, d] -> [b, hkv, s // bs, d]``."""
    b, s, hkv, d = k.shape
    nbc = s // block_size
    blocks = k[:, : nbc * block_size].reshape(b, nbc, block_size, hkv, d)
    return blocks.float().mean(dim=2).permute(0, 2, 1, 3).contiguous()


def select_blocks_fwd(q: torch.Tensor, k: torch.Tensor, block_size: int, top_k: int) -> torch.Tensor:
    """Launcher. q ``[b, s, hq, d]`` (head dim contiguous), k ``[b, s, hkv, d]`` -> idx int64."""
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    k1 = top_k - 1
    idx = torch.empty(b, s, hkv, top_k, dtype=torch.int64, device=q.device)
    nbc = s // block_size
    if k1 == 0 or nbc == 0:
        # no earlier block can be picked: own block only
        idx[..., 0] = (torch.arange(s, device=q.device) // block_size)[None, :, None]
        if k1:
            idx[..., 1:] = -1
        return idx
    kc = mean_pool_blocks(k, block_size)  # [b, hkv, nbc, d] fp32
    if q.dtype == torch.float32 or not SPLIT_SCORES:
        kc_hi, kc_lo, split = kc.to(q.dtype), kc, False
    else:
        kc_hi = kc.to(q.dtype)
        kc_lo = (kc - kc_hi.float()).to(q.dtype)
        split = True
    gp = next_pow2(g)
    bt = max(1, ROWS // gp)
    kp = next_pow2(k1)
    grid = (cdiv(s, bt), b * hkv)
    select_blocks_kernel[grid](
        q,
        kc_hi,
        kc_lo,
        idx,
        s,
        nbc,
        k1,
        top_k,
        softmax_scale(d) * LOG2E,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        HKV=hkv,
        G=g,
        GP=gp,
        D=d,
        BS=block_size,
        BT=bt,
        KP=kp,
        LOG_BT=bt.bit_length() - 1,
        LOG_KP=kp.bit_length() - 1,
        SPLIT=split,
        PREC=dot_precision(q.dtype),
    )
    return idx


_TORCH_CHUNK = 512


def select_blocks_torch(q: torch.Tensor, k: torch.Tensor, block_size: int, top_k: int) -> torch.Tensor:
    """Exact selection for budgets too large for the kernel's register top-k (top_k - 1 > 128).

    The same math in float32, chunked over query tokens: memory O(chunk * hq * num_blocks).
    """
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    kc = mean_pool_blocks(k, block_size)  # [b, hkv, nbc, d]
    nbc = kc.shape[2]
    idx = torch.full((b, s, hkv, top_k), -1, dtype=torch.int64, device=q.device)
    pos_all = torch.arange(s, device=q.device)
    idx[..., 0] = (pos_all // block_size)[None, :, None]
    n_pick = min(top_k - 1, nbc)
    if n_pick == 0:
        return idx
    blocks = torch.arange(nbc, device=q.device)
    for start in range(0, s, _TORCH_CHUNK):
        pos = pos_all[start : start + _TORCH_CHUNK]
        qc = q[:, pos].float().view(b, -1, hkv, g, d)
        scores = torch.einsum("bchgd,bhnd->bchgn", qc, kc) * softmax_scale(d)
        complete = blocks[None, :] < ((pos + 1) // block_size)[:, None]
        earlier = blocks[None, :] < (pos // block_size)[:, None]
        lse = scores.masked_fill(~complete[None, :, None, None, :], float("-inf")).logsumexp(-1, keepdim=True)
        imp = torch.exp(scores - lse).masked_fill(~earlier[None, :, None, None, :], 0.0).sum(3)
        imp = imp.masked_fill(~earlier[None, :, None, :], float("-inf"))
        val, pick = imp.topk(n_pick, dim=-1)
        idx[:, pos, :, 1 : 1 + n_pick] = pick.masked_fill(val == float("-inf"), -1)
    return idx


def select_blocks(q: torch.Tensor, k: torch.Tensor, block_size: int, top_k: int) -> torch.Tensor:
    """Exact top-k block selection per token and KV head (no gradient).

    Args:
        q: ``[B, T, HQ, D]`` queries (RoPE applied), fp16/bf16/fp32, head dim contiguous.
        k: ``[B, T, HKV, D]`` keys, same dtype and device, ``HQ % HKV == 0``.
        block_size: tokens per key block (any int >= 1; 16/32/64/128 are the tuned ones).
        top_k: selected blocks per token and KV head, own block included (>= 1).

    Returns:
        idx ``[B, T, HKV, top_k]`` int64: slot 0 the token's own block ``t // block_size``, slots
        1.. the most important earlier blocks in descending importance, -1 where fewer exist.
    """
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
        raise ValueError("q and k must be tensors")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [B, T, H, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[1] != q.shape[1] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)}")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")
    if q.dtype != k.dtype or q.device != k.device:
        raise ValueError(f"q is {q.dtype} on {q.device}, k is {k.dtype} on {k.device}: must match")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r}: must be a positive int")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k={top_k!r}: must be an int >= 1 (the own block counts as one)")
    if q.shape[3] < 16 or q.shape[3] & (q.shape[3] - 1):
        raise ValueError(f"head_dim={q.shape[3]}: the Triton kernels need a power of two >= 16")
    kernel_dtype_ok(q, k)
    check_device(q, k)
    with torch.no_grad():
        dtype = interpreter_upcast(q.dtype)
        q, k = last_dim_contiguous(q.to(dtype)), k.to(dtype)
        if next_pow2(top_k - 1) > MAX_KP:
            return select_blocks_torch(q, k, block_size, top_k)
        return select_blocks_fwd(q, k, block_size, top_k)
