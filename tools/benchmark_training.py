"""Whole-step training throughput: step time, tokens/s, model TFLOP/s, MFU, peak memory and where the time goes.

    python tools/benchmark_training.py --config configs/llama1b_ssa_h100.yaml --vocab-size 128256 \
        --cases full ssa full@32768+recompute --out docs/benchmarks/training_1gpu

A case is ``MODE[@SEQ][+recompute][+unfused][+vocabN]``: the training mode (full | ssa | sparse),
optionally another sequence length, full activation recompute, the model without our fused
kernels (``model.fused_kernels=false``) or another vocabulary size. Each case trains ``--steps``
optimizer steps on the embedded default corpus (the run file's data is replaced: only speed is
measured; a vocabulary larger than the corpus's only changes the output layer's size, which is what
costs time) and reports the median step time after ``--warmup``, tokens/s/GPU, model TFLOP/s/GPU
(``train/metrics.py``'s FLOP count: recompute and padding are not model FLOPs), MFU against the
device's dense bf16 peak, peak GPU memory above the process's baseline, and, over
``--profile-steps`` further steps, device time per model part (``train/step_profile.py``) and the
top kernels from the PyTorch profiler. Writes ``OUT.json`` and ``OUT.md``.

Under torchrun it measures one parallel layout (``--tensor-model-parallel-size``,
``--pipeline-model-parallel-size``, ``--virtual-pipeline-model-parallel-size``; the run file's
distributed-optimizer setting): tokens/s and TFLOP/s are per GPU, peak memory is the largest over
ranks, rank 0 prints and writes, and the per-part breakdown (if asked for) is rank 0's own:

    torchrun --nproc-per-node 4 tools/benchmark_training.py --config configs/llama1b_ssa_h100.yaml \
        --vocab-size 128256 --cases ssa --profile-steps 0 --tensor-model-parallel-size 2 \
        --pipeline-model-parallel-size 2 --out /tmp/tp2_pp2
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import re
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ssa_megatron.config import load_config
from ssa_megatron.data.config import DataConfig
from ssa_megatron.train import metrics
from ssa_megatron.train.step_profile import StepProfile
from ssa_megatron.train.trainer import Trainer

CASE = re.compile(r"^(full|ssa|sparse)(?:@(\d+))?((?:\+(?:recompute|unfused|vocab\d+))*)$")


def case_config(base, case: str):
    """The run config of one case name (see the module docstring)."""
    match = CASE.match(case)
    if not match:
        raise SystemExit(f"bad case {case!r}: expected MODE[@SEQ][+recompute][+unfused][+vocabN], MODE in full|ssa|sparse")
    mode, seq, flags = match.group(1), match.group(2), match.group(3).split("+")[1:]
    model = dataclasses.replace(base.model, seq_length=int(seq) if seq else base.model.seq_length)
    train = base.train
    for flag in flags:
        if flag == "recompute":
            train = dataclasses.replace(train, recompute_granularity="full", recompute_method="uniform",
                                        recompute_num_layers=1)
        elif flag == "unfused":
            model = dataclasses.replace(model, fused_kernels=False)
        else:
            model = dataclasses.replace(model, vocab_size=int(flag[len("vocab"):]))
    return dataclasses.replace(base, model=model, train=train, ssa=dataclasses.replace(base.ssa, training_mode=mode))


def top_kernels(trainer: Trainer, rows: int = 15) -> list[dict]:
    """The kernels that took the most device time over one step (PyTorch profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        trainer.step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    return [{"kernel": e.key[:90], "ms": e.device_time_total / 1e3, "calls": e.count} for e in events[:rows]]


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def largest_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def measure(case: str, cfg, steps: int, warmup: int, profile_steps: int) -> dict:
    gc.collect()  # the previous case's model and optimizer must not count towards this one's memory
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated() if cuda else 0
    trainer = Trainer(cfg)
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times, losses = [], []
        for _ in range(steps):
            synchronize()
            start = time.perf_counter()
            record = trainer.step()
            synchronize()
            times.append(time.perf_counter() - start)
            losses.append(record.lm_loss)
        peak = largest_over_ranks((torch.cuda.max_memory_allocated() - baseline) / 2**30 if cuda else 0.0, trainer.ctx.device)
        # every rank times its own steps; the slowest rank's median is the layout's step time
        step_s = largest_over_ranks(statistics.median(times[warmup:]), trainer.ctx.device)
        tokens, world = cfg.train.global_batch_size * cfg.model.seq_length, trainer.ctx.world_size
        per_gpu_tflops = lambda c: metrics.flops_per_token(c, c.model.vocab_size) * tokens / step_s / world / 1e12
        peak_tflops = metrics.peak_bf16_tflops(trainer.ctx.device)
        mfu = lambda t: 100 * t / peak_tflops if peak_tflops else None
        # ssa computes both streams; the paper-style MFU counts one (the full stream's attention)
        one_stream = trainer.cfg if cfg.ssa.training_mode != "ssa" else dataclasses.replace(
            trainer.cfg, ssa=dataclasses.replace(trainer.cfg.ssa, training_mode="full"))
        tflops = per_gpu_tflops(trainer.cfg)
        p = cfg.parallel
        row = {
            "case": case, "layout": {"tp": p.tensor_model_parallel_size, "pp": p.pipeline_model_parallel_size,
                                     "vpp": p.virtual_pipeline_model_parallel_size, "dp": trainer.ctx.dp_size,
                                     "distributed_optimizer": p.use_distributed_optimizer},
            "gpus": world, "mode": cfg.ssa.training_mode, "seq_length": cfg.model.seq_length,
            "vocab_size": trainer.cfg.model.vocab_size, "fused_kernels": cfg.model.fused_kernels,
            "recompute": cfg.train.recompute_granularity is not None,
            "step_ms": step_s * 1e3, "tokens_per_s_per_gpu": tokens / step_s / world,
            "model_tflops_per_gpu": tflops, "mfu_percent": mfu(tflops),
            "mfu_one_stream_percent": mfu(per_gpu_tflops(one_stream)),
            "peak_memory_gib": peak, "lm_loss_first_last": [losses[0], losses[-1]],
        }
        if profile_steps and cuda:
            profile = StepProfile(trainer.model, trainer.ctx.device)
            with profile.recording():
                for _ in range(profile_steps):
                    trainer.step()
                    profile.step_done()
            profile.close()
            row["parts_ms"] = profile.report()
            row["top_kernels"] = top_kernels(trainer)
        return row
    finally:
        trainer.close()


def layout_name(row: dict) -> str:
    """``TP2 PP2 (VPP2) DP1, dist. opt.`` (rows of runs before layouts were recorded: one GPU)."""
    layout = row.get("layout", {"tp": 1, "pp": 1, "vpp": None, "dp": 1, "distributed_optimizer": None})
    vpp = f" (VPP{layout['vpp']})" if layout["vpp"] and layout["vpp"] > 1 else ""
    optimizer = ", dist. opt." if layout["distributed_optimizer"] else ""
    return f"TP{layout['tp']} PP{layout['pp']}{vpp} DP{layout['dp']}{optimizer}"


def report(meta: dict, rows: list[dict]) -> str:
    """The markdown page: one throughput table, then each case's breakdown."""
    lines = [
        "# Training throughput\n",
        f"{meta['device']}, {meta['date']}, torch {meta['torch']}, megatron-core {meta['megatron_core']}; "
        f"`{meta['config']}`, micro-batch {meta['micro_batch_size']}, global batch {meta['global_batch_size']}, "
        f"median of steps {meta['warmup'] + 1}-{meta['steps']}; embedded default corpus, model vocabulary as listed. "
        "Model TFLOP/s count the attention the mode computes (both streams for ssa), never recompute; MFU = that / "
        f"{meta['peak_tflops']} TFLOP/s dense bf16 peak; 'MFU one stream' counts one stream's attention for ssa too "
        "(the paper's convention: SSA's extra stream is overhead).\n" + (f"\n{meta['note']}\n" if meta.get("note") else ""),
        "| case | layout | seq | vocab | fused | recompute | step ms | tokens/s/GPU | model TFLOP/s | MFU % | MFU % one stream | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    pct = lambda v: f"{v:.1f}" if v is not None else "-"
    for r in rows:
        lines.append(f"| {r['case']} | {layout_name(r)} | {r['seq_length']} | {r['vocab_size']} | {'yes' if r['fused_kernels'] else 'no'} | "
                     f"{'yes' if r['recompute'] else 'no'} | {r['step_ms']:.0f} | {r['tokens_per_s_per_gpu']:.0f} | "
                     f"{r['model_tflops_per_gpu']:.0f} | {pct(r['mfu_percent'])} | {pct(r['mfu_one_stream_percent'])} | "
                     f"{r['peak_memory_gib']:.1f} |")
    for r in rows:
        if "parts_ms" not in r:
            continue
        lines += [f"\n## Where the step goes: {r['case']}\n",
                  "Device time per optimizer step (all micro-batches), from module hooks; 'other' is the step "
                  "minus the parts (embedding, residual adds, gradient reduction and zeroing, optimizer, loss "
                  "bookkeeping, idle gaps).\n",
                  "| part | forward ms | backward ms | total ms | share |", "|---|---|---|---|---|"]
        parts = r["parts_ms"]
        accounted = 0.0
        for part, t in sorted(parts.items(), key=lambda kv: -(kv[1]["fwd_ms"] + kv[1]["bwd_ms"])):
            total = t["fwd_ms"] + t["bwd_ms"]
            accounted += total
            lines.append(f"| {part} | {t['fwd_ms']:.1f} | {t['bwd_ms']:.1f} | {total:.1f} | {100 * total / r['step_ms']:.0f}% |")
        other = r["step_ms"] - accounted
        lines.append(f"| other | | | {other:.1f} | {100 * other / r['step_ms']:.0f}% |")
        lines += ["\n| top kernels (one step) | ms | calls |", "|---|---|---|"]
        lines += [f"| `{k['kernel']}` | {k['ms']:.1f} | {k['calls']} |" for k in r["top_kernels"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--cases", nargs="+", default=["full", "ssa", "sparse"], help="MODE[@SEQ][+recompute][+unfused][+vocabN]")
    parser.add_argument("--vocab-size", type=int, default=None, help="model vocabulary (default: the corpus's, 4096)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--profile-steps", type=int, default=2, help="extra steps timed per part (0: no breakdown)")
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument("--tensor-model-parallel-size", type=int, default=None, help="TP (default: the run file's)")
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=None, help="PP (default: the run file's)")
    parser.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None,
                        help="model chunks per pipeline stage, interleaved 1F1B (default: the run file's)")
    parser.add_argument("--out", required=True, help="path prefix for .json and .md")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps={args.steps} must exceed --warmup={args.warmup}")

    base = load_config(args.config, {
        "train": {"train_iters": args.steps + args.profile_steps + 1, "eval_interval": 0, "tensorboard_dir": None,
                  "micro_batch_size": args.micro_batch_size, "global_batch_size": args.global_batch_size},
        "model": {"vocab_size": args.vocab_size},
        "parallel": {k: v for k, v in {
            "tensor_model_parallel_size": args.tensor_model_parallel_size,
            "pipeline_model_parallel_size": args.pipeline_model_parallel_size,
            "virtual_pipeline_model_parallel_size": args.virtual_pipeline_model_parallel_size,
        }.items() if v is not None},
    })
    base = dataclasses.replace(base, data=DataConfig(split="100,0,0"))
    cuda = torch.cuda.is_available()
    meta = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu", "date": datetime.date.today().isoformat(),
        "torch": torch.__version__, "megatron_core": __import__("megatron.core").core.__version__,
        "peak_tflops": metrics.peak_bf16_tflops(torch.device("cuda" if cuda else "cpu")), "config": args.config,
        "model": dataclasses.asdict(base.model), "ssa": dataclasses.asdict(base.ssa),
        "micro_batch_size": args.micro_batch_size, "global_batch_size": args.global_batch_size,
        "steps": args.steps, "warmup": args.warmup, "profile_steps": args.profile_steps,
    }
    rows = []
    first_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun rank 0 alone prints and writes
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for case in args.cases:
        try:
            rows.append(measure(case, case_config(base, case), args.steps, args.warmup, args.profile_steps))
        except torch.OutOfMemoryError as err:  # a case that does not fit is a result, not the end of the run
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise  # the other ranks would wait for this one in their next collective
            print(f"{case}: out of memory: {str(err).splitlines()[0]}", flush=True)
            continue
        if not first_rank:
            continue
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "top_kernels"}), flush=True)
        # written after every case: a run cut short by its time limit keeps what it measured
        Path(f"{args.out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        Path(f"{args.out}.md").write_text(report(meta, rows))


if __name__ == "__main__":
    main()
