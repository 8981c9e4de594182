"""Concatenate Megatron indexed datasets into one, streaming (memory: one input index at a time).

The output is byte-identical to writing all documents in one pass: ``.bin`` files are copied
in order, and the ``.idx`` sections are written input by input with pointers shifted by the
bytes before and document indices by the sequences before (as megatron-core's
``IndexedDatasetBuilder.add_index`` does, without holding every index in memory).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import numpy as np

from ssa_megatron.data.indexed_format import bin_path, idx_path, read_index
from ssa_megatron.data.indexed_writer import TMP, commit_pair, remove_temporaries, write_index_header

COPY_BUFFER = 16 << 20


@dataclass(frozen=True)
class MergeStats:
    documents: int
    tokens: int
    bytes: int


def merge_datasets(prefixes: list[str], output_prefix: str) -> MergeStats:
    """Merge ``prefixes`` in order into ``output_prefix``.{bin,idx}, atomically."""
    if not prefixes:
        raise ValueError("merge: no input datasets given")
    if output_prefix in prefixes:
        raise ValueError(f"merge: output {output_prefix!r} is also an input; choose another --output-prefix")
    indexes = [read_index(p) for p in prefixes]  # checks every header and size up front
    dtype = indexes[0].dtype
    for prefix, index in zip(prefixes, indexes):
        if index.dtype != dtype:
            raise ValueError(f"merge: {prefix} holds {index.dtype} tokens but {prefixes[0]} holds "
                             f"{dtype}; re-run preprocessing of one of them with --dtype {dtype}")
    sequences = sum(len(i.sequence_lengths) for i in indexes)
    documents = sum(len(i.document_indices) - 1 for i in indexes)
    tmp = output_prefix + TMP
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    try:
        with open(bin_path(tmp), "wb") as out:
            for prefix in prefixes:
                with open(bin_path(prefix), "rb") as f:
                    shutil.copyfileobj(f, out, COPY_BUFFER)
        with open(idx_path(tmp), "wb") as f:
            write_index_header(f, dtype, sequences, documents + 1)
            for index in indexes:
                index.sequence_lengths.tofile(f)
            byte_offset = 0
            for prefix, index in zip(prefixes, indexes):
                (index.sequence_pointers + byte_offset).tofile(f)
                byte_offset += os.path.getsize(bin_path(prefix))
            np.zeros(1, np.int64).tofile(f)
            sequence_offset = 0
            for index in indexes:
                (index.document_indices[1:] + sequence_offset).tofile(f)
                sequence_offset += len(index.sequence_lengths)
        commit_pair(tmp, output_prefix)
    except BaseException:
        remove_temporaries(output_prefix)
        raise
    tokens = sum(i.num_tokens for i in indexes)
    return MergeStats(documents, tokens, byte_offset)
