"""Batched, crash-safe writing of Megatron ``.bin``/``.idx`` pairs.

Tokens go to ``<prefix>.bin.tmp`` in large batches, the index to ``<prefix>.idx.tmp``;
``commit_pair`` then removes any old ``.idx`` first, renames the ``.bin`` and the ``.idx`` last.
A crash at any point therefore leaves no ``.idx`` beside a ``.bin`` it does not describe, and
"the ``.idx`` exists" is the completion test everywhere (``read_header`` also checks sizes).
"""

from __future__ import annotations

import os
import struct

import numpy as np

from ssa_megatron.data.indexed_format import CODE_OF_DTYPE, MAGIC, VERSION, bin_path, idx_path

TMP = ".tmp"


def write_index_header(f, dtype: np.dtype, sequence_count: int, document_count: int) -> None:
    f.write(MAGIC)
    f.write(struct.pack("<QBQQ", VERSION, CODE_OF_DTYPE[np.dtype(dtype)],
                        sequence_count, document_count))


def commit_pair(tmp_prefix: str, prefix: str) -> None:
    """Atomically publish ``tmp_prefix.{bin,idx}`` as ``prefix.{bin,idx}`` (same filesystem)."""
    if os.path.exists(idx_path(prefix)):
        os.unlink(idx_path(prefix))  # never leave an old .idx beside a new .bin
    os.replace(bin_path(tmp_prefix), bin_path(prefix))
    os.replace(idx_path(tmp_prefix), idx_path(prefix))


def remove_pair(prefix: str) -> None:
    for path in (idx_path(prefix), bin_path(prefix)):
        if os.path.exists(path):
            os.unlink(path)


def remove_temporaries(prefix: str) -> None:
    """Delete leftovers of an interrupted write of ``prefix`` (never a finished file)."""
    remove_pair(prefix + TMP)


class IndexedWriter:
    """Write one indexed dataset, one sequence per document, in batches.

    ``add_batch(tokens, lengths)`` takes a flat token array and the per-document lengths;
    memory held is the per-document lengths only (4 bytes per document).
    """

    def __init__(self, prefix: str, dtype: np.dtype):
        self.prefix = prefix
        self.tmp_prefix = prefix + TMP
        self.dtype = np.dtype(dtype)
        self._bin = open(bin_path(self.tmp_prefix), "wb")
        self._lengths: list[np.ndarray] = []
        self.num_documents = 0
        self.num_tokens = 0

    def add_batch(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        assert int(lengths.sum()) == len(tokens), "lengths must cover the token batch"
        if len(tokens) and int(tokens.max()) > np.iinfo(self.dtype).max:
            raise ValueError(f"{self.prefix}: token id {int(tokens.max())} does not fit {self.dtype}; "
                             "use --dtype int32 (or auto)")
        np.ascontiguousarray(tokens, dtype=self.dtype).tofile(self._bin)
        self._lengths.append(np.asarray(lengths, dtype=np.int32))
        self.num_documents += len(lengths)
        self.num_tokens += len(tokens)

    def finish(self) -> None:
        """Write the index and publish both files atomically."""
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        pointers = np.zeros(len(lengths), np.int64)
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self.dtype.itemsize
        with open(idx_path(self.tmp_prefix), "wb") as f:
            write_index_header(f, self.dtype, len(lengths), len(lengths) + 1)
            lengths.tofile(f)
            pointers.tofile(f)
            np.arange(len(lengths) + 1, dtype=np.int64).tofile(f)
        commit_pair(self.tmp_prefix, self.prefix)

    def abort(self) -> None:
        """Close and delete the temporaries; nothing is published."""
        self._bin.close()
        remove_temporaries(self.prefix)
