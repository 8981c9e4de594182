"""Block importance + exact top-k block selection (SSA spec steps 2-4) as three Triton kernels.

* ``mean_pool_kernel``: the block keys ``k_cmp``, once, already multiplied by ``scale * log2(e)``
  (scores come out of the matmul in base 2, no multiply per score) and split ``hi + lo`` in q's
  dtype: ``q . hi + q . lo`` is float32-grade (~2^-16 relative) on the tensor cores.
* ``lse_kernel`` (pass 1): per (token, head), the base-2 log-sum-exp of the scores against the
  blocks complete at the token (``_lse_chunk``: online max and sum, rows = tokens x heads).
* ``select_blocks_kernel`` (pass 2 and the top-k): per chunk of blocks, the importance
  ``sum over the group's heads of 2**(s - lse)`` (``_importance_chunk``) and an exact streaming
  top-k (``_top_k_update``); the best ``top_k - 1`` blocks and the own block are written.

A program owns ``TOK`` query tokens x one KV head: the tokens and the group's ``g`` heads form
``TOK * GP`` matmul rows, in sub-tiles of at most 128 rows that share each chunk's key loads (16
tokens x 16 heads: the pooled keys are read once per 256 rows). The keys stream in chunks of
``NC`` blocks; ``[seq, num_blocks]`` is never materialised. Only the chunk(s) at the diagonal are
masked; the others are complete (pass 1) or strictly earlier (pass 2) for every token of the program.

Pass 2 computes the scores transposed (``[NC blocks, rows]``): a token's heads are then neighbouring
columns, so the head sum is in-thread adds and two shuffles, and ``-lse`` enters as a third, K=16
matmul (``_neg_lse_rows``) instead of a per-score subtraction and a per-column lse in registers.

The top-k works on the ``[NC, TOK]`` importance tile in a warp-per-token layout. Its rows are cut
into slabs of ``SR`` rows (``top_k - 1`` rounded up to a power of two, at least 16); each slab keeps
a descending carry of its best ``SR`` (importance, block) pairs. Per chunk a slab is bitonic-sorted
ascending; the elementwise max with the carry is the best ``SR`` of both as a bitonic sequence, and
``log2 SR`` merge stages sort it: fixed work per chunk, no data-dependent loop, and the slabs meet
once at the end (``_merge_slabs``). Each compare-exchange keeps the pair's max or min per row and a
row keeps its own index unless the other value won, so ties neither lose nor double a block.

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
# Largest matmul row sub-tile (tokens x padded heads) of the score matmuls.
ROWS = 128
# Scores as q . hi + q . lo (float32-grade, two tensor-core dots) rather than q . bf16(k_cmp)
# (one dot, ~4e-3 relative error on k_cmp): the spec computes importance in float32.
SPLIT_SCORES = True


@triton.jit
def mean_pool_kernel(
    k, kc_hi, kc_lo, NBC, stride_kb, stride_kt, stride_kh, scale,
    HKV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, NB: tl.constexpr, SPLIT: tl.constexpr,
):
    """``scale * mean`` of the keys of ``NB`` complete blocks -> ``kc_hi [+ kc_lo]``, ``[B, HKV, NBC, D]``."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HKV, i_bh % HKV
    o_n = i_n * NB + tl.arange(0, NB)
    m_n = (o_n < NBC)[:, None]
    o_d = tl.arange(0, D)
    p_k = (k + i_b.to(tl.int64) * stride_kb + i_h * stride_kh + (o_n * BS).to(tl.int64)[:, None] * stride_kt
           + o_d[None, :])
    acc = tl.zeros([NB, D], dtype=tl.float32)
    for i in range(BS):
        acc += tl.load(p_k + i * stride_kt, mask=m_n, other=0.0).to(tl.float32)
    kc = acc * scale
    p_o = (i_bh.to(tl.int64) * NBC + o_n)[:, None] * D + o_d[None, :]
    hi = kc.to(kc_hi.dtype.element_ty)
    tl.store(kc_hi + p_o, hi, mask=m_n)
    if SPLIT:
        tl.store(kc_lo + p_o, (kc - hi.to(tl.float32)).to(kc_lo.dtype.element_ty), mask=m_n)


