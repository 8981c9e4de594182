"""``ssa-eval``: the evaluation suite's one entry point (``python tools/ssa_eval.py`` is the same).

    ssa-eval perplexity --model HF --data FILE... --window 8192 --stride 256 --settings full sparse sparse:rf=1024 --out DIR
    ssa-eval attention  --model HF --data FILE... --seq-len 8192 --settings sparse:rf=256 --inference full sparse --out DIR
    ssa-eval sweep      --model HF1 HF2 ... --data FILE... --budgets 256 512 1024 2048 4096 --out DIR
    ssa-eval lm-eval    --model HF --settings full sparse --out DIR [--tasks piqa:3 ...] [--include-path DIR]
    ssa-eval niah       --model HF --lengths 4096 8192 16384 32768 --depths 0 0.5 1 --settings full sparse --out DIR
    ssa-eval report     DIR1 DIR2 ... --out report.md

A model is ``--model DIR`` (HF export) or ``--load-dir CKPT [--ckpt-step N]`` (Megatron checkpoint,
converted in memory). Each subcommand writes ``<name>.json`` (and ``.md``/``.png``) into ``--out``.
Bad input exits with code 2 and one line saying what to fix.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ssa_megatron.eval.models import EvalModel, load_model, write_json


def _model_args(p: argparse.ArgumentParser, many: bool = False) -> None:
    p.add_argument("--model", nargs="+" if many else None, help="HF export directory" + (" (one or more)" if many else ""))
    p.add_argument("--load-dir", nargs="+" if many else None, help="Megatron checkpoint directory (converted in memory)")
    p.add_argument("--ckpt-step", type=int, default=None, help="checkpoint iteration (default: the latest)")
    p.add_argument("--tokenizer", default=None, help="HF tokenizer directory (default: the model's / the run's)")
    p.add_argument("--name", nargs="+" if many else None, default=None, help="display name(s) (default: the directory name)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", nargs="+", required=True, help="text/JSONL files or Megatron indexed dataset prefixes")
    p.add_argument("--json-key", default="text")
    p.add_argument("--max-documents", type=int, default=None)
    p.add_argument("--no-prefix", action="store_true", help="do not prefix documents with BOS/EOS (their first token is then unscored)")


def _load(args, index: int | None = None) -> EvalModel:
    pick = (lambda v: v[index] if v is not None else None) if index is not None else (lambda v: v)
    return load_model(pick(args.model), load_dir=pick(args.load_dir), ckpt_step=args.ckpt_step, tokenizer=args.tokenizer,
                      dtype=args.dtype, device=args.device, name=pick(args.name))


def _docs(args, model: EvalModel):
    from ssa_megatron.eval.data import read_documents

    return read_documents(args.data, model.tokenizer, json_key=args.json_key, max_documents=args.max_documents)


def _prefix(args, model: EvalModel):
    from ssa_megatron.eval.perplexity import default_prefix

    return None if args.no_prefix else default_prefix(model.tokenizer)


def _write(out: Path, name: str, result: dict, md: str) -> None:
    write_json(out / f"{name}.json", result)
    (out / f"{name}.md").write_text(md)
    print(md)


def cmd_perplexity(args) -> None:
    from ssa_megatron.eval import perplexity
    from ssa_megatron.eval.data import concatenate

    model = _load(args)
    docs = _docs(args, model)
    if args.concat:
        docs = [concatenate(docs, model.tokenizer.eos_token_id if model.tokenizer else None)]
    result = perplexity.perplexity(model, docs, model.settings(args.settings), window=args.window, stride=args.stride,
                                   batch_size=args.batch_size, prefix_token=_prefix(args, model))
    _write(Path(args.out), "perplexity", result, perplexity.markdown(result))


def cmd_attention(args) -> None:
    from ssa_megatron.eval import attention
    from ssa_megatron.eval.data import sequences

    model = _load(args)
    ids = sequences(_docs(args, model), args.seq_len, args.num_sequences, model.tokenizer.eos_token_id if model.tokenizer else None)
    result = attention.analyse(model, ids, model.settings(args.settings), inference=tuple(args.inference), sink_tokens=args.sink_tokens)
    _write(Path(args.out), "attention", result, attention.markdown(result))


def cmd_sweep(args) -> None:
    from ssa_megatron.eval import sweep
    from ssa_megatron.eval.data import sequences

    count = len(args.model or args.load_dir or [])
    if count == 0:
        raise ValueError("give --model DIR... or --load-dir CKPT...")
    if args.model and args.load_dir:
        raise ValueError("give --model or --load-dir, not both")
    if args.name and len(args.name) != count:
        raise ValueError(f"--name: {len(args.name)} names for {count} models")
    models = []
    for i in range(count):
        model = _load(args, i)
        docs = _docs(args, model)
        ids = sequences(docs, args.seq_len, args.num_sequences, model.tokenizer.eos_token_id if model.tokenizer else None)
        models.append(sweep.sweep_model(model, docs, ids, args.budgets, block_sizes=args.block_size, window=args.window,
                                        stride=args.stride, batch_size=args.batch_size, prefix_token=_prefix(args, model),
                                        sink_tokens=args.sink_tokens))
        del model
    result = {"kind": "sweep", "window": args.window, "stride": args.stride, "budgets": args.budgets, "models": models}
    sweep.write(result, args.out)
    md = sweep.markdown(result)
    (Path(args.out) / "sweep.md").write_text(md)
    print(md)


def cmd_lm_eval(args) -> None:
    from ssa_megatron.eval import lm_eval_runner as runner

    tasks = runner.parse_tasks(args.tasks) if args.tasks else runner.PAPER_TASKS
    if args.model is not None:  # the harness loads the export itself (its HF wrapper, trust_remote_code)
        import json
        import types

        import torch

        from ssa_megatron.eval.models import parse_setting

        config_file = Path(args.model) / "config.json"
        if not config_file.is_file():
            raise ValueError(f"--model {args.model}: no config.json there; pass an HF export (ssa-convert to-hf)")
        cfg = types.SimpleNamespace(**json.loads(config_file.read_text()))
        settings = [parse_setting(s, cfg.block_size).resolve(cfg) for s in args.settings]
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        merged = runner.run_lm_eval(settings, tasks, args.out, model_dir=args.model, name=args.name or Path(args.model).name,
                                    include_path=args.include_path, limit=args.limit, device=device, dtype=args.dtype,
                                    batch_size=args.batch_size)
    else:
        model = _load(args)
        merged = runner.run_lm_eval(model.settings(args.settings), tasks, args.out, model_obj=model.model, tokenizer=model.tokenizer,
                                    name=model.name, include_path=args.include_path, limit=args.limit, batch_size=args.batch_size)
    print(runner.markdown(merged, tasks))


def cmd_niah(args) -> None:
    from ssa_megatron.eval import niah

    model = _load(args)
    haystack = Path(args.haystack).read_text() if args.haystack else niah.NOISE
    result = niah.run_niah(model, model.settings(args.settings), args.lengths, args.depths, samples=args.samples,
                           max_new_tokens=args.max_new_tokens, haystack=haystack, seed=args.seed)
    _write(Path(args.out), "niah", result, niah.markdown(result))
    niah.heatmap(result, Path(args.out) / "niah.png", metric=args.metric)


def cmd_report(args) -> None:
    from ssa_megatron.eval.report import build_report

    print(f"wrote {build_report(args.run_dirs, args.out, title=args.title)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssa-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    settings_help = "attention settings: full, sparse, sparse:k=K, sparse:bs=B,k=K, sparse:rf=TOKENS"

    p = sub.add_parser("perplexity", help="sliding-window perplexity, full and sparse at several budgets")
    _model_args(p)
    _data_args(p)
    p.add_argument("--window", type=int, default=8192)
    p.add_argument("--stride", type=int, default=256, help="tokens between window starts (the PG19 protocol: 256)")
    p.add_argument("--settings", nargs="+", default=["full", "sparse"], help=settings_help)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--concat", action="store_true", help="join all documents (EOS between) into one stream (WikiText style)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("attention", help="AttnSparsity, dropped mass, entropy, sink mass, alignment gap per layer/head")
    _model_args(p)
    _data_args(p)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--num-sequences", type=int, default=4)
    p.add_argument("--settings", nargs="+", default=["sparse"], help="sparse budgets to measure: " + settings_help)
    p.add_argument("--inference", nargs="+", default=["full", "sparse"], choices=["full", "sparse"])
    p.add_argument("--sink-tokens", type=int, default=4)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_attention)

    p = sub.add_parser("sweep", help="perplexity and AttnSparsity vs budget, JSON + PNG, one line per model")
    _model_args(p, many=True)
    _data_args(p)
    p.add_argument("--budgets", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096], help="receptive fields in tokens")
    p.add_argument("--block-size", type=int, nargs="+", default=None, help="block sizes (default: each model's own)")
    p.add_argument("--window", type=int, default=8192)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=8192, help="sequence length of the sparsity measurement")
    p.add_argument("--num-sequences", type=int, default=2)
    p.add_argument("--sink-tokens", type=int, default=4)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("lm-eval", help="lm-evaluation-harness in both attention modes (the paper's tasks and shots)")
    _model_args(p)
    p.add_argument("--settings", nargs="+", default=["full", "sparse"], help=settings_help)
    p.add_argument("--tasks", nargs="+", default=None, help="NAME:SHOTS ... (default: piqa:3 hellaswag:10 arc_easy:25 arc_challenge:5 wikitext:0)")
    p.add_argument("--include-path", default=None, help="directory of extra task YAMLs")
    p.add_argument("--limit", type=float, default=None, help="examples per task (testing only)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_lm_eval)

    p = sub.add_parser("niah", help="needle in a haystack (RULER single needle) with a heatmap")
    _model_args(p)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--haystack", default=None, help="text file of filler (default: RULER's repeated noise sentences)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metric", default="contains", choices=["exact", "contains", "partial"], help="heatmap colour")
    p.add_argument("--settings", nargs="+", default=["full", "sparse"], help=settings_help)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_niah)

    p = sub.add_parser("report", help="one markdown page from several runs' outputs")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--title", default="SSA evaluation")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args.func(args)
    except ValueError as e:
        print(f"ssa-eval {args.command}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
