"""The embedded default run (stdlib text -> BPE -> indexed data -> SSA training on CPU) learns."""

from __future__ import annotations

import dataclasses

from ssa_megatron.config import load_config
from ssa_megatron.train.trainer import train


def test_default_cpu_run_loss_falls(tmp_path):
    cfg = load_config("configs/tiny_cpu.yaml", {"train": {"train_iters": 40, "log_interval": 10, "eval_interval": 20}})
    history = train(cfg).history
    first, last = history[0].lm_loss, sum(r.lm_loss for r in history[-5:]) / 5
    assert len(history) == 40
    assert last < first - 1.0, (first, last)
    assert all(r.alignment_loss > 0 for r in history)
    assert 0 < sum(r.sparse_fraction for r in history) / len(history) < 1  # both modes were trained


def test_default_run_trains_the_full_and_sparse_baselines():
    for mode in ("full", "sparse"):
        cfg = load_config("configs/tiny_cpu.yaml", {"train": {"train_iters": 3, "log_interval": 1}})
        cfg = dataclasses.replace(cfg, ssa=dataclasses.replace(cfg.ssa, training_mode=mode))
        history = train(cfg).history
        assert all(r.alignment_loss == 0 for r in history), mode  # no alignment loss in the baselines
        assert all(r.sparse_fraction == (1.0 if mode == "sparse" else 0.0) for r in history)
