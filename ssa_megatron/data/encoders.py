"""Batch encoders: the exact HF ``tokenizers`` path and the fast ``gigatoken`` path.

Both map a list of texts to ``(tokens, lengths)``: one flat token array and the number of
tokens per text, so writers and EOD insertion work on whole batches in numpy. The HF path is
the reference (ids identical to ``Tokenizer.encode``); gigatoken is a native BPE ~10x faster,
trusted only after ``mismatch_rate`` compared it with the reference on a sample.
"""

from __future__ import annotations

import itertools

import numpy as np

BACKENDS = ("hf", "gigatoken")


class HFEncoder:
    """Exact: HF ``encode_batch_fast`` (no offsets), no special tokens added."""

    name = "hf"

    def __init__(self, tokenizer_json: str):
        import tokenizers

        self._tok = tokenizers.Tokenizer.from_file(tokenizer_json)

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        tokens = np.fromiter(itertools.chain.from_iterable(ids), np.int64, int(lengths.sum()))
        return tokens, lengths


class GigatokenEncoder:
    """Fast: gigatoken's Rust BPE (sequential inside worker processes, threaded otherwise)."""

    name = "gigatoken"

    def __init__(self, tokenizer_json: str):
        try:
            import gigatoken
        except ImportError as e:
            raise ImportError("--backend gigatoken needs the gigatoken package: "
                              "pip install 'ssa-megatron[fast-tokenize]' (or use --backend hf)") from e
        try:
            self._tok = gigatoken.Tokenizer(tokenizer_json)
        except Exception as e:  # gigatoken raises various errors for unsupported tokenizers
            raise ValueError(f"gigatoken cannot load {tokenizer_json} ({e}); use --backend hf") from e

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        import awkward as ak

        batch = self._tok.encode_batch(texts)
        return ak.to_numpy(ak.flatten(batch)), ak.to_numpy(ak.num(batch))


def make_encoder(backend: str, tokenizer_json: str):
    if backend == "hf":
        return HFEncoder(tokenizer_json)
    if backend == "gigatoken":
        return GigatokenEncoder(tokenizer_json)
    raise ValueError(f"--backend={backend!r}: must be one of {', '.join(BACKENDS)}")


def append_eod(tokens: np.ndarray, lengths: np.ndarray, eod: int) -> tuple[np.ndarray, np.ndarray]:
    """Insert ``eod`` after each document of a flat batch: doc i's tokens move right by i."""
    out = np.empty(len(tokens) + len(lengths), dtype=np.int64)
    ends = np.cumsum(lengths) + np.arange(len(lengths))  # position of each EOD in ``out``
    keep = np.ones(len(out), dtype=bool)
    keep[ends] = False
    out[keep] = tokens
    out[ends] = eod
    return out, lengths + 1


def mismatch_rate(reference, candidate, texts: list[str]) -> tuple[int, int]:
    """(documents tokenised differently, documents compared)."""
    ref_tokens, ref_lengths = reference.encode(texts)
    cand_tokens, cand_lengths = candidate.encode(texts)
    ref_docs = np.split(ref_tokens, np.cumsum(ref_lengths)[:-1])
    cand_docs = np.split(cand_tokens.astype(np.int64), np.cumsum(cand_lengths)[:-1])
    different = sum(not np.array_equal(a, b) for a, b in zip(ref_docs, cand_docs))
    return different, len(texts)
