"""The fused RoPE equals Megatron's own unfused RoPE, in value and gradient, on Megatron's strided views."""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

from ssa_megatron.model.rope import apply_rope


def _freqs(s: int, d: int, base: float = 10000.0) -> torch.Tensor:
    """Megatron's angles: ``[s, 1, 1, d]``, the two halves equal."""
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = torch.outer(torch.arange(s, dtype=torch.float32), inv)
    return torch.cat((angles, angles), dim=-1)[:, None, None, :]


def test_fused_rope_matches_megatron_on_a_view_of_the_qkv_projection():
    s, b, groups, heads_per_group, d = 23, 2, 2, 3, 8
    g = torch.Generator().manual_seed(0)
    # Megatron's fused QKV output [s, b, groups, (heads_per_group + 2) * d]; the queries are a view into it
    mixed = torch.randn(s, b, groups, (heads_per_group + 2) * d, generator=g, requires_grad=True)
    freqs = _freqs(s, d)
    query = mixed[..., : heads_per_group * d].reshape(s, b, groups * heads_per_group, d)
    ours = apply_rope(query, freqs)
    theirs = _apply_rotary_pos_emb_bshd(query, freqs)
    assert ours.is_contiguous() and ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert not torch.allclose(ours, query, atol=1e-2)  # the rotation is not the identity here
    grad = torch.randn(ours.shape, generator=g)
    (ours_grad,) = torch.autograd.grad(ours, mixed, grad)
    (theirs_grad,) = torch.autograd.grad(theirs, mixed, grad)
    assert torch.allclose(ours_grad, theirs_grad, atol=1e-6)
    assert ours_grad[..., heads_per_group * d :].abs().max() == 0  # keys/values untouched


def test_fused_rope_in_bf16_rounds_once():
    s, d = 64, 16
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(s, 1, 2, d, generator=g).bfloat16()
    freqs = _freqs(s, d)
    exact = _apply_rotary_pos_emb_bshd(keys.double(), freqs.double())
    ours = apply_rope(keys, freqs)
    assert ours.dtype == torch.bfloat16
    # one bf16 rounding of the float32 result: within half an ulp (2^-8 relative) of the exact value
    assert ((ours.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all()
