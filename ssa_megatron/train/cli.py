"""``ssa-pretrain`` / ``python -m ssa_megatron.train``: train a GPT with SSA attention from a YAML run file.

    ssa-pretrain --config configs/tiny_cpu.yaml
    torchrun --nproc-per-node 8 -m ssa_megatron.train --config configs/llama1b_h100.yaml \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --data-path 0.7 /data/A 0.3 /data/B

The run file holds everything; the flags below (Megatron-LM's names) override the values that
change between launches of the same run (layout, data, length, checkpoints, exit conditions) and are
logged; the resolved run file is printed at start and saved beside each checkpoint.

Exit codes: 0 finished, 3 saved and stopped early (signal, exit duration or interval: requeue and
resume with --load), 2 bad input, 1 crash.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import time
import warnings

from ssa_megatron.config import field_help, load_config

logger = logging.getLogger("ssa_megatron.train")

# Command-line overrides, Megatron-LM's names: (flag, section, key, argparse options). Each maps to
# one run-file key; everything else lives in the run file.
OVERRIDES = [
    ("--tensor-model-parallel-size", "parallel", "tensor_model_parallel_size", dict(type=int)),
    ("--pipeline-model-parallel-size", "parallel", "pipeline_model_parallel_size", dict(type=int)),
    ("--virtual-pipeline-model-parallel-size", "parallel", "virtual_pipeline_model_parallel_size",
     dict(type=int, help="model chunks per pipeline stage (interleaved 1F1B)")),
    ("--data-path", "data", "data_path", dict(nargs="+", help="prefix, or a blend: WEIGHT PREFIX [WEIGHT PREFIX ...]")),
    ("--tokenizer", "data", "tokenizer", dict(help="Hugging Face tokenizer directory")),
    ("--training-mode", "ssa", "training_mode", dict(choices=("ssa", "full", "sparse"))),
    ("--alpha", "ssa", "alpha", dict(type=float)),
    ("--train-iters", "train", "train_iters", dict(type=int, help="optimizer steps of the whole run")),
    ("--device", "train", "device", dict(choices=("auto", "cuda", "cpu"))),
    ("--seed", "train", "seed", dict(type=int)),
    ("--micro-batch-size", "train", "micro_batch_size", dict(type=int)),
    ("--global-batch-size", "train", "global_batch_size", dict(type=int, help="sequences per optimizer step, all DP ranks")),
    ("--lr", "train", "lr", dict(type=float)),
    ("--min-lr", "train", "min_lr", dict(type=float)),
    ("--log-interval", "train", "log_interval", dict(type=int)),
    ("--tensorboard-dir", "train", "tensorboard_dir", dict()),
    ("--eval-interval", "train", "eval_interval", dict(type=int, help="0 disables validation")),
    ("--eval-iters", "train", "eval_iters", dict(type=int)),
    ("--exit-duration-in-mins", "train", "exit_duration_in_mins",
     dict(type=float, help="save and exit (code 3) after this many minutes of wall time")),
    ("--exit-interval", "train", "exit_interval", dict(type=int, help="save and exit (code 3) at multiples of this iteration")),
    ("--exit-signal-handler", "train", "exit_signal_handler",
     dict(action="store_const", const=True, help="save and exit (code 3) on train.exit_signals (default SIGTERM, SIGUSR1, SIGUSR2)")),
    ("--recompute-granularity", "train", "recompute_granularity", dict(choices=("full", "selective"))),
    ("--recompute-method", "train", "recompute_method", dict(choices=("uniform", "block"))),
    ("--recompute-num-layers", "train", "recompute_num_layers", dict(type=int)),
    ("--save", "checkpoint", "save", dict(help="checkpoint directory (Megatron-LM layout)")),
    ("--load", "checkpoint", "load", dict(help="resume from the latest good checkpoint here; a missing dir equal to --save starts fresh")),
    ("--ckpt-step", "checkpoint", "ckpt_step", dict(type=int, help="load this iteration instead of the latest")),
    ("--save-interval", "checkpoint", "save_interval", dict(type=int)),
    ("--no-load-optim", "checkpoint", "no_load_optim", dict(action="store_const", const=True, help="fresh optimizer state")),
    ("--no-load-rng", "checkpoint", "no_load_rng", dict(action="store_const", const=True, help="do not restore RNG states")),
    ("--finetune", "checkpoint", "finetune",
     dict(action="store_const", const=True, help="weights only: iteration, optimizer, scheduler and data start at 0")),
]


HELP_EPILOG = """\
Every flag overrides the run-file key in [brackets]; everything else lives in the run file:
see "Configuration reference" in README.md for every key, and docs/errors.md for the errors a run
can stop with and their fixes. Bad input stops with one line "ssa-pretrain: error: ..." and exit
code 2 before any data or model is built; --debug (or SSA_DEBUG=1) shows the traceback."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ssa-pretrain", description=__doc__.splitlines()[0], epilog=HELP_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run file, e.g. configs/tiny_cpu.yaml (see configs/)")
    for flag, section, key, options in OVERRIDES:
        text = options.get("help") or field_help(section, key) or "see the configuration reference"
        options = {**options, "help": f"{text} [{section}.{key}]"}
        parser.add_argument(flag, dest=key, **options)
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an input error (same as SSA_DEBUG=1)")
    return parser.parse_args(argv)


