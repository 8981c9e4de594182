"""Print an indexed dataset's statistics and decode documents back to text.

    python tools/inspect_data.py data/corpus_text_document --tokenizer tokenizers/bpe32k --sample 0 17
    python tools/inspect_data.py data/corpus_text_document --tokenizer tokenizers/bpe32k --check-tokens

``--check-tokens`` reads every token (slow on large data) to verify ids fit the tokenizer and
counts EOD tokens. Without a prefix, ``--tokenizer`` alone prints the tokenizer's vocabulary
size, special ids and the token dtype preprocessing would use.
"""

import argparse
import json
import sys

from ssa_megatron.data.indexed_format import token_dtype
from ssa_megatron.data.inspect import dataset_stats, decode_sample, format_stats, scan_tokens
from ssa_megatron.data.tokenizer import load_tokenizer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prefix", nargs="?", help="dataset prefix (no .bin/.idx)")
    p.add_argument("--tokenizer", help="Hugging Face tokenizer directory (needed to decode)")
    p.add_argument("--sample", type=int, nargs="*", default=[], help="documents to decode")
    p.add_argument("--max-chars", type=int, default=2000, help="truncate decoded text (0: no limit)")
    p.add_argument("--ids", action="store_true", help="also print the token ids")
    p.add_argument("--check-tokens", action="store_true", help="scan all tokens (needs --tokenizer)")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    args = p.parse_args(argv)
    if not args.prefix and not args.tokenizer:
        p.error("give a dataset prefix, --tokenizer, or both")
    if (args.sample or args.check_tokens) and not args.tokenizer:
        p.error("--sample and --check-tokens need --tokenizer")
    try:
        tok = load_tokenizer(args.tokenizer) if args.tokenizer else None
        if tok is not None:
            print(f"tokenizer {tok.path}: vocab {tok.vocab_size}, eod {tok.eod}, bos {tok.bos}, "
                  f"preprocessing dtype {token_dtype(tok.vocab_size).name}")
        if not args.prefix:
            return 0
        stats = dataset_stats(args.prefix)
        if args.check_tokens:
            stats.update(scan_tokens(args.prefix, tok.vocab_size, tok.eod))
        print(json.dumps(stats, indent=1) if args.json else format_stats(stats))
        if args.check_tokens and not args.json:
            print(f"max token id {stats['max_token_id']} < vocab {tok.vocab_size}; {stats['eod_tokens']:,} EOD tokens")
        for n in args.sample:
            ids, text = decode_sample(args.prefix, n, tok)
            shown = text if not args.max_chars or len(text) <= args.max_chars else text[:args.max_chars] + " [...]"
            print(f"--- document {n}: {len(ids)} tokens ---")
            if args.ids:
                print(ids.tolist())
            print(shown)
    except (ValueError, FileNotFoundError, IndexError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
