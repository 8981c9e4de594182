"""Triton kernels of SSA (Sparse Sparse Attention): block selection, sparse attention, alignment loss.

Layout ``[B, T, H, D]`` (batch, sequence, heads, head dim), as in ``ssa_megatron.ops``, whose
``backend="triton"`` calls these functions and whose torch reference is their oracle:

* ``select_blocks(q, k, block_size, top_k) -> idx [B, T, HKV, top_k]`` int64 — exact top-k;
* ``sparse_attention(q, k, v, idx, block_size, deterministic=False) -> o [B, T, HQ, D]`` —
  differentiable in q, k, v; ``deterministic=True`` fixes every summation order (bitwise repeats);
* ``alignment_loss(o_full, o_sparse) -> scalar`` — fused forward/backward of the symmetric SmoothL1;
* ``cross_entropy_stats`` / ``cross_entropy_grad_`` — a logits chunk's logsumexp and gradient, for
  the fused linear + cross-entropy output layer.

The kernels run on CUDA; on CPU only under ``TRITON_INTERPRET=1`` set before this package is
imported (tests). ``INTERPRET`` says which mode the kernels were built in.
"""

from ssa_kernels._utils import INTERPRET
from ssa_kernels.align import alignment_loss
from ssa_kernels.cross_entropy import cross_entropy_grad_, cross_entropy_stats
from ssa_kernels.select import select_blocks
from ssa_kernels.inverse import build_inverse_index
from ssa_kernels.sparse import sparse_attention

__all__ = [
    "INTERPRET", "alignment_loss", "build_inverse_index", "cross_entropy_grad_", "cross_entropy_stats", "select_blocks",
    "sparse_attention",
]
