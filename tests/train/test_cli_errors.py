"""``ssa-pretrain`` with bad input: one line ``ssa-pretrain: error: ...`` on rank 0, exit code 2, in seconds,
before any process group, data or model is built (issue 16's table, the training side).

Each test runs ``cli.main`` in-process; ``distributed.initialize`` is replaced by a tripwire, so a
test that reaches it (i.e. would go on to build data and model) fails. Subprocesses only where the
behaviour needs one: torchrun's ranks and a real Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from run_files import TINY, with_values

from ssa_megatron.train import cli

REPO = Path(__file__).resolve().parents[2]
PREFIX = "ssa-pretrain: error: "


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny tokenizer, a one-document dataset and a 40-document dataset (no torch involved)."""
    from ssa_megatron.data.preprocess import PreprocessConfig, run_preprocess
    from ssa_megatron.data.tokenizer import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("cli_data")
    texts = [f"document {i}: " + " ".join(f"word{(i * 7 + j) % 50}" for j in range(60)) for i in range(40)]
    tokenizer = str(root / "tok")
    train_bpe_tokenizer(texts, tokenizer, vocab_size=400)
    (root / "one.txt").write_text("\n\n".join(texts))  # one text file = one document
    (root / "many.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    for name in ("one.txt", "many.jsonl"):
        run_preprocess(PreprocessConfig(inputs=(str(root / name),), output_prefix=str(root / name.split(".")[0]),
                                        tokenizer=tokenizer, progress=False))
    return {"tokenizer": tokenizer, "one": str(root / "one_text_document"), "many": str(root / "many_text_document")}


@pytest.fixture(autouse=True)
def no_process_groups(monkeypatch):
    """Bad input must stop before the run creates process groups (and so before data and model)."""
    from ssa_megatron.train import distributed

    def tripwire(cfg):
        raise AssertionError("reached distributed.initialize: the error came after process groups, data or model")

    monkeypatch.setattr(distributed, "initialize", tripwire)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SSA_DEBUG", "SSA_SKIP_MEMORY_CHECK"):
        monkeypatch.delenv(name, raising=False)


def run_cli(capsys, *argv) -> tuple[int, str]:
    """(exit code, stderr) of ``ssa-pretrain argv``; asserts it took seconds and stderr is one line."""
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(a) for a in argv])
    assert time.perf_counter() - start < 10
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return exit_info.value.code, err.rstrip("\n")


