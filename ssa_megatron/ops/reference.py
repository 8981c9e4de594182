"""Pure-PyTorch reference of the SSA math: the oracle every fast path is tested against.

Notation (all tensors batch-first, ``[b, s, h, d]``):
    b   batch size                 s    sequence length
    hq  query heads                hkv  key/value heads (GQA groups), hq % hkv == 0
    g   query heads per KV head    d    head dim
    bs  block_size                 nb   number of blocks, ceil(s / bs)
    k   top_k (selected blocks per token and KV head, own block included)

These functions favour being obviously right over being fast. Work is chunked over query
tokens so memory stays ``O(chunk * (nb + k * bs))`` per head rather than ``O(s^2)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Query tokens processed at once: bounds the [chunk, hq, nb] importance scores and the
# [chunk, hkv, k * bs, d] gathered keys/values.
_QUERY_CHUNK = 1024


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention, scale 1/sqrt(d). q ``[b, s, hq, d]``, k/v ``[b, s, hkv, d]``.

    In backward SDPA gets its grad_output in its output's exact layout (``grad_in_output_layout``).
    """
    # SDPA wants [b, h, s, d]; enable_gqa shares each KV head across its g query heads.
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    )
    return grad_in_output_layout(o).transpose(1, 2)


def grad_in_output_layout(o: torch.Tensor) -> torch.Tensor:
    """``o``, whose gradient is re-laid (copied) into ``o``'s own strides when it arrives in others.

    For SDPA's output. cuDNN attention's backward (SDPA's default backend for bf16 on an H100/H200)
    caches its graph under q/k/v's sizes and strides with the first call's grad_output strides baked
    in, so a later call with another grad_output layout is read with the first one's strides:
    gradients of the right size and the wrong values (confirmed on an H200 with torch 2.11; see
    docs/kernels.md). The SSA layer hands SDPA two layouts: the full stream's gradient comes in the
    output's layout, the sparse stream's (its alignment term alone) batch-major. With every grad_output
    in the output's layout no call leaves another a stale graph; the copy happens only for the second.
    """
    if o.requires_grad:
        size, stride = o.shape, o.stride()

        def relay(g: torch.Tensor) -> torch.Tensor:
            if g.stride() == stride:
                return g
            return torch.empty_strided(size, stride, dtype=g.dtype, device=g.device).copy_(g)

        o.register_hook(relay)
    return o


