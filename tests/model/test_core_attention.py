"""The SSA core attention computes exactly the ops' streams, gated, and only the streams it needs."""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from tiny_config import tiny_config

from ssa_megatron import ops
from ssa_megatron.model import core_attention as core_attention_module
from ssa_megatron.train.model_provider import transformer_config
from ssa_megatron.model.core_attention import SSACoreAttention
from ssa_megatron.model.step_state import SSAStepState


def make_attention(training_mode="ssa", attention_mode="full", layer_number=2, **ssa):
    cfg = tiny_config(ssa={"training_mode": training_mode, "attention_mode": attention_mode, **ssa})
    state = SSAStepState(cfg.ssa, cfg.model.num_layers)
    module = SSACoreAttention(
        transformer_config(cfg), layer_number, AttnMaskType.causal, "self", ssa=cfg.ssa, step_state=state
    )
    return module, state, cfg


def random_qkv(seq=37, batch=2, heads=4, groups=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(seq, batch, heads, dim, generator=g, requires_grad=True)
    k = torch.randn(seq, batch, groups, dim, generator=g, requires_grad=True)
    v = torch.randn(seq, batch, groups, dim, generator=g, requires_grad=True)
    gate = torch.rand(seq, batch, heads, generator=g)
    return q, k, v, gate


def expected_streams(q, k, v, gate, block_size, top_k):
    """The ops on [b, s, h, d], gated, back to Megatron's [s, b, h*d]."""
    qb, kb, vb = (t.permute(1, 0, 2, 3) for t in (q, k, v))
    g = gate.permute(1, 0, 2).unsqueeze(-1)
    full = ops.full_attention(qb, kb, vb) * g
    sparse = ops.sparse_attention(qb, kb, vb, ops.select_blocks(qb, kb, block_size, top_k), block_size) * g
    to_megatron = lambda o: o.permute(1, 0, 2, 3).reshape(q.shape[0], q.shape[1], -1)
    return full, sparse, to_megatron


@pytest.mark.parametrize("mode", ["full", "sparse"])
def test_ssa_training_returns_drawn_stream_and_records_alignment_of_gated_outputs(mode):
    attention, state, cfg = make_attention("ssa")
    attention.train()
    state.begin_step(num_microbatches=1)
    state.mode = mode
    q, k, v, gate = random_qkv()
    with attention.gated_by(gate):
        out = attention(q, k, v, None)
    full, sparse, to_megatron = expected_streams(q, k, v, gate, cfg.ssa.block_size, cfg.ssa.top_k)
    torch.testing.assert_close(out, to_megatron(full if mode == "full" else sparse), rtol=1e-5, atol=1e-6)
    recorded = state.layer_losses(torch.device("cpu"))
    torch.testing.assert_close(recorded[1], ops.alignment_loss(full, sparse).detach(), rtol=1e-5, atol=1e-8)
    assert recorded[0] == 0 and recorded[2:].abs().sum() == 0  # only this layer's slot
    assert recorded[1] > 0


@pytest.mark.parametrize("attention_mode", ["full", "sparse"])
def test_eval_uses_attention_mode_stream(attention_mode):
    attention, state, cfg = make_attention("ssa", attention_mode=attention_mode)
    attention.eval()
    state.use_inference_mode()
    q, k, v, gate = random_qkv(seed=3)
    with torch.no_grad(), attention.gated_by(gate):
        out = attention(q, k, v, None)
    full, sparse, to_megatron = expected_streams(q, k, v, gate, cfg.ssa.block_size, cfg.ssa.top_k)
    torch.testing.assert_close(out, to_megatron(full if attention_mode == "full" else sparse))
    assert state.layer_losses(torch.device("cpu")).abs().sum() == 0


def test_gate_scales_each_head_output():
    attention, state, _ = make_attention("full")
    attention.train()
    q, k, v, gate = random_qkv(seed=1)
    ones = torch.ones_like(gate)
    with attention.gated_by(ones):
        ungated = attention(q, k, v, None).reshape(*gate.shape, -1)
    with attention.gated_by(gate):
        gated = attention(q, k, v, None).reshape(*gate.shape, -1)
    torch.testing.assert_close(gated, ungated * gate.unsqueeze(-1))


def _forbid(monkeypatch, *names):
    for name in names:
        def refuse(*args, _name=name, **kwargs):
            raise AssertionError(f"{_name} must not run in this mode")
        monkeypatch.setattr(core_attention_module.ops, name, refuse)


def test_full_training_never_computes_sparse_stream(monkeypatch):
    attention, state, _ = make_attention("full")
    attention.train()
    _forbid(monkeypatch, "select_blocks", "sparse_attention", "alignment_loss")
    q, k, v, gate = random_qkv()
    with attention.gated_by(gate):
        out = attention(q, k, v, None)
    out.sum().backward()
    assert q.grad is not None and state.layer_losses(torch.device("cpu")).abs().sum() == 0


def test_sparse_training_never_computes_full_stream(monkeypatch):
    attention, state, _ = make_attention("sparse")
    attention.train()
    _forbid(monkeypatch, "full_attention", "alignment_loss")
    q, k, v, gate = random_qkv()
    with attention.gated_by(gate):
        out = attention(q, k, v, None)
    out.sum().backward()
    assert k.grad is not None


@pytest.mark.parametrize("deterministic", [False, True])
def test_ssa_deterministic_reaches_the_sparse_op(monkeypatch, deterministic):
    attention, state, cfg = make_attention("ssa", deterministic=deterministic)
    assert cfg.ssa.deterministic is deterministic
    attention.train()
    state.begin_step(num_microbatches=1)
    state.mode = "sparse"
    seen = []
    real = ops.sparse_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("deterministic"))
        return real(*args, **kwargs)

    monkeypatch.setattr(core_attention_module.ops, "sparse_attention", spy)
    q, k, v, gate = random_qkv(seed=4)
    with attention.gated_by(gate):
        out = attention(q, k, v, None)
    out.sum().backward()
    assert seen == [deterministic]


