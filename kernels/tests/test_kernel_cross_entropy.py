"""The fused output layer's per-chunk cross-entropy kernels against torch's own cross-entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import DEVICE, ON_GPU

import ssa_kernels

# (rows, vocab shard, dtype): vocab not a multiple of the kernel's column block, one row, a shard
# smaller than one block, and (GPU) the paper's 128k vocabulary
SHAPES = [
    pytest.param(37, 5000, torch.float32, id="r37-v5000-fp32"),
    pytest.param(1, 2048, torch.float32, id="r1-v2048-fp32"),
    pytest.param(9, 300, torch.float16, id="r9-v300-fp16"),
    pytest.param(64, 128256, torch.bfloat16, id="r64-v128256-bf16",
                 marks=pytest.mark.skipif(not ON_GPU, reason="GPU-only case (large, bf16)")),
]


def _inputs(rows: int, vocab: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(rows, vocab, generator=g)).to(DEVICE, dtype)
    labels = torch.randint(0, vocab, (rows,), generator=g).to(DEVICE)
    labels[::3] = -1  # every third row's label lives on another rank's shard
    return logits, labels


@pytest.mark.parametrize("rows,vocab,dtype", SHAPES)
def test_stats_are_logsumexp_and_the_labelled_logit(rows, vocab, dtype):
    logits, labels = _inputs(rows, vocab, dtype, seed=1)
    lse, target = ssa_kernels.cross_entropy_stats(logits, labels)
    x = logits.double()
    assert torch.allclose(lse.double(), torch.logsumexp(x, 1), rtol=0, atol=1e-4)
    on_shard = labels >= 0
    expected = torch.zeros(rows, dtype=torch.float64, device=DEVICE)
    expected[on_shard] = x[on_shard, labels[on_shard]]
    assert torch.equal(target.double(), expected)  # a picked value, exactly


@pytest.mark.parametrize("rows,vocab,dtype", SHAPES)
def test_grad_is_torch_cross_entropy_gradient(rows, vocab, dtype):
    logits, labels = _inputs(rows, vocab, dtype, seed=2)
    # torch's cross-entropy of the rows whose label is here (ignore_index=-1 rows: softmax only)
    x = logits.double().requires_grad_()
    per_row = F.cross_entropy(x, labels, ignore_index=-1, reduction="none")
    per_row = torch.where(labels >= 0, per_row, torch.logsumexp(x, 1))  # loss of a row with no target here
    (expected,) = torch.autograd.grad(per_row.sum(), x)
    lse = torch.logsumexp(logits.float(), 1)
    out = ssa_kernels.cross_entropy_grad_(logits, labels, lse)
    assert out.data_ptr() == logits.data_ptr() and out.dtype == dtype  # in place
    tol = {torch.float32: 5e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert (out.double() - expected).abs().max().item() < tol


def test_rows_of_a_strided_view_leave_the_rest_untouched():
    big = torch.randn(6, 700, device=DEVICE)
    view = big[:, 50:650]  # columns contiguous, rows strided
    labels = torch.tensor([0, 599, -1, 5, 300, 1], device=DEVICE)
    before = big.clone()
    lse, _ = ssa_kernels.cross_entropy_stats(view, labels)
    assert torch.allclose(lse, torch.logsumexp(before[:, 50:650], 1), atol=1e-5)
    ssa_kernels.cross_entropy_grad_(view, labels, lse)
    assert torch.equal(big[:, :50], before[:, :50]) and torch.equal(big[:, 650:], before[:, 650:])
    assert torch.allclose(big[:, 50:650].sum(1), torch.tensor([0.0, 0, 1, 0, 0, 0], device=DEVICE), atol=1e-5)
