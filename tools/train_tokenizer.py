"""Train a byte-level BPE tokenizer on your text and save it as a Hugging Face tokenizer directory.

    python tools/train_tokenizer.py --input 'data/*.jsonl' --json-keys text \\
        --vocab-size 32000 --output-dir tokenizers/bpe32k --max-bytes 2G

The directory (``tokenizer.json``, ``tokenizer_config.json``) loads with
``ssa_megatron.data.load_tokenizer`` and ``transformers.AutoTokenizer``; pass it to
``tools/preprocess_data.py --tokenizer``. Special tokens take ids 0, 1, 2, ... in the order
EOS, BOS, PAD, then ``--special-tokens``. An existing tokenizer directory (e.g. a local
Llama-3) needs no training: pass it to the other tools directly.
"""

import argparse
import logging
import sys

from ssa_megatron.data.inputs import parse_size
from ssa_megatron.data.tokenizer import SpecialTokens, train_tokenizer_from_files


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="files, globs or directories")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--vocab-size", type=int, required=True, help="including the special tokens")
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--input-format", default="auto", choices=["auto", "jsonl", "text", "parquet"])
    p.add_argument("--text-separator", default=None)
    p.add_argument("--max-bytes", type=parse_size, default=None, help="train on the first N bytes of text")
    p.add_argument("--eos-token", default=SpecialTokens.eos, help="also the end-of-document (EOD) token")
    p.add_argument("--bos-token", default=SpecialTokens.bos)
    p.add_argument("--pad-token", default=SpecialTokens.pad)
    p.add_argument("--special-tokens", nargs="*", default=[], help="extra special tokens")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    special = SpecialTokens(args.eos_token, args.bos_token, args.pad_token, tuple(args.special_tokens))
    try:
        tok, stats = train_tokenizer_from_files(
            args.input, args.output_dir, vocab_size=args.vocab_size, json_keys=tuple(args.json_keys),
            input_format=args.input_format, text_separator=args.text_separator,
            max_bytes=args.max_bytes, special=special, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if stats.malformed:
        print(f"skipped {stats.malformed} malformed records, e.g. {stats.examples[0]}", file=sys.stderr)
    if tok.vocab_size < args.vocab_size:
        print(f"warning: the vocabulary has {tok.vocab_size} tokens, fewer than --vocab-size {args.vocab_size}: "
              "the corpus has no more merges to learn; train on more text (--max-bytes, more --input) "
              "or ask for a smaller --vocab-size", file=sys.stderr)
    print(f"wrote {args.output_dir}: vocab {tok.vocab_size}, eos/eod {tok.eod}, bos {tok.bos}, pad {tok.pad}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
