"""The gradient diagnostic (``train.alignment_grad_interval``) splits the step's gradient exactly and
leaves training unchanged."""

from __future__ import annotations

import math

import pytest
import torch
from synthetic_data import in_memory_data
from tiny_config import tiny_config

from ssa_megatron import ops
from ssa_megatron.model import core_attention as core_attention_module
from ssa_megatron.model.step_state import draw_mode
from ssa_megatron.train.trainer import Trainer


def autograd_parts(trainer: Trainer, monkeypatch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(grad CE, grad mean_layers L_align), both averaged over the first step's micro-batches, by plain
    autograd on the module: no schedule, no auto-scaler, no optimizer."""
    recorded = []
    alignment_loss = ops.alignment_loss
    monkeypatch.setattr(core_attention_module, "attach_aux_loss", lambda out, loss, scale: out)
    monkeypatch.setattr(core_attention_module.ops, "alignment_loss",
                        lambda o_full, o_sparse, backend="auto": recorded.append(alignment_loss(o_full, o_sparse)) or recorded[-1])
    module = trainer.model[0].module
    module.train()
    batches = trainer.data.train_iterators(1, consumed_samples=0)[0]
    num_mb = trainer.num_microbatches
    ce, alignment = 0.0, 0.0
    for microbatch in range(num_mb):
        batch = next(batches)
        trainer.step_state.mode = draw_mode(trainer.cfg.train.seed, 0, microbatch)
        recorded.clear()
        per_token = module(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        ce = ce + (per_token * batch["loss_mask"]).sum() / batch["loss_mask"].sum() / num_mb
        alignment = alignment + torch.stack(recorded).mean() / num_mb
    monkeypatch.undo()
    params = list(module.parameters())
    ce_grads = torch.autograd.grad(ce, params, retain_graph=True)
    # the last layer's MLP and the final norm come after every alignment loss: no gradient from it
    alignment_grads = torch.autograd.grad(alignment, params, allow_unused=True)
    return list(ce_grads), [torch.zeros_like(p) if g is None else g for p, g in zip(params, alignment_grads)]


def norm(grads: list[torch.Tensor]) -> float:
    return float(torch.cat([g.flatten() for g in grads]).norm())


@pytest.mark.parametrize("alpha", [10.0, 0.0])
def test_split_norms_equal_autograd_of_each_term(alpha, monkeypatch):
    # A large init makes attention peaked, so the alignment gradient is far from zero.
    cfg = tiny_config(model={"init_method_std": 0.3}, ssa={"alpha": alpha},
                      train={"global_batch_size": 6, "alignment_grad_interval": 1})
    trainer = Trainer(cfg, in_memory_data())
    try:
        ce, alignment = autograd_parts(trainer, monkeypatch)
        record = trainer.step()
    finally:
        trainer.close()
    split = record.alignment_gradient
    assert split is not None and norm(alignment) > 1e-3, norm(alignment)
    assert split.lm_norm == pytest.approx(norm(ce), rel=1e-4)
    assert split.alignment_norm == pytest.approx(norm(alignment), rel=1e-4)
    weighted = alpha * norm(alignment)
    assert split.share == pytest.approx(weighted / (weighted + norm(ce)), rel=1e-4, abs=1e-9)
    # the optimizer's own norm of the update is that of grad CE + alpha * grad L_align
    assert record.grad_norm == pytest.approx(norm([c + alpha * a for c, a in zip(ce, alignment)]), rel=1e-4)


def test_measuring_leaves_the_losses_and_weights_unchanged():
    def run(interval: int):
        cfg = tiny_config(model={"init_method_std": 0.3},
                          train={"global_batch_size": 4, "train_iters": 4, "alignment_grad_interval": interval})
        trainer = Trainer(cfg, in_memory_data())
        try:
            records = [trainer.step() for _ in range(cfg.train.train_iters)]
            weights = [p.detach().clone() for p in trainer.model[0].module.parameters()]
        finally:
            trainer.close()
        return records, weights

    measured, measured_weights = run(2)
    plain, plain_weights = run(0)
    assert [r.alignment_gradient is not None for r in measured] == [False, True, False, True]
    assert all(r.alignment_gradient is None for r in plain)
    for a, b in zip(measured, plain):
        assert (a.lm_loss, a.alignment_loss, a.layer_alignment_losses) == (b.lm_loss, b.alignment_loss, b.layer_alignment_losses)
        assert math.isclose(a.grad_norm, b.grad_norm, rel_tol=1e-6)
    for a, b in zip(measured_weights, plain_weights):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_baselines_have_nothing_to_measure():
    cfg = tiny_config(ssa={"training_mode": "full"}, train={"alignment_grad_interval": 1})
    trainer = Trainer(cfg, in_memory_data())
    try:
        assert trainer.step().alignment_gradient is None
    finally:
        trainer.close()
