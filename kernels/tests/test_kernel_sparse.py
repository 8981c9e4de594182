"""sparse_attention (Triton) matches the oracle in output and in dq, dk, dv; alignment loss too."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import CASES, DEVICE, TOL, Case, rel_err

import ssa_kernels
from ssa_megatron import ops
from ssa_megatron.ops import reference


def oracle(q, k, v, idx, block_size, do):
    """Reference output and gradients in float32 from the same (possibly 16-bit) inputs."""
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    o = reference.sparse_attention(q32, k32, v32, idx, block_size)
    grads = torch.autograd.grad(o, (q32, k32, v32), do.float())
    return o.detach(), grads


@pytest.mark.parametrize("case", CASES)
def test_sparse_attention_output_and_grads_match_oracle(case: Case):
    q, k, v = case.inputs(seed=2, requires_grad=True)
    # the oracle's selection, so both sides attend to the same blocks
    idx = reference.select_blocks(q.detach().float(), k.detach().float(), case.block_size, case.top_k)
    o = ssa_kernels.sparse_attention(q, k, v, idx, case.block_size)
    do = torch.randn_like(o)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    o_ref, (dq_ref, dk_ref, dv_ref) = oracle(q, k, v, idx, case.block_size, do)
    tol = TOL[case.dtype]
    assert o.dtype == q.dtype and o.shape == q.shape
    for name, x, ref in (("o", o, o_ref), ("dq", dq, dq_ref), ("dk", dk, dk_ref), ("dv", dv, dv_ref)):
        assert torch.isfinite(x).all(), f"{name} has non-finite values"
        err = rel_err(x, ref)
        assert err < tol, f"{name}: relative RMS error {err:.2e} >= {tol:.0e}"


def test_sparse_attention_on_kernel_selection_with_int32_idx_strided_inputs_and_token_ranges(monkeypatch):
    from ssa_kernels import sparse as sparse_mod

    monkeypatch.setattr(sparse_mod, "RANGE_TOKENS", 32)  # several token ranges at seq 70
    case = Case(2, 70, 4, 2, 16, 16, 3, torch.float32)
    q, k, v = case.inputs(seed=6)
    # Megatron's [s, b, h, d] tensors seen as [b, s, h, d]: non-contiguous, head dim contiguous
    q, k, v = (t.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_() for t in (q, k, v))
    idx = ssa_kernels.select_blocks(q.detach(), k.detach(), 16, 3).to(torch.int32)
    o = ssa_kernels.sparse_attention(q, k, v, idx, 16)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    o_ref, grads_ref = oracle(q, k, v, idx.long(), 16, do)
    assert rel_err(o, o_ref) < 1e-5
    for x, ref in zip(grads, grads_ref):
        assert rel_err(x, ref) < 1e-5


def test_ops_triton_backend_matches_torch_backend():
    case = Case(1, 60, 4, 2, 16, 16, 3, torch.float32)
    q, k, v = case.inputs(seed=7)
    idx = ops.select_blocks(q, k, 16, 3, backend="triton")
    assert torch.equal(idx, ops.select_blocks(q, k, 16, 3, backend="torch"))
    o = ops.sparse_attention(q, k, v, idx, 16, backend="triton")
    assert rel_err(o, ops.sparse_attention(q, k, v, idx, 16, backend="torch")) < 1e-5


@pytest.mark.parametrize("range_tokens, stable", [(0, False), (32, False), (0, True), (32, True)])
def test_inverse_index_lists_every_selecting_token_once_per_block(range_tokens, stable):
    case = Case(2, 90, 4, 2, 16, 16, 4, torch.float32)
    q, k, _ = case.inputs(seed=8)
    idx = reference.select_blocks(q, k, 16, 4)
    tok, ibin, istart, iend, n_items, n_ranges, *_ = ssa_kernels.build_inverse_index(
        idx, 90, 16, chunk=5, range_tokens=range_tokens, stable=stable
    )
    nb = -(-90 // 16)
    assert n_ranges == (1 if range_tokens == 0 else 3)
    assert int(n_items[0]) <= ibin.numel()
    got = set()
    for i in range(int(n_items[0])):
        bin_ = int(ibin[i])
        bh, r, blk = bin_ // (nb * n_ranges), (bin_ // nb) % n_ranges, bin_ % nb
        for t in tok[istart[i] : iend[i]].tolist():
            assert n_ranges == 1 or t // range_tokens == r
            assert (bh, blk, t) not in got
            got.add((bh, blk, t))
        assert iend[i] - istart[i] <= 5
    want = set()
    b, s, hkv, top_k = idx.shape
    for bb in range(b):
        for t in range(s):
            for h in range(hkv):
                for blk in idx[bb, t, h].tolist():
                    if blk >= 0:
                        want.add((bb * hkv + h, blk, t))
    assert got == want


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(lambda q, k, v, idx: ssa_kernels.sparse_attention(q, k, v, idx[..., :1, :], 16), id="idx-heads"),
        pytest.param(lambda q, k, v, idx: ssa_kernels.sparse_attention(q, k, v, idx.float(), 16), id="idx-float"),
        pytest.param(lambda q, k, v, idx: ssa_kernels.sparse_attention(q, k, v[:, :-1], idx, 16), id="v-shape"),
        pytest.param(lambda q, k, v, idx: ssa_kernels.sparse_attention(q, k, v, idx, 0), id="block-size-zero"),
        pytest.param(lambda q, k, v, idx: ssa_kernels.sparse_attention(q, k.half(), v, idx, 16), id="dtype-mismatch"),
    ],
)
def test_sparse_attention_refuses_bad_input(bad):
    q, k, v = Case(1, 32, 4, 2, 16, 16, 2, torch.float32).inputs()
    idx = torch.zeros(1, 32, 2, 2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError):
        bad(q, k, v, idx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_alignment_loss_matches_oracle_value_and_grads(dtype):
    g = torch.Generator().manual_seed(9)
    full = (torch.randn(2, 33, 4, 16, generator=g) * 1.5).to(DEVICE, dtype).requires_grad_()
    sparse = (torch.randn(2, 33, 4, 16, generator=g) * 1.5).to(DEVICE, dtype).requires_grad_()
    loss = ssa_kernels.alignment_loss(full, sparse)
    gf, gs = torch.autograd.grad(loss * 3.0, (full, sparse))
    f32, s32 = (t.detach().float().requires_grad_() for t in (full, sparse))
    ref = reference.alignment_loss(f32, s32)
    rf, rs = torch.autograd.grad(ref * 3.0, (f32, s32))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    assert rel_err(gf, rf) < tol and rel_err(gs, rs) < tol
    assert torch.equal(ops.alignment_loss(full, sparse, backend="triton"), loss)
