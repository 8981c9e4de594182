"""Prepare the reproduction corpus (issue 15): public-domain English novels -> the repo's BPE tokenizer ->
Megatron indexed training data, plus held-out excerpts (whole books the training never sees) for evaluation.

    # the source: 100 English novels (1839-1937), one plain-text file per novel, AUTHOR_TITLE_YEAR.txt
    git clone https://github.com/computationalstylistics/100_english_novels /tmp/100_english_novels
    python experiments/reproduction/prepare_data.py --source /tmp/100_english_novels/corpus \\
        --source-commit "$(git -C /tmp/100_english_novels rev-parse HEAD)" --out .cache/reproduction

writes OUT/ (about 40 MiB, small enough to travel with the working tree to a GPU machine):
``tokenizer/`` (byte-level BPE trained on the training novels), ``train_text_document.{bin,idx}``,
``heldout.jsonl`` (one excerpt per held-out novel, ``{"text", "title"}``) and ``manifest.json``
(source, licence, the novels of each split, document and token counts: docs/reproduction.md quotes it).

Only novels first published before ``--max-year`` + 1 (1929: public domain in the United States) are
used; the year is the file name's last field. Deterministic: the same source gives the same files.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from layout import HELDOUT, MANIFEST, TOKENIZER, TRAIN_DATA

from ssa_megatron.data.indexed_format import read_index
from ssa_megatron.data.preprocess import PreprocessConfig, run_preprocess
from ssa_megatron.data.tokenizer import load_tokenizer, train_tokenizer_from_files

SOURCE = "https://github.com/computationalstylistics/100_english_novels"
LICENCE = ("public domain in the United States: novels first published in or before {max_year} (the year in "
           "each file name); the source repository adds no licence of its own, and only its texts are used")


def novels(source: Path, max_year: int) -> list[tuple[Path, int]]:
    """(file, year) of every ``AUTHOR_TITLE_YEAR.txt`` in ``source`` first published by ``max_year``, by name."""
    if not source.is_dir():
        raise ValueError(f"--source {source}: not a directory (give the corpus/ folder of {SOURCE})")
    found = []
    for path in sorted(source.glob("*.txt")):
        year = path.stem.rsplit("_", 1)[-1]
        if not year.isdigit():
            raise ValueError(f"{path.name}: expected AUTHOR_TITLE_YEAR.txt (a year as the last field)")
        if int(year) <= max_year:
            found.append((path, int(year)))
    if len(found) < 2:
        raise ValueError(f"--source {source}: {len(found)} novels published by {max_year}; need at least 2")
    return found


def heldout_positions(count: int, heldout: int) -> set[int]:
    """``heldout`` positions spread evenly over ``count`` novels sorted by author (many authors, all eras)."""
    if not 1 <= heldout < count:
        raise ValueError(f"--heldout {heldout}: must be between 1 and {count - 1} (the number of novels - 1)")
    return {int((i + 0.5) * count / heldout) for i in range(heldout)}


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8").lstrip("\ufeff")


def excerpt(text: str, chars: int) -> str:
    """About ``chars`` characters from 10% into the text (past any front matter), whole lines only."""
    start = text.find("\n", len(text) // 10) + 1
    end = text.rfind("\n", start, start + chars)
    return text[start:end if end > start else start + chars]


def write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def mib(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def prepare(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    if out.exists():
        if not args.overwrite:
            raise ValueError(f"--out {out} exists; pass --overwrite to rebuild it")
        shutil.rmtree(out)
    chosen = novels(Path(args.source), args.max_year)
    held = heldout_positions(len(chosen), args.heldout)
    train = [(p, y) for i, (p, y) in enumerate(chosen) if i not in held]
    heldout = [(p, y) for i, (p, y) in enumerate(chosen) if i in held]
    out.mkdir(parents=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="novels-") as tmp:
        train_jsonl = Path(tmp) / "train.jsonl"
        write_jsonl(train_jsonl, [{"text": read_text(p), "title": p.stem} for p, _ in train])
        print(f"[1/3] {len(train)} training novels ({mib(train_jsonl):.1f} MiB of text): training a "
              f"{args.vocab_size}-token BPE", flush=True)
        tokenizer, _ = train_tokenizer_from_files([str(train_jsonl)], str(out / TOKENIZER), vocab_size=args.vocab_size)
        print(f"[2/3] tokenising into {out / TRAIN_DATA}.bin ({time.perf_counter() - start:.0f} s so far)", flush=True)
        # preprocessing names its output <prefix>_<json key>_document
        summary = run_preprocess(PreprocessConfig(inputs=(str(train_jsonl),), tokenizer=str(out / TOKENIZER),
                                                  output_prefix=str(out / TRAIN_DATA.removesuffix("_text_document")),
                                                  workers=args.workers))
    print(f"[3/3] {len(heldout)} held-out excerpts of ~{args.excerpt_chars} characters -> {HELDOUT}", flush=True)
    records = [{"text": excerpt(read_text(p), args.excerpt_chars), "title": p.stem} for p, _ in heldout]
    write_jsonl(out / HELDOUT, records)
    tok = load_tokenizer(str(out / TOKENIZER))
    index = read_index(str(out / TRAIN_DATA))
    manifest = {
        "source": SOURCE,
        "source_commit": args.source_commit,
        "licence": LICENCE.format(max_year=args.max_year),
        "max_year": args.max_year,
        "tokenizer": {"kind": "byte-level BPE (tools/train_tokenizer.py's trainer)", "vocab_size": tokenizer.vocab_size},
        "train": {"novels": [p.stem for p, _ in train], "documents": len(index.sequence_lengths),
                  "tokens": index.num_tokens, "characters": sum(len(read_text(p)) for p, _ in train),
                  "prefix": TRAIN_DATA},
        "heldout": {"novels": [p.stem for p, _ in heldout], "documents": len(records),
                    "tokens": sum(len(tok.encode(r["text"])) for r in records),
                    "characters": sum(len(r["text"]) for r in records), "file": HELDOUT},
        "mib": {name: round(mib(out / name), 2) for name in (TOKENIZER, f"{TRAIN_DATA}.bin", f"{TRAIN_DATA}.idx", HELDOUT)},
        "command": " ".join(sys.argv),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    total = mib(out)
    print(f"{summary.line()}\nwrote {out}: {total:.1f} MiB ({manifest['train']['tokens']:,} training tokens in "
          f"{manifest['train']['documents']} novels, {manifest['heldout']['tokens']:,} held-out tokens)")
    if total > args.max_mib:
        raise ValueError(f"{out} holds {total:.1f} MiB, more than --max-mib {args.max_mib} (what may travel to the "
                         "GPU machine beside the working tree): lower --max-year or --vocab-size, or raise --max-mib")
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="the corpus/ folder of " + SOURCE)
    p.add_argument("--source-commit", default=None, help="the source's git commit, recorded in manifest.json")
    p.add_argument("--out", required=True, help="output directory (git-ignored, e.g. .cache/reproduction)")
    p.add_argument("--max-year", type=int, default=1929, help="latest first-publication year to use")
    p.add_argument("--heldout", type=int, default=6, help="novels held out of training for evaluation")
    p.add_argument("--excerpt-chars", type=int, default=120_000,
                   help="characters per held-out excerpt (~28k tokens: room for 4x a 4096-token context)")
    p.add_argument("--vocab-size", type=int, default=16384, help="BPE vocabulary (<= 65500 keeps uint16 tokens)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-mib", type=float, default=48.0, help="refuse an output larger than this")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        prepare(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
