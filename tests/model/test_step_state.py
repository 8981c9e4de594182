"""The per-micro-batch mode draw and the alignment-loss bookkeeping."""

from __future__ import annotations

import torch
from tiny_config import tiny_config

from ssa_megatron.model.step_state import SSAStepState, draw_mode


def test_mode_draw_is_a_pure_function_of_seed_iteration_microbatch():
    draws = [draw_mode(7, it, mb) for it in range(20) for mb in range(8)]
    assert draws == [draw_mode(7, it, mb) for it in range(20) for mb in range(8)]
    assert draws != [draw_mode(8, it, mb) for it in range(20) for mb in range(8)]


def test_mode_draw_is_fair():
    draws = [draw_mode(0, it, mb) for it in range(500) for mb in range(8)]
    assert set(draws) == {"full", "sparse"}
    assert abs(draws.count("sparse") / len(draws) - 0.5) < 0.03


def test_non_ssa_training_modes_never_draw():
    cfg = tiny_config(ssa={"training_mode": "sparse"})
    state = SSAStepState(cfg.ssa, cfg.model.num_layers)
    for mb in range(10):
        state.begin_microbatch(0, 0, mb)
        assert state.mode == "sparse"


def test_alignment_record_is_a_per_layer_mean_over_microbatches():
    cfg = tiny_config()
    state = SSAStepState(cfg.ssa, num_layers=4, tp_size=2)
    state.begin_step(num_microbatches=2)
    state.record_alignment(3, torch.tensor(1.0))
    state.record_alignment(3, torch.tensor(3.0))
    assert state.layer_losses(torch.device("cpu")).tolist() == [0.0, 0.0, 2.0, 0.0]
    assert state.alignment_grad_scale == cfg.ssa.alpha / (4 * 2 * 2)
