"""Merge preprocessing shards (or any Megatron indexed datasets) into one dataset.

After a SLURM array of ``tools/preprocess_data.py --task-index i --task-count N`` runs::

    python tools/merge_datasets.py --shards-dir data/corpus.shards

writes ``data/corpus_<key>_document.{bin,idx}`` for each ``--json-keys`` key, refusing if any
shard is unfinished (it names them). To concatenate arbitrary datasets, in order::

    python tools/merge_datasets.py --inputs data/a_text_document data/b_text_document \\
        --output-prefix data/ab_text_document
"""

import argparse
import sys

from ssa_megatron.data.merge import merge_datasets
from ssa_megatron.data.shards import merge_shards


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards-dir", help="<output-prefix>.shards written by tools/preprocess_data.py")
    src.add_argument("--inputs", nargs="+", help="dataset prefixes to concatenate, in order")
    p.add_argument("--output-prefix", help="with --inputs: the merged prefix; with --shards-dir: "
                   "overrides the prefix (<prefix>_<key>_document is written)")
    p.add_argument("--keep-shards", action="store_true", help="with --shards-dir: keep the shard files")
    args = p.parse_args(argv)
    try:
        if args.shards_dir:
            outputs = merge_shards(args.shards_dir, keep_shards=args.keep_shards,
                                   output_prefix=args.output_prefix)
        else:
            if not args.output_prefix:
                p.error("--inputs needs --output-prefix")
            merge_datasets(args.inputs, args.output_prefix)
            outputs = [args.output_prefix]
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for out in outputs:
        print(f"wrote {out}.bin / {out}.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