def overrides_from_args(args: argparse.Namespace) -> dict[str, dict]:
    """``{section: {key: value}}`` for the flags given on the command line."""
    overrides: dict[str, dict] = {}
    for _flag, section, key, _options in OVERRIDES:
        value = getattr(args, key)
        if value is not None:
            overrides.setdefault(section, {})[key] = value
    return overrides


def _run(args: argparse.Namespace) -> None:
    overrides = overrides_from_args(args)
    cfg = load_config(args.config, overrides)

    # Megatron warns at import when TE/apex are absent; both are optional here and reported once below.
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message="Apex is not installed. Falling back to Torch Norm")
    warnings.filterwarnings("ignore", message="full scope is deprecated")  # megatron-core 0.16's own default
    from ssa_megatron.train.trainer import train  # heavy imports after the config is known to be valid

    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # per-parameter DDP/optimizer dumps
    if overrides:
        logger.info("command-line overrides: %s", json.dumps(overrides))
    result = train(cfg)
    sys.exit(result.exit_code)


# Exceptions that mean "bad input" when raised on purpose by this project's own checks; the same
# types raised inside a library (megatron, torch, numpy) are internal errors and keep the traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
_OUR_CODE = tuple(
    os.path.dirname(os.path.abspath(spec.origin)) + os.sep
    for spec in map(importlib.util.find_spec, ("ssa_megatron", "ssa_kernels"))
    if spec is not None and spec.origin is not None
)


def is_user_error(err: BaseException) -> bool:
    """A bad-input exception raised by our own validation (the innermost frame is in our code)."""
    if not isinstance(err, USER_ERRORS):
        return False
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is None or os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_OUR_CODE)


def one_line(message: str) -> str:
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


RANK_ZERO_GRACE_S = 3.0  # how long other ranks wait before exiting on bad input (seen lost under CPU load)


def main(argv=None) -> None:
    """The ``ssa-pretrain`` entry point: bad input ends in one line on rank 0 and exit code 2."""
    args = parse_args(argv)  # argparse's own errors: usage + "ssa-pretrain: error: ...", exit code 2
    debug = args.debug or os.environ.get("SSA_DEBUG", "0") not in ("", "0")
    rank_zero = os.environ.get("RANK", "0") == "0"  # torchrun sets RANK; one process otherwise
    try:
        _run(args)
    except KeyboardInterrupt:
        if debug:
            raise
        if rank_zero:
            print("ssa-pretrain: interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as err:
        if debug or not is_user_error(err):
            raise
        if rank_zero:
            print(f"ssa-pretrain: error: {one_line(err)}", file=sys.stderr, flush=True)
        else:  # torchrun stops every worker at the first exit: let rank 0 print its line first
            time.sleep(RANK_ZERO_GRACE_S)
        sys.exit(2)
