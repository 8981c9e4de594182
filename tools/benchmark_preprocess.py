"""Benchmark preprocessing on this machine and record it in docs/benchmarks/preprocess.{json,md}.

    python tools/benchmark_preprocess.py --label dev-machine --workdir /tmp/ssa-bench
    taskset -c 0,1 python tools/benchmark_preprocess.py --label other-host-2-cores ...

Builds a JSONL corpus (default 256 MB) from the Python sources and docs installed here, trains
a 32k byte-level BPE on a sample, then measures HF encode-only speed and our exact
(``--backend hf``) and fast (``--backend gigatoken``) paths as whole processes with 2 workers,
with peak memory. About 15 minutes on 2 idle cores. The result is stored under ``--label`` in
the JSON (other labels are kept) and the markdown is rewritten from all of them. Megatron-LM
figures are the issue's anchors, not re-measured.
"""

import argparse
import json
import os
import sys

from ssa_megatron.data.benchmark import REPO, run_benchmark, runs_to_markdown


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/ssa-preprocess-bench", help="corpus, tokenizer and outputs")
    p.add_argument("--corpus-mb", type=int, default=256)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--label", required=True, help="name of this machine/setting in the results")
    p.add_argument("--note", default="", help="context printed under the label (e.g. other load)")
    p.add_argument("--output", default=os.path.join(REPO, "docs", "benchmarks", "preprocess"),
                   help="updates <output>.json and rewrites <output>.md")
    args = p.parse_args(argv)
    results = {**run_benchmark(args.workdir, corpus_mb=args.corpus_mb, runs=args.runs), "note": args.note}
    runs = {}
    if os.path.exists(args.output + ".json"):
        with open(args.output + ".json") as f:
            runs = json.load(f)["runs"]
    runs[args.label] = results
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output + ".json", "w") as f:
        json.dump({"runs": runs}, f, indent=1)
    markdown = runs_to_markdown(runs)
    with open(args.output + ".md", "w") as f:
        f.write(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
