"""One gloo rank of test_megatron_datasets: default corpus + datasets + its DP slice, as JSON.

    RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python distributed_data_worker.py CACHE_DIR
"""

import hashlib
import json
import logging
import sys
import warnings

import torch.distributed as dist

from ssa_megatron.data import DataConfig, build_data_iterator, build_datasets, load_tokenizer, prepare_default_corpus


def main() -> None:
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tokenizer_dir, prefix = prepare_default_corpus(sys.argv[1])  # both ranks at once: one builds
    cfg = DataConfig(data_path=[prefix], tokenizer=tokenizer_dir, cache_dir=sys.argv[1])
    tok = load_tokenizer(tokenizer_dir)
    train, valid, _ = build_datasets(cfg, seq_length=64, seed=3, num_samples=(40, 8, 0), tokenizer=tok)
    it = build_data_iterator(train, micro_batch_size=2, data_parallel_rank=rank, data_parallel_size=world,
                             consumed_samples=0)
    batches = [next(it)["tokens"] for _ in range(3)]
    print(json.dumps({"rank": rank, "paths": [tokenizer_dir, prefix], "train": len(train), "valid": len(valid),
                      "rows": [hashlib.md5(r.numpy().tobytes()).hexdigest() for b in batches for r in b]}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
