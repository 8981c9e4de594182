"""Rotary position embedding in one fused pass per tensor (forward and backward), for ``[s, b, h, d]``.

Megatron's unfused RoPE (``rope_utils._apply_rotary_pos_emb_bshd``) runs ~8 elementwise kernels
per tensor (cos/sin, two products, the half rotation's negate and concatenation, the sum, a final
concatenation), each a full pass over the queries or keys; its fused one needs Transformer Engine.
``torch.compile`` turns the same formula into one kernel each way. Megatron's layout and
convention: ``freqs [s, 1, 1, d]`` float32 angles (the two halves equal), ``rotate_half`` not
interleaved, no scaling. The products are taken in float32 and rounded once.
"""

from __future__ import annotations

import torch


def rope_reference(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """``t * cos + rotate_half(t) * sin`` in float32, rounded to ``t``'s dtype (the oracle of ``apply_rope``).

    Contiguous like Megatron's result: ``t`` is a strided view into the fused QKV projection, and
    attention kernels handed that layout run slower (H200: core attention 202 -> 195 ms per 1B step once contiguous).
    """
    x = t.float()
    x1, x2 = x.chunk(2, dim=-1)
    return (x * freqs.cos() + torch.cat((-x2, x1), dim=-1) * freqs.sin()).to(t.dtype).contiguous()


_compiled = None


def apply_rope(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """RoPE of queries or keys ``[s, b, h, d]`` by angles ``[s, 1, 1, d]``: ``rope_reference``, compiled."""
    global _compiled
    if _compiled is None:  # compiled on first use: importing the model stays cheap
        _compiled = torch.compile(rope_reference, dynamic=None)
    return _compiled(t, freqs)
