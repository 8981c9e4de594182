"""End-to-end training throughput of the three training modes (ssa, full, sparse) on one run file.

    python tools/benchmark_training.py --config configs/llama1b_ssa_h100.yaml --steps 12 \
        --micro-batch-size 1 --global-batch-size 8 --out docs/benchmarks/training_1gpu

Trains each mode for ``--steps`` optimizer steps on the embedded default corpus (the data path of
the run file is replaced: only speed is measured) and reports the median step time of the steps
after ``--warmup``, tokens/s/GPU and model TFLOP/s/GPU (``train/metrics.py``'s FLOP count), and
peak GPU memory (model, optimizer and activations). Writes ``OUT.json`` and a markdown table ``OUT.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import statistics
import time
from pathlib import Path

import torch

from ssa_megatron.config import load_config
from ssa_megatron.data.config import DataConfig
from ssa_megatron.train import metrics
from ssa_megatron.train.trainer import Trainer


def measure(cfg, steps: int, warmup: int) -> dict:
    gc.collect()  # the previous mode's model and optimizer must not count towards this one's memory
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated()
    trainer = Trainer(cfg)
    try:
        torch.cuda.reset_peak_memory_stats()
        times, losses = [], []
        for _ in range(steps):
            torch.cuda.synchronize()
            start = time.perf_counter()
            record = trainer.step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            losses.append(record.lm_loss)
        step_s = statistics.median(times[warmup:])
        tokens = cfg.train.global_batch_size * cfg.model.seq_length
        flops = metrics.flops_per_token(trainer.cfg, trainer.cfg.model.vocab_size) * tokens
        world = trainer.ctx.world_size
        return {
            "mode": cfg.ssa.training_mode,
            "step_ms": step_s * 1e3,
            "tokens_per_s_per_gpu": tokens / step_s / world,
            "model_tflops_per_gpu": flops / step_s / world / 1e12,
            "peak_memory_gib": (torch.cuda.max_memory_allocated() - baseline) / 2**30,
            "lm_loss_first_last": [losses[0], losses[-1]],
        }
    finally:
        trainer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument("--modes", nargs="+", default=["full", "ssa", "sparse"])
    parser.add_argument("--out", required=True, help="path prefix for .json and .md")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps={args.steps} must exceed --warmup={args.warmup}")

    base = load_config(args.config, {"train": {"train_iters": args.steps, "eval_interval": 0, "tensorboard_dir": None,
                                              "micro_batch_size": args.micro_batch_size,
                                              "global_batch_size": args.global_batch_size}})
    base = dataclasses.replace(base, data=DataConfig(split="100,0,0"))
    rows = []
    for mode in args.modes:
        cfg = dataclasses.replace(base, ssa=dataclasses.replace(base.ssa, training_mode=mode))
        rows.append(measure(cfg, args.steps, args.warmup))
        print(json.dumps(rows[-1]), flush=True)
    full = next((r for r in rows if r["mode"] == "full"), None)
    meta = {
        "device": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(),
        "torch": torch.__version__, "megatron_core": __import__("megatron.core").core.__version__,
        "config": args.config, "model": dataclasses.asdict(base.model), "ssa": dataclasses.asdict(base.ssa),
        "micro_batch_size": args.micro_batch_size, "global_batch_size": args.global_batch_size,
        "steps": args.steps, "warmup": args.warmup,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        "# Training throughput by training mode\n",
        f"{meta['device']}, {meta['date']}, torch {meta['torch']}, megatron-core {meta['megatron_core']}; "
        f"`{args.config}` (seq {base.model.seq_length}, block {base.ssa.block_size}, top-k {base.ssa.top_k}), "
        f"micro-batch {args.micro_batch_size}, global batch {args.global_batch_size}, median of steps "
        f"{args.warmup + 1}-{args.steps}; default corpus (vocab 4096).\n",
        "| training mode | step ms | tokens/s/GPU | model TFLOP/s/GPU | step time vs full | peak GiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['step_ms'] / full['step_ms']:.2f}x" if full else "-"
        lines.append(f"| {r['mode']} | {r['step_ms']:.0f} | {r['tokens_per_s_per_gpu']:.0f} | "
                     f"{r['model_tflops_per_gpu']:.0f} | {ratio} | {r['peak_memory_gib']:.1f} |")
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
