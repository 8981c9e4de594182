"""Bad configuration fails before any process group or GPU is touched, naming field, value and fix."""

from __future__ import annotations

import pytest
from tiny_config import tiny_config

from ssa_megatron.config import load_config
from ssa_megatron.model.config import SSAConfig


@pytest.mark.parametrize(
    "section, values, message",
    [
        ("ssa", {"top_k": 0}, r"ssa.top_k=0"),
        ("ssa", {"block_size": 0}, r"ssa.block_size=0"),
        ("ssa", {"training_mode": "moba"}, r"ssa.training_mode='moba'"),
        ("ssa", {"attention_mode": "ssa"}, r"ssa.attention_mode='ssa'"),
        ("ssa", {"alpha": -1.0}, r"ssa.alpha=-1.0"),
        ("ssa", {"deterministic": "yes"}, r"ssa.deterministic='yes'"),
        ("model", {"num_attention_heads": 6, "num_query_groups": 4}, r"num_attention_heads=6 .*num_query_groups=4"),
        ("model", {"hidden_size": 30}, r"hidden_size=30 .*kv_channels"),
        ("train", {"dtype": "fp16"}, r"train.dtype='fp16'"),
        ("train", {"global_batch_size": 5}, r"global_batch_size=5 .*micro_batch_size=2"),
        ("parallel", {"tensor_model_parallel_size": 4}, r"num_query_groups=2 is not divisible by .*tensor_model_parallel_size=4"),
        ("parallel", {"tensor_model_parallel_size": 3}, r"num_attention_heads=4 is not divisible"),
        ("parallel", {"pipeline_model_parallel_size": 3}, r"num_layers=4 is not divisible by .* 3 x 1"),
        ("parallel", {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 4}, r"2 x 4"),
        ("parallel", {"virtual_pipeline_model_parallel_size": 2}, r"needs pipeline_model_parallel_size > 1"),
    ],
)
def test_bad_values_raise_value_error_naming_the_field(section, values, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**{section: values})


def test_ssa_deterministic_is_a_bool_off_by_default():
    assert tiny_config().ssa.deterministic is False
    assert tiny_config(ssa={"deterministic": True}).ssa.deterministic is True
    with pytest.raises(ValueError, match=r"ssa.deterministic=1: must be true or false"):
        SSAConfig(deterministic=1)  # built in code, without the run file's type check


def test_world_size_must_fit_the_layout():
    cfg = tiny_config(parallel={"tensor_model_parallel_size": 2})
    with pytest.raises(ValueError, match="world size 3 is not divisible by tensor x pipeline parallel size = 2 x 1"):
        cfg.check_world_size(3)
    assert cfg.check_world_size(4) == 2


def test_unknown_yaml_keys_are_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  num_layer: 4\n")
    with pytest.raises(ValueError, match=r"model: unknown key\(s\) \['num_layer'\]"):
        load_config(path)
    path.write_text("modle:\n  num_layers: 4\n")
    with pytest.raises(ValueError, match=r"unknown config section\(s\) \['modle'\]"):
        load_config(path)


def test_missing_config_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_replace_yaml_values(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  num_layers: 4\ntrain:\n  train_iters: 5\n")
    cfg = load_config(path, {"train": {"train_iters": 9}, "parallel": {"tensor_model_parallel_size": 2}})
    assert cfg.train.train_iters == 9 and cfg.parallel.tensor_model_parallel_size == 2


def test_every_shipped_run_file_is_valid():
    from pathlib import Path

    files = sorted(Path("configs").glob("*.yaml"))
    assert files
    for path in files:
        cfg = load_config(path)
        assert cfg.model.num_attention_heads % cfg.model.num_query_groups == 0, path
