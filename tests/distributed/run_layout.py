"""One training run in a given parallel layout, for the layout-equality tests (run under torchrun).

    python -m torch.distributed.run --nproc-per-node 4 tests/distributed/run_layout.py \
        --layout '{"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2}' \
        --init init.pt --out result.pt

Loads the full initial weights, trains a few steps on in-memory data, and writes (rank 0) the
per-step logged metrics, the final full weights and the modes every rank drew per micro-batch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from ssa_megatron.train.full_state import gather_full_state, load_full_state  # noqa: E402
from synthetic_data import in_memory_data  # noqa: E402
from tiny_config import tiny_config  # noqa: E402

from ssa_megatron.train.trainer import Trainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layout", default="{}")
    parser.add_argument("--train", default="{}")
    parser.add_argument("--model", default="{}")
    parser.add_argument("--ssa", default="{}")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--init", required=True, help="full initial weights; written if absent (1 process)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    cfg = tiny_config(
        model=json.loads(args.model), ssa=json.loads(args.ssa), parallel=json.loads(args.layout), train=json.loads(args.train)
    )
    trainer = Trainer(cfg, in_memory_data(vocab_size=256))
    if os.path.exists(args.init):
        load_full_state(trainer.model, torch.load(args.init))
    elif dist.get_world_size() == 1:
        torch.save(gather_full_state(trainer.model), args.init)
    else:
        raise SystemExit(f"{args.init} missing: run the one-process layout first")
    # A layout change must not change the optimizer's view: the loaded weights are its master copy.
    trainer.optimizer.reload_model_params()

    modes, records = [], []
    original = trainer.step_state.begin_microbatch

    def recording_begin_microbatch(seed, iteration, microbatch):
        original(seed, iteration, microbatch)
        modes.append((iteration, microbatch, trainer.step_state.mode))

    trainer.step_state.begin_microbatch = recording_begin_microbatch
    for _ in range(args.steps):
        r = trainer.step()
        records.append({"lm": r.lm_loss, "align": r.alignment_loss, "layers": r.layer_alignment_losses, "grad_norm": r.grad_norm})
    weights = gather_full_state(trainer.model)
    ranks = [None] * dist.get_world_size()
    layout = {
        "tp": trainer.ctx.tp_size, "pp": trainer.ctx.pp_size, "dp_rank": trainer.ctx.dp_rank,
        "records": records, "modes": modes,
    }
    dist.all_gather_object(ranks, layout)
    if dist.get_rank() == 0:
        torch.save({"ranks": ranks, "weights": weights}, args.out)
    trainer.close()


if __name__ == "__main__":
    main()
