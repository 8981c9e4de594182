"""Shape table and error metric shared by the kernel tests.

CPU (interpreter, ~10 ms per program) keeps to tiny shapes, fp32/fp16 only (bf16 ``tl.dot`` is
silently wrong in the interpreter, triton#11584); a CUDA machine adds bf16, 16 query heads per KV
head, block 128 and head_dim 128.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


def interpreter_usable() -> bool:
    """True when triton's own jit functions (tl.sum, tl.max, ...) were built for the interpreter."""
    if "triton" not in sys.modules:
        return False
    import triton.language.standard as standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.sum, InterpretedFunction)


@dataclass(frozen=True)
class Case:
    b: int
    s: int
    hq: int
    hkv: int
    d: int
    block_size: int
    top_k: int
    dtype: torch.dtype

    def inputs(self, seed: int = 0, requires_grad: bool = False):
        g = torch.Generator().manual_seed(seed)
        make = lambda h: torch.randn(self.b, self.s, h, self.d, generator=g).to(DEVICE, self.dtype)
        q, k, v = make(self.hq), make(self.hkv), make(self.hkv)
        return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


def _p(case_id: str, *args, gpu_only: bool = False):
    marks = [pytest.mark.skipif(not ON_GPU, reason="GPU-only case (bf16 / large)")] if gpu_only else []
    return pytest.param(Case(*args), id=case_id, marks=marks)


f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16

# id: g<query heads per KV head>-bs<block>-k<top_k>-s<seq>[-detail]
CASES = [
    _p("g1-bs16-k3-s77-ragged", 1, 77, 2, 2, 16, 16, 3, f32),
    _p("g2-bs32-k3-s100-b2-ragged", 2, 100, 4, 2, 32, 32, 3, f32),
    _p("g8-bs16-k4-s130-fp16", 1, 130, 8, 1, 16, 16, 4, f16),
    _p("g2-bs64-k2-s150-d64", 1, 150, 4, 2, 64, 64, 2, f32),
    _p("g3-bs16-k3-s70-oddgroup", 1, 70, 6, 2, 16, 16, 3, f32),
    _p("g2-bs16-k9-s60-pad", 1, 60, 4, 2, 16, 16, 9, f32),  # more slots than earlier blocks: -1 padding
    _p("g2-bs24-k3-s90-nonpow2", 1, 90, 2, 1, 16, 24, 3, f16),
    _p("g16-bs16-k16-s1000-bf16", 2, 1000, 32, 2, 64, 16, 16, bf16, gpu_only=True),
    _p("g16-bs64-k4-s1111-bf16", 1, 1111, 32, 2, 64, 64, 4, bf16, gpu_only=True),
    _p("g8-bs128-k3-s777-d128-bf16", 1, 777, 16, 2, 128, 128, 3, bf16, gpu_only=True),
    _p("g2-bs32-k64-s3000-fp16", 1, 3000, 4, 2, 64, 32, 64, f16, gpu_only=True),
    _p("g16-bs16-k200-s4000-torchpath", 1, 4000, 16, 1, 64, 16, 200, bf16, gpu_only=True),
]

# relative RMS error ||x - ref|| / ||ref|| allowed per input dtype (reference in fp32 on the same inputs)
TOL = {f32: 1e-5, f16: 3e-3, bf16: 2e-2}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative RMS error ``||x - ref|| / ||ref||`` in float64 (fla's metric)."""
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


class SDPAReadingGradOutInOutputLayout(torch.autograd.Function):
    """CPU stand-in for torch's cuDNN attention as the H200 run saw it (torch 2.11): the output is laid
    out like q (cuDNN's ``alloc_with_matching_layout``), and the backward reads grad_output's memory
    with the *output's* strides, whatever grad_output's own are (a backward graph built for, and
    cached with, an output-layout grad_output). A caller that hands it a grad_output in another layout
    gets gradients uncorrelated with the right ones; one in the output's layout gets SDPA's own.
    Install with ``monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
    SDPAReadingGradOutInOutputLayout.sdpa)``."""

    real_sdpa = staticmethod(torch.nn.functional.scaled_dot_product_attention)

    @staticmethod
    def forward(ctx, q, k, v):
        with torch.no_grad():
            o = SDPAReadingGradOutInOutputLayout.real_sdpa(q, k, v, is_causal=True, enable_gqa=True)
        out = torch.empty_like(q).copy_(o)  # q [b, hq, s, d] has the output's shape
        ctx.save_for_backward(q, k, v)
        ctx.out_layout = (out.shape, out.stride())
        return out

    @staticmethod
    def backward(ctx, do):
        size, stride = ctx.out_layout
        assert do.shape == size and _dense(do), "the stand-in reads grad_output's memory: it must be dense"
        seen = torch.as_strided(do, size, stride, do.storage_offset())  # do's memory, the output's strides
        q, k, v = (t.detach().requires_grad_() for t in ctx.saved_tensors)
        with torch.enable_grad():
            o = SDPAReadingGradOutInOutputLayout.real_sdpa(q, k, v, is_causal=True, enable_gqa=True)
            return torch.autograd.grad(o, (q, k, v), seen)

    @staticmethod
    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        assert attn_mask is None and dropout_p == 0.0 and is_causal and scale is None and enable_gqa
        return SDPAReadingGradOutInOutputLayout.apply(q, k, v)


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: some permutation of it is contiguous."""
    order = sorted(range(t.dim()), key=lambda i: -t.stride(i))
    return t.permute(order).is_contiguous()
