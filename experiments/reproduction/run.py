"""Issue 15's experiment: SSA, FullAttn and MoBA (and an alpha sweep of SSA) trained identically, evaluated
with the repo's own tools, written up in docs/reproduction.md.

    python experiments/reproduction/run.py train    [--runs ssa full ...] [--minutes 9]
    python experiments/reproduction/run.py evaluate [--runs ...]
    python experiments/reproduction/run.py report
    python experiments/reproduction/run.py all      [--runs ...] [--minutes 9]   # train, evaluate, report

A composition of the repo's entry points, run in this process: ``ssa-pretrain`` once per run, with
``--training-mode`` / ``--alpha`` the only differences (same config, seed and data order), then
``ssa-convert to-hf`` of each finished run and the ``ssa-eval`` subcommands on that export. Every call
is printed as the command line it equals. Data: ``--data-dir`` from experiments/reproduction/prepare_data.py.

Resumable: ``train`` skips finished runs (``exit_status.json``) and resumes the others from their last
checkpoint (``--load`` = ``--save``); with ``--minutes`` each run gets ``--exit-duration-in-mins`` from
what is left, so a call ends in time (saved, exit code 3) and the same command continues it.
``evaluate`` skips outputs that exist. Layout of ``--out``: see layout.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from layout import HELDOUT, LENGTH_FACTORS, MANIFEST, REPO, TOKENIZER, TRAIN_DATA, Run, all_runs, select

from ssa_megatron.config import load_config
from ssa_megatron.launch.status import read_exit_status, step_outcome

START_MINUTES = 2.0  # don't start a run with less time than this left (build + a few steps + save)


def call(prog: str, main, argv: list[str]) -> int:
    """Run an entry point's ``main(argv)`` here; its exit code (``sys.exit`` included)."""
    print(f"\n$ {prog} {' '.join(argv)}", flush=True)
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code if isinstance(code, int) else (0 if code is None else 1)


def finished(run: Run, out: Path, iters: int | None = None) -> bool:
    """The run's last training call ended at its train_iters (at least ``iters`` when given)."""
    status = read_exit_status(run.checkpoints(out))
    return step_outcome(status) == "finished" and status["iteration"] >= (iters or 0)


def train(args, runs: list[Run]) -> bool:
    """Train (or resume) each run in turn; False when time ran out before all had finished."""
    from ssa_megatron.train.cli import main as pretrain

    deadline = time.monotonic() + 60 * args.minutes if args.minutes else None
    iters = args.train_iters or load_config(args.config).train.train_iters
    for i, run in enumerate(runs, 1):
        if finished(run, args.out, iters):
            print(f"[train {i}/{len(runs)}] {run.name}: finished already", flush=True)
            continue
        argv = ["--config", str(args.config), "--training-mode", run.training_mode,
                "--data-path", str(args.data_dir / TRAIN_DATA), "--tokenizer", str(args.data_dir / TOKENIZER),
                "--save", str(run.checkpoints(args.out)), "--load", str(run.checkpoints(args.out)),
                "--tensorboard-dir", str(run.tensorboard(args.out))]
        argv += ["--alpha", str(run.alpha)] if run.alpha is not None else []
        argv += ["--train-iters", str(args.train_iters)] if args.train_iters else []
        if deadline is not None:
            left = (deadline - time.monotonic()) / 60 - args.margin_minutes
            if left < START_MINUTES:
                print(f"[train] {left:.1f} min left of --minutes {args.minutes}: not starting {run.name}; "
                      "run the same command again to continue", flush=True)
                return False
            argv += ["--exit-duration-in-mins", f"{left:.2f}"]
        print(f"[train {i}/{len(runs)}] {run.name} ({run.label})", flush=True)
        code = call("ssa-pretrain", pretrain, argv)
        if code == 3:
            print(f"[train] {run.name} stopped early and saved: run the same command again to resume it", flush=True)
            return False
        if code != 0:
            raise RuntimeError(f"ssa-pretrain exited with {code} for run {run.name}: see its output above")
    return True


def export(run: Run, args) -> Path:
    """The run's final checkpoint as an HF export (``ssa-convert to-hf``), made once."""
    from ssa_megatron.convert.cli import main as convert

    hf = run.export_dir(args.out)
    if (hf / "config.json").is_file():
        return hf
    argv = ["to-hf", "--load-dir", str(run.checkpoints(args.out)), "--save-dir", str(hf),
            "--tokenizer", str(args.data_dir / TOKENIZER)]
    if call("ssa-convert", convert, argv) != 0:
        raise RuntimeError(f"ssa-convert to-hf failed for run {run.name}: see its output above")
    return hf


