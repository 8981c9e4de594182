"""The dense stream's backward gets its grad_output in SDPA's output layout (``reference.grad_in_output_layout``).

Why: on the H200 (torch 2.11, cuDNN SDPA, the default backend for bf16 there) a probe of issue 10's fused layer
gave q/k/v gradients uncorrelated with the unfused layer's whenever the two handed SDPA's backward grad_outputs
in different layouts for the same q/k/v. The cause (confirmed there since) is torch's cuDNN attention backward,
which caches its graph under q/k/v's sizes and strides with the first call's grad_output strides baked in. The SSA layer
hands it two layouts: the full stream's gradient arrives in the output's layout (Megatron's sequence-major
views), the sparse stream's dense gradient (the alignment term alone, written by the Triton alignment kernel)
batch-major. CPU SDPA accepts any layout, so the CPU tests use a stand-in that reads grad_output as cuDNN's
cached graph would (``kernel_cases.SDPAReadingGradOutInOutputLayout``); the GPU test runs cuDNN itself.
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import DEVICE, ON_GPU, TOL, Case, SDPAReadingGradOutInOutputLayout, rel_err

from ssa_megatron import ops

f32, bf16 = torch.float32, torch.bfloat16


def megatron_inputs(case: Case, seed: int):
    """q/k/v ``[b, s, h, d]`` as views of Megatron's ``[s, b, h, d]`` leaves, a gate, upstream gradients."""
    g = torch.Generator().manual_seed(seed)
    leaves = [torch.randn(case.s, case.b, h, case.d, generator=g).to(DEVICE, case.dtype).requires_grad_()
              for h in (case.hq, case.hkv, case.hkv)]
    gate = torch.rand(case.b, case.s, case.hq, 1, generator=g).to(DEVICE, case.dtype)
    do = torch.randn(case.s, case.b, case.hq * case.d, generator=g).to(DEVICE, case.dtype)
    return leaves, gate, do


def unfused_layer_grads(leaves, gate, do, case: Case, stream: str, backend: str):
    """The core attention's two-stream forward (``SSACoreAttention``) and backward: q/k/v gradients.
    The alignment loss gets a weight that makes its gradient as large as the residual's."""
    q, k, v = (t.transpose(0, 1) for t in leaves)
    o_full = ops.full_attention(q, k, v, backend=backend) * gate
    idx = ops.select_blocks(q, k, case.block_size, case.top_k, backend=backend)
    o_sparse = ops.sparse_attention(q, k, v, idx, case.block_size, backend=backend) * gate
    loss = ops.alignment_loss(o_full, o_sparse, backend=backend)
    out = (o_full if stream == "full" else o_sparse).permute(1, 0, 2, 3).reshape(case.s, case.b, -1)
    weight = torch.tensor(float(o_full.numel()), device=DEVICE, dtype=loss.dtype)  # the loss is a mean
    return torch.autograd.grad([out, loss], leaves, [do, weight])


@pytest.mark.parametrize("stream", ["full", "sparse"])
def test_unfused_layer_gradients_survive_an_sdpa_that_reads_grad_output_in_its_output_layout(monkeypatch, stream):
    case = Case(2, 48, 4, 2, 16, 8, 2, f32)
    leaves, gate, do = megatron_inputs(case, seed=21)
    want = unfused_layer_grads(leaves, gate, do, case, stream, backend="triton")  # torch's own SDPA
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", SDPAReadingGradOutInOutputLayout.sdpa)
    got = unfused_layer_grads(leaves, gate, do, case, stream, backend="triton")
    for name, x, ref in zip(("dq", "dk", "dv"), got, want):
        assert rel_err(x, ref) < TOL[f32], f"{stream}: {name} relative RMS error {rel_err(x, ref):.2e}"


def test_the_stand_in_breaks_a_caller_that_hands_it_another_grad_output_layout(monkeypatch):
    """The stand-in is strict enough for the test above to mean something."""
    case = Case(2, 24, 4, 2, 16, 8, 2, f32)
    (q, k, v), _, _ = megatron_inputs(case, seed=12)
    qt, kt, vt = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, h, s, d] views of [s, b, h, d]
    do = torch.randn(case.b, case.s, case.hq, case.d, device=DEVICE).transpose(1, 2)  # [b, h, s, d] view, batch-major
    sdpa = torch.nn.functional.scaled_dot_product_attention
    want = torch.autograd.grad(sdpa(qt, kt, vt, is_causal=True, enable_gqa=True), (q, k, v), do)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", SDPAReadingGradOutInOutputLayout.sdpa)
    o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
    assert o.stride() != do.stride()
    assert all(rel_err(x, r) > 0.5 for x, r in zip(torch.autograd.grad(o, (q, k, v), do), want))


@pytest.mark.skipif(not ON_GPU, reason="GPU-only: cuDNN attention")
def test_unfused_layer_matches_the_fp32_reference_under_cudnn_attention_in_one_process():
    """One q/k/v layout, so one cached cuDNN backward graph: the sparse stream first (its dense grad_output
    is batch-major unless re-laid), then the full stream; each against the fp32 torch reference."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    case = Case(2, 1024, 32, 2, 64, 16, 16, bf16)
    leaves, gate, do = megatron_inputs(case, seed=13)
    reference_leaves = [t.detach().float().requires_grad_() for t in leaves]
    for stream in ("sparse", "full"):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            got = unfused_layer_grads(leaves, gate, do, case, stream, backend="triton")
        want = unfused_layer_grads(reference_leaves, gate.float(), do.float(), case, stream, backend="torch")
        for name, x, ref in zip(("dq", "dk", "dv"), got, want):
            assert rel_err(x, ref) < TOL[bf16], f"{stream}: {name} relative RMS error {rel_err(x, ref):.2e}"