def test_alignment_gradient_is_injected_with_the_step_scale():
    """Backward of the output adds d(objective)/d(L_align) = alpha / (layers x micro-batches)."""
    attention, state, cfg = make_attention("ssa")
    attention.train()
    state.begin_step(num_microbatches=3)
    state.mode = "full"
    q, k, v, gate = random_qkv(seed=2)
    with attention.gated_by(gate):
        out = attention(q, k, v, None)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    # Explicitly: the same output plus scale * alignment loss, with no injection.
    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    full, sparse, to_megatron = expected_streams(q2, k2, v2, gate, cfg.ssa.block_size, cfg.ssa.top_k)
    scale = cfg.ssa.alpha / (cfg.model.num_layers * 3)
    explicit = torch.autograd.grad(
        to_megatron(full).sum() + scale * ops.alignment_loss(full, sparse), (q2, k2, v2), retain_graph=True
    )
    plain = torch.autograd.grad(to_megatron(full).sum(), (q2, k2, v2))
    for got, want, without in zip(grads, explicit, plain):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        assert (want - without).abs().max() > 1e-5  # the alignment term is really in there


def test_bad_layer_types_are_refused():
    cfg = tiny_config()
    state = SSAStepState(cfg.ssa, cfg.model.num_layers)
    with pytest.raises(ValueError, match="causal self-attention"):
        SSACoreAttention(transformer_config(cfg), 1, AttnMaskType.padding, "self", ssa=cfg.ssa, step_state=state)
    with pytest.raises(ValueError, match="softmax_scale"):
        SSACoreAttention(transformer_config(cfg), 1, AttnMaskType.causal, "self", softmax_scale=0.5, ssa=cfg.ssa, step_state=state)
