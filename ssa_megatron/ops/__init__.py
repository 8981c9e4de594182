"""SSA functional ops, ``[batch, seq, heads, head_dim]`` layout, with a ``backend=`` switch.

``backend="torch"`` is the reference (``reference.py``), the oracle for every fast path;
``"triton"`` runs the kernels of the ``ssa_kernels`` package; ``"auto"`` picks Triton for CUDA
tensors when it is importable and torch otherwise. The full stream always uses PyTorch SDPA
(flash / cuDNN on GPU), which is the fastest dense causal attention available.
"""

from __future__ import annotations

import torch

from ssa_megatron.ops import reference
from ssa_megatron.ops.backend import resolve_backend
from ssa_megatron.ops.validation import check_block_args, check_idx, check_logits_labels, check_pair, check_qkv

__all__ = [
    "full_attention", "select_blocks", "sparse_attention", "alignment_loss", "cross_entropy_stats", "cross_entropy_grad_",
    "resolve_backend",
]


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Causal attention, scale 1/sqrt(d): q ``[b, s, hq, d]``, k/v ``[b, s, hkv, d]`` -> ``[b, s, hq, d]``."""
    check_qkv(q, k, v)
    resolve_backend(backend, q.device)  # validates the name; SDPA serves every backend
    return reference.full_attention(q, k, v)


def select_blocks(q: torch.Tensor, k: torch.Tensor, block_size: int, top_k: int, backend: str = "auto") -> torch.Tensor:
    """Exact top-k block selection per token and KV head -> ``[b, s, hkv, top_k]`` int64.

    Slot 0 is the token's own block, then the most important earlier blocks (importance:
    per-head softmax of q against mean-pooled block keys, normalised over blocks complete at the
    token, summed over the GQA group, in float32); -1 fills slots with no earlier block left.
    Deterministic on every backend (no atomics; the Triton autotune candidates differ only in
    pipelining, not in arithmetic), so it needs no ``deterministic`` switch.
    """
    check_qkv(q, k)
    check_block_args(block_size, top_k)
    if resolve_backend(backend, q.device, q.dtype) == "triton":
        import ssa_kernels

        return ssa_kernels.select_blocks(q, k, block_size, top_k)
    return reference.select_blocks(q, k, block_size, top_k)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    block_size: int,
    backend: str = "auto",
    *,
    deterministic: bool = False,
) -> torch.Tensor:
    """Attention over the selected blocks only, causal inside the own block -> ``[b, s, hq, d]``.

    ``deterministic=True`` (``ssa.deterministic``): the Triton kernels fix every summation order (a
    stable inverse index, dK/dV summed without atomics in a fixed order, pinned autotune configs),
    so the same inputs give bitwise-identical output and gradients on the same GPU and software
    (``docs/kernels.md``, "Deterministic mode"). The default backward adds dK/dV with atomics: equal
    to rounding, not bitwise. The torch backend is deterministic either way on CUDA: its only
    scatter, the backward of the key/value gather, is torch's sort-based ``index_put_(accumulate=
    True)``; on CPU torch makes that op deterministic only under ``torch.use_deterministic_algorithms``.
    """
    check_qkv(q, k, v)
    check_block_args(block_size)
    check_idx(idx, q, k)
    if not isinstance(deterministic, bool):
        raise ValueError(f"deterministic={deterministic!r}: must be True or False")
    if resolve_backend(backend, q.device, q.dtype) == "triton":
        import ssa_kernels

        return ssa_kernels.sparse_attention(q, k, v, idx, block_size, deterministic=deterministic)
    return reference.sparse_attention(q, k, v, idx, block_size)


def alignment_loss(o_full: torch.Tensor, o_sparse: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``SmoothL1(o_full, sg(o_sparse)) + SmoothL1(sg(o_full), o_sparse)``, beta 1, mean, float32 scalar.

    Deterministic on every backend (the kernel's per-program partial sums are reduced by ``torch.sum``).
    """
    check_pair(o_full, o_sparse)
    if resolve_backend(backend, o_full.device, o_full.dtype) == "triton":
        import ssa_kernels

        return ssa_kernels.alignment_loss(o_full, o_sparse)  # fused: one read of each stream per pass
    return reference.alignment_loss(o_full, o_sparse)


def cross_entropy_stats(logits: torch.Tensor, labels: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``logits [rows, vocab shard]``: (logsumexp, logit at the shard-local label or 0 where it is -1)."""
    check_logits_labels(logits, labels)
    if resolve_backend(backend, logits.device, logits.dtype) == "triton":
        import ssa_kernels

        return ssa_kernels.cross_entropy_stats(logits, labels)  # one read of the logits
    return reference.cross_entropy_stats(logits, labels)


def cross_entropy_grad_(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Overwrite ``logits`` with ``softmax - onehot(labels)`` given each row's global ``lse``; returns it."""
    check_logits_labels(logits, labels)
    if lse.shape != logits.shape[:1]:
        raise ValueError(f"lse must be [{logits.shape[0]}], got {tuple(lse.shape)}")
    if resolve_backend(backend, logits.device, logits.dtype) == "triton":
        import ssa_kernels

        return ssa_kernels.cross_entropy_grad_(logits, labels, lse)
    return reference.cross_entropy_grad_(logits, labels, lse)
