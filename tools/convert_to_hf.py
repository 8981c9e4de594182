"""Megatron checkpoint (any layout) -> Hugging Face directory; the same as ``ssa-convert to-hf``.

    python tools/convert_to_hf.py --load-dir CKPT --save-dir HF [--ckpt-step N] [--tokenizer DIR] [--dtype bf16|fp32]
"""

import sys

from ssa_megatron.convert.cli import main

if __name__ == "__main__":
    main(["to-hf", *sys.argv[1:]])
