"""``ssa-pretrain`` / ``python -m ssa_megatron.train``: train a GPT with SSA attention from a YAML run file.

    ssa-pretrain --config configs/tiny_cpu.yaml
    torchrun --nproc-per-node 8 -m ssa_megatron.train --config configs/llama1b_h100.yaml \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --data-path 0.7 /data/A 0.3 /data/B

The run file holds everything; the flags below override the few values that change between
launches of the same run (layout, data, length) and are logged with the resolved configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings

from ssa_megatron.config import config_to_dict, load_config

logger = logging.getLogger("ssa_megatron.train")

# flag -> (section, key)
OVERRIDES = {
    "tensor_model_parallel_size": ("parallel", "tensor_model_parallel_size"),
    "pipeline_model_parallel_size": ("parallel", "pipeline_model_parallel_size"),
    "virtual_pipeline_model_parallel_size": ("parallel", "virtual_pipeline_model_parallel_size"),
    "data_path": ("data", "data_path"),
    "tokenizer": ("data", "tokenizer"),
    "train_iters": ("train", "train_iters"),
    "device": ("train", "device"),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ssa-pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML run file (see configs/)")
    parser.add_argument("--tensor-model-parallel-size", type=int)
    parser.add_argument("--pipeline-model-parallel-size", type=int)
    parser.add_argument("--virtual-pipeline-model-parallel-size", type=int, help="model chunks per pipeline stage")
    parser.add_argument("--data-path", nargs="+", help="prefix, or a blend: WEIGHT PREFIX [WEIGHT PREFIX ...]")
    parser.add_argument("--tokenizer", help="Hugging Face tokenizer directory")
    parser.add_argument("--train-iters", type=int)
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"))
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    overrides: dict[str, dict] = {}
    for flag, (section, key) in OVERRIDES.items():
        value = getattr(args, flag)
        if value is not None:
            overrides.setdefault(section, {})[key] = value
    cfg = load_config(args.config, overrides)

    # Megatron warns at import when TE/apex are absent; both are optional here and reported once below.
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    from ssa_megatron.train.trainer import train  # heavy imports after the config is known to be valid

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # per-parameter DDP/optimizer dumps
    if overrides:
        logger.info("command-line overrides: %s", json.dumps(overrides))
    logger.debug("resolved config: %s", json.dumps(config_to_dict(cfg)))
    train(cfg)