def mean_pool_blocks(k: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of the keys of every *complete* block: ``[b, s, hkv, d] -> [b, s // bs, hkv, d]``.

    A trailing partial block is never complete at any token, so it is never scored.
    """
    b, s, hkv, d = k.shape
    n_complete = s // block_size
    blocks = k[:, : n_complete * block_size].reshape(b, n_complete, block_size, hkv, d)
    return blocks.float().mean(dim=2)


def block_importance(q: torch.Tensor, k_cmp: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Importance of every complete block for the query tokens at ``positions``, in float32.

    q ``[b, c, hq, d]`` (tokens at ``positions``), k_cmp ``[b, nbc, hkv, d]``;
    returns ``[b, c, hkv, nbc]``: the per-head softmax probability of each block strictly before the
    token's own block, normalised over the blocks complete at the token, summed over the GQA group.
    Blocks that are not strictly earlier get ``-inf`` so they can never be picked.
    """
    b, c, hq, d = q.shape
    hkv, nbc = k_cmp.shape[2], k_cmp.shape[1]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d)
    # [b, c, hkv, g, d] x [b, nbc, hkv, d] -> [b, c, hkv, g, nbc]
    scores = torch.einsum("bchgd,bnhd->bchgn", q.float().view(b, c, hkv, g, d), k_cmp) * scale
    blocks = torch.arange(nbc, device=q.device)
    complete = blocks[None, :] < ((positions + 1) // block_size)[:, None]  # [c, nbc]
    earlier = blocks[None, :] < (positions // block_size)[:, None]  # [c, nbc]
    lse = scores.masked_fill(~complete[None, :, None, None, :], float("-inf")).logsumexp(dim=-1, keepdim=True)
    probs = torch.exp(scores - lse).masked_fill(~earlier[None, :, None, None, :], 0.0)
    importance = probs.sum(dim=3)  # sum over the g query heads of the group: [b, c, hkv, nbc]
    return importance.masked_fill(~earlier[None, :, None, :], float("-inf"))


def select_blocks(q: torch.Tensor, k: torch.Tensor, block_size: int, top_k: int) -> torch.Tensor:
    """Exact top-k block selection. Returns ``[b, s, hkv, top_k]`` int64.

    Slot 0 holds the token's own block; slots 1.. the most important earlier blocks in
    descending importance; unused slots (fewer earlier blocks than ``top_k - 1``) are -1.
    """
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    with torch.no_grad():
        k_cmp = mean_pool_blocks(k, block_size)
        idx = torch.full((b, s, hkv, top_k), -1, dtype=torch.int64, device=q.device)
        n_pick = min(top_k - 1, k_cmp.shape[1])
        for start in range(0, s, _QUERY_CHUNK):
            positions = torch.arange(start, min(start + _QUERY_CHUNK, s), device=q.device)
            own = (positions // block_size)[None, :, None].expand(b, -1, hkv)
            idx[:, positions, :, 0] = own
            if n_pick == 0:
                continue
            importance = block_importance(q[:, positions], k_cmp, positions, block_size)
            values, picked = importance.topk(n_pick, dim=-1)
            idx[:, positions, :, 1 : 1 + n_pick] = picked.masked_fill(values == float("-inf"), -1)
    return idx


def sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, block_size: int
) -> torch.Tensor:
    """Softmax attention of each query over the tokens of its selected blocks, causal.

    q ``[b, s, hq, d]``, k/v ``[b, s, hkv, d]``, idx ``[b, s, hkv, top_k]`` (-1 = unused slot,
    block indices distinct). Keys after the query (inside its own block) are masked.
    Differentiable w.r.t. q, k and v; idx carries no gradient.
    """
    b, s, hq, d = q.shape
    hkv, top_k = k.shape[2], idx.shape[-1]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d)
    offsets = torch.arange(block_size, device=q.device)
    batch = torch.arange(b, device=q.device)[:, None, None, None]
    head = torch.arange(hkv, device=q.device)[None, None, :, None]
    outputs = []
    for start in range(0, s, _QUERY_CHUNK):
        positions = torch.arange(start, min(start + _QUERY_CHUNK, s), device=q.device)
        c = positions.numel()
        sel = idx[:, positions]  # [b, c, hkv, top_k]
        # Token indices of the selected blocks: [b, c, hkv, top_k * bs]
        keys = (sel.clamp(min=0)[..., None] * block_size + offsets).flatten(-2)
        valid = (sel[..., None] >= 0).expand(-1, -1, -1, -1, block_size).flatten(-2)
        # Out of place: with top_k == 1 the flatten above is a stride-0 view of the expand.
        valid = valid & (keys <= positions[None, :, None, None])
        keys = keys.clamp(max=s - 1)
        k_sel = k[batch, keys, head]  # [b, c, hkv, top_k * bs, d]
        v_sel = v[batch, keys, head]
        q_c = q[:, positions].reshape(b, c, hkv, g, d)
        acc = torch.promote_types(q.dtype, torch.float32)  # fp32 accumulation, fp64 stays fp64
        scores = torch.einsum("bchgd,bchnd->bchgn", q_c.to(acc), k_sel.to(acc)) * scale
        scores = scores.masked_fill(~valid[:, :, :, None, :], float("-inf"))
        probs = scores.softmax(dim=-1)
        o = torch.einsum("bchgn,bchnd->bchgd", probs, v_sel.to(acc))
        outputs.append(o.reshape(b, c, hq, d).to(q.dtype))
    return torch.cat(outputs, dim=1)


def alignment_loss(o_full: torch.Tensor, o_sparse: torch.Tensor) -> torch.Tensor:
    """Symmetric SmoothL1 (beta 1, mean) between the two streams, each side once detached.

    ``SmoothL1(o_full, sg(o_sparse))`` pulls full attention towards the sparse pattern (the
    sparsity loss); ``SmoothL1(sg(o_full), o_sparse)`` keeps the sparse stream faithful (the
    commitment loss). Computed in float32 whatever the input dtype.
    """
    full, sparse = o_full.float(), o_sparse.float()
    return F.smooth_l1_loss(full, sparse.detach(), beta=1.0) + F.smooth_l1_loss(full.detach(), sparse, beta=1.0)


# -- cross-entropy over a logits chunk (the fused output layer's per-chunk math) -----------------


def cross_entropy_stats(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(``logsumexp`` of each row, the row's logit at ``labels`` or 0 where it is -1), float32.

    logits ``[rows, vocab]`` (one rank's vocabulary shard), labels ``[rows]`` shard-local, -1 for
    labels outside the shard.
    """
    x = logits.float()
    picked = x.gather(1, labels.clamp(min=0).long().unsqueeze(1)).squeeze(1)
    return torch.logsumexp(x, dim=1), torch.where(labels >= 0, picked, torch.zeros_like(picked))


def cross_entropy_grad_(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Overwrite ``logits`` with ``softmax - onehot(labels)`` (rows normalised by the given ``lse``)."""
    p = torch.exp(logits.float() - lse.unsqueeze(1))
    rows = torch.nonzero(labels >= 0).squeeze(1)
    p[rows, labels[rows].long()] -= 1.0
    return logits.copy_(p)
