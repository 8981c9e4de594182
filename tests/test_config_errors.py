"""Bad run files fail in load_config, in milliseconds, with one message naming file, field, value and fix.

The command-line side (one line, exit code 2, rank 0 only) is in tests/train/test_cli_errors.py.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
from run_files import TINY, with_values

from ssa_megatron.config import _build, check_kernel_head_dim, load_config


def run_file(tmp_path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def refused(tmp_path, text: str, overrides=None) -> str:
    path = run_file(tmp_path, text)
    start = time.perf_counter()
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        load_config(path, overrides)
    assert time.perf_counter() - start < 2
    message = str(err.value)
    assert "\n" not in message
    return message.replace(str(path), "RUN")


# ---- YAML number quirks and types, from the dataclass hints -----------------------------------------


def test_yaml_1_1_exponent_without_a_dot_reads_as_a_number(tmp_path):
    cfg = load_config(run_file(tmp_path, with_values(train="  lr: 1e-3\n  min_lr: 1E-5\n  train_iters: 2e2")))
    assert cfg.train.lr == 0.001 and cfg.train.min_lr == 1e-5
    assert cfg.train.train_iters == 200 and isinstance(cfg.train.train_iters, int)


@pytest.mark.parametrize("section, line, message", [
    ("train", '  lr: "1e-3"', "RUN: train.lr='1e-3': must be a number, got a string (write the number without quotes)"),
    ("ssa", "  alpha: ten", "RUN: ssa.alpha='ten': must be a number, got a string"),
    ("model", '  kv_channels: "48"',
     "RUN: model.kv_channels='48': must be an integer or null, got a string (write the number without quotes)"),
    ("model", "  num_layers: true", "RUN: model.num_layers=True: must be an integer, got a boolean"),
    ("model", "  num_layers: 4.5", "RUN: model.num_layers=4.5: must be an integer, got a number"),
    ("model", "  tie_embeddings: 1", "RUN: model.tie_embeddings=1: must be true or false, got an integer"),
    ("ssa", "  deterministic: 1", "RUN: ssa.deterministic=1: must be true or false, got an integer"),
    ("train", "  lr_decay_style: 3", "RUN: train.lr_decay_style=3: must be a string, got an integer"),
    ("train", "  lr: .nan", "RUN: train.lr=nan: must be a finite number"),
    ("train", "  exit_signals: SIGTERM", "RUN: train.exit_signals='SIGTERM': must be a list, got a string"),
])
def test_wrong_types_are_refused_by_field_name(tmp_path, section, line, message):
    assert refused(tmp_path, with_values(**{section: line})) == message


def test_lists_become_tuples_and_ints_become_floats(tmp_path):
    cfg = load_config(run_file(tmp_path, with_values(train="  exit_signals: [SIGUSR1]\n  clip_grad: 2")))
    assert cfg.train.exit_signals == ("SIGUSR1",) and isinstance(cfg.train.clip_grad, float)


def test_the_type_check_covers_fields_added_later():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Future:
        steps: int = 1
        name: str | None = None

    with pytest.raises(ValueError, match=r"^future.steps='3': must be an integer, got a string"):
        _build(Future, {"steps": "3"}, "future")
    assert _build(Future, {"steps": 3.0, "name": None}, "future") == Future(steps=3)


# ---- the run file itself ----------------------------------------------------------------------------


def test_malformed_yaml_names_the_file_line_and_column(tmp_path):
    assert refused(tmp_path, "model:\n  num_layers: [4\n") == (
        "RUN: not valid YAML: line 3, column 1: expected ',' or ']', but got '<stream end>'")


def test_empty_run_file_is_an_error(tmp_path):
    assert refused(tmp_path, "# nothing\n") == (
        "RUN: the run file is empty; start from one in configs/ (e.g. configs/tiny_cpu.yaml)")


def test_run_file_without_a_model_section_is_an_error_not_the_1b_default(tmp_path):
    expected = ("RUN: no model: section; a run file must give the model (the built-in defaults are the 1B "
                "model at seq 8192): copy one from configs/, e.g. configs/tiny_cpu.yaml")
    assert refused(tmp_path, "train:\n  train_iters: 2\n") == expected
    assert refused(tmp_path, "model:\ntrain:\n  train_iters: 2\n") == expected


def test_config_pointing_to_a_directory_says_so(tmp_path):
    with pytest.raises(ValueError) as err:
        load_config(tmp_path)
    assert str(err.value) == f"--config {tmp_path}: is a directory; give a YAML run file, e.g. configs/tiny_cpu.yaml"


def test_binary_run_file_names_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"\xff\xfe\x00model")
    with pytest.raises(ValueError, match=r"run.yaml: not a UTF-8 text file"):
        load_config(path)


# ---- cross-field rules -------------------------------------------------------------------------------


def test_block_size_at_least_the_sequence_is_refused(tmp_path):
    assert refused(tmp_path, with_values(ssa="  block_size: 256")) == (
        "RUN: ssa.block_size=256 >= model.seq_length=256: one key block covers the whole sequence, so sparse "
        "attention equals full attention (and runs slower); use a block size well below the sequence (e.g. 16 "
        "or 64), or ssa.training_mode: full")


@pytest.mark.parametrize("top_k", [16, 17])
def test_top_k_covering_every_block_is_refused(tmp_path, top_k):
    assert refused(tmp_path, with_values(ssa=f"  top_k: {top_k}")) == (
        f"RUN: ssa.top_k={top_k} >= the 16 key blocks of model.seq_length=256 / ssa.block_size=16: every token "
        "would attend to every block, so sparse attention equals full attention (and runs slower); set ssa.top_k "
        "below 16 (or a smaller block size), or ssa.training_mode: full")


def test_budget_rule_spares_runs_that_never_use_the_sparse_stream(tmp_path):
    cfg = load_config(run_file(tmp_path, with_values(ssa="  top_k: 16\n  training_mode: full")))
    assert cfg.ssa.top_k == 16
    assert load_config(run_file(tmp_path, with_values(ssa="  top_k: 15"))).ssa.top_k == 15  # the largest sparse one
    with pytest.raises(ValueError, match="ssa.top_k=16 >= the 16 key blocks"):  # sparse validation uses it
        load_config(run_file(tmp_path, with_values(ssa="  top_k: 16\n  training_mode: full\n  attention_mode: sparse")))


def test_head_dim_the_triton_kernels_cannot_take_is_refused_when_they_would_run(tmp_path):
    model = "  kv_channels: 48"
    assert refused(tmp_path, with_values(model=model, ssa="  backend: triton")) == (
        "RUN: head dim model.kv_channels=48: the Triton kernels (ssa.backend=triton) need a power of two >= 16 "
        "(16, 32, 64, 128, ...); change the head dim (model.kv_channels) or set ssa.backend: torch (slower)")
    assert refused(tmp_path, with_values(model=model, train="  device: cuda")) == (
        "RUN: head dim model.kv_channels=48: the Triton kernels (ssa.backend=auto on CUDA) need a power of two "
        ">= 16 (16, 32, 64, 128, ...); change the head dim (model.kv_channels) or set ssa.backend: torch (slower)")
    on_cpu = load_config(run_file(tmp_path, with_values(model=model)))  # auto on CPU: the torch backend
    check_kernel_head_dim(on_cpu, "cpu")
    with pytest.raises(ValueError, match=r"^head dim model.kv_channels=48: the Triton kernels \(ssa.backend=auto on CUDA"):
        check_kernel_head_dim(on_cpu, "cuda")  # train.device: auto on a GPU machine (preflight resolves it)
    load_config(run_file(tmp_path, with_values(model=model, ssa="  backend: torch", train="  device: cuda")))
    load_config(run_file(tmp_path, with_values(model=model, ssa="  backend: triton\n  training_mode: full")))


def test_head_dim_from_hidden_size_is_named_as_such(tmp_path):
    text = with_values(model="  hidden_size: 96\n  num_attention_heads: 4", ssa="  backend: triton")
    assert refused(tmp_path, text).startswith(
        "RUN: head dim model.hidden_size / model.num_attention_heads = 96 / 4 = 24: the Triton kernels")


def test_evaluation_without_a_validation_split_is_refused_up_front(tmp_path):
    assert refused(tmp_path, with_values(data='  split: "100,0,0"')) == (
        "RUN: train.eval_interval=100 but data.split='100,0,0' gives the validation split no weight: give it one "
        "(e.g. '98,2,0') or set train.eval_interval: 0")
    load_config(run_file(tmp_path, with_values(data='  split: "100,0,0"', train="  eval_interval: 0")))


def test_evaluation_with_webdataset_shards_is_refused_up_front(tmp_path):
    text = with_values(data="  webdataset: /w/index.json\n  tokenizer: /t")
    assert refused(tmp_path, text) == (
        "RUN: train.eval_interval=100 but data.webdataset has no validation split: set train.eval_interval: 0")


# ---- who is blamed: the run file or the command line ---------------------------------------------------


def test_a_bad_blend_from_the_command_line_does_not_blame_the_run_file(tmp_path):
    message = refused(tmp_path, TINY, {"data": {"data_path": ["x", "/p/A", "1", "/p/B"], "tokenizer": "/t"}})
    assert message == (
        "command line (--data-path): data.data_path: weight 'x' (before prefix '/p/A') is not a positive number; "
        "write weight/prefix pairs, e.g. ['0.7', '/data/A_text_document', '0.3', '/data/B_text_document']")


def test_a_bad_blend_in_the_run_file_blames_the_run_file(tmp_path):
    message = refused(tmp_path, with_values(data='  data_path: ["x", /p/A, "1", /p/B]\n  tokenizer: /t'))
    assert message.startswith("RUN: data.data_path: weight 'x' (before prefix '/p/A')")


def test_a_rule_between_a_flag_and_the_run_file_names_both(tmp_path):
    message = refused(tmp_path, TINY, {"parallel": {"tensor_model_parallel_size": 3}})
    assert message == (
        "RUN + command line (--tensor-model-parallel-size): model.num_attention_heads=8 is not divisible by "
        "parallel.tensor_model_parallel_size=3: pick a TP size that divides the query heads")
