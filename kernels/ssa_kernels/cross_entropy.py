"""Cross-entropy over a (vocabulary shard of a) logits chunk, for the fused linear + cross-entropy.

The fused output layer (``ssa_megatron/model/output_loss.py``) never materialises the logits of a
whole micro-batch: it computes them a chunk of tokens at a time, and these two kernels turn each
chunk into what it needs with two reads of the bf16 logits instead of torch's ~10 passes over fp32
copies:

* ``cross_entropy_stats(logits, labels) -> (lse, target)``: per row, ``logsumexp`` over the columns
  (online max/sum) and the logit at ``labels`` (0 where the label is -1: another rank's shard);
* ``cross_entropy_grad_(logits, labels, lse)``: overwrites the logits with ``softmax - onehot``, the
  gradient of each row's loss, in the logits' dtype (what the unfused path feeds its GEMMs too).

Rows are tokens; columns are this rank's vocabulary shard. The torch reference
(``ssa_megatron/ops/reference.py``) is the oracle.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ssa_kernels._utils import LOG2E, check_device

BLOCK_V = 2048


@triton.jit
def ce_stats_kernel(logits, labels, lse, target, V, stride_row, BLOCK_V: tl.constexpr, LOG2E: tl.constexpr):
    """One row per program: lanes keep their own running max and sum (combined once at the end)."""
    row = tl.program_id(0).to(tl.int64)
    base = logits + row * stride_row
    b_m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    b_s = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        o_v = start + tl.arange(0, BLOCK_V)
        b_x = tl.load(base + o_v, mask=o_v < V, other=float("-inf")).to(tl.float32) * LOG2E
        b_new = tl.maximum(b_m, b_x)
        # lanes still at -inf (only masked columns so far) keep a zero sum
        b_s = tl.where(b_new == float("-inf"), 0.0, b_s * tl.exp2(b_m - b_new) + tl.exp2(b_x - b_new))
        b_m = b_new
    m = tl.max(b_m, 0)
    s = tl.sum(b_s * tl.exp2(b_m - m), 0)
    tl.store(lse + row, (m + tl.log2(s)) / LOG2E)
    label = tl.load(labels + row)
    picked = tl.load(base + tl.maximum(label, 0)).to(tl.float32)
    tl.store(target + row, tl.where(label >= 0, picked, 0.0))


@triton.jit
def ce_grad_kernel(logits, labels, lse, V, stride_row, BLOCK_V: tl.constexpr, LOG2E: tl.constexpr):
    """``softmax - onehot`` of one row, written over its logits."""
    row = tl.program_id(0).to(tl.int64)
    base = logits + row * stride_row
    b_lse = tl.load(lse + row) * LOG2E
    label = tl.load(labels + row)
    for start in range(0, V, BLOCK_V):
        o_v = start + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        b_x = tl.load(base + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_p = tl.exp2(b_x * LOG2E - b_lse) - tl.where(o_v == label, 1.0, 0.0)
        tl.store(base + o_v, b_p.to(logits.dtype.element_ty), mask=m_v)


def cross_entropy_stats(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(``logsumexp`` of each row, the row's logit at ``labels`` or 0 where it is -1), float32 ``[rows]``."""
    check_device(logits, labels)  # shapes are checked by ssa_megatron.ops, the public boundary
    rows, vocab = logits.shape
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    target = torch.empty_like(lse)
    if rows:
        ce_stats_kernel[(rows,)](logits, labels, lse, target, vocab, logits.stride(0), BLOCK_V=BLOCK_V, LOG2E=LOG2E)
    return lse, target


def cross_entropy_grad_(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Overwrite ``logits`` with ``exp(logits - lse) - onehot(labels)`` (no one-hot where a label is -1)."""
    check_device(logits, labels)
    rows, vocab = logits.shape
    if rows:
        ce_grad_kernel[(rows,)](logits, labels, lse, vocab, logits.stride(0), BLOCK_V=BLOCK_V, LOG2E=LOG2E)
    return logits
