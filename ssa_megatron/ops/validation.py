"""Argument checks shared by every backend of the SSA ops: fail early, name the argument and the fix."""

from __future__ import annotations

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None) -> None:
    """q ``[b, s, hq, d]``, k/v ``[b, s, hkv, d]`` with ``hq % hkv == 0``, same dtype and device."""
    named = {"q": q, "k": k} if v is None else {"q": q, "k": k, "v": v}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, seq, heads, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(
                f"{name} is {t.dtype} on {t.device} but q is {q.dtype} on {q.device}: pass all on one dtype/device"
            )
    b, s, hq, d = q.shape
    if k.shape[:2] != (b, s) or k.shape[3] != d:
        raise ValueError(f"k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} in batch, seq or head_dim")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"v shape {tuple(v.shape)} must equal k shape {tuple(k.shape)}")
    if k.shape[2] == 0 or hq % k.shape[2] != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({k.shape[2]})")


def check_block_args(block_size: int, top_k: int | None = None) -> None:
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r}: must be a positive int (e.g. 16)")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r}: must be an int >= 1 (the own block counts as one)")


def check_idx(idx: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
    """idx ``[b, s, hkv, top_k]`` of integer block indices on q's device."""
    if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"idx must be an int32/int64 tensor (from select_blocks), got {getattr(idx, 'dtype', type(idx))}")
    if idx.dim() != 4 or idx.shape[:3] != (q.shape[0], q.shape[1], k.shape[2]):
        raise ValueError(
            f"idx shape {tuple(idx.shape)} must be [batch, seq, kv_heads, top_k] = "
            f"[{q.shape[0]}, {q.shape[1]}, {k.shape[2]}, top_k]"
        )
    if idx.device != q.device:
        raise ValueError(f"idx is on {idx.device} but q is on {q.device}")


def check_pair(o_full: torch.Tensor, o_sparse: torch.Tensor) -> None:
    if not isinstance(o_full, torch.Tensor) or not isinstance(o_sparse, torch.Tensor):
        raise ValueError("o_full and o_sparse must be tensors")
    if o_full.shape != o_sparse.shape:
        raise ValueError(f"o_full shape {tuple(o_full.shape)} != o_sparse shape {tuple(o_sparse.shape)}")
    if o_full.device != o_sparse.device:
        raise ValueError(f"o_full is on {o_full.device} but o_sparse is on {o_sparse.device}: pass both on one device")
    if not o_full.is_floating_point() or not o_sparse.is_floating_point():
        raise ValueError(f"o_full/o_sparse must be floating tensors, got {o_full.dtype}/{o_sparse.dtype}")


def check_logits_labels(logits: torch.Tensor, labels: torch.Tensor) -> None:
    """``logits [rows, vocab]`` (columns contiguous) and shard-local ``labels [rows]`` in ``[-1, vocab)``."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be [rows, vocab] with contiguous columns, got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1] or labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"labels must be [{logits.shape[0]}] int32/int64, got {tuple(labels.shape)} {labels.dtype}")
    if labels.device != logits.device:
        raise ValueError(f"labels are on {labels.device}, logits on {logits.device}")
