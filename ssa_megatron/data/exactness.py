"""Check a fast backend against the HF tokenizer on a sample before trusting it with a corpus.

The sample is spread over the run (the starts of up to 16 evenly spaced shards) and each text is
cut to ``SAMPLE_CHARS`` characters, which keeps the check to about a second. Any difference is
refused unless the user accepts it explicitly; the rate is reported either way.
"""

from __future__ import annotations

import logging

from ssa_megatron.data.encoders import make_encoder, mismatch_rate
from ssa_megatron.data.inputs import Shard
from ssa_megatron.data.readers import ReadStats, iter_documents

log = logging.getLogger(__name__)
SAMPLE_CHARS = 4096


def sample_texts(shards: list[Shard], keys: tuple[str, ...], count: int,
                 text_separator: str | None) -> list[str]:
    """Up to ``count`` texts from the starts of up to 16 evenly spaced shards."""
    picked = shards[:: max(1, len(shards) // 16)][:16]
    per_shard = max(1, count // len(picked))
    texts: list[str] = []
    for shard in picked:
        taken, stats = 0, ReadStats()
        for piece in shard.pieces:
            for doc in iter_documents(piece, keys, stats, text_separator=text_separator):
                texts.extend(t[:SAMPLE_CHARS] for t in doc if t)
                taken += 1
                if taken >= per_shard:
                    break
            if taken >= per_shard:
                break
    return texts[:count]


def check_exactness(backend: str, tokenizer_json: str, texts: list[str], *,
                    allow_inexact: bool) -> tuple[int, int]:
    """(documents that differ, documents compared); raises on a difference unless allowed."""
    different, total = mismatch_rate(make_encoder("hf", tokenizer_json), make_encoder(backend, tokenizer_json),
                                     texts)
    if different and not allow_inexact:
        raise ValueError(
            f"--backend {backend} tokenised {different} of {total} sampled documents differently from the "
            f"Hugging Face tokenizer ({100 * different / total:.3f}%); use --backend hf for exact tokens, "
            "or pass --allow-inexact to accept the difference")
    if different:
        log.warning("%s differs from hf on %d/%d sampled documents; continuing (--allow-inexact)",
                    backend, different, total)
    return different, total
