"""Fused SSA alignment loss (spec step 7): ``SmoothL1(o_full, sg(o_sparse)) + SmoothL1(sg(o_full), o_sparse)``.

Both terms have the same value, ``mean(phi(o_full - o_sparse))`` with ``phi`` the beta-1 Huber
function, so the loss is ``2 * mean(phi(d))``; each term sends gradient to one side only:
``d/d o_full = phi'(d) / N`` and ``d/d o_sparse = -phi'(d) / N`` with ``phi'(d) = clamp(d, -1, 1)``.
The torch version upcasts both tensors to fp32 copies and runs two losses and their backward
(~10 passes over ``[B, T, HQ, D]``); this one reads the two inputs once in the forward (per-program
partial sums, summed by torch: deterministic) and once in the backward, writing both gradients.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ssa_kernels._utils import cdiv, check_device

BLOCK = 4096


# N is specialised (divisibility by 16) on purpose: with it unknown, the tail mask keeps Triton from
# proving 16-byte vector loads.
@triton.jit
def align_fwd_kernel(a, b, partial, N, BLOCK: tl.constexpr):
    i_p = tl.program_id(0)
    o_n = i_p.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m_n = o_n < N
    b_d = tl.load(a + o_n, mask=m_n, other=0.0).to(tl.float32) - tl.load(b + o_n, mask=m_n, other=0.0).to(tl.float32)
    b_ad = tl.abs(b_d)
    b_l = tl.where(b_ad < 1.0, 0.5 * b_d * b_d, b_ad - 0.5)
    tl.store(partial + i_p, tl.sum(b_l, 0))


@triton.jit
def align_bwd_kernel(a, b, grad, ga, gb, N, inv_n, BLOCK: tl.constexpr):
    i_p = tl.program_id(0)
    o_n = i_p.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m_n = o_n < N
    b_d = tl.load(a + o_n, mask=m_n, other=0.0).to(tl.float32) - tl.load(b + o_n, mask=m_n, other=0.0).to(tl.float32)
    # the upstream gradient stays on the device: no host sync
    b_g = tl.minimum(tl.maximum(b_d, -1.0), 1.0) * (tl.load(grad).to(tl.float32) * inv_n)
    tl.store(ga + o_n, b_g.to(ga.dtype.element_ty), mask=m_n)
    tl.store(gb + o_n, (-b_g).to(gb.dtype.element_ty), mask=m_n)


class AlignmentLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o_full, o_sparse):
        a, b = o_full.reshape(-1), o_sparse.reshape(-1)
        n = a.numel()
        grid = (cdiv(n, BLOCK),)
        partial = torch.empty(grid[0], dtype=torch.float32, device=a.device)
        align_fwd_kernel[grid](a, b, partial, n, BLOCK=BLOCK)
        ctx.save_for_backward(a, b)
        ctx.shapes = (o_full.shape, o_sparse.shape)
        return partial.sum() * (2.0 / n)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        n = a.numel()
        ga, gb = torch.empty_like(a), torch.empty_like(b)
        align_bwd_kernel[(cdiv(n, BLOCK),)](a, b, grad.contiguous(), ga, gb, n, 1.0 / n, BLOCK=BLOCK)
        ga = ga.view(ctx.shapes[0]) if ctx.needs_input_grad[0] else None
        gb = gb.view(ctx.shapes[1]) if ctx.needs_input_grad[1] else None
        return ga, gb


def alignment_loss(o_full: torch.Tensor, o_sparse: torch.Tensor) -> torch.Tensor:
    """SSA alignment loss of the two streams, float32 scalar, fused forward and backward.

    Args:
        o_full: ``[...]`` full-stream output (gated), fp16/bf16/fp32.
        o_sparse: same shape, sparse-stream output; may differ in dtype.

    Returns:
        ``SmoothL1(o_full, sg(o_sparse)) + SmoothL1(sg(o_full), o_sparse)`` (beta 1, mean).
    """
    if not isinstance(o_full, torch.Tensor) or not isinstance(o_sparse, torch.Tensor):
        raise ValueError("o_full and o_sparse must be tensors")
    if o_full.shape != o_sparse.shape:
        raise ValueError(f"o_full shape {tuple(o_full.shape)} != o_sparse shape {tuple(o_sparse.shape)}")
    if o_full.numel() == 0:
        raise ValueError("alignment_loss of empty tensors is undefined")
    for name, t in (("o_full", o_full), ("o_sparse", o_sparse)):
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"{name} must be fp16/bf16/fp32, got {t.dtype}")
    if o_full.device != o_sparse.device:
        raise ValueError(f"o_full is on {o_full.device}, o_sparse on {o_sparse.device}")
    check_device(o_full, o_sparse)
    return AlignmentLossFunction.apply(o_full, o_sparse)
