"""The fused linear + cross-entropy equals torch's cross-entropy of the full logits, in value and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssa_megatron.model import output_loss
from ssa_megatron.model.output_loss import LinearCrossEntropy


def _inputs(n=45, h=16, vocab=300, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    weight = (0.5 * torch.randn(vocab, h, generator=g)).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=g)
    mask = (torch.rand(n, generator=g) > 0.3).float()
    return hidden, weight, labels, mask


def _reference(hidden, weight, labels, mask):
    """Masked-mean cross-entropy of the materialised float64 logits and its gradients."""
    h, w = (t.detach().double().requires_grad_() for t in (hidden, weight))
    per_token = F.cross_entropy(h @ w.t(), labels, reduction="none")
    loss = (per_token * mask.double()).sum() / mask.sum()
    return per_token.detach(), torch.autograd.grad(loss, (h, w))


@pytest.mark.parametrize("chunk_bytes", [1 << 30, 7 * 300 * 4], ids=["one-chunk", "chunks-of-7-tokens"])
def test_loss_and_gradients_match_full_logits(monkeypatch, chunk_bytes):
    monkeypatch.setattr(output_loss, "LOGITS_CHUNK_BYTES", chunk_bytes)
    hidden, weight, labels, mask = _inputs()
    per_token = LinearCrossEntropy.apply(hidden, weight, labels, mask, None, "torch")
    loss = (per_token * mask).sum() / mask.sum()  # the trainer's masked mean
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref_per_token, ref_grads = _reference(hidden, weight, labels, mask)
    assert torch.allclose(per_token.double(), ref_per_token, rtol=1e-6, atol=1e-6)
    for got, ref in zip(grads, ref_grads):
        assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-7)
        assert got.abs().max() > 0


def test_bf16_inputs_match_within_bf16_rounding(monkeypatch):
    monkeypatch.setattr(output_loss, "LOGITS_CHUNK_BYTES", 16 * 300 * 2)
    hidden, weight, labels, mask = _inputs(dtype=torch.bfloat16, seed=3)
    per_token = LinearCrossEntropy.apply(hidden, weight, labels, mask, None, "torch")
    grads = torch.autograd.grad((per_token * mask).sum() / mask.sum(), (hidden, weight))
    ref_per_token, ref_grads = _reference(hidden, weight, labels, mask)
    assert (per_token.double() - ref_per_token).abs().max() < 0.05  # bf16 logits of magnitude ~5
    for got, ref in zip(grads, ref_grads):
        assert got.dtype == torch.bfloat16
        assert ((got.double() - ref).norm() / ref.norm()) < 1e-2


def test_a_gradient_not_proportional_to_the_mask_is_refused():
    hidden, weight, labels, mask = _inputs(seed=4)
    per_token = LinearCrossEntropy.apply(hidden, weight, labels, mask, None, "torch")
    with pytest.raises(ValueError, match="proportional to the loss mask"):
        torch.autograd.grad((per_token * torch.arange(len(mask))).sum(), weight)


def test_without_gradients_no_gradient_work_is_kept():
    hidden, weight, labels, mask = _inputs(seed=5)
    with torch.no_grad():
        per_token = LinearCrossEntropy.apply(hidden, weight, labels, mask, None, "torch")
    assert per_token.grad_fn is None
    assert torch.allclose(per_token.double(), _reference(hidden, weight, labels, mask)[0], atol=1e-6)
