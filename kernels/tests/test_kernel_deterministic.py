"""Deterministic mode of the sparse attention kernels (``deterministic=True``, ``ssa.deterministic``).

On the interpreter the programs of a launch run one after another, so even the default path's
atomics land in a fixed order and "two runs give the same bits" cannot fail there. The CPU tests
therefore also check the mechanism itself: the inverse index is stable (each block's tokens in
increasing order, the work items cut from those lists), the deterministic backward issues no float
atomic at all, its kernels run pinned configs, and the reduce kernel sums the partials. The bitwise
repeat at a real size runs on a GPU (``test_bitwise_repeat_at_a_real_size``).
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from kernel_cases import CASES, DEVICE, ON_GPU, TOL, Case, rel_err

import ssa_kernels
from ssa_kernels import _utils
from ssa_kernels import inverse as inverse_mod
from ssa_kernels import select as select_mod
from ssa_kernels import sparse as sparse_mod
from ssa_megatron import ops
from ssa_megatron.ops import reference

# The oracle test's shapes, without the two slowest on the interpreter (b2-s100 and bs64-s150 take
# ~45 s there); every GPU case stays.
_SLOW_ON_CPU = {"g2-bs32-k3-s100-b2-ragged", "g2-bs64-k2-s150-d64"}
DET_CASES = [c for c in CASES if c.id not in _SLOW_ON_CPU]


class _Forbidden:
    """Stands in for a kernel that must not be launched."""

    def __init__(self, why: str):
        self.why = why

    def __getitem__(self, grid):
        raise AssertionError(self.why)


class _LaunchSpy:
    """Stands in for a plain ``@triton.jit`` kernel: records each grid, then launches it."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def _grads(q, k, v, idx, block_size, do, deterministic, repeats=1):
    o = ssa_kernels.sparse_attention(q, k, v, idx, block_size, deterministic=deterministic)
    runs = [torch.autograd.grad(o, (q, k, v), do, retain_graph=True) for _ in range(repeats)]
    return o, runs


@pytest.mark.parametrize("case", DET_CASES)
def test_deterministic_mode_matches_oracle_and_repeats_bit_for_bit(monkeypatch, case: Case):
    if not ON_GPU:  # work items of 16 tokens: at these lengths most blocks then sum several partials
        monkeypatch.setattr(sparse_mod, "ITEM_TOKENS", 16)
    q, k, v = case.inputs(seed=2, requires_grad=True)
    idx = reference.select_blocks(q.detach().float(), k.detach().float(), case.block_size, case.top_k)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE, q.dtype)
    o, runs = _grads(q, k, v, idx, case.block_size, do, deterministic=True, repeats=2)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    o_ref = reference.sparse_attention(q32, k32, v32, idx, case.block_size)
    grads_ref = torch.autograd.grad(o_ref, (q32, k32, v32), do.float())
    tol = TOL[case.dtype]
    assert o.dtype == q.dtype and all(g.dtype == q.dtype for g in runs[0])
    for name, x, ref in zip(("o", "dq", "dk", "dv"), (o, *runs[0]), (o_ref, *grads_ref)):
        assert torch.isfinite(x).all(), f"{name} has non-finite values"
        err = rel_err(x, ref)
        assert err < tol, f"{name}: relative RMS error {err:.2e} >= {tol:.0e}"
    for name, x, y in zip(("dq", "dk", "dv"), *runs):
        assert torch.equal(x, y), f"{name} differs between two deterministic backward passes"


