"""The per-part step profile (the training benchmark's breakdown) times each part, and only inside ``recording()``."""

from __future__ import annotations

import time

from synthetic_data import in_memory_data
from tiny_config import tiny_config

from ssa_megatron.train import step_profile
from ssa_megatron.train.step_profile import StepProfile
from ssa_megatron.train.trainer import Trainer


def test_parts_are_timed_forward_and_backward_and_fit_inside_the_step(monkeypatch):
    trainer = Trainer(tiny_config(train={"train_iters": 3}), in_memory_data())
    try:
        profile = StepProfile(trainer.model, trainer.ctx.device)
        trainer.step()  # outside recording(): leaves no spans
        assert profile.report() == {}
        # the MLP gets slower by 20 ms per forward: the profile must put that time there
        mlp = trainer.model[0].module.decoder.layers[0].mlp
        forward = mlp.forward
        monkeypatch.setattr(mlp, "forward", lambda *a, **k: (time.sleep(0.02), forward(*a, **k))[1])
        with profile.recording():
            start = time.perf_counter()
            trainer.step()
            step_ms = (time.perf_counter() - start) * 1e3
            profile.step_done()
        parts = profile.report()
        profile.close()
    finally:
        trainer.close()
    assert set(parts) == set(step_profile.PARTS) | {"output layer + loss"}
    for part, t in parts.items():
        assert t["fwd_ms"] > 0 and t["bwd_ms"] > 0, part
    microbatches = 4 // 2  # tiny_config: global batch 4, micro-batch 2
    assert parts["MLP"]["fwd_ms"] >= 20 * microbatches
    assert sum(t["fwd_ms"] + t["bwd_ms"] for t in parts.values()) < step_ms
