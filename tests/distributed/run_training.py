"""One ``train()`` run on in-memory data for the checkpoint/resume tests (under torchrun, or one process).

    python -m torch.distributed.run --nproc-per-node 2 tests/distributed/run_training.py \
        --config '{"parallel": {"tensor_model_parallel_size": 2}, "checkpoint": {"save": "ckpt"}}' --out result

Every rank writes ``<out>.rank<R>.json``: its per-step records (all model-wide, the same on every
rank), the exit code and the reason; the process exits with the trainer's exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from synthetic_data import in_memory_data  # noqa: E402
from tiny_config import tiny_config  # noqa: E402

from ssa_megatron.train.trainer import train  # noqa: E402


def run(sections: dict, out: str) -> int:
    cfg = tiny_config(**{k: v for k, v in sections.items() if k in ("model", "ssa", "parallel", "train")})
    if "checkpoint" in sections:
        import dataclasses

        cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, **sections["checkpoint"]))
    rank = int(os.environ.get("RANK", "0"))
    result = train(cfg, in_memory_data(vocab_size=256))
    records = [{"iteration": r.iteration, "lm": r.lm_loss, "align": r.alignment_loss, "grad_norm": r.grad_norm,
                "skipped": r.skipped} for r in result.history]
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump({"records": records, "exit_code": result.exit_code, "reason": result.reason}, f)
    return result.exit_code


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="{}", help="JSON: {model|ssa|parallel|train|checkpoint: {...}}")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    sys.exit(run(json.loads(args.config), args.out))


if __name__ == "__main__":
    main()
