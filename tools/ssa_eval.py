"""The evaluation suite: perplexity, attention analysis, budget sweep, lm-eval, NIAH, report.

    python tools/ssa_eval.py perplexity --model runs/ssa/hf --data pg19.jsonl --window 8192 --stride 256 --out runs/ssa/eval
    python tools/ssa_eval.py report runs/ssa/eval runs/full/eval --out report.md

The same as the ``ssa-eval`` command; logic in ``ssa_megatron/eval/``, every flag: ``--help``.
"""

import sys

from ssa_megatron.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
