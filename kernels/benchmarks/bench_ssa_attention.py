"""SSA kernels at real sizes: correctness vs a float32 reference, then timings vs dense SDPA and FlexAttention.

Shape: the paper's 1B layer (32 query heads, 2 KV heads, head_dim 64, bf16), batch = max(1, 16k / seq)
(2 x 8k, 1 x 32k, 1 x 128k), block_size 16 and 64, receptive field 256 and 1024 tokens.

    PYTHONPATH=.:kernels python kernels/benchmarks/bench_ssa_attention.py --out docs/benchmarks \
        --before docs/benchmarks/kernels.json
    # issue 10's table in one run (estimated 4-5 min on an H100/H200; --budget-s bounds it):
    python kernels/benchmarks/bench_ssa_attention.py --sections check,time,prefill,layer --deterministic \
        --budget-s 300 --out OUT
    # re-render the markdown on any machine (no GPU) from the JSONs of two runs:
    git show HEAD:docs/benchmarks/kernels.json > /tmp/kernels_before.json
    python kernels/benchmarks/bench_ssa_attention.py --report-only --results OUT/kernels.json \
        --before /tmp/kernels_before.json --out docs/benchmarks

Measuring and reporting are split: this script measures and writes ``kernels.json`` (saved after
every item, so a crash keeps what ran); ``report_ssa_attention.py`` renders ``kernels.md`` from it,
with a "before" column from ``--before`` (an earlier run's JSON, read at the start) beside each
timed table's headline figures.

Sections (each guarded: a failure is recorded in the JSON and the run goes on):
  check   bf16 kernels vs the torch oracle in float32 on the same inputs, at 8k and 32k; the CUDA
          caching allocator is filled with NaN before every kernel run, so an output element the
          kernel never writes shows up as NaN; relative RMS error ||x - ref|| / ||ref||.
  time    median of triton.testing.do_bench (CUDA events) for dense SDPA (every backend that takes
          the GQA problem; the fastest is the baseline), FlexAttention with the same token-level
          block pattern, and ours: select_blocks, sparse fwd, sparse fwd+bwd (+ a breakdown), peak
          memory of each, useful TFLOP/s.
  layer   one SSA training layer's attention at 8k (full SDPA + selection + sparse + alignment loss,
          fwd+bwd) vs dense SDPA fwd+bwd alone.
  prefill forward only, batch 1 at --prefill-seqs (32k, 128k), block 16 / top-16 and 64 / top-16:
          select_blocks + sparse_attention through ``ssa_megatron.ops`` (backend triton) under
          ``torch.no_grad``, timed together and apart, vs dense causal SDPA forward
          (``ops.full_attention``, every backend that takes the GQA problem, the fastest kept);
          speedup = dense / (select + sparse). Issue 10's target: >= 10x at 128k, block 16 / top-16.
          With ``check``: the same path at 1 x 8k vs the float32 oracle's selection + attention.
  select  select_blocks alone: every (block, top-k) config at every --seqs length, each autotune
          candidate of the paper's block 16 / top-16 timed on its own, the pooling kernel, and the
          exact-set check against the oracle at 8k and 32k (plus head_dim 128 and 8 heads per group).

--deterministic adds the deterministic mode (ssa.deterministic) to check and time: its errors vs the
oracle and whether two fwd+bwd give the same bits; its fwd / fwd+bwd time and peak memory beside the
default path; in the breakdown, the stable inverse index and the atomic-free dK/dV (+ reduce).

FLOPs (FlashAttention's convention): forward 4 * d * (query heads) * (attended keys), backward 2.5x
the forward. Sparse "useful" FLOPs count only the keys a query attends (its selected blocks, keys
<= the query); dense causal attends (s + 1) / 2 keys per query on average.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback

import torch
import torch.nn.functional as F
import triton

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, os.path.join(ROOT, "kernels"), HERE]

import report_ssa_attention as report  # noqa: E402
import ssa_kernels  # noqa: E402
from ssa_kernels import select as select_mod  # noqa: E402
from ssa_kernels import sparse as sparse_mod  # noqa: E402
from ssa_megatron import ops  # noqa: E402
from ssa_megatron.ops import reference  # noqa: E402

HQ, HKV, D = 32, 2, 64
G = HQ // HKV
TOKENS = 16384
CONFIGS = [(16, 16), (16, 64), (64, 4), (64, 16)]  # (block_size, top_k): receptive field 256 / 1024
PREFILL_CONFIGS = [(16, 16), (64, 16)]  # the paper's block 16 / top-16 (issue 10's target), and block 64 / top-16
DTYPE = torch.bfloat16
# The benchmark is for CUDA; on CPU (tests: tiny sizes, kernels under TRITON_INTERPRET=1) a timing is
# one wall-clock call, peak memory is not measured and nothing is NaN-poisoned.
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def log(*a):
    print(*a, flush=True)


# ----------------------------------------------------------------------------- helpers


def batch_for(seq: int) -> int:
    return max(1, TOKENS // seq)


def make_qkv(b: int, s: int, seed: int = 0, requires_grad: bool = False):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    mk = lambda h: torch.randn(b, s, h, D, generator=gen, device=DEV, dtype=torch.float32).to(DTYPE)
    q, k, v = mk(HQ), mk(HKV), mk(HKV)
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


def poison():
    """Fill the caching allocator's free memory with NaN: outputs allocated next start as NaN."""
    if DEV != "cuda":
        return
    torch.cuda.synchronize()
    free, _ = torch.cuda.mem_get_info()
    n = int(min(free * 0.6, 24e9)) // 4
    x = torch.empty(n, dtype=torch.float32, device=DEV)
    x.fill_(float("nan"))
    del x
    torch.cuda.synchronize()


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def bench_ms(fn, grad_to_none=None) -> float:
    if DEV != "cuda":  # CPU (tests, kernels interpreted: the figure means nothing): one wall-clock call
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def peak_mib(fn) -> float | None:
    """Peak memory allocated during fn beyond what was allocated before it, MiB (None off CUDA)."""
    if DEV != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def attended_keys(idx: torch.Tensor, block_size: int) -> int:
    """Sum over (batch, token, KV head) of the keys a query attends: selected blocks, keys <= token."""
    total = 0
    s = idx.shape[1]
    for start in range(0, s, 8192):
        sel = idx[:, start : start + 8192]
        t = torch.arange(start, start + sel.shape[1], device=idx.device)[None, :, None, None]
        n = (t - sel * block_size + 1).clamp(0, block_size)
        total += int(torch.where(sel >= 0, n, 0).sum())
    return total


