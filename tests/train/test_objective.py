"""What the trainer optimises is exactly ``CE + alpha * mean_layers(L_align)``, averaged over micro-batches."""

from __future__ import annotations

import pytest
import torch
from synthetic_data import in_memory_data
from tiny_config import tiny_config

from ssa_megatron import ops
from ssa_megatron.model import core_attention as core_attention_module
from ssa_megatron.model.step_state import draw_mode
from ssa_megatron.train.trainer import Trainer


def schedule_gradients(trainer: Trainer) -> list[torch.Tensor]:
    """Gradients of one step through Megatron's schedule (alignment joined by the auto-scaler)."""
    for chunk in trainer.model:
        chunk.train()
        chunk.zero_grad_buffer()
    trainer.step_state.begin_step(trainer.num_microbatches)
    trainer._run_schedule(trainer.data.train_iterators(1, consumed_samples=0), forward_only=False, iteration=0)
    return [p.main_grad.clone() for p in trainer.model[0].module.parameters()]


def explicit_gradients(trainer: Trainer, monkeypatch, alignment_weight: float) -> list[torch.Tensor]:
    """Gradients of the written-out objective, with the auto-scaler disabled."""
    collected = []
    alignment_loss = ops.alignment_loss

    def recording_alignment_loss(o_full, o_sparse, backend="auto"):
        loss = alignment_loss(o_full, o_sparse)
        collected.append(loss)
        return loss

    monkeypatch.setattr(core_attention_module, "attach_aux_loss", lambda out, loss, scale: out)
    monkeypatch.setattr(core_attention_module.ops, "alignment_loss", recording_alignment_loss)
    module = trainer.model[0].module
    module.train()
    batches = trainer.data.train_iterators(1, consumed_samples=0)[0]
    seed, num_mb = trainer.cfg.train.seed, trainer.num_microbatches
    objective = 0.0
    for microbatch in range(num_mb):
        batch = next(batches)
        trainer.step_state.mode = draw_mode(seed, 0, microbatch)
        collected.clear()
        per_token = module(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        ce = (per_token * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
        alignment = torch.stack(collected).mean()  # mean over all layers
        assert len(collected) == trainer.cfg.model.num_layers
        objective = objective + (ce + alignment_weight * alignment) / num_mb
    monkeypatch.undo()
    return list(torch.autograd.grad(objective, list(module.parameters())))


@pytest.mark.parametrize("num_microbatches", [1, 3])
def test_optimised_objective_is_ce_plus_alpha_mean_alignment(num_microbatches, monkeypatch):
    # A large init makes attention peaked, so the two streams (and the alignment gradient) differ clearly.
    cfg = tiny_config(model={"init_method_std": 0.3}, train={"global_batch_size": 2 * num_microbatches})
    trainer = Trainer(cfg, in_memory_data())
    try:
        modes = {draw_mode(cfg.train.seed, 0, j) for j in range(num_microbatches)}
        got = schedule_gradients(trainer)
        want = explicit_gradients(trainer, monkeypatch, cfg.ssa.alpha)
        ce_only = explicit_gradients(trainer, monkeypatch, 0.0)
    finally:
        trainer.close()
    alignment_part = torch.cat([(w - c).flatten() for w, c in zip(want, ce_only)])
    error = torch.cat([(g - w).flatten() for g, w in zip(got, want)])
    # The alignment term moves the gradient far more than the comparison's error: a wrong scale
    # (missing 1/num_microbatches, 1/num_layers or alpha) would fail.
    assert alignment_part.abs().max() > 1e-2, (modes, alignment_part.abs().max())
    assert error.abs().max() < 1e-3 * alignment_part.abs().max()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
