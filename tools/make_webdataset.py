"""Pack an indexed dataset into WebDataset tar shards of fixed-length token sequences.

    python tools/make_webdataset.py --input-prefix data/corpus_text_document \\
        --output-dir data/corpus_wds_4k --seq-length 4096 --samples-per-shard 2048

Upload the directory (shards + ``index.json``) to object storage and train with
``data.webdataset: <url of index.json>`` (plus ``data.webdataset_url_template`` for ``pipe:``
URLs). Each shard is read by one data-parallel rank's DataLoader worker, so write at least
``ranks x workers`` shards. The sequence length is fixed here; it must match the model's.
"""

import argparse
import sys

from ssa_megatron.data.webdataset_shards import write_webdataset


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input-prefix", required=True, help="indexed dataset prefix (no .bin/.idx)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--seq-length", type=int, required=True)
    p.add_argument("--samples-per-shard", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0, help="document shuffle seed")
    p.add_argument("--no-shuffle", action="store_true", help="keep the documents' order")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    try:
        manifest = write_webdataset(args.input_prefix, args.output_dir, seq_length=args.seq_length,
                                    samples_per_shard=args.samples_per_shard,
                                    seed=None if args.no_shuffle else args.seed, progress=args.progress)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output_dir}: {manifest.num_samples:,} samples of {manifest.seq_length} tokens "
          f"in {len(manifest.shards)} shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
