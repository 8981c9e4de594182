"""``ssa-convert``: Hugging Face conversion both ways (flag names follow Megatron-LM's converter).

    ssa-convert to-hf   --load-dir CKPT --save-dir HF [--ckpt-step N] [--tokenizer DIR] [--dtype bf16|fp32]
    ssa-convert from-hf --load-dir HF --save-dir CKPT --tensor-model-parallel-size T --pipeline-model-parallel-size P
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ssa-convert", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="direction", required=True)
    to_hf = sub.add_parser("to-hf", help="Megatron checkpoint (any TP/PP/VPP/DP layout) -> Hugging Face directory")
    to_hf.add_argument("--load-dir", required=True, help="the run's checkpoint directory (its --save)")
    to_hf.add_argument("--save-dir", required=True, help="output HF directory")
    to_hf.add_argument("--ckpt-step", type=int, help="iteration to convert (default: the latest)")
    to_hf.add_argument("--tokenizer", help="HF tokenizer directory to ship (default: the run's data.tokenizer)")
    to_hf.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    to_hf.add_argument("--max-shard-size", default="5GB", help="safetensors shard size, e.g. 5GB or 500MB")
    from_hf = sub.add_parser("from-hf", help="HF directory (our export, Llama, the SSA authors') -> Megatron checkpoint")
    from_hf.add_argument("--load-dir", required=True, help="HF model directory")
    from_hf.add_argument("--save-dir", required=True, help="output checkpoint directory (for ssa-pretrain --load)")
    from_hf.add_argument("--tensor-model-parallel-size", type=int, default=1)
    from_hf.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    try:
        if args.direction == "to-hf":
            from ssa_megatron.convert.to_hf import convert_to_hf

            path = convert_to_hf(args.load_dir, args.save_dir, ckpt_step=args.ckpt_step, tokenizer=args.tokenizer,
                                 dtype=args.dtype, max_shard_size=args.max_shard_size)
        else:
            from ssa_megatron.convert.from_hf import convert_from_hf

            path = convert_from_hf(args.load_dir, args.save_dir, tp=args.tensor_model_parallel_size,
                                   pp=args.pipeline_model_parallel_size)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"ssa-convert {args.direction}: error: {err}")
    print(path)


if __name__ == "__main__":
    main()
