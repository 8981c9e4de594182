"""Hugging Face directory (our export, a Llama, the SSA authors' release) -> Megatron checkpoint;
the same as ``ssa-convert from-hf``.

    python tools/convert_from_hf.py --load-dir HF --save-dir CKPT \
        --tensor-model-parallel-size T --pipeline-model-parallel-size P
"""

import sys

from ssa_megatron.convert.cli import main

if __name__ == "__main__":
    main(["from-hf", *sys.argv[1:]])