def sparse_fwd_flops(idx: torch.Tensor, block_size: int) -> float:
    return 4.0 * D * G * attended_keys(idx, block_size)


def dense_fwd_flops(b: int, s: int) -> float:
    return 4.0 * D * HQ * b * s * (s + 1) / 2


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


# ----------------------------------------------------------------------------- dense SDPA


def sdpa_backends():
    from torch.nn.attention import SDPBackend

    if DEV != "cuda":
        return {"math": SDPBackend.MATH}
    return {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }


def sdpa(qt, kt, vt):
    """Causal GQA attention on [b, h, s, d] tensors."""
    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)


def time_dense(b: int, s: int) -> dict:
    from torch.nn.attention import sdpa_kernel

    q, k, v = make_qkv(b, s, seed=1)
    qt, kt, vt = (t.transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    do = torch.randn_like(qt)
    flops = dense_fwd_flops(b, s)
    out = {"fwd_flops": flops, "backends": {}}
    for name, backend in sdpa_backends().items():
        try:
            with sdpa_kernel([backend]):
                fwd = lambda: sdpa(qt, kt, vt)
                fwd_bwd = lambda: sdpa(qt, kt, vt).backward(do)
                fwd_bwd()
                r = {"fwd_ms": bench_ms(fwd), "fwd_bwd_ms": bench_ms(fwd_bwd, grad_to_none=[qt, kt, vt])}
                r["fwd_tflops"] = tflops(flops, r["fwd_ms"])
                r["fwd_bwd_tflops"] = tflops(3.5 * flops, r["fwd_bwd_ms"])
                r["fwd_bwd_peak_mib"] = peak_mib(fwd_bwd)
                out["backends"][name] = r
                log(f"  dense {name:9s} b{b} s{s}: fwd {r['fwd_ms']:.3f} ms ({r['fwd_tflops']:.0f} TF/s)  "
                    f"fwd+bwd {r['fwd_bwd_ms']:.3f} ms ({r['fwd_bwd_tflops']:.0f} TF/s)")
        except Exception as e:  # a backend that refuses the GQA problem
            out["backends"][name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        qt.grad = kt.grad = vt.grad = None
    ok = {n: r for n, r in out["backends"].items() if "fwd_bwd_ms" in r}
    if ok:
        best = min(ok, key=lambda n: ok[n]["fwd_bwd_ms"])
        out["best"] = best
        out.update({k: v for k, v in ok[best].items()})
    return out


# ----------------------------------------------------------------------------- ours


def time_ours(b: int, s: int, block_size: int, top_k: int, breakdown: bool, deterministic: bool = False) -> dict:
    q, k, v = make_qkv(b, s, seed=2, requires_grad=True)
    qd, kd = q.detach(), k.detach()
    idx = ssa_kernels.select_blocks(qd, kd, block_size, top_k)
    fwd_flops = sparse_fwd_flops(idx, block_size)
    do = torch.randn_like(q)
    r = {"fwd_flops": fwd_flops, "attended_keys_per_query": attended_keys(idx, block_size) / (b * s * HKV)}
    sel = lambda: ssa_kernels.select_blocks(qd, kd, block_size, top_k)
    fwd = lambda: ssa_kernels.sparse_attention(q, k, v, idx, block_size)
    fwd_bwd = lambda: ssa_kernels.sparse_attention(q, k, v, idx, block_size).backward(do)
    fwd_bwd()
    r["select_ms"] = bench_ms(sel)
    r["fwd_ms"] = bench_ms(fwd)
    r["fwd_bwd_ms"] = bench_ms(fwd_bwd, grad_to_none=[q, k, v])
    r["fwd_tflops"] = tflops(fwd_flops, r["fwd_ms"])
    r["fwd_bwd_tflops"] = tflops(3.5 * fwd_flops, r["fwd_bwd_ms"])
    r["select_peak_mib"] = peak_mib(sel)
    r["fwd_bwd_peak_mib"] = peak_mib(fwd_bwd)
    q.grad = k.grad = v.grad = None
    if deterministic:
        fwd_det = lambda: ssa_kernels.sparse_attention(q, k, v, idx, block_size, deterministic=True)
        fwd_bwd_det = lambda: fwd_det().backward(do)
        fwd_bwd_det()
        r["det_fwd_ms"] = bench_ms(fwd_det)
        r["det_fwd_bwd_ms"] = bench_ms(fwd_bwd_det, grad_to_none=[q, k, v])
        r["det_fwd_bwd_peak_mib"] = peak_mib(fwd_bwd_det)
        r["det_bitwise_repeat"] = bitwise_repeat(q, k, v, idx, block_size, do)
        q.grad = k.grad = v.grad = None
    if breakdown:
        with torch.no_grad():
            o, lse = sparse_mod.sparse_attention_fwd(qd, kd, v.detach(), idx, block_size)
            dq, delta = sparse_mod.sparse_attention_bwd_dq(qd, kd, v.detach(), idx, o, lse, do, block_size)
            r["bwd_dq_ms"] = bench_ms(lambda: sparse_mod.sparse_attention_bwd_dq(qd, kd, v.detach(), idx, o, lse, do, block_size))
            # dK/dV work-item size and token ranges of the inverse index: default, then variants
            for tag, chunk, rt in (("", sparse_mod.ITEM_TOKENS, sparse_mod.RANGE_TOKENS), ("_chunk256", 256, 0),
                                   ("_chunk64", 64, 0), ("_ranges2k", sparse_mod.ITEM_TOKENS, 2048)):
                inv = sparse_mod.build_inverse_index(idx, s, block_size, chunk=chunk, range_tokens=rt)
                r[f"bwd_index{tag}_ms"] = bench_ms(
                    lambda: sparse_mod.build_inverse_index(idx, s, block_size, chunk=chunk, range_tokens=rt))
                r[f"bwd_dkdv{tag}_ms"] = bench_ms(
                    lambda: sparse_mod.sparse_attention_bwd_dkdv(qd, kd, v.detach(), do, lse, delta, inv, block_size)
                )
            if deterministic:  # the stable index, and the dK/dV partials + their ordered sum
                stable = lambda: sparse_mod.build_inverse_index(idx, s, block_size, sparse_mod.ITEM_TOKENS, stable=True)
                inv = stable()
                r["bwd_index_stable_ms"] = bench_ms(stable)
                r["bwd_dkdv_det_ms"] = bench_ms(
                    lambda: sparse_mod.sparse_attention_bwd_dkdv(qd, kd, v.detach(), do, lse, delta, inv, block_size)
                )
            r.update(select_floors(qd, kd, block_size, sel))
    log(f"  ours bs{block_size:3d} k{top_k:3d} b{b} s{s}: select {r['select_ms']:.3f}  fwd {r['fwd_ms']:.3f} "
        f"({r['fwd_tflops']:.0f} TF/s)  fwd+bwd {r['fwd_bwd_ms']:.3f} ({r['fwd_bwd_tflops']:.0f} TF/s)  "
        f"peak {r['fwd_bwd_peak_mib']:.0f} MiB"
        + (f"  [dq {r['bwd_dq_ms']:.3f} index {r['bwd_index_ms']:.3f} dkdv {r['bwd_dkdv_ms']:.3f} "
           f"(chunk256 {r['bwd_dkdv_chunk256_ms']:.3f}, chunk64 {r['bwd_dkdv_chunk64_ms']:.3f}, ranges2k "
           f"{r['bwd_dkdv_ranges2k_ms']:.3f}) select-1dot {r.get('select_single_dot_ms', float('nan')):.3f} "
           f"select-top2 {r['select_topk2_ms']:.3f}]"
           if breakdown else "")
        + (f"  | deterministic: fwd {r['det_fwd_ms']:.3f} fwd+bwd {r['det_fwd_bwd_ms']:.3f} peak "
           f"{r['det_fwd_bwd_peak_mib']:.0f} MiB, same bits twice: {r['det_bitwise_repeat']}"
           + (f" [index {r['bwd_index_stable_ms']:.3f} dkdv+reduce {r['bwd_dkdv_det_ms']:.3f}]" if breakdown else "")
           if deterministic else ""))
    return r


def bitwise_repeat(q, k, v, idx, block_size: int, do) -> bool:
    """Two deterministic fwd+bwd on the same inputs: identical output and gradients, bit for bit."""
    runs = []
    for _ in range(2):
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        o = ssa_kernels.sparse_attention(qq, kk, vv, idx, block_size, deterministic=True)
        runs.append((o, *torch.autograd.grad(o, (qq, kk, vv), do)))
    return all(torch.equal(x, y) for x, y in zip(*runs))


# ----------------------------------------------------------------------------- FlexAttention


_FLEX = {}


def time_flex(b: int, s: int, block_size: int, top_k: int) -> dict:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    flex = _FLEX["fn"]
    q, k, v = make_qkv(b, s, seed=2)
    idx = ssa_kernels.select_blocks(q, k, block_size, top_k)
    fwd_flops = sparse_fwd_flops(idx, block_size)
    nb = -(-s // block_size)
    t0 = time.time()
    # token-level pattern: [b, hkv, s, nb + 1] selected-block table (column nb absorbs the -1 slots)
    table = torch.zeros(b, HKV, s, nb + 1, dtype=torch.bool, device=DEV)
    sel = idx.permute(0, 2, 1, 3)
    table.scatter_(3, torch.where(sel >= 0, sel, nb), True)
    table = table[..., :nb].contiguous()
    bs_, g_ = block_size, G

    def mask_mod(bb, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & table[bb, h // g_, q_idx, kv_idx // bs_]

    block_mask = create_block_mask(mask_mod, b, HQ, s, s, device=DEV, _compile=True)
    torch.cuda.synchronize()
    r = {"mask_build_s": time.time() - t0, "fwd_flops": fwd_flops}
    qt, kt, vt = (t.transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    do = torch.randn_like(qt)
    fwd = lambda: flex(qt, kt, vt, block_mask=block_mask, enable_gqa=True)
    fwd_bwd = lambda: flex(qt, kt, vt, block_mask=block_mask, enable_gqa=True).backward(do)
    t0 = time.time()
    fwd_bwd()
    torch.cuda.synchronize()
    r["first_call_s"] = time.time() - t0
    r["fwd_ms"] = bench_ms(fwd)
    r["fwd_bwd_ms"] = bench_ms(fwd_bwd, grad_to_none=[qt, kt, vt])
    r["fwd_tflops"] = tflops(fwd_flops, r["fwd_ms"])
    r["fwd_bwd_tflops"] = tflops(3.5 * fwd_flops, r["fwd_bwd_ms"])
    r["fwd_bwd_peak_mib"] = peak_mib(fwd_bwd)
    # check flex computes the same function (a cheap cross-check of both)
    with torch.no_grad():
        o_flex = fwd().transpose(1, 2)
        o_ours = ssa_kernels.sparse_attention(q, k, v, idx, block_size)
        r["rel_err_vs_ours"] = rel_err(o_flex, o_ours)
    log(f"  flex bs{block_size:3d} k{top_k:3d} b{b} s{s}: mask {r['mask_build_s']:.1f}s  fwd {r['fwd_ms']:.3f} "
        f"({r['fwd_tflops']:.0f} TF/s)  fwd+bwd {r['fwd_bwd_ms']:.3f} ({r['fwd_bwd_tflops']:.0f} TF/s)  "
        f"vs ours {r['rel_err_vs_ours']:.1e}")
    return r


# ----------------------------------------------------------------------------- SSA layer


def time_ssa_layer(b: int, s: int, block_size: int, top_k: int, backend) -> dict:
    from torch.nn.attention import sdpa_kernel

    q, k, v = make_qkv(b, s, seed=3, requires_grad=True)
    do = torch.randn(b, s, HQ, D, device=DEV, dtype=DTYPE)
    one = torch.ones((), device=DEV)

    def dense():
        o = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        o.backward(do)

    def layer():
        # full stream on [b, h, s, d] views, sparse stream on [b, s, h, d]; gradient from the main
        # stream (full mode) plus the alignment loss into both streams
        o_full = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        idx = ssa_kernels.select_blocks(q.detach(), k.detach(), block_size, top_k)
        o_sparse = ssa_kernels.sparse_attention(q, k, v, idx, block_size)
        loss = ssa_kernels.alignment_loss(o_full, o_sparse)
        torch.autograd.backward([o_full, loss], [do, one])

    with sdpa_kernel([backend]):
        dense()
        layer()
        r = {"dense_fwd_bwd_ms": bench_ms(dense, grad_to_none=[q, k, v]),
             "ssa_layer_fwd_bwd_ms": bench_ms(layer, grad_to_none=[q, k, v])}
        r["ssa_layer_peak_mib"] = peak_mib(layer)
    r["ratio"] = r["ssa_layer_fwd_bwd_ms"] / r["dense_fwd_bwd_ms"]
    # the torch alignment loss, for comparison
    o1 = torch.randn(b, s, HQ, D, device=DEV, dtype=DTYPE, requires_grad=True)
    o2 = torch.randn(b, s, HQ, D, device=DEV, dtype=DTYPE, requires_grad=True)
    r["align_triton_fwd_bwd_ms"] = bench_ms(lambda: ssa_kernels.alignment_loss(o1, o2).backward(), grad_to_none=[o1, o2])
    r["align_torch_fwd_bwd_ms"] = bench_ms(lambda: reference.alignment_loss(o1, o2).backward(), grad_to_none=[o1, o2])
    log(f"  SSA layer bs{block_size} k{top_k} b{b} s{s}: {r['ssa_layer_fwd_bwd_ms']:.3f} ms vs dense "
        f"{r['dense_fwd_bwd_ms']:.3f} ms -> {r['ratio']:.3f}x  (align triton {r['align_triton_fwd_bwd_ms']:.3f} "
        f"/ torch {r['align_torch_fwd_bwd_ms']:.3f} ms)")
    return r


def profile_layer(b: int, s: int, block_size: int, top_k: int, backend) -> dict:
    """CUDA time per kernel of one SSA layer fwd+bwd (torch.profiler), and CPU vs GPU wall."""
    from torch.nn.attention import sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    q, k, v = make_qkv(b, s, seed=3, requires_grad=True)
    do = torch.randn(b, s, HQ, D, device=DEV, dtype=DTYPE)
    one = torch.ones((), device=DEV)

    def layer():
        o_full = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        idx = ssa_kernels.select_blocks(q.detach(), k.detach(), block_size, top_k)
        o_sparse = ssa_kernels.sparse_attention(q, k, v, idx, block_size)
        loss = ssa_kernels.alignment_loss(o_full, o_sparse)
        torch.autograd.backward([o_full, loss], [do, one])
        q.grad = k.grad = v.grad = None

    with sdpa_kernel([backend]):
        for _ in range(3):
            layer()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                layer()
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
    log(table)
    rows = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0))
        if t:
            rows[e.key[:120]] = {"cuda_us_per_iter": t / 5, "calls_per_iter": e.count / 5}
    return {"kernels": dict(sorted(rows.items(), key=lambda kv: -kv[1]["cuda_us_per_iter"])[:40])}


# ----------------------------------------------------------------------------- sparse prefill


def prefill_fn(q, k, v, block_size: int, top_k: int):
    """The inference path of one sparse layer: selection, then attention over the selected blocks."""
    idx = ops.select_blocks(q, k, block_size, top_k, backend="triton")
    return ops.sparse_attention(q, k, v, idx, block_size, backend="triton")


@torch.no_grad()
def time_prefill_dense(b: int, s: int) -> dict:
    """Dense causal SDPA forward (``ops.full_attention``, ``[b, s, h, d]``) under each backend; the fastest."""
    from torch.nn.attention import sdpa_kernel

    q, k, v = make_qkv(b, s, seed=6)
    out = {"backends": {}}
    for name, backend in sdpa_backends().items():
        try:
            with sdpa_kernel([backend]):
                fwd = lambda: ops.full_attention(q, k, v, backend="triton")
                out["backends"][name] = {"fwd_ms": bench_ms(fwd), "fwd_peak_mib": peak_mib(fwd)}
            log(f"  prefill dense {name:9s} b{b} s{s}: fwd {out['backends'][name]['fwd_ms']:.3f} ms")
        except Exception as e:  # a backend that refuses the GQA problem
            out["backends"][name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    ok = {n: r for n, r in out["backends"].items() if "fwd_ms" in r}
    if ok:
        out["best"] = min(ok, key=lambda n: ok[n]["fwd_ms"])
        out.update(ok[out["best"]])
    return out


@torch.no_grad()
def time_prefill(b: int, s: int, block_size: int, top_k: int, dense_fwd_ms: float | None) -> dict:
    """select_blocks + sparse_attention forward, together and apart; speedup over ``dense_fwd_ms``."""
    q, k, v = make_qkv(b, s, seed=6)
    idx = ops.select_blocks(q, k, block_size, top_k, backend="triton")
    prefill = lambda: prefill_fn(q, k, v, block_size, top_k)
    # do_bench's first, untimed call compiles and autotunes
    r = {"select_ms": bench_ms(lambda: ops.select_blocks(q, k, block_size, top_k, backend="triton")),
         "sparse_fwd_ms": bench_ms(lambda: ops.sparse_attention(q, k, v, idx, block_size, backend="triton")),
         "prefill_ms": bench_ms(prefill), "prefill_peak_mib": peak_mib(prefill)}
    if dense_fwd_ms:
        r["speedup"] = dense_fwd_ms / r["prefill_ms"]
        r["sparse_only_speedup"] = dense_fwd_ms / r["sparse_fwd_ms"]
    log(f"  prefill bs{block_size:3d} k{top_k:3d} b{b} s{s}: select {r['select_ms']:.3f} + sparse fwd "
        f"{r['sparse_fwd_ms']:.3f} -> together {r['prefill_ms']:.3f} ms"
        + (f" vs dense fwd {dense_fwd_ms:.3f} ms: {r['speedup']:.1f}x (sparse fwd alone {r['sparse_only_speedup']:.1f}x)"
           if dense_fwd_ms else ""))
    return r


def check_prefill(b: int, s: int, block_size: int, top_k: int) -> dict:
    """The prefill path (bf16, no_grad, selection included) vs the float32 oracle's selection + attention.

    Also: its output equals the training forward's (autograd on, same idx) bit for bit.
    """
    q, k, v = make_qkv(b, s, seed=5)
    with torch.no_grad():
        poison()
        idx = ops.select_blocks(q, k, block_size, top_k, backend="triton")
        poison()
        o = ops.sparse_attention(q, k, v, idx, block_size, backend="triton")
        q32, k32, v32 = (t.float() for t in (q, k, v))
        ref_idx = reference.select_blocks(q32, k32, block_size, top_k)
        o_ref = reference.sparse_attention(q32, k32, v32, ref_idx, block_size)
    o_train = ssa_kernels.sparse_attention(q.clone().requires_grad_(), k, v, idx, block_size)
    same = (idx[..., 1:].sort(-1).values == ref_idx[..., 1:].sort(-1).values).all(-1)
    r = {"same_set_frac": same.float().mean().item(), "o_finite": bool(torch.isfinite(o).all()),
         "o_rel_err": rel_err(o, o_ref), "o_ref_bf16_rounding_rel_err": rel_err(o_ref.to(DTYPE), o_ref),
         "same_as_training_forward": torch.equal(o_train.detach(), o)}
    r["pass"] = bool(r["o_finite"] and r["same_set_frac"] > 0.99 and r["o_rel_err"] < 2e-2 and r["same_as_training_forward"])
    log(f"  check prefill bs{block_size} k{top_k} b{b} s{s}: pass={r['pass']} same-set {r['same_set_frac']:.5f} "
        f"rel err o {r['o_rel_err']:.1e} (bf16 floor {r['o_ref_bf16_rounding_rel_err']:.1e}), "
        f"= training forward: {r['same_as_training_forward']}")
    return r


# ----------------------------------------------------------------------------- correctness


def check(b: int, s: int, block_size: int, top_k: int, deterministic: bool = False) -> dict:
    q, k, v = make_qkv(b, s, seed=4)
    r = {}
    # selection: exact top-k vs the oracle on the same (bf16) values in float32
    poison()
    idx = ssa_kernels.select_blocks(q, k, block_size, top_k)
    ref_idx = reference.select_blocks(q.float(), k.float(), block_size, top_k)
    own = (torch.arange(s, device=DEV) // block_size)[None, :, None]
    r["select_own_block_ok"] = bool((idx[..., 0] == own).all())
    r["select_padding_ok"] = bool(torch.equal(idx[..., 1:] >= 0, ref_idx[..., 1:] >= 0))
    r["select_in_range"] = bool(((idx >= -1) & (idx < -(-s // block_size))).all())
    same = (idx[..., 1:].sort(-1).values == ref_idx[..., 1:].sort(-1).values).all(-1)
    r["select_same_set_frac"] = same.float().mean().item()
    # where sets differ: the chosen blocks' total importance vs the optimum (near-ties only)
    rows = (~same).nonzero()
    r["select_rows_differing"] = int(rows.shape[0])
    if rows.shape[0]:
        tokens = rows[:, 1].unique()[:4096]
        kc = reference.mean_pool_blocks(k.float(), block_size)
        imp = reference.block_importance(q[:, tokens].float(), kc, tokens, block_size)  # [b, c, hkv, nbc]
        pick = lambda sel: imp.gather(-1, sel[:, tokens, :, 1:].clamp(min=0)).masked_fill(sel[:, tokens, :, 1:] < 0, 0).sum(-1)
        ours, best = pick(idx), pick(ref_idx)
        r["select_max_rel_importance_shortfall"] = ((best - ours) / best.clamp_min(1e-30)).max().item()
    # sparse attention fwd+bwd in bf16 vs the oracle in float32, same idx
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    do = torch.randn_like(q)
    poison()
    o = ssa_kernels.sparse_attention(qg, kg, vg, ref_idx, block_size)
    poison()
    dq, dk, dv = torch.autograd.grad(o, (qg, kg, vg), do)
    q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
    o_ref = reference.sparse_attention(q32, k32, v32, ref_idx, block_size)
    g_ref = torch.autograd.grad(o_ref, (q32, k32, v32), do.float())
    for name, x, ref in (("o", o, o_ref), ("dq", dq, g_ref[0]), ("dk", dk, g_ref[1]), ("dv", dv, g_ref[2])):
        r[f"{name}_finite"] = bool(torch.isfinite(x).all())
        r[f"{name}_rel_err"] = rel_err(x, ref)
    det_ok = True
    if deterministic:
        poison()
        o_det = ssa_kernels.sparse_attention(qg, kg, vg, ref_idx, block_size, deterministic=True)
        poison()
        g_det = torch.autograd.grad(o_det, (qg, kg, vg), do)
        for name, x, ref in (("o", o_det, o_ref), ("dq", g_det[0], g_ref[0]), ("dk", g_det[1], g_ref[1]), ("dv", g_det[2], g_ref[2])):
            r[f"det_{name}_rel_err"] = rel_err(x, ref) if bool(torch.isfinite(x).all()) else float("nan")
        r["det_bitwise_repeat"] = bitwise_repeat(q, k, v, ref_idx, block_size, do)
        det_ok = r["det_bitwise_repeat"] and all(r[f"det_{n}_rel_err"] < 2e-2 for n in ("o", "dq", "dk", "dv"))
        del o_det, g_det
    # the bf16 forward's error relative to rounding the fp32 reference to bf16 (the floor)
    r["o_ref_bf16_rounding_rel_err"] = rel_err(o_ref.to(DTYPE), o_ref)
    # alignment loss
    o2 = torch.randn_like(o)
    poison()
    a = ssa_kernels.alignment_loss(o.detach(), o2)
    r["align_rel_err"] = abs(a.item() - reference.alignment_loss(o.detach(), o2).item()) / a.item()
    r["pass"] = bool(
        r["select_own_block_ok"] and r["select_padding_ok"] and r["select_in_range"]
        and r["select_same_set_frac"] > 0.99
        and all(r[f"{n}_finite"] and r[f"{n}_rel_err"] < 2e-2 for n in ("o", "dq", "dk", "dv"))
        and r["align_rel_err"] < 1e-4
        and det_ok
    )
    log(f"  check bs{block_size} k{top_k} b{b} s{s}: pass={r['pass']} same-set {r['select_same_set_frac']:.5f} "
        f"shortfall {r.get('select_max_rel_importance_shortfall', 0):.1e} | rel err o {r['o_rel_err']:.1e} "
        f"dq {r['dq_rel_err']:.1e} dk {r['dk_rel_err']:.1e} dv {r['dv_rel_err']:.1e} (bf16 floor "
        f"{r['o_ref_bf16_rounding_rel_err']:.1e})"
        + (f" | deterministic: o {r['det_o_rel_err']:.1e} dq {r['det_dq_rel_err']:.1e} dk {r['det_dk_rel_err']:.1e} "
           f"dv {r['det_dv_rel_err']:.1e}, same bits twice: {r['det_bitwise_repeat']}" if deterministic else ""))
    del o_ref, g_ref, q32, k32, v32
    torch.cuda.empty_cache()
    return r


# ----------------------------------------------------------------------------- selection alone


def _cfg_name(cfg) -> str:
    return " ".join(f"{k}={v}" for k, v in cfg.kwargs.items()) + f" warps={cfg.num_warps} stages={cfg.num_stages}" + (
        f" maxnreg={cfg.maxnreg}" if cfg.maxnreg else "")


def _with_configs(kern, cfgs, fn):
    """Run ``fn`` with the autotuner ``kern`` restricted to ``cfgs`` (its cache emptied before and after)."""
    saved, kern.configs, kern.cache = kern.configs, cfgs, {}
    try:
        return fn()
    finally:
        kern.configs, kern.cache = saved, {}


def _first_candidates(fn):
    """``fn`` with both selection kernels on their first autotune candidate (one compile per shape)."""
    return _with_configs(select_mod.lse_kernel, select_mod.LSE_CANDIDATES[:1], lambda: _with_configs(
        select_mod.select_blocks_kernel, select_mod.CANDIDATES[:1], fn))


def select_floors(q, k, block_size: int, sel) -> dict:
    """What selection costs without its top-k (the same two passes at top_k=2: one carried key) and
    with one bf16 score dot instead of the float32-grade hi + lo pair (``sel`` re-run that way)."""
    sel2 = lambda: ssa_kernels.select_blocks(q, k, block_size, 2)
    sel2()
    r = {"select_topk2_ms": bench_ms(sel2)}
    if select_mod.SPLIT_SCORES:
        select_mod.SPLIT_SCORES = False
        try:
            sel()
            r["select_single_dot_ms"] = bench_ms(sel)
        finally:
            select_mod.SPLIT_SCORES = True
    return r


def time_select(b: int, s: int, block_size: int, top_k: int, detail: bool) -> dict:
    """select_blocks at one shape: autotuned time and picks; with ``detail`` every candidate of both kernels."""
    q, k, _ = make_qkv(b, s, seed=2)
    sel = lambda: ssa_kernels.select_blocks(q, k, block_size, top_k)
    sel()
    r = {"select_ms": bench_ms(sel), "select_config": _cfg_name(select_mod.select_blocks_kernel.best_config),
         "lse_config": _cfg_name(select_mod.lse_kernel.best_config)}
    r["select_peak_mib"] = peak_mib(sel)
    r["pool_ms"] = bench_ms(lambda: select_mod.pool_blocks(k, block_size, q.dtype, True))
    if detail:
        for name, kern in (("lse", select_mod.lse_kernel), ("select", select_mod.select_blocks_kernel)):
            r[f"{name}_candidates_ms"] = {
                _cfg_name(cfg): _with_configs(kern, [cfg], lambda: (sel(), bench_ms(sel))[1]) for cfg in kern.configs}
        r.update(select_floors(q, k, block_size, sel))
    log(f"  select bs{block_size:3d} k{top_k:3d} b{b} s{s}: {r['select_ms']:.3f} ms (lse {r['lse_config']}; "
        f"select {r['select_config']}), pool {r['pool_ms']:.3f}" + "".join(
            f"\n    {n}: {c}: {ms:.3f}" for n in ("lse", "select") for c, ms in r.get(f"{n}_candidates_ms", {}).items()))
    return r


def check_select(b: int, s: int, block_size: int, top_k: int, hq: int = HQ, d: int = D) -> dict:
    """bf16 selection vs the float32 oracle on the same inputs: exact sets, and the shortfall where not."""
    gen = torch.Generator(device=DEV).manual_seed(4)
    q = torch.randn(b, s, hq, d, generator=gen, device=DEV).to(DTYPE)
    k = torch.randn(b, s, HKV, d, generator=gen, device=DEV).to(DTYPE)
    poison()
    idx = ssa_kernels.select_blocks(q, k, block_size, top_k)
    ref = reference.select_blocks(q.float(), k.float(), block_size, top_k)
    own = (torch.arange(s, device=DEV) // block_size)[None, :, None]
    r = {"own_block_ok": bool((idx[..., 0] == own).all()), "padding_ok": bool(torch.equal(idx[..., 1:] >= 0, ref[..., 1:] >= 0))}
    srt = idx[..., 1:].sort(-1).values
    r["distinct"] = bool(not ((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any())
    same = (srt == ref[..., 1:].sort(-1).values).all(-1)
    r["same_set_frac"] = same.float().mean().item()
    rows = (~same).nonzero()
    r["rows_differing"] = int(rows.shape[0])
    r["max_rel_importance_shortfall"] = 0.0
    if rows.shape[0]:
        tokens = rows[:, 1].unique()[:4096]
        kc = reference.mean_pool_blocks(k.float(), block_size)
        imp = reference.block_importance(q[:, tokens].float(), kc, tokens, block_size)
        pick = lambda sel: imp.gather(-1, sel[:, tokens, :, 1:].clamp(min=0)).masked_fill(sel[:, tokens, :, 1:] < 0, 0).sum(-1)
        ours, best = pick(idx), pick(ref)
        r["max_rel_importance_shortfall"] = ((best - ours) / best.clamp_min(1e-30)).max().item()
    r["pass"] = bool(r["own_block_ok"] and r["padding_ok"] and r["distinct"] and r["same_set_frac"] > 0.99
                     and r["max_rel_importance_shortfall"] < 1e-4)
    log(f"  check select bs{block_size} k{top_k} b{b} s{s} hq{hq} d{d}: pass={r['pass']} same-set "
        f"{r['same_set_frac']:.5f} shortfall {r['max_rel_importance_shortfall']:.1e}")
    return r


def prewarm_worker(seqs: str, select_only: bool, deterministic: bool = False):
    """Compile this process's one autotune candidate (SSA_KERNELS_CONFIG) of every kernel the run uses.

    Shapes at a short sequence: the sequence length is never specialised on, so the compiled kernels
    land in triton's disk cache under the same keys the timed run looks up.
    """
    for s in (int(x) for x in seqs.split(",")):
        b = batch_for(s)
        if select_only:
            prewarm_select(b, s, int(os.environ.get("SSA_KERNELS_CONFIG", "0")))
            continue
        for bs, k in CONFIGS:
            q, kk, v = make_qkv(b, s, requires_grad=True)
            ssa_kernels.select_blocks(q.detach(), kk.detach(), bs, 2)
            for split in (True, False):
                select_mod.SPLIT_SCORES = split
                idx = ssa_kernels.select_blocks(q.detach(), kk.detach(), bs, k)
            select_mod.SPLIT_SCORES = True
            ssa_kernels.sparse_attention(q, kk, v, idx, bs).backward(torch.randn_like(q))
            if deterministic:
                ssa_kernels.sparse_attention(q, kk, v, idx, bs, deterministic=True).backward(torch.randn_like(q))
        o = torch.randn(b, s, HQ, D, device=DEV, dtype=DTYPE, requires_grad=True)
        ssa_kernels.alignment_loss(o, torch.randn_like(o)).backward()
    torch.cuda.synchronize()


def prewarm_select(b: int, s: int, cand: int):
    """What the select section compiles, for candidate ``cand``; the one-off shapes spread over the workers."""
    q, k, _ = make_qkv(b, s)
    for bs, top_k in CONFIGS:
        ssa_kernels.select_blocks(q, k, bs, top_k)
    select_mod.SPLIT_SCORES = False  # the single-dot variant
    ssa_kernels.select_blocks(q, k, 16, 16)
    select_mod.SPLIT_SCORES = True
    if cand == 3:  # the check's other shapes, first candidates: head_dim 128, 8 query heads per KV head
        for hq, d in ((HQ, 2 * D), (HQ // 2, D)):
            qq = torch.randn(b, s, hq, d, device=DEV, dtype=DTYPE)
            kk = torch.randn(b, s, HKV, d, device=DEV, dtype=DTYPE)
            _first_candidates(lambda: ssa_kernels.select_blocks(qq, kk, 16, 16))


def prewarm(n_configs: int, select_only: bool, deterministic: bool = False):
    """Compile the autotune candidates in parallel processes (one candidate each) before timing."""
    import subprocess

    t0 = time.time()
    env = dict(os.environ)
    procs = []
    for i in range(n_configs):
        env_i = dict(env, SSA_KERNELS_CONFIG=str(i))
        cmd = ([sys.executable, os.path.abspath(__file__), "--prewarm-worker", "2048"] + ["--select-only"] * select_only
               + ["--deterministic"] * deterministic)
        procs.append(subprocess.Popen(cmd, env=env_i))
    rcs = [p.wait() for p in procs]
    log(f"== prewarm: {n_configs} processes, rc {rcs}, {time.time() - t0:.0f} s")


def autotune_choices() -> dict:
    out = {}
    for name, kern in (("select", select_mod.select_blocks_kernel), ("lse", select_mod.lse_kernel), ("fwd", sparse_mod.sparse_fwd_kernel),
                       ("bwd_dq", sparse_mod.sparse_bwd_dq_kernel), ("bwd_dkdv", sparse_mod.sparse_bwd_dkdv_kernel)):
        out[name] = {str(k): str(c) for k, c in getattr(kern, "cache", {}).items()}
    return out


SECTIONS = ("check", "time", "prefill", "select", "layer", "profile", "flex")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks"),
                    help="folder of kernels.json (measured) and kernels.md (rendered)")
    ap.add_argument("--before", default=os.path.join(ROOT, "docs", "benchmarks", "kernels.json"),
                    help="an earlier run's kernels.json, read at the start: the report's 'before' columns "
                         "(default: the committed one; 'none': no before columns)")
    ap.add_argument("--report-only", action="store_true",
                    help="measure nothing: render OUT/kernels.md from --results (and --before); no GPU needed")
    ap.add_argument("--results", default=None, help="with --report-only: the run's JSON (default OUT/kernels.json)")
    ap.add_argument("--seqs", default="8192,32768,131072")
    ap.add_argument("--prefill-seqs", default="32768,131072", help="sequence lengths of the prefill section (batch 1)")
    ap.add_argument("--sections", default="check,time,prefill,layer,profile,flex", help=f"comma list of {', '.join(SECTIONS)}")
    ap.add_argument("--flex", default="8192:16-16,8192:64-16,32768:16-16", help="seq:bs-topk list for FlexAttention")
    ap.add_argument("--budget-s", type=float, default=480, help="seconds from the start (prewarm included) after which the remaining items are skipped "
                         "(recorded as skipped)")
    ap.add_argument("--prewarm", type=int, default=4, help="parallel compile processes (0: none)")
    ap.add_argument("--prewarm-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--select-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--deterministic", action="store_true",
                    help="also check and time the deterministic mode (check, time sections)")
    args = ap.parse_args(argv)
    args.before = None if args.before.lower() == "none" else args.before
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        ap.error(f"--sections {args.sections}: unknown {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return args


def device_name() -> str:
    if DEV == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}{', triton interpreter' if ssa_kernels.INTERPRET else ''})"


def main(argv=None):
    args = parse_args(argv)
    if args.prewarm_worker:
        prewarm_worker(args.prewarm_worker, args.select_only, args.deterministic)
        return
    md_path, json_path = os.path.join(args.out, "kernels.md"), os.path.join(args.out, "kernels.json")
    if args.report_only:
        os.makedirs(args.out, exist_ok=True)
        log(report.write_report(args.results or json_path, md_path, args.before))
        return
    t_start = time.time()
    os.makedirs(args.out, exist_ok=True)
    sections = set(args.sections.split(","))
    seqs = [int(x) for x in args.seqs.split(",")]
    # read before this run overwrites it (--out may be the folder of the committed JSON)
    before = report.load(args.before) if args.before and os.path.exists(args.before) else None
    if args.before and before is None:
        log(f"--before {args.before}: no such file, the report has no before columns")
    res = {"env": {
        "device": device_name(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "shape": {"hq": HQ, "hkv": HKV, "d": D, "dtype": str(DTYPE), "tokens": TOKENS},
    }, "args": {k: v for k, v in vars(args).items() if k not in ("prewarm_worker", "select_only", "report_only", "results")}}
    log(json.dumps(res["env"]))
    if args.prewarm:
        prewarm(args.prewarm, sections == {"select"}, args.deterministic)

    def save():
        res["autotune"] = autotune_choices()
        res["wall_s"] = time.time() - t_start
        with open(json_path, "w") as f:
            json.dump(res, f, indent=1)
        try:
            text = report.markdown(res, before, args.before or "")
        except Exception:
            text = "markdown failed:\n" + traceback.format_exc()
        with open(md_path, "w") as f:
            f.write(text)

    def guarded(store: dict, key: str, fn, *a):
        if time.time() - t_start > args.budget_s:
            store[key] = {"skipped": f"not run: wall-time budget of {args.budget_s:.0f} s spent"}
            log(f"  {key}: skipped (budget)")
            return
        try:
            store[key] = fn(*a)
        except Exception as e:
            store[key] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
            log(f"  {key}: ERROR {traceback.format_exc()[-2000:]}")
        if DEV == "cuda":
            torch.cuda.empty_cache()
        save()

    if "check" in sections:
        log("== check")
        res["check"] = {}
        for s in (8192, 32768):
            for bs, k in CONFIGS:
                if s == 32768 and bs * k > 256:
                    continue  # the float32 oracle's autograd graph would need ~64 GB at 32k x 1024 keys
                guarded(res["check"], f"s{s}xb{batch_for(s)}-bs{bs}-k{k}", check, batch_for(s), s, bs, k, args.deterministic)
        if "prefill" in sections:  # the prefill path, selection included, at a small size
            res["prefill_check"] = {}
            for bs, k in PREFILL_CONFIGS:
                guarded(res["prefill_check"], f"s8192xb1-bs{bs}-k{k}", check_prefill, 1, 8192, bs, k)
    if "time" in sections:
        log("== time")
        res["time"] = {}
        for s in seqs:
            b = batch_for(s)
            entry = res["time"].setdefault(f"{s}x{b}", {"ours": {}, "flex": {}})
            guarded(entry, "dense", time_dense, b, s)
            for bs, k in CONFIGS:
                guarded(entry["ours"], f"{bs}-{k}", time_ours, b, s, bs, k, s == 32768, args.deterministic)
    if "prefill" in sections:
        log("== prefill")
        res["prefill"] = {}
        for s in (int(x) for x in args.prefill_seqs.split(",")):
            entry = res["prefill"].setdefault(f"{s}x1", {"ours": {}})
            guarded(entry, "dense", time_prefill_dense, 1, s)
            for bs, k in PREFILL_CONFIGS:
                guarded(entry["ours"], f"{bs}-{k}", time_prefill, 1, s, bs, k, entry["dense"].get("fwd_ms"))
        speedup, met = report.prefill_target(res)
        log(f"  prefill target >= {report.PREFILL_TARGET['speedup']:.0f}x at {report.PREFILL_TARGET['seq_key']} "
            f"block-top-k {report.PREFILL_TARGET['cfg']}: " + ("not measured" if met is None else f"{speedup:.1f}x, met: {met}"))
    if "select" in sections:
        log("== select")
        res["select"] = {"time": {}, "check": {}}
        for s in seqs:
            entry = res["select"]["time"].setdefault(f"{s}x{batch_for(s)}", {})
            for bs, k in CONFIGS:
                guarded(entry, f"{bs}-{k}", time_select, batch_for(s), s, bs, k, (bs, k) == (16, 16))
        for s in (8192, 32768):
            for bs, k in CONFIGS:
                guarded(res["select"]["check"], f"s{s}xb{batch_for(s)}-bs{bs}-k{k}", check_select, batch_for(s), s, bs, k)
        for hq, d in ((HQ, 2 * D), (HQ // 2, D)):  # other shapes: the first candidates only (one compile each)
            guarded(res["select"]["check"], f"s8192xb2-bs16-k16-hq{hq}-d{d}",
                    lambda *a: _first_candidates(lambda: check_select(*a)), 2, 8192, 16, 16, hq, d)
    if "layer" in sections:
        log("== layer")
        res["layer"] = {}
        dense = res.get("time", {}).get(f"8192x{batch_for(8192)}", {}).get("dense", {})
        backend = sdpa_backends()[dense.get("best", "cudnn")]
        for bs, k in CONFIGS:
            guarded(res["layer"], f"{bs}-{k}", time_ssa_layer, batch_for(8192), 8192, bs, k, backend)
    if "profile" in sections:
        log("== profile")
        dense = res.get("time", {}).get(f"8192x{batch_for(8192)}", {}).get("dense", {})
        backend = sdpa_backends()[dense.get("best", "cudnn")]
        guarded(res, "profile_layer_8k_bs16_k16", profile_layer, batch_for(8192), 8192, 16, 16, backend)
    if "flex" in sections:
        log("== flex")
        for item in args.flex.split(","):
            s_str, cfg = item.split(":")
            s = int(s_str)
            bs, k = (int(x) for x in cfg.split("-"))
            entry = res.setdefault("time", {}).setdefault(f"{s}x{batch_for(s)}", {"ours": {}, "flex": {}})
            guarded(entry.setdefault("flex", {}), f"{bs}-{k}", time_flex, batch_for(s), s, bs, k)
        for s in seqs:
            entry = res.setdefault("time", {}).setdefault(f"{s}x{batch_for(s)}", {"ours": {}, "flex": {}})
            for bs, k in CONFIGS:
                entry.setdefault("flex", {}).setdefault(
                    f"{bs}-{k}", {"skipped": "not run: FlexAttention compile + mask build cost more device time than "
                                             "this session had (see --flex)"})
    save()
    with open(md_path) as f:
        log(f.read())


if __name__ == "__main__":
    main()
