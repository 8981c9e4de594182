"""Checkpoint save/load time and size for the 1B model, and 32k-context memory with activation recompute.

    python tools/benchmark_checkpoint.py --config configs/llama1b_ssa_h100.yaml --out docs/benchmarks/checkpoint_1gpu

On one GPU, with the paper's vocabulary (128,256) and random tokens (only sizes and times matter):
1. trains 2 steps at seq 8192, saves (synchronous), saves again asynchronously (time training waited
   and time until the checkpoint is committed), measures the checkpoint's size on disk, then builds a
   fresh trainer that loads it and checks that the next step's loss matches the uninterrupted run's;
2. trains 2 steps at seq 32768 (global batch 1) with and without full activation recompute and reports
   peak memory and step time.
Writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ssa_megatron.config import load_config
from ssa_megatron.data.config import DataConfig
from ssa_megatron.train.checkpoint import AsyncSaves, checkpoint_dir
from ssa_megatron.train.data_setup import TrainingData
from ssa_megatron.train.trainer import Trainer

VOCAB = 128_256


class RandomTokens(TrainingData):
    """Uniform random token sequences (the loss is only compared with itself)."""

    def _iterators(self, dataset, count, consumed_samples):
        def stream(position):
            while True:
                generator = torch.Generator().manual_seed(position)
                tokens = torch.randint(0, self.vocab_size, (self.micro_batch_size, self.seq_length + 1), generator=generator)
                position += self.micro_batch_size * self.dp_size
                yield {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(tokens.shape[0], self.seq_length),
                       "position_ids": torch.arange(self.seq_length).expand(tokens.shape[0], -1)}

        return [stream(consumed_samples + self.dp_rank * self.micro_batch_size) for _ in range(count)]


def random_tokens(cfg, ctx):
    return RandomTokens(vocab_size=VOCAB, train=None, valid=None, micro_batch_size=cfg.train.micro_batch_size,
                        dp_rank=ctx.dp_rank, dp_size=ctx.dp_size, num_workers=0, seq_length=cfg.model.seq_length)


def timed_step(trainer):
    torch.cuda.synchronize()
    start = time.perf_counter()
    record = trainer.step()
    torch.cuda.synchronize()
    return record, time.perf_counter() - start


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def release():
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def checkpoint_times(base, root: Path) -> dict:
    cfg = dataclasses.replace(base, checkpoint=dataclasses.replace(base.checkpoint, save=str(root)))
    trainer = Trainer(cfg, random_tokens)
    try:
        for _ in range(2):
            timed_step(trainer)
        sync_s = trainer.save()  # iteration 2 (the first save of a process also sets up its writer)
        size = directory_bytes(checkpoint_dir(root, 2))
        reference, _ = timed_step(trainer)  # iteration 3: what a resumed run must reproduce
        trainer.async_saves = AsyncSaves()  # as checkpoint.async_save: true does
        start = time.perf_counter()
        async_wait_s = trainer.save()  # iteration 3, written in the background
        trainer.finalize_saves(blocking=True)
        async_total_s = time.perf_counter() - start
    finally:
        trainer.close()
    release()
    load_cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, load=str(root), ckpt_step=2, save=None))
    start = time.perf_counter()
    resumed = Trainer(load_cfg, random_tokens)
    try:
        build_and_load_s = time.perf_counter() - start
        again, _ = timed_step(resumed)
        load_s = resumed.load_seconds
    finally:
        resumed.close()
    release()
    return {
        "checkpoint_gib": size / 2**30,
        "save_sync_s": sync_s,
        "save_async_wait_s": async_wait_s,
        "save_async_total_s": async_total_s,
        "load_s": load_s,
        "trainer_build_and_load_s": build_and_load_s,
        "loss_after_resume": again.lm_loss,
        "loss_uninterrupted": reference.lm_loss,
        "loss_rel_diff": abs(again.lm_loss - reference.lm_loss) / reference.lm_loss,
    }


def long_context_memory(base, recompute: bool) -> dict:
    train = dict(micro_batch_size=1, global_batch_size=1)
    if recompute:
        train.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, seq_length=32768),
                              train=dataclasses.replace(base.train, **train))
    release()
    trainer = Trainer(cfg, random_tokens)
    try:
        times = [timed_step(trainer)[1] for _ in range(3)]
        return {"recompute": recompute, "seq": 32768, "step_ms": 1e3 * min(times[1:]),
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    except torch.OutOfMemoryError as err:
        return {"recompute": recompute, "seq": 32768, "oom": str(err).splitlines()[0]}
    finally:
        trainer.close()
        release()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True, help="path prefix for .json and .md")
    parser.add_argument("--dir", default=None, help="where to write checkpoints (default: a temp dir)")
    args = parser.parse_args()
    os.environ.setdefault("SSA_SKIP_MEMORY_CHECK", "1")  # measure, even where the estimate is cautious
    base = load_config(args.config, {"train": {"train_iters": 100, "eval_interval": 0, "tensorboard_dir": None,
                                              "micro_batch_size": 1, "global_batch_size": 4},
                                     "model": {"vocab_size": VOCAB}})
    base = dataclasses.replace(base, data=DataConfig(split="100,0,0"))  # random tokens stand in for the run's data
    root = Path(args.dir or tempfile.mkdtemp()) / "ckpt"
    shutil.rmtree(root, ignore_errors=True)
    ckpt = checkpoint_times(base, root)
    print(json.dumps(ckpt), flush=True)
    memory = [long_context_memory(base, recompute) for recompute in (True, False)]
    print(json.dumps(memory), flush=True)
    meta = {"device": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "megatron_core": __import__("megatron.core").core.__version__, "config": args.config, "vocab": VOCAB,
            "distributed_optimizer": base.parallel.use_distributed_optimizer}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps({"meta": meta, "checkpoint": ckpt, "long_context": memory}, indent=2))
    lines = [
        "# Checkpoints and long-context memory, one GPU\n",
        f"{meta['device']}, {meta['date']}, torch {meta['torch']}, megatron-core {meta['megatron_core']}; `{args.config}` "
        f"with vocab {VOCAB} (1.24B parameters), bf16, distributed optimizer={meta['distributed_optimizer']}, local disk.\n",
        "| checkpoint size | save (sync) | save (async): training waits | async until committed | load | build + load | loss after resume vs uninterrupted |",
        "|---|---|---|---|---|---|---|",
        f"| {ckpt['checkpoint_gib']:.1f} GiB | {ckpt['save_sync_s']:.1f} s | {ckpt['save_async_wait_s']:.1f} s | "
        f"{ckpt['save_async_total_s']:.1f} s | {ckpt['load_s']:.1f} s | {ckpt['trainer_build_and_load_s']:.1f} s | "
        f"rel. diff {ckpt['loss_rel_diff']:.1e} |",
        "",
        "| seq 32768, micro-batch 1 | step ms | peak GiB |",
        "|---|---|---|",
    ]
    for row in memory:
        label = "full recompute (uniform, 1 layer)" if row["recompute"] else "no recompute"
        lines.append(f"| {label} | {row.get('step_ms', float('nan')):.0f} | "
                     + (f"{row['peak_gib']:.1f} |" if "peak_gib" in row else f"OOM: {row['oom']} |"))
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
