"""Look inside an indexed dataset: counts and length statistics, and document N as text.

Opening the dataset runs the same header and size checks as training, so a truncated or
corrupt ``.bin``/``.idx`` is reported here with the file name.
"""

from __future__ import annotations

import os

import numpy as np

from ssa_megatron.data.indexed_format import bin_path, idx_path, read_index, read_sequence

SCAN_CHUNK = 1 << 26  # tokens per step of the optional full scan


def dataset_stats(prefix: str) -> dict:
    """Counts, sizes and document-length percentiles of ``prefix``."""
    index = read_index(prefix)
    lengths = np.asarray(index.sequence_lengths, dtype=np.int64)
    stats = {"prefix": prefix, "dtype": index.dtype.name, "documents": len(index.document_indices) - 1,
             "sequences": len(lengths), "tokens": int(lengths.sum()),
             "bin_bytes": os.path.getsize(bin_path(prefix)), "idx_bytes": os.path.getsize(idx_path(prefix))}
    if len(lengths):
        p50, p99 = np.percentile(lengths, [50, 99])
        stats["length"] = {"min": int(lengths.min()), "mean": float(lengths.mean()), "median": float(p50),
                           "p99": float(p99), "max": int(lengths.max())}
    return stats


def scan_tokens(prefix: str, vocab_size: int, eod: int) -> dict:
    """Read every token: the largest id (must be < vocab_size) and how many are EOD."""
    index = read_index(prefix)
    tokens = np.memmap(bin_path(prefix), dtype=index.dtype, mode="r")
    largest, eods = -1, 0
    for start in range(0, len(tokens), SCAN_CHUNK):
        chunk = tokens[start:start + SCAN_CHUNK]
        largest = max(largest, int(chunk.max()))
        eods += int(np.count_nonzero(chunk == eod))
    if largest >= vocab_size:
        raise ValueError(f"{bin_path(prefix)}: token id {largest} >= the tokenizer's vocab size {vocab_size}; "
                         "the data was preprocessed with another tokenizer")
    return {"max_token_id": largest, "eod_tokens": eods}


def decode_sample(prefix: str, n: int, tokenizer) -> tuple[np.ndarray, str]:
    """(token ids, text) of document ``n``; the EOD token shows as its text."""
    ids = read_sequence(prefix, read_index(prefix), n)
    return ids, tokenizer.decode(ids.tolist())


def format_stats(stats: dict) -> str:
    lines = [f"{stats['prefix']}: {stats['documents']:,} documents, {stats['tokens']:,} tokens ({stats['dtype']}), "
             f".bin {stats['bin_bytes'] / 1e6:,.1f} MB, .idx {stats['idx_bytes'] / 1e6:,.2f} MB"]
    if "length" in stats:
        length = stats["length"]
        lines.append("document length (tokens): " + ", ".join(
            f"{k} {v:,.0f}" if isinstance(v, float) else f"{k} {v:,}" for k, v in length.items()))
    return "\n".join(lines)