def eval_calls(run: Run, hf: Path, args, cfg) -> list[tuple[str, list[str]]]:
    """(output kind, ssa-eval argv) of one run's export: perplexity at 1x/2x/4x the context, attention analysis
    at the training budget, and for the paper's three models the budget sweep (+ NIAH with --niah)."""
    seq, rf = cfg.model.seq_length, cfg.ssa.block_size * cfg.ssa.top_k
    model = ["--model", str(hf), "--dtype", args.dtype]
    data = ["--data", str(args.data_dir / HELDOUT)]
    calls = []
    for factor in LENGTH_FACTORS:
        window = factor * seq
        calls.append((f"perplexity_{factor}x", ["perplexity", *model, *data, "--window", str(window),
                                                "--stride", str(window // 4), "--settings", "full", "sparse"]))
    calls.append(("attention", ["attention", *model, *data, "--seq-len", str(seq), "--num-sequences", str(args.eval_sequences),
                                "--settings", f"sparse:rf={rf}", "--inference", "full", "sparse"]))
    if run.main:
        calls.append(("sweep", ["sweep", *model, *data, "--budgets", *map(str, args.budgets),
                                "--window", str(seq), "--stride", str(seq // 4), "--seq-len", str(seq),
                                "--num-sequences", str(args.eval_sequences)]))
        if args.niah:
            calls.append(("niah", ["niah", *model, "--lengths", str(seq), str(2 * seq), "--depths", "0", "0.5", "1"]))
    return [(kind, [*argv, "--name", run.label, "--out", str(run.eval_dir(args.out, kind))]) for kind, argv in calls]


def evaluate(args, runs: list[Run]) -> None:
    from ssa_megatron.eval.cli import main as ssa_eval

    cfg = load_config(args.config)
    for i, run in enumerate(runs, 1):
        if not finished(run, args.out):
            print(f"[evaluate {i}/{len(runs)}] {run.name}: not trained to the end yet, skipped", flush=True)
            continue
        calls = [(kind, argv) for kind, argv in eval_calls(run, run.export_dir(args.out), args, cfg)
                 if not (run.eval_dir(args.out, kind) / f"{kind.split('_')[0]}.json").is_file()]
        if calls:
            export(run, args)
        for kind, argv in calls:
            print(f"[evaluate {i}/{len(runs)}] {run.name}: {kind}", flush=True)
            code = call("ssa-eval", ssa_eval, argv)
            if code != 0:
                raise RuntimeError(f"ssa-eval {argv[0]} exited with {code} for run {run.name}: see its output above")


def parse_args(argv=None) -> tuple[argparse.Namespace, list[Run]]:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=REPO / "configs/reproduce_small_h200.yaml")
    common.add_argument("--data-dir", type=Path, default=REPO / ".cache/reproduction",
                        help="prepare_data.py's output: tokenizer/, train_text_document.*, heldout.jsonl, manifest.json")
    common.add_argument("--out", type=Path, default=REPO / "runs/reproduction", help="runs' checkpoints, logs and evaluations")
    common.add_argument("--runs", nargs="+", default=None, help="run names (default: all): ssa full sparse ssa_alpha<A>...")
    common.add_argument("--alphas", type=float, nargs="*", default=[0.0, 100.0],
                        help="alpha sweep: SSA runs besides the config's alpha (the main SSA run)")
    training = argparse.ArgumentParser(add_help=False)
    training.add_argument("--minutes", type=float, default=None, help="time budget of this call for training")
    training.add_argument("--margin-minutes", type=float, default=1.5,
                          help="kept back from --minutes for a run's start-up and final save")
    training.add_argument("--train-iters", type=int, default=None, help="override train.train_iters for every run")
    evaluation = argparse.ArgumentParser(add_help=False)
    evaluation.add_argument("--budgets", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096],
                            help="receptive fields of the budget sweep (tokens)")
    evaluation.add_argument("--eval-sequences", type=int, default=8,
                            help="sequences of the training length for the attention analysis and the sweep")
    evaluation.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"], help="evaluation dtype")
    evaluation.add_argument("--niah", action="store_true", help="also run needle-in-a-haystack on the three models")
    writing = argparse.ArgumentParser(add_help=False)
    writing.add_argument("--doc", type=Path, default=REPO / "docs/reproduction.md")
    writing.add_argument("--figures", type=Path, default=REPO / "docs/reproduction", help="directory of the PNGs")
    writing.add_argument("--notes", type=Path, default=None, help="markdown of the reading, included in the document")

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="phase", required=True)
    sub.add_parser("train", parents=[common, training], help="train (or resume) the runs")
    sub.add_parser("evaluate", parents=[common, evaluation], help="ssa-eval on every finished run")
    sub.add_parser("report", parents=[common, writing], help="write the document and its figures")
    sub.add_parser("all", parents=[common, training, evaluation, writing], help="train, evaluate, report")
    args = parser.parse_args(argv)
    for name in ("config", "data_dir", "out"):
        setattr(args, name, getattr(args, name).resolve())
    if not args.config.is_file():
        parser.error(f"--config {args.config}: no such file")
    if not (args.data_dir / MANIFEST).is_file():
        parser.error(f"--data-dir {args.data_dir}: no manifest.json; run experiments/reproduction/prepare_data.py first")
    try:
        return args, select(all_runs(args.alphas), args.runs)
    except ValueError as e:
        parser.error(str(e))


def main(argv=None) -> int:
    args, runs = parse_args(argv)
    done = True
    if args.phase in ("train", "all"):
        done = train(args, runs)
    if args.phase in ("evaluate", "all"):
        evaluate(args, runs)
    if args.phase in ("report", "all"):
        import report

        print(f"\nwrote {report.write(args, all_runs(args.alphas))}", flush=True)
    return 0 if done else 3


if __name__ == "__main__":
    sys.exit(main())
