"""Key-block-major inverse of a block selection, for the dK/dV kernel: a counting sort in 4 launches.

``idx [B, T, HKV, K]`` says which blocks each token attends; the backward wants, per key block,
the tokens that attend it. Bins are (batch x KV head, token range, block); a selection entry
``(b, t, h, slot) -> blk`` falls in bin ``((b * HKV + h) * NR + t // RT) * NB + blk`` (``_entry_bins``).

1. ``inverse_hist_kernel``: count entries per bin (int32 atomics: the counts do not depend on the order);
2. ``inverse_scan_kernel``: one program scans the counts -> bin starts (= scatter cursors), and the
   number of dK/dV work items per bin (``cdiv(count, chunk)``) -> each bin's first item; total items;
3. ``inverse_scatter_kernel``: every entry takes a slot in its bin (atomic cursor) and writes its
   token there; the order inside a bin is arbitrary (the atomic dK/dV sum does not care);
   ``stable=True`` instead writes each entry's bin (``inverse_keys_kernel``) and stable-sorts the
   entries by it (``torch.sort``): a bin's tokens come out in increasing order, the same every run;
4. ``inverse_items_kernel``: writes the work items ``(bin, start, end)``, at most ``chunk`` tokens
   each, so a block that every token selects (a sink block) spreads over many programs.

No host sync: the item arrays have a static upper bound ``cdiv(B*T*HKV*K, chunk) + bins`` of
entries; the dK/dV kernel reads the true count from ``n_items`` on the device.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ssa_kernels._utils import cdiv, next_pow2

# Tokens per dK/dV work item.
ITEM_TOKENS = 128
# Bins per program of the scan and items kernels.
SCAN_BLOCK = 1024


@triton.jit
def _entry_bins(idx, T, TOPK, NB, NR, RT, HKV: tl.constexpr, BTT: tl.constexpr, KK: tl.constexpr):
    """This program's ``[BTT, KK]`` selection entries (``BTT`` tokens x the slots of one KV head).

    Returns (bin, valid, token, entry offset into ``idx``, in range); ``valid`` drops unused (-1) slots.
    """
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HKV, i_bh % HKV
    o_t = i_t * BTT + tl.arange(0, BTT)
    o_k = tl.arange(0, KK)
    m_e = (o_t < T)[:, None] & (o_k < TOPK)[None, :]
    o_e = ((i_b * T + o_t).to(tl.int64) * HKV + i_h)[:, None] * TOPK + o_k[None, :]
    # [BTT, KK]
    b_blk = tl.load(idx + o_e, mask=m_e, other=-1).to(tl.int32)
    m = m_e & (b_blk >= 0) & (b_blk < NB)
    b_bin = (i_bh * NR + o_t // RT)[:, None] * NB + b_blk
    return b_bin, m, o_t, o_e, m_e


@triton.jit(do_not_specialize=["T", "TOPK", "NB", "NR", "RT"])
def inverse_hist_kernel(idx, counts, T, TOPK, NB, NR, RT, HKV: tl.constexpr, BTT: tl.constexpr, KK: tl.constexpr):
    b_bin, m, _, _, _ = _entry_bins(idx, T, TOPK, NB, NR, RT, HKV, BTT, KK)
    tl.atomic_add(counts + b_bin, tl.full([BTT, KK], 1, tl.int32), mask=m, sem="relaxed")


@triton.jit(do_not_specialize=["T", "TOPK", "NB", "NR", "RT"])
def inverse_scatter_kernel(
    idx, cursor, tok, T, TOPK, NB, NR, RT, HKV: tl.constexpr, BTT: tl.constexpr, KK: tl.constexpr
):
    b_bin, m, o_t, _, _ = _entry_bins(idx, T, TOPK, NB, NR, RT, HKV, BTT, KK)
    # [BTT, KK] slot of each entry inside its bin: whichever program's atomic comes first
    b_pos = tl.atomic_add(cursor + b_bin, tl.full([BTT, KK], 1, tl.int32), mask=m, sem="relaxed")
    b_tok = tl.zeros([BTT, KK], dtype=tl.int32) + o_t[:, None]
    tl.store(tok + b_pos, b_tok, mask=m)


@triton.jit(do_not_specialize=["T", "TOPK", "NB", "NR", "RT", "NBINS"])
def inverse_keys_kernel(
    idx, keys, T, TOPK, NB, NR, RT, NBINS, HKV: tl.constexpr, BTT: tl.constexpr, KK: tl.constexpr
):
    """The stable path's sort keys: each entry's bin, ``NBINS`` (after every bin) for unused slots."""
    b_bin, m, _, o_e, m_e = _entry_bins(idx, T, TOPK, NB, NR, RT, HKV, BTT, KK)
    tl.store(keys + o_e, tl.where(m, b_bin, NBINS), mask=m_e)


@triton.jit(do_not_specialize=["NBINS"])
def inverse_scan_kernel(counts, starts, cursor, item_first, n_items, NBINS, CT: tl.constexpr, SB: tl.constexpr):
    # one program: exclusive scans of the bin counts and of the bins' item counts
    b_cc = tl.zeros([1], dtype=tl.int32)
    b_ci = tl.zeros([1], dtype=tl.int32)
    for b0 in range(0, NBINS, SB):
        o_n = b0 + tl.arange(0, SB)
        m_n = o_n < NBINS
        b_c = tl.load(counts + o_n, mask=m_n, other=0)
        b_n = (b_c + CT - 1) // CT
        b_st = b_cc + tl.cumsum(b_c, 0) - b_c
        tl.store(starts + o_n, b_st, mask=m_n)
        tl.store(cursor + o_n, b_st, mask=m_n)
        tl.store(item_first + o_n, b_ci + tl.cumsum(b_n, 0) - b_n, mask=m_n)
        b_cc += tl.sum(b_c, 0)
        b_ci += tl.sum(b_n, 0)
    tl.store(n_items + tl.arange(0, 1), b_ci)


@triton.jit(do_not_specialize=["NBINS"])
def inverse_items_kernel(
    counts, starts, item_first, item_bin, item_start, item_end, NBINS, CT: tl.constexpr, SB: tl.constexpr
):
    o_n = tl.program_id(0) * SB + tl.arange(0, SB)
    m_n = o_n < NBINS
    b_c = tl.load(counts + o_n, mask=m_n, other=0)
    b_st = tl.load(starts + o_n, mask=m_n, other=0)
    b_fi = tl.load(item_first + o_n, mask=m_n, other=0)
    b_n = (b_c + CT - 1) // CT
    for j in range(tl.max(b_n, 0)):
        m_j = m_n & (b_n > j)
        b_s0 = b_st + j * CT
        tl.store(item_bin + b_fi + j, o_n, mask=m_j)
        tl.store(item_start + b_fi + j, b_s0, mask=m_j)
        tl.store(item_end + b_fi + j, tl.minimum(b_s0 + CT, b_st + b_c), mask=m_j)


class InverseIndex(NamedTuple):
    """A selection as dK/dV work items: item ``i < n_items[0]`` covers the tokens
    ``tok[item_start[i]:item_end[i]]`` of bin ``item_bin[i]``; bin ``j``'s items are
    ``item_first[j] .. item_first[j] + cdiv(counts[j], chunk) - 1``, in token order."""

    tok: torch.Tensor  # [entries] int32, grouped by bin
    item_bin: torch.Tensor  # [items upper bound] int32 (entries past n_items are zero)
    item_start: torch.Tensor
    item_end: torch.Tensor
    n_items: torch.Tensor  # [1] int32, on the device
    n_ranges: int
    counts: torch.Tensor  # [bins] int32 entries per bin
    item_first: torch.Tensor  # [bins] int32 first work item of each bin
    chunk: int  # at most this many tokens per item
    stable: bool  # tokens in increasing order inside each bin


def build_inverse_index(
    idx: torch.Tensor, seq_len: int, block_size: int, chunk: int = ITEM_TOKENS, range_tokens: int = 0,
    stable: bool = False,
) -> InverseIndex:
    """Key-block-major view of a selection as dK/dV work items, on the device, without host sync.

    Args:
        idx: ``[B, T, HKV, K]`` int32/int64 selected blocks (-1 = unused slot).
        seq_len: T. block_size: tokens per key block.
        chunk: at most this many tokens per work item.
        range_tokens: bin tokens also by ``t // range_tokens`` (0: one range), so the items that run
            together read one window of q/dO rows.
        stable: list each bin's tokens in increasing order (a stable sort instead of the atomic
            scatter), so the index, and every work item, is the same in every run.

    Returns:
        an :class:`InverseIndex`.
    """
    b, t, hkv, top_k = idx.shape
    dev = idx.device
    idx = idx.contiguous()
    nb = cdiv(seq_len, block_size)
    rt = range_tokens if 0 < range_tokens < t else t
    n_ranges = cdiv(t, rt)
    nbins = b * hkv * n_ranges * nb
    n_ub = cdiv(b * t * hkv * top_k, chunk) + nbins
    counts = torch.zeros(nbins, dtype=torch.int32, device=dev)
    kk = next_pow2(top_k)
    btt = max(1, 1024 // kk)
    grid = (cdiv(t, btt), b * hkv)
    entries = dict(HKV=hkv, BTT=btt, KK=kk)
    inverse_hist_kernel[grid](idx, counts, t, top_k, nb, n_ranges, rt, **entries)
    starts = torch.empty(nbins, dtype=torch.int32, device=dev)
    cursor = torch.empty(nbins, dtype=torch.int32, device=dev)
    first = torch.empty(nbins, dtype=torch.int32, device=dev)
    n_items = torch.empty(1, dtype=torch.int32, device=dev)
    inverse_scan_kernel[(1,)](counts, starts, cursor, first, n_items, nbins, CT=chunk, SB=SCAN_BLOCK)
    if stable:
        # the entries sorted by bin, stably: inside a bin, in idx's memory order, i.e. by token
        keys = torch.empty(b * t * hkv * top_k, dtype=torch.int32, device=dev)
        inverse_keys_kernel[grid](idx, keys, t, top_k, nb, n_ranges, rt, nbins, **entries)
        order = torch.sort(keys, stable=True).indices
        tok = (order // (hkv * top_k) % t).to(torch.int32)  # entry (b, t, h, slot) -> t
    else:
        tok = torch.empty(max(1, b * t * hkv * top_k), dtype=torch.int32, device=dev)
        inverse_scatter_kernel[grid](idx, cursor, tok, t, top_k, nb, n_ranges, rt, **entries)
    items = torch.zeros(3, n_ub, dtype=torch.int32, device=dev)
    inverse_items_kernel[(cdiv(nbins, SCAN_BLOCK),)](
        counts, starts, first, items[0], items[1], items[2], nbins, CT=chunk, SB=SCAN_BLOCK
    )
    return InverseIndex(tok, items[0], items[1], items[2], n_items, n_ranges, counts, first, chunk, stable)
