"""Benchmark preprocessing on this machine and write docs/benchmarks/preprocess.{json,md}.

    python tools/benchmark_preprocess.py --workdir /tmp/ssa-bench

Builds a JSONL corpus (default 256 MB) from the Python sources and docs installed here, trains
a 32k byte-level BPE on a sample, then measures HF encode-only speed and our exact
(``--backend hf``) and fast (``--backend gigatoken``) paths as whole processes with 2 workers,
with peak memory. About 15 minutes on 2 cores. Megatron-LM figures are the issue's anchors.
"""

import argparse
import json
import os
import sys

from ssa_megatron.data.benchmark import REPO, run_benchmark, to_markdown


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/ssa-preprocess-bench", help="corpus, tokenizer and outputs")
    p.add_argument("--corpus-mb", type=int, default=256)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--output", default=os.path.join(REPO, "docs", "benchmarks", "preprocess"),
                   help="writes <output>.json and <output>.md")
    args = p.parse_args(argv)
    results = run_benchmark(args.workdir, corpus_mb=args.corpus_mb, runs=args.runs)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output + ".json", "w") as f:
        json.dump(results, f, indent=1)
    markdown = to_markdown(results)
    with open(args.output + ".md", "w") as f:
        f.write(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
