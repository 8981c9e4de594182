"""Megatron's indexed dataset format (``.bin``/``.idx``), read and checked with numpy alone.

Layout of ``<prefix>.idx`` (little endian), as written by megatron-core's
``indexed_dataset._IndexWriter`` and read by ``IndexedDataset``::

    b"MMIDIDX\\x00\\x00"           9 bytes magic
    version          uint64      always 1
    dtype code       uint8       4 = int32, 8 = uint16 (Megatron's ``DType`` enum)
    sequence_count   uint64      S
    document_count   uint64      D + 1 (document_indices has a leading 0)
    sequence_lengths int32[S]    tokens per sequence
    sequence_ptrs    int64[S]    byte offset of each sequence in .bin
    document_indices int64[D+1]  sequence index where each document ends (0 first)

``<prefix>.bin`` is the raw token stream. Here every document is one sequence, as in
Megatron-LM's ``preprocess_data.py``. Kept free of torch/megatron so the preprocessing tools
start fast; tests check the result against Megatron's own ``IndexedDataset``.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8  # 34 bytes
# Megatron's DType enum codes (megatron/core/datasets/indexed_dataset.py).
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
               6: np.float64, 7: np.float32, 8: np.uint16}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
# Megatron-LM picks uint16 below this vocabulary size (DType.optimal_dtype), int32 above.
UINT16_VOCAB_LIMIT = 65500


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def token_dtype(vocab_size: int, requested: str = "auto") -> np.dtype:
    """The token dtype for a vocabulary: Megatron's choice for ``auto``; refuses one too small."""
    if requested == "auto":
        return np.dtype(np.uint16 if vocab_size < UINT16_VOCAB_LIMIT else np.int32)
    if requested not in ("uint16", "int32"):
        raise ValueError(f"--dtype={requested!r}: must be auto, uint16 or int32")
    dtype = np.dtype(requested)
    if vocab_size - 1 > np.iinfo(dtype).max:
        raise ValueError(
            f"--dtype={requested}: the tokenizer's vocabulary has {vocab_size} ids, more than "
            f"{requested} holds (max id {np.iinfo(dtype).max}); use --dtype int32 or --dtype auto")
    return dtype


@dataclass(frozen=True)
class IndexHeader:
    """The fixed-size header of an ``.idx`` file."""

    dtype: np.dtype
    sequence_count: int
    document_count: int  # entries in document_indices, i.e. documents + 1

    @property
    def idx_size(self) -> int:
        """Exact size in bytes of a well-formed ``.idx`` with this header."""
        return HEADER_SIZE + self.sequence_count * (4 + 8) + self.document_count * 8


def read_header(prefix: str) -> IndexHeader:
    """Read and check the ``.idx`` header and both file sizes; raise ValueError naming the file."""
    path = idx_path(prefix)
    if not os.path.isfile(path) or not os.path.isfile(bin_path(prefix)):
        missing = [p for p in (bin_path(prefix), path) if not os.path.isfile(p)]
        raise FileNotFoundError(
            f"indexed dataset {prefix!r} is incomplete: missing {', '.join(missing)}; "
            "pass the prefix without .bin/.idx, or re-run preprocessing")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(HEADER_SIZE)
    if len(head) < HEADER_SIZE or head[: len(MAGIC)] != MAGIC:
        raise ValueError(f"{path}: not a Megatron .idx file (bad or truncated header); "
                         "re-run preprocessing to rebuild it")
    version, code, seqs, docs = struct.unpack("<QBQQ", head[len(MAGIC):])
    if version != VERSION or code not in DTYPE_CODES:
        raise ValueError(f"{path}: unsupported .idx version {version} or dtype code {code}; "
                         "re-run preprocessing to rebuild it")
    header = IndexHeader(np.dtype(DTYPE_CODES[code]), seqs, docs)
    if size != header.idx_size:
        raise ValueError(f"{path}: {size} bytes but its header describes {header.idx_size} "
                         f"({seqs} sequences); the file is truncated or corrupt, re-run preprocessing")
    return header


@dataclass(frozen=True)
class Index:
    """A checked, memory-mapped ``.idx``: arrays are read-only views into the file."""

    dtype: np.dtype
    sequence_lengths: np.ndarray  # int32 [S]
    sequence_pointers: np.ndarray  # int64 [S], byte offsets into .bin
    document_indices: np.ndarray  # int64 [D + 1]

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))


def read_index(prefix: str) -> Index:
    """Map an ``.idx`` and check it against its ``.bin`` (size, pointers, document indices)."""
    header = read_header(prefix)
    mm = np.memmap(idx_path(prefix), dtype=np.uint8, mode="r")
    seqs, docs = header.sequence_count, header.document_count
    lengths = np.frombuffer(mm, np.int32, seqs, HEADER_SIZE)
    pointers = np.frombuffer(mm, np.int64, seqs, HEADER_SIZE + 4 * seqs)
    doc_idx = np.frombuffer(mm, np.int64, docs, HEADER_SIZE + 12 * seqs)
    itemsize = header.dtype.itemsize
    expected_bin = int(pointers[-1] + lengths[-1] * itemsize) if seqs else 0
    actual_bin = os.path.getsize(bin_path(prefix))
    if actual_bin != expected_bin:
        raise ValueError(f"{bin_path(prefix)}: {actual_bin} bytes but {idx_path(prefix)} describes "
                         f"{expected_bin}; the .bin is truncated or belongs to another index, "
                         "re-run preprocessing")
    if docs == 0 or doc_idx[0] != 0 or doc_idx[-1] != seqs:
        raise ValueError(f"{idx_path(prefix)}: document indices do not span its {seqs} sequences; "
                         "the file is corrupt, re-run preprocessing")
    return Index(header.dtype, lengths, pointers, doc_idx)


def read_sequence(prefix: str, index: Index, i: int) -> np.ndarray:
    """Tokens of sequence ``i`` (one document in files written by these tools)."""
    if not 0 <= i < len(index.sequence_lengths):
        raise IndexError(f"sample {i} out of range: {prefix} has {len(index.sequence_lengths)} documents")
    data = np.memmap(bin_path(prefix), dtype=index.dtype, mode="r")
    start = int(index.sequence_pointers[i]) // index.dtype.itemsize
    return np.array(data[start:start + int(index.sequence_lengths[i])])