@triton.jit
def _load_chunk(kc_hi, kc_lo, p_kc, o_j, n_j, D: tl.constexpr, MASK: tl.constexpr, SPLIT: tl.constexpr):
    """The ``[NC, D]`` hi (and lo) block keys of rows ``o_j``; only the diagonal chunk needs a mask."""
    o_d = tl.arange(0, D)
    p = p_kc + o_j[:, None] * D + o_d[None, :]
    if MASK:
        b_kh = tl.load(kc_hi + p, mask=(o_j < n_j)[:, None], other=0.0)
    else:
        b_kh = tl.load(kc_hi + p)
    b_kl = b_kh
    if SPLIT:
        if MASK:
            b_kl = tl.load(kc_lo + p, mask=(o_j < n_j)[:, None], other=0.0)
        else:
            b_kl = tl.load(kc_lo + p)
    return b_kh, b_kl


@triton.jit
def _lse_chunk(b_q, b_kh, b_kl, b_m, b_l, o_tok, o_j, BS: tl.constexpr, MASK: tl.constexpr, SPLIT: tl.constexpr,
               PREC: tl.constexpr):
    """Pass 1 on one chunk: online base-2 log-sum-exp per row over the blocks complete at its token."""
    b_s = tl.dot(b_q, tl.trans(b_kh), input_precision=PREC)
    if SPLIT:
        b_s = tl.dot(b_q, tl.trans(b_kl), b_s, input_precision=PREC)
    if MASK:
        b_s = tl.where(o_j[None, :] < ((o_tok + 1) // BS)[:, None], b_s, float("-inf"))
    b_mn = tl.maximum(b_m, tl.max(b_s, 1))
    b_l = b_l * tl.exp2(b_m - b_mn) + tl.sum(tl.exp2(b_s - b_mn[:, None]), 1)
    return b_mn, b_l


@triton.jit
def _lse_chunks(qs, b_kh, b_kl, ms, ls, toks, o_j, BS: tl.constexpr, NSUB: tl.constexpr, MASK: tl.constexpr,
                SPLIT: tl.constexpr, PREC: tl.constexpr):
    """``_lse_chunk`` for every row sub-tile, one load of the chunk's keys for all."""
    ms_n = ()
    ls_n = ()
    for s in tl.static_range(NSUB):
        m, l = _lse_chunk(qs[s], b_kh, b_kl, ms[s], ls[s], toks[s], o_j, BS, MASK, SPLIT, PREC)
        ms_n = ms_n + (m,)
        ls_n = ls_n + (l,)
    return ms_n, ls_n


@triton.jit
def _importance_chunks(b_kh, b_kl, b_one, qs, nls, toks, o_j, o_c, BS: tl.constexpr, GP: tl.constexpr,
                       NSUB: tl.constexpr, MASK: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr):
    """``[NC, TOK]`` importance of one chunk for all the program's tokens, in the top-k's layout."""
    imps = ()
    for s in tl.static_range(NSUB):
        imps = imps + (_importance_chunk(b_kh, b_kl, b_one, qs[s], nls[s], toks[s], o_j, BS, GP, MASK, SPLIT, PREC),)
    return _gather_layout(_join_tokens(imps, NSUB), o_c)


@triton.jit
def _importance_chunk(b_kh, b_kl, b_one, b_q, b_nl, o_tok, o_j, BS: tl.constexpr, GP: tl.constexpr,
                      MASK: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr):
    """Pass 2 on one chunk and row sub-tile: ``[NC, tokens]`` importance, ``sum over heads of p_h(j)``.

    Scores are computed transposed (``[NC, rows]``): a token's heads are then neighbouring
    columns, which a thread holds in registers and its quad of lanes shares, so the head sum is
    in-thread adds and two shuffles. ``- lse`` enters as a third, K=16 matmul (``_neg_lse_rows``),
    so the exponent comes straight out of the accumulator: no per-score subtraction, and no
    per-column lse held in registers.
    """
    b_s = tl.dot(b_one, b_nl, input_precision=PREC)
    b_s = tl.dot(b_kh, tl.trans(b_q), b_s, input_precision=PREC)
    if SPLIT:
        b_s = tl.dot(b_kl, tl.trans(b_q), b_s, input_precision=PREC)
    b_p = tl.exp2(b_s)
    if MASK:
        b_p = tl.where(o_j[:, None] < (o_tok // BS)[None, :], b_p, 0.0)
    return tl.sum(tl.reshape(b_p, [b_p.shape[0], b_p.shape[1] // GP, GP]), 2)


@triton.jit
def _neg_lse_rows(lse, dtype: tl.constexpr):
    """``[16, rows]`` matmul operand: ``-lse`` split in three parts of ``dtype`` (24+ bits), then zeros.

    With the ``[NC, 16]`` operand whose first three columns are ones it adds ``-lse`` to every score.
    """
    n1 = (-lse).to(dtype)
    r1 = -lse - n1.to(tl.float32)
    n2 = r1.to(dtype)
    n3 = (r1 - n2.to(tl.float32)).to(dtype)
    o_k = tl.arange(0, 16)[:, None]
    return tl.where(o_k == 0, n1[None, :], tl.where(o_k == 1, n2[None, :], tl.where(o_k == 2, n3[None, :], 0.0)))


@triton.jit
def _join_tokens(imps, NSUB: tl.constexpr):
    """One ``[NC, TOK]`` tile from the sub-tiles' ``[NC, TOK // NSUB]`` (sub-tile s holds tokens s mod NSUB).

    Interleaving sub-tiles ``i`` and ``i + n/2`` of ``n`` at every level puts token ``NSUB * t + s`` in
    column ``NSUB * t + s``.
    """
    tl.static_assert(NSUB <= 16, "at most 16 row sub-tiles (256 query heads per KV head)")
    if NSUB >= 16:
        imps = _interleave_halves(imps, 8)
    if NSUB >= 8:
        imps = _interleave_halves(imps, 4)
    if NSUB >= 4:
        imps = _interleave_halves(imps, 2)
    if NSUB >= 2:
        imps = _interleave_halves(imps, 1)
    return imps[0]


@triton.jit
def _interleave_halves(imps, HALF: tl.constexpr):
    """Tiles ``i`` and ``i + HALF`` -> one tile with their columns alternating, for ``i < HALF``."""
    pairs = ()
    for i in tl.static_range(HALF):
        a = imps[i]
        pairs = pairs + (tl.reshape(tl.join(a, imps[i + HALF]), [a.shape[0], 2 * a.shape[1]]),)
    return pairs


@triton.jit
def _compare_exchange(v, j, o_r, BIT: tl.constexpr, desc):
    """Rows ``r`` and ``r ^ BIT`` of every column end in order: descending where ``desc``, else ascending.

    Each row keeps the max or the min of its pair; a row keeps its own index unless the other row's
    value won, so on a tie both rows keep their own entry: the network stays a permutation (no
    block lost or doubled) without an index tie-break.
    """
    if BIT == 1:  # neighbouring rows share a thread in the gather layout: split/join, no shuffle
        return _compare_exchange_pairs(v, j, desc)
    part = tl.broadcast_to((o_r ^ BIT)[:, None], v.shape)
    v_o = tl.gather(v, part, 0)
    j_o = tl.gather(j, part, 0)
    keep_max = ((o_r & BIT) == 0)[:, None] == desc
    v_n = tl.where(keep_max, tl.maximum(v, v_o), tl.minimum(v, v_o))
    return v_n, tl.where(v_n == v, j, j_o)


@triton.jit
def _compare_exchange_pairs(v, j, desc):
    """``_compare_exchange`` of rows ``2i`` and ``2i + 1``, in registers."""
    v0, v1 = _split_rows(v)
    j0, j1 = _split_rows(j)
    d0, _ = _split_rows(tl.broadcast_to(desc, v.shape))
    n0 = tl.where(d0, tl.maximum(v0, v1), tl.minimum(v0, v1))
    n1 = tl.where(d0, tl.minimum(v0, v1), tl.maximum(v0, v1))
    v = _join_rows(n0, n1)
    j = _join_rows(tl.where(n0 == v0, j0, j1), tl.where(n1 == v1, j1, j0))
    return v, j


@triton.jit
def _split_rows(x):
    """``[R, C]`` -> its even and odd rows, ``[R // 2, C]`` each."""
    return tl.split(tl.permute(tl.reshape(x, [x.shape[0] // 2, 2, x.shape[1]]), [0, 2, 1]))


@triton.jit
def _join_rows(a, b):
    """Inverse of ``_split_rows``."""
    return tl.reshape(tl.permute(tl.join(a, b), [0, 2, 1]), [2 * a.shape[0], a.shape[1]])


@triton.jit
def _sort_slabs(v, j, o_r, LOG_SR: tl.constexpr):
    """Bitonic sort, ascending, of every slab of ``2**LOG_SR`` consecutive rows (per column)."""
    for i in tl.static_range(1, LOG_SR + 1):
        # stage i sorts runs of 2**i rows, alternating direction, the last one ascending
        if i < LOG_SR:
            desc = (((o_r >> i) & 1) == 1)[:, None]
        else:
            desc = (o_r < 0)[:, None]
        for jj in tl.static_range(i):
            v, j = _compare_exchange(v, j, o_r, 1 << (i - 1 - jj), desc)
    return v, j


@triton.jit
def _merge_desc(v, j, o_r, LOG_SR: tl.constexpr):
    """Sort every bitonic slab of ``2**LOG_SR`` rows descending (the merge half of a bitonic sort)."""
    desc = (o_r >= 0)[:, None]
    for jj in tl.static_range(LOG_SR):
        v, j = _compare_exchange(v, j, o_r, 1 << (LOG_SR - 1 - jj), desc)
    return v, j


@triton.jit
def _gather_layout(x, o_r):
    """``x`` itself, moved by an identity gather into the layout the compare-exchanges gather in.

    Without it Triton keeps the importance matmul's layout for the whole top-k and converts
    through shared memory around every gather.
    """
    return tl.gather(x, tl.broadcast_to(o_r[:, None], x.shape), 0)


@triton.jit
def _top_k_update(c_v, c_j, x_v, x_j, o_r, LOG_SR: tl.constexpr):
    """Carry ``c`` (each slab descending) <- best ``SR`` of each slab of carry and chunk ``x``.

    The max of a descending and an ascending sequence holds the best half of both, bitonic.
    """
    x_v, x_j = _sort_slabs(x_v, x_j, o_r, LOG_SR)
    take = x_v > c_v
    c_v = tl.where(take, x_v, c_v)
    c_j = tl.where(take, x_j, c_j)
    return _merge_desc(c_v, c_j, o_r, LOG_SR)


@triton.jit
def _merge_slabs(c_v, c_j, o_r, LOG_SR: tl.constexpr, LOG_NC: tl.constexpr):
    """Every slab <- the best ``SR`` of all slabs, descending: pairs of slabs meet in ``LOG_NC - LOG_SR`` rounds."""
    for lvl in tl.static_range(LOG_SR, LOG_NC):
        # the partner slab, reversed (ascending): the max with it is the pair's best half, bitonic
        part = tl.broadcast_to((o_r ^ (1 << lvl) ^ ((1 << LOG_SR) - 1))[:, None], c_v.shape)
        p_v = tl.gather(c_v, part, 0)
        p_j = tl.gather(c_j, part, 0)
        take = p_v > c_v
        c_v = tl.where(take, p_v, c_v)
        c_j = tl.where(take, p_j, c_j)
        c_v, c_j = _merge_desc(c_v, c_j, o_r, LOG_SR)
    return c_v, c_j


@triton.jit
def _program_tokens(T, NBC, HKV: tl.constexpr, D: tl.constexpr, TOK: tl.constexpr):
    """This program's (batch x KV head) index, batch, KV head, first and last token, and the offset of
    its pooled keys (both passes tile the grid the same way)."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    t0 = i_t * TOK
    return i_bh, i_bh // HKV, i_bh % HKV, t0, tl.minimum(t0 + TOK, T) - 1, i_bh.to(tl.int64) * NBC * D


@triton.jit
def _row_tile(q, i_b, i_h, t0, T, stride_qb, stride_qt, stride_qh, s, G: tl.constexpr, GP: tl.constexpr,
              D: tl.constexpr, RS: tl.constexpr, NSUB: tl.constexpr):
    """Row sub-tile ``s`` of a program: its tokens are ``t0 + s (mod NSUB)``, the group's heads inside."""
    o_rs = tl.arange(0, RS)
    o_tok = t0 + (o_rs // GP) * NSUB + s
    o_head = o_rs % GP
    o_d = tl.arange(0, D)
    p_q = (q + i_b.to(tl.int64) * stride_qb + o_tok[:, None].to(tl.int64) * stride_qt
           + (i_h * G + o_head)[:, None] * stride_qh + o_d[None, :])
    return tl.load(p_q, mask=((o_tok < T) & (o_head < G))[:, None], other=0.0), o_tok, o_head


# lse of a row that has no complete block yet, or of a padded head: finite in every dtype, and
# p = exp2(s - lse) = 0 for it
LSE_NONE = tl.constexpr(30000.0)

# Autotune candidates: tokens per program, log2 of the blocks per chunk, warps, pipeline stages
# (measured on an H200: 4 warps at 64 blocks a chunk win; three-CTA occupancy through a register
# cap and one stage is worth 2-5% for the selection kernel).
LSE_CANDIDATES = [
    triton.Config({"TOK": 16, "LOG_NC": 6}, num_warps=4, num_stages=2),
    triton.Config({"TOK": 16, "LOG_NC": 6}, num_warps=4, num_stages=3),
]
CANDIDATES = [
    triton.Config({"TOK": 16, "LOG_NC": 6}, num_warps=4, num_stages=2),
    triton.Config({"TOK": 16, "LOG_NC": 6}, num_warps=4, num_stages=3),
    triton.Config({"TOK": 16, "LOG_NC": 6}, num_warps=4, num_stages=1, maxnreg=168),
    triton.Config({"TOK": 16, "LOG_NC": 6}, num_warps=4, num_stages=1, maxnreg=128),
]


@triton.autotune(configs=configs(LSE_CANDIDATES), key=["GP", "D", "BS", "SPLIT"])
@triton.jit(do_not_specialize=["T", "NBC"])
def lse_kernel(
    q,
    kc_hi,
    kc_lo,
    lse,
    T,
    NBC,
    stride_qb,
    stride_qt,
    stride_qh,
    HKV: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    SPLIT: tl.constexpr,
    PREC: tl.constexpr,
    MAX_RS: tl.constexpr,
    TOK: tl.constexpr,
    LOG_NC: tl.constexpr,
):
    """Pass 1: base-2 log-sum-exp of every (token, head) over the blocks complete at the token."""
    NCB: tl.constexpr = 1 << LOG_NC
    RS: tl.constexpr = MAX_RS if TOK * GP > MAX_RS else TOK * GP  # rows per sub-tile
    NSUB: tl.constexpr = TOK * GP // RS
    i_bh, i_b, i_h, t0, t_last, p_kc = _program_tokens(T, NBC, HKV, D, TOK)
    qs = ()
    toks = ()
    ms = ()
    ls = ()
    for s in tl.static_range(NSUB):
        b_q, o_tok, o_head = _row_tile(q, i_b, i_h, t0, T, stride_qb, stride_qt, stride_qh, s, G, GP, D, RS, NSUB)
        qs = qs + (b_q,)
        toks = toks + (o_tok,)
        ms = ms + (tl.full([RS], -1.0e30, dtype=tl.float32),)
        ls = ls + (tl.zeros([RS], dtype=tl.float32),)
    o_c = tl.arange(0, NCB)
    n_cmp = (t_last + 1) // BS
    n_full = ((t0 + 1) // BS) // NCB  # chunks complete for every token of the program: no mask
    for c in range(n_full):
        b_kh, b_kl = _load_chunk(kc_hi, kc_lo, p_kc, c * NCB + o_c, n_cmp, D, False, SPLIT)
        ms, ls = _lse_chunks(qs, b_kh, b_kl, ms, ls, toks, c * NCB + o_c, BS, NSUB, False, SPLIT, PREC)
    for c in range(n_full, tl.cdiv(n_cmp, NCB)):
        b_kh, b_kl = _load_chunk(kc_hi, kc_lo, p_kc, c * NCB + o_c, n_cmp, D, True, SPLIT)
        ms, ls = _lse_chunks(qs, b_kh, b_kl, ms, ls, toks, c * NCB + o_c, BS, NSUB, True, SPLIT, PREC)
    o_head = tl.arange(0, RS) % GP
    for s in tl.static_range(NSUB):
        b_lse = tl.where((ls[s] > 0) & (o_head < G), ms[s] + tl.log2(tl.where(ls[s] > 0, ls[s], 1.0)), LSE_NONE)
        tl.store(lse + (i_bh.to(tl.int64) * T + toks[s]) * GP + o_head, b_lse, mask=toks[s] < T)


@triton.autotune(configs=configs(CANDIDATES), key=["GP", "D", "BS", "LOG_SR", "SPLIT"])
@triton.jit(do_not_specialize=["T", "NBC", "K1", "TOPK"])
def select_blocks_kernel(
    q,
    kc_hi,
    kc_lo,
    lse,
    idx,
    T,
    NBC,
    K1,
    TOPK,
    stride_qb,
    stride_qt,
    stride_qh,
    HKV: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    LOG_SR: tl.constexpr,
    SPLIT: tl.constexpr,
    PREC: tl.constexpr,
    MAX_RS: tl.constexpr,
    TOK: tl.constexpr,
    LOG_NC: tl.constexpr,
):
    """Pass 2 and the top-k: importance of every earlier block per token, the best ``K1`` kept."""
    LOG_C: tl.constexpr = LOG_NC if LOG_NC > LOG_SR else LOG_SR  # a chunk holds at least one slab
    NCB: tl.constexpr = 1 << LOG_C
    RS: tl.constexpr = MAX_RS if TOK * GP > MAX_RS else TOK * GP  # rows per sub-tile
    NSUB: tl.constexpr = TOK * GP // RS
    i_bh, i_b, i_h, t0, t_last, p_kc = _program_tokens(T, NBC, HKV, D, TOK)

    # ---- the rows: q, and -lse as the operand of a K=16 matmul
    qs = ()
    toks = ()
    nls = ()
    for s in tl.static_range(NSUB):
        b_q, o_tok, o_head = _row_tile(q, i_b, i_h, t0, T, stride_qb, stride_qt, stride_qh, s, G, GP, D, RS, NSUB)
        b_lse = tl.load(lse + (i_bh.to(tl.int64) * T + o_tok) * GP + o_head, mask=o_tok < T, other=LSE_NONE)
        qs = qs + (b_q,)
        toks = toks + (o_tok,)
        nls = nls + (_neg_lse_rows(b_lse, kc_hi.dtype.element_ty),)
    b_one = (tl.arange(0, 16)[None, :] < 3).to(kc_hi.dtype.element_ty) + tl.zeros([NCB, 16], kc_hi.dtype.element_ty)

    # ---- importance per (block, token) and the exact streaming top-k, diagonal chunk first
    o_c = tl.arange(0, NCB)
    o_t = t0 + tl.arange(0, TOK)
    n_ear = t_last // BS
    n_clean = (t0 // BS) // NCB  # chunks strictly before every token's own block: no mask
    c_v = tl.full([NCB, TOK], -1.0, dtype=tl.float32)
    c_j = tl.full([NCB, TOK], -1, dtype=tl.int32)
    for c in range(n_clean, tl.cdiv(n_ear, NCB)):
        o_j = c * NCB + o_c
        b_kh, b_kl = _load_chunk(kc_hi, kc_lo, p_kc, o_j, n_ear, D, True, SPLIT)
        b_imp = _importance_chunks(b_kh, b_kl, b_one, qs, nls, toks, o_j, o_c, BS, GP, NSUB, True, SPLIT, PREC)
        # -1: not a candidate (not strictly earlier); a valid block of importance 0 can still be picked
        x_v = tl.where(o_j[:, None] < (o_t // BS)[None, :], b_imp, -1.0)
        c_v, c_j = _top_k_update(c_v, c_j, x_v, tl.broadcast_to(o_j[:, None], [NCB, TOK]), o_c, LOG_SR)
    for c in range(n_clean):
        o_j = c * NCB + o_c
        b_kh, b_kl = _load_chunk(kc_hi, kc_lo, p_kc, o_j, n_ear, D, False, SPLIT)
        b_imp = _importance_chunks(b_kh, b_kl, b_one, qs, nls, toks, o_j, o_c, BS, GP, NSUB, False, SPLIT, PREC)
        c_v, c_j = _top_k_update(c_v, c_j, b_imp, tl.broadcast_to(o_j[:, None], [NCB, TOK]), o_c, LOG_SR)
    c_v, c_j = _merge_slabs(c_v, c_j, o_c, LOG_SR, LOG_C)

    # ---- output: own block, then the best K1 by descending importance (rows 0.. of slab 0)
    m_t = o_t < T
    p_idx = idx + ((i_b * T + o_t).to(tl.int64) * HKV + i_h) * TOPK
    tl.store(p_idx, (o_t // BS).to(tl.int64), mask=m_t)
    b_blk = tl.where(c_v >= 0, c_j, -1).to(tl.int64)
    tl.store(p_idx[None, :] + 1 + o_c[:, None], b_blk, mask=m_t[None, :] & (o_c < K1)[:, None])


def pool_blocks(k: torch.Tensor, block_size: int, dtype: torch.dtype, split: bool):
    """``scale * log2(e) * mean`` of every complete block's keys as ``[b, hkv, s // bs, d]`` (hi, lo)."""
    b, s, hkv, d = k.shape
    nbc = s // block_size
    kc_hi = torch.empty(b, hkv, nbc, d, dtype=dtype, device=k.device)
    kc_lo = torch.empty_like(kc_hi) if split else kc_hi
    nb = 16
    mean_pool_kernel[(cdiv(nbc, nb), b * hkv)](
        k, kc_hi, kc_lo, nbc, k.stride(0), k.stride(1), k.stride(2), softmax_scale(d) * LOG2E / block_size,
        HKV=hkv, D=d, BS=block_size, NB=nb, SPLIT=split,
    )
    return kc_hi, kc_lo


def mean_pool_blocks(k: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of every complete block's keys, float32: ``[b, s, hkv, d] -> [b, hkv, s // bs, d]``."""
    b, s, hkv, d = k.shape
    nbc = s // block_size
    blocks = k[:, : nbc * block_size].reshape(b, nbc, block_size, hkv, d)
    return blocks.float().mean(dim=2).permute(0, 2, 1, 3).contiguous()


def select_blocks_fwd(q: torch.Tensor, k: torch.Tensor, block_size: int, top_k: int) -> torch.Tensor:
    """Launcher. q ``[b, s, hq, d]``, k ``[b, s, hkv, d]`` (head dims contiguous) -> idx int64."""
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
    split = q.dtype != torch.float32 and SPLIT_SCORES
    kc_hi, kc_lo = pool_blocks(k, block_size, q.dtype, split)
    gp = next_pow2(g)
    lse = torch.empty(b * hkv, s, gp, dtype=torch.float32, device=q.device)
    grid = lambda meta: (cdiv(s, meta["TOK"]), b * hkv)
    common = dict(HKV=hkv, G=g, GP=gp, D=d, BS=block_size, SPLIT=split, PREC=dot_precision(q.dtype), MAX_RS=ROWS)
    lse_kernel[grid](q, kc_hi, kc_lo, lse, s, nbc, q.stride(0), q.stride(1), q.stride(2), **common)
    sr = max(16, next_pow2(k1))
    select_blocks_kernel[grid](
        q,
        kc_hi,
        kc_lo,
        lse,
        idx,
        s,
        nbc,
        k1,
        top_k,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        LOG_SR=sr.bit_length() - 1,
        **common,
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
        q, k = last_dim_contiguous(q.to(dtype)), last_dim_contiguous(k.to(dtype))
        if next_pow2(top_k - 1) > MAX_KP:
            return select_blocks_torch(q, k, block_size, top_k)
        return select_blocks_fwd(q, k, block_size, top_k)