def write(tmp_path, text: str, name="run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def bad_run(tmp_path, capsys, text: str, *flags) -> str:
    path = write(tmp_path, text)
    code, err = run_cli(capsys, "--config", path, *flags)
    assert code == 2
    assert err.startswith(PREFIX)
    return err[len(PREFIX):].replace(str(path), "RUN")


# ---- one test per row of the table (training side) ------------------------------------------


@pytest.mark.timeout(60)
def test_a_split_with_no_documents_is_an_error_not_a_hang(tmp_path, capsys, data):
    message = bad_run(tmp_path, capsys, TINY, "--data-path", data["one"], "--tokenizer", data["tokenizer"],
                      "--train-iters", "2")
    assert message == (
        f"data.split='95,5,0': the validation split gets 0 of the 1 document(s) of {data['one']} (Megatron splits "
        "each dataset by document): preprocess more documents (e.g. --text-separator cuts a text file into "
        "documents) or give it no weight (e.g. data.split: '100,0,0' with train.eval_interval: 0)")


@pytest.mark.timeout(60)
def test_a_blend_is_checked_prefix_by_prefix(tmp_path, capsys, data):
    message = bad_run(tmp_path, capsys, TINY, "--data-path", "0.5", data["many"], "0.5", data["one"],
                      "--tokenizer", data["tokenizer"])
    assert message.startswith(f"data.split='95,5,0': the validation split gets 0 of the 1 document(s) of {data['one']}")


def test_empty_run_file(tmp_path, capsys):
    assert bad_run(tmp_path, capsys, "") == (
        "RUN: the run file is empty; start from one in configs/ (e.g. configs/tiny_cpu.yaml)")


def test_run_file_without_model_section(tmp_path, capsys):
    assert bad_run(tmp_path, capsys, "train:\n  device: cpu\n") == (
        "RUN: no model: section; a run file must give the model (the built-in defaults are the 1B model at seq "
        "8192): copy one from configs/, e.g. configs/tiny_cpu.yaml")


@pytest.mark.parametrize("section, line, expected", [
    ("ssa", "  alpha: ten", "RUN: ssa.alpha='ten': must be a number, got a string"),
    ("model", '  kv_channels: "48"',
     "RUN: model.kv_channels='48': must be an integer or null, got a string (write the number without quotes)"),
    ("train", '  lr: "1e-3"', "RUN: train.lr='1e-3': must be a number, got a string (write the number without quotes)"),
    ("model", "  num_layers: true", "RUN: model.num_layers=True: must be an integer, got a boolean"),
])
def test_yaml_values_of_the_wrong_type(tmp_path, capsys, section, line, expected):
    assert bad_run(tmp_path, capsys, with_values(**{section: line})) == expected


def test_block_size_or_top_k_that_make_sparse_equal_full(tmp_path, capsys):
    assert bad_run(tmp_path, capsys, with_values(ssa="  top_k: 16")).startswith(
        "RUN: ssa.top_k=16 >= the 16 key blocks of model.seq_length=256 / ssa.block_size=16: every token would "
        "attend to every block")
    assert bad_run(tmp_path, capsys, with_values(ssa="  block_size: 512")).startswith(
        "RUN: ssa.block_size=512 >= model.seq_length=256: one key block covers the whole sequence")


def test_head_dim_the_kernels_cannot_take_with_auto_backend_on_cuda(tmp_path, capsys, monkeypatch):
    import torch

    from ssa_megatron.train import distributed

    monkeypatch.setattr(distributed, "resolve_device", lambda requested: torch.device("cuda"))
    message = bad_run(tmp_path, capsys, with_values(model="  kv_channels: 48", train="  device: auto"))
    assert message == (
        "head dim model.kv_channels=48: the Triton kernels (ssa.backend=auto on CUDA) need a power of two >= 16 "
        "(16, 32, 64, 128, ...); change the head dim (model.kv_channels) or set ssa.backend: torch (slower)")


def test_malformed_yaml_names_the_file(tmp_path, capsys):
    assert bad_run(tmp_path, capsys, "model:\n  num_layers: 4\n   bad indent: 1\n") == (
        "RUN: not valid YAML: line 3, column 14: mapping values are not allowed here")


def test_garbage_tokenizer_json_names_the_file(tmp_path, capsys, data):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("<html>not a tokenizer</html>")
    message = bad_run(tmp_path, capsys, TINY, "--data-path", data["many"], "--tokenizer", tok)
    assert message == (
        f"tokenizer '{tok}': {tok}/tokenizer.json is not a Hugging Face tokenizer file (expected value at line 1 "
        "column 1); pass a tokenizer directory saved by HF tokenizers/transformers or tools/train_tokenizer.py")


def test_blend_weight_error_on_the_command_line_blames_the_command_line(tmp_path, capsys, data):
    message = bad_run(tmp_path, capsys, TINY, "--data-path", "0.7", data["many"], "0,3", data["many"],
                      "--tokenizer", data["tokenizer"])
    assert message == (
        f"command line (--data-path): data.data_path: weight '0,3' (before prefix '{data['many']}') is not a "
        "positive number; write weight/prefix pairs, e.g. ['0.7', '/data/A_text_document', '0.3', "
        "'/data/B_text_document']")


def test_config_pointing_to_a_directory(tmp_path, capsys):
    code, err = run_cli(capsys, "--config", tmp_path)
    assert (code, err) == (2, f"{PREFIX}--config {tmp_path}: is a directory; give a YAML run file, e.g. "
                              "configs/tiny_cpu.yaml")


def test_missing_config_file(tmp_path, capsys):
    code, err = run_cli(capsys, "--config", tmp_path / "nope.yaml")
    assert (code, err) == (2, f"{PREFIX}config file {tmp_path / 'nope.yaml'} does not exist (see configs/ for examples)")


def test_evaluation_without_validation_split(tmp_path, capsys):
    assert bad_run(tmp_path, capsys, with_values(data='  split: "100,0,0"')) == (
        "RUN: train.eval_interval=100 but data.split='100,0,0' gives the validation split no weight: give it one "
        "(e.g. '98,2,0') or set train.eval_interval: 0")


def test_a_run_that_cannot_fit_in_memory_is_refused_naming_the_estimate_and_knobs(tmp_path, capsys, monkeypatch):
    from ssa_megatron.train import preflight

    monkeypatch.setattr(preflight, "available_memory", lambda device: (8 << 30, "available RAM on this CPU machine"))
    text = with_values(model="  num_layers: 16\n  hidden_size: 2048\n  ffn_hidden_size: 8192\n  num_attention_heads: 32"
                             "\n  seq_length: 8192", train="  micro_batch_size: 1\n  global_batch_size: 8")
    assert bad_run(tmp_path, capsys, text) == (
        "estimated memory per rank 49.6 GiB (weights 3.6, gradients 3.6, optimizer 7.1, activations 34.0, "
        "logits 0.4, overhead 1.0 GiB) exceeds the 8.0 GiB available RAM on this CPU machine: lower "
        "train.micro_batch_size or model.seq_length, set train.recompute_granularity: full (with recompute_method: "
        "uniform, recompute_num_layers: 1), use more tensor/pipeline-parallel ranks, "
        "parallel.use_distributed_optimizer with data parallelism, or a smaller model "
        "(SSA_SKIP_MEMORY_CHECK=1 runs anyway)")
    monkeypatch.setenv("SSA_SKIP_MEMORY_CHECK", "1")
    with pytest.raises(AssertionError, match="reached distributed.initialize"):  # warned, then it goes on
        cli.main(["--config", str(tmp_path / "run.yaml")])


# ---- how errors are reported ---------------------------------------------------------------------------


def test_only_rank_zero_prints(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    path = write(tmp_path, "")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--config", str(path)])
    assert exit_info.value.code == 2 and capsys.readouterr().err == ""


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(tmp_path, monkeypatch, how):
    path = write(tmp_path, "")
    argv = ["--config", str(path)]
    if how == "flag":
        argv.append("--debug")
    else:
        monkeypatch.setenv("SSA_DEBUG", "1")
    with pytest.raises(ValueError, match="the run file is empty"):
        cli.main(argv)


def test_internal_errors_keep_their_traceback(tmp_path, monkeypatch):
    path = write(tmp_path, TINY)

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "load_config", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["--config", str(path)])

    def library_value_error(*args, **kwargs):
        return int("not a number")  # a ValueError raised outside ssa_megatron: a bug, not bad input

    monkeypatch.setattr(cli, "load_config", library_value_error)
    with pytest.raises(ValueError, match="invalid literal"):
        cli.main(["--config", str(path)])


def test_ctrl_c_is_one_line(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_config", interrupted)
    code, err = run_cli(capsys, "--config", write(tmp_path, TINY))
    assert (code, err) == (130, "ssa-pretrain: interrupted (Ctrl-C)")


def test_help_describes_every_flag_and_points_to_the_references(capsys):
    parser_actions = []
    original = cli.argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        parser_actions.extend(self._actions)
        return original(self, args, namespace)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli.argparse.ArgumentParser, "parse_args", capture)
        with pytest.raises(SystemExit) as exit_info:
            cli.parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    flags = [a for a in parser_actions if a.option_strings]
    assert len(flags) >= len(cli.OVERRIDES) + 2
    missing = [a.option_strings[0] for a in flags if not a.help or a.help.startswith("see the configuration")
               and a.dest not in ("recompute_method", "recompute_num_layers")]
    assert not missing, f"flags without help text: {missing}"
    assert '"Configuration reference" in README.md' in out and "docs/errors.md" in out and "--debug" in out


# ---- subprocesses: torchrun's ranks, a real Ctrl-C -------------------------------------------------------


def test_under_torchrun_the_error_is_printed_once(tmp_path):
    path = write(tmp_path, "")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SSA_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "0",
                           "-m", "ssa_megatron.train", "--config", str(path)], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env=env)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "ssa-pretrain: error:" in line]
    assert proc.returncode != 0
    assert len(lines) == 1, proc.stderr
    assert lines[0].endswith("the run file is empty; start from one in configs/ (e.g. configs/tiny_cpu.yaml)")


@pytest.mark.timeout(180)
def test_ctrl_c_during_training_exits_with_one_line(tmp_path, data):
    path = write(tmp_path, with_values(train="  train_iters: 100000\n  log_interval: 1\n  eval_interval: 0"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SSA_DEBUG", None)
    proc = subprocess.Popen([sys.executable, "-m", "ssa_megatron.train", "--config", str(path), "--data-path",
                             data["many"], "--tokenizer", data["tokenizer"]], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    try:
        for line in proc.stdout:
            if line.startswith("iteration "):
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.splitlines()[-1] == "ssa-pretrain: interrupted (Ctrl-C)"
    assert "Traceback" not in err
