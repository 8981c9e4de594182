"""The pre-build checks: the parameter count the memory estimate uses is the built model's, the
estimate is calibrated, and the start of a run prints versions, parameter count, device and estimate."""

from __future__ import annotations

import logging

import pytest
from synthetic_data import in_memory_data
from tiny_config import tiny_config

from ssa_megatron.config import load_config
from ssa_megatron.train import preflight
from ssa_megatron.train.trainer import Trainer


@pytest.mark.parametrize("model", [{}, {"tie_embeddings": False, "kv_channels": 16}])
def test_parameter_count_is_the_built_models(model):
    cfg = tiny_config(model=model)
    trainer = Trainer(cfg, in_memory_data(vocab_size=200))
    try:
        built = sum(p.numel() for chunk in trainer.model for p in chunk.parameters())
    finally:
        trainer.close()
    assert preflight.count_parameters(cfg, 200) == built


def test_estimate_matches_the_measured_1b_peak_on_an_h100():
    # docs/benchmarks/training_1gpu.md: 34.7 GiB peak for the ssa mode (micro-batch 1, vocab 4096, one GPU).
    cfg = load_config("configs/llama1b_ssa_h100.yaml")
    estimate = preflight.estimate_memory(cfg, 4096, world_size=1)
    assert 31 < estimate.total / preflight.GiB < 34.7  # close, and never above what really ran


def test_estimate_shrinks_with_the_knobs_it_names():
    cfg = load_config("configs/llama1b_ssa_h100.yaml")
    base = preflight.estimate_memory(cfg, 4096).total
    recompute = load_config("configs/llama1b_ssa_h100.yaml", {"train": {
        "recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}})
    assert preflight.estimate_memory(recompute, 4096).total < base / 1.5
    assert preflight.estimate_memory(cfg, 4096, world_size=8).total < base  # distributed optimizer over DP=8
    tp2 = load_config("configs/llama1b_ssa_h100.yaml", {"parallel": {"tensor_model_parallel_size": 2}})
    assert preflight.estimate_memory(tp2, 4096, world_size=2).total < base / 1.5


def test_start_of_run_prints_versions_parameters_device_and_estimate(caplog, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    cfg = tiny_config()
    with caplog.at_level(logging.INFO, logger="ssa_megatron.train"):
        preflight.check_run(cfg)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "versions: torch " in text and ", megatron-core " in text and ", triton " in text and ", CUDA " in text
    assert "device: cpu (gloo), 1 rank(s)" in text
    expected = preflight.count_parameters(cfg, 4096) / 1e6
    assert f"model: {expected:.1f}M parameters (vocab 4096 padded to 4096) | estimated memory per rank " in text


def test_other_ranks_print_nothing(caplog, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    with caplog.at_level(logging.INFO, logger="ssa_megatron.train"):
        preflight.check_run(tiny_config())
    assert not caplog.records