def _entries(idx: torch.Tensor, seq_len: int, block_size: int):
    """{(b * hkv + h, block): sorted tokens} of a selection, from plain loops."""
    lists: dict[tuple[int, int], list[int]] = {}
    b, s, hkv, _ = idx.shape
    for bb in range(b):
        for t in range(s):
            for h in range(hkv):
                for blk in idx[bb, t, h].tolist():
                    if 0 <= blk < -(-seq_len // block_size):
                        lists.setdefault((bb * hkv + h, blk), []).append(t)
    return lists


@pytest.mark.parametrize("chunk", [5, 128])
def test_stable_inverse_index_lists_each_blocks_tokens_in_increasing_order(monkeypatch, chunk):
    case = Case(2, 90, 4, 2, 16, 16, 4, torch.float32)
    q, k, _ = case.inputs(seed=8)
    idx = reference.select_blocks(q, k, 16, 4)
    # block 0 of (batch 0, KV head 1) as a sink most tokens select (rows keep distinct blocks)
    rows = idx[0, 20:, 1]
    rows[:, 3] = torch.where((rows == 0).any(-1), rows[:, 3], 0)
    idx = idx.to(torch.int32)
    forbidden = _Forbidden("the stable index must not place tokens by atomic cursors")
    monkeypatch.setattr(inverse_mod, "inverse_scatter_kernel", forbidden)
    inv = ssa_kernels.build_inverse_index(idx, 90, 16, chunk=chunk, stable=True)
    assert inv.stable and inv.n_ranges == 1 and inv.chunk == chunk
    nb = -(-90 // 16)
    want = _entries(idx, 90, 16)
    assert len(want[(1, 0)]) > 60  # the sink
    n_items = int(inv.n_items[0])
    got: dict[tuple[int, int], list[int]] = {}
    for i in range(n_items):
        bin_ = int(inv.item_bin[i])
        assert int(inv.item_end[i]) - int(inv.item_start[i]) <= chunk
        got.setdefault((bin_ // nb, bin_ % nb), []).extend(inv.tok[inv.item_start[i] : inv.item_end[i]].tolist())
    # every bin's list, read item after item, is exactly its tokens in increasing order
    assert got == want
    # a bin's items are consecutive, starting at item_first, cutting its list in order
    for bin_ in range(inv.counts.numel()):
        n = -(-int(inv.counts[bin_]) // chunk)
        first = int(inv.item_first[bin_])
        for j in range(n):
            assert int(inv.item_bin[first + j]) == bin_
            assert int(inv.item_start[first + j]) == int(inv.item_start[first]) + j * chunk
    # the whole token array is the same in a second build
    again = ssa_kernels.build_inverse_index(idx, 90, 16, chunk=chunk, stable=True)
    for name in ("tok", "item_bin", "item_start", "item_end", "n_items"):
        assert torch.equal(getattr(inv, name), getattr(again, name)), name


def _record_atomics(monkeypatch):
    """Record the dtype of every atomic read-modify-write the interpreter executes."""
    from triton.runtime.interpreter import InterpreterBuilder

    seen = []
    real = InterpreterBuilder.create_atomic_rmw

    def spy(self, rmwOp, ptr, val, mask, sem, scope):
        seen.append(val.dtype.scalar)
        return real(self, rmwOp, ptr, val, mask, sem, scope)

    monkeypatch.setattr(InterpreterBuilder, "create_atomic_rmw", spy)
    return seen


def _record_launches(monkeypatch):
    """Record (kernel, pinned, DETERMINISTIC) of every autotuned sparse kernel launch."""
    seen = []
    real = _utils.launch

    def spy(kernel, grid, *args, pinned=False, **kwargs):
        seen.append((kernel.base_fn.__name__, pinned, kwargs.get("DETERMINISTIC")))
        return real(kernel, grid, *args, pinned=pinned, **kwargs)

    monkeypatch.setattr(sparse_mod, "launch", spy)
    return seen


@pytest.mark.skipif(ON_GPU, reason="spies on the interpreter's atomics")
def test_deterministic_backward_has_no_float_atomics_and_runs_the_pinned_deterministic_kernels(monkeypatch):
    case = Case(1, 50, 4, 2, 16, 16, 3, torch.float32)
    q, k, v = case.inputs(seed=5, requires_grad=True)
    idx = reference.select_blocks(q.detach(), k.detach(), 16, 3)
    do = torch.randn_like(q)
    atomics = _record_atomics(monkeypatch)
    launches = _record_launches(monkeypatch)
    reduce_spy = _LaunchSpy(sparse_mod.sparse_bwd_dkdv_reduce_kernel)
    monkeypatch.setattr(sparse_mod, "sparse_bwd_dkdv_reduce_kernel", reduce_spy)
    reduced = reduce_spy.grids

    grads = {}
    for deterministic in (False, True):
        atomics.clear()
        launches.clear()
        reduced.clear()
        o = ssa_kernels.sparse_attention(q, k, v, idx, 16, deterministic=deterministic)
        grads[deterministic] = torch.autograd.grad(o, (q, k, v), do)
        floats = [dt for dt in atomics if dt.is_floating()]
        names = {name: (pinned, det) for name, pinned, det in launches}
        if deterministic:
            assert floats == [], "the deterministic backward must not add with float atomics"
            assert all(dt.is_int() for dt in atomics)  # only the histogram's counts: order-free
            assert names == {"sparse_fwd_kernel": (True, None), "sparse_bwd_dq_kernel": (True, None),
                             "sparse_bwd_dkdv_kernel": (True, True)}
            assert reduced == [(1 * 2 * 4,)]  # one program per (batch, KV head, key block)
        else:  # the spies see the default path's atomics and tuned launches
            assert floats, "the default dK/dV adds with float atomics"
            assert names == {"sparse_fwd_kernel": (False, None), "sparse_bwd_dq_kernel": (False, None),
                             "sparse_bwd_dkdv_kernel": (False, False)}
            assert reduced == []
    for x, y in zip(grads[False], grads[True]):
        assert rel_err(y, x) < 1e-6


def test_pinned_launch_runs_the_first_candidate_whatever_the_tuner_holds():
    @triton.autotune(configs=[triton.Config({"V": 3}), triton.Config({"V": 7})], key=[])
    @triton.jit
    def write_v(out, V: tl.constexpr):
        tl.store(out + tl.arange(0, 1), tl.full([1], V, tl.int32))

    out = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    write_v.cache[(str(out.dtype),)] = write_v.configs[1]  # as if timing had picked the second
    _utils.launch(write_v, (1,), out)
    assert int(out[0]) == 7
    _utils.launch(write_v, (1,), out, pinned=True)
    assert int(out[0]) == 3


def test_selection_candidates_share_their_arithmetic():
    """The autotuner may pick any selection candidate in any process: they must round the same way
    (same tile, chunk and warp count; pipelining and register caps only), so selection needs no
    deterministic switch."""
    for candidates in (select_mod.CANDIDATES, select_mod.LSE_CANDIDATES):
        shapes = {(c.kwargs["TOK"], c.kwargs["LOG_NC"], c.num_warps) for c in candidates}
        assert len(shapes) == 1, shapes


@pytest.mark.parametrize("deterministic", [False, True])
def test_ops_passes_deterministic_to_the_kernels(monkeypatch, deterministic):
    case = Case(1, 40, 4, 2, 16, 16, 2, torch.float32)
    q, k, v = case.inputs(seed=9, requires_grad=True)
    idx = ops.select_blocks(q.detach(), k.detach(), 16, 2, backend="triton")
    seen = []
    real = ssa_kernels.sparse_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("deterministic"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ssa_kernels, "sparse_attention", spy)
    o = ops.sparse_attention(q, k, v, idx, 16, backend="triton", deterministic=deterministic)
    assert seen == [deterministic]
    assert rel_err(o, ops.sparse_attention(q, k, v, idx, 16, backend="torch")) < 1e-5
    with pytest.raises(ValueError, match="deterministic"):
        real(q, k, v, idx, 16, deterministic=1)


@pytest.mark.skipif(not ON_GPU, reason="GPU-only: bitwise repeats are only meaningful where programs run concurrently")
@pytest.mark.parametrize("seq, block_size, top_k, hq, d", [(8192, 16, 16, 32, 64), (8192, 64, 4, 16, 128)])
def test_bitwise_repeat_at_a_real_size(seq, block_size, top_k, hq, d):
    """Two deterministic fwd+bwd on the same inputs give the same bits (outputs, dq, dk, dv); so do
    selection, the alignment loss and the torch backend's sparse attention."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda h: torch.randn(2, seq, h, d, generator=gen, device="cuda").to(torch.bfloat16)
    q, k, v = mk(hq), mk(2), mk(2)
    idx = ssa_kernels.select_blocks(q, k, block_size, top_k)
    # block 0 as a sink every later token selects, as in a trained model: long lists, many items per block
    later = idx[:, block_size:]
    later[..., -1:] = torch.where((later == 0).any(-1, keepdim=True), later[..., -1:], 0)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    do = torch.randn(q.shape, generator=gen, device="cuda").to(torch.bfloat16)
    runs = []
    for _ in range(2):
        o = ssa_kernels.sparse_attention(q, k, v, idx, block_size, deterministic=True)
        runs.append((o, *torch.autograd.grad(o, (q, k, v), do)))
    for name, x, y in zip(("o", "dq", "dk", "dv"), *runs):
        assert torch.equal(x, y), f"{name}: deterministic runs differ"
    o_default = ssa_kernels.sparse_attention(q, k, v, idx, block_size)
    default = (o_default, *torch.autograd.grad(o_default, (q, k, v), do))
    for name, x, y in zip(("o", "dq", "dk", "dv"), runs[0], default):
        assert rel_err(x, y) < 1e-2, name  # same math, other rounding
    assert torch.equal(ssa_kernels.select_blocks(q.detach(), k.detach(), block_size, top_k),
                       ssa_kernels.select_blocks(q.detach(), k.detach(), block_size, top_k))
    a, b = runs[0][0].detach(), torch.randn_like(runs[0][0])
    assert torch.equal(ssa_kernels.alignment_loss(a, b), ssa_kernels.alignment_loss(a, b))
    # the torch backend on CUDA (sort-based index_put_ in its backward), at a size its graph fits
    qs, ks, vs = (t.detach()[:1, :2048].float().requires_grad_() for t in (q, k, v))
    torch_runs = []
    for _ in range(2):
        o = ops.sparse_attention(qs, ks, vs, idx[:1, :2048], block_size, backend="torch")
        torch_runs.append((o, *torch.autograd.grad(o, (qs, ks, vs), do[:1, :2048].float())))
    for name, x, y in zip(("o", "dq", "dk", "dv"), *torch_runs):
        assert torch.equal(x, y), f"torch backend {name}: runs differ"
