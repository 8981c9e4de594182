"""SSA core attention: Megatron's ``DotProductAttention`` slot, computing the streams SSA needs.

Notation (Megatron's): sq/sk query/key length, b batch, np/ng query heads / KV groups on this
tensor-parallel rank, hn head dim. In: query ``[sq, b, np, hn]``, key/value ``[sk, b, ng, hn]``
(RoPE applied, or applied here when the gated attention hands over its angles); out:
``[sq, b, np * hn]`` for the row-parallel output projection.

Per forward (one micro-batch, see ``step_state.py``):
- ``training_mode=ssa`` in training: both streams, gated, their alignment loss recorded and
  attached to the output (``alignment.py``); the drawn mode's stream is returned. Under activation
  recompute the first forward runs without autograd and computes only the returned stream; the
  recompute in backward computes both (so the loss is recorded once per micro-batch).
- ``training_mode=full|sparse`` in training, or any mode outside training: only that stream.
"""

from __future__ import annotations

import contextlib
import math

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from ssa_megatron import ops
from ssa_megatron.model.config import SSAConfig
from ssa_megatron.model.alignment import attach_aux_loss
from ssa_megatron.model.rope import apply_rope
from ssa_megatron.model.step_state import SSAStepState


class SSACoreAttention(MegatronModule):
    """Dense + block-sparse attention of one layer; meets Megatron's ``CoreAttentionBuilder`` contract."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        *,
        ssa: SSAConfig,
        step_state: SSAStepState,
        **unused_te_kwargs,
    ):
        super().__init__(config=config)
        if attention_type != "self" or attn_mask_type != AttnMaskType.causal:
            raise ValueError(
                f"SSA attention is causal self-attention only; got attention_type={attention_type!r}, "
                f"attn_mask_type={attn_mask_type}"
            )
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"attention_dropout={dropout}: SSA attention has no dropout; set it to 0")
        head_dim = config.kv_channels
        if softmax_scale is not None and not math.isclose(softmax_scale, 1.0 / math.sqrt(head_dim)):
            raise ValueError(f"softmax_scale={softmax_scale}: SSA uses 1/sqrt(head_dim); leave it unset")
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism is not supported by SSA attention yet: set context_parallel_size=1")
        self.layer_number = layer_number  # global, 1-based
        self.ssa = ssa
        self.step_state = step_state
        self._gate: torch.Tensor | None = None
        self._rope_freqs: torch.Tensor | None = None

    @contextlib.contextmanager
    def gated_by(self, gate: torch.Tensor, rope_freqs: torch.Tensor | None = None):
        """Apply the head-wise gate ``[sq, b, np]`` to both streams during one forward, and RoPE by
        ``rope_freqs [s, 1, 1, d]`` to the queries and keys when the caller left it to this module
        (the fused RoPE, ``rope.py``)."""
        self._gate, self._rope_freqs = gate, rope_freqs
        try:
            yield
        finally:
            self._gate, self._rope_freqs = None, None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SSA attention does not support packed sequences or attention_bias")
        sq, b, np_, hn = query.shape
        if self._rope_freqs is not None:
            query, key = apply_rope(query, self._rope_freqs), apply_rope(key, self._rope_freqs)
        # [s, b, h, d] -> [b, s, h, d]: the ops' layout
        q, k, v = (t.permute(1, 0, 2, 3) for t in (query, key, value))
        # Megatron hands in the gate as [sq, b, np]; -> [b, sq, np, 1]
        gate = None if self._gate is None else self._gate.permute(1, 0, 2).unsqueeze(-1)

        # attention_mask carries the micro-batch's stream (see step_state.py); attention itself is causal
        mode = self.step_state.stream(self.training, attention_mask)
        both = self.step_state.computes_both_streams(self.training)
        o_full = self._full(q, k, v, gate) if both or mode == "full" else None
        o_sparse = self._sparse(q, k, v, gate) if both or mode == "sparse" else None
        out = o_full if mode == "full" else o_sparse

        if both:
            loss = ops.alignment_loss(o_full, o_sparse, backend=self.ssa.backend)
            self.step_state.record_alignment(self.layer_number, loss)
            out = attach_aux_loss(out, loss, self.step_state.alignment_grad_scale)
        # [b, sq, np, hn] -> [sq, b, np * hn]
        return out.permute(1, 0, 2, 3).reshape(sq, b, np_ * hn)

    def _full(self, q, k, v, gate):
        o = ops.full_attention(q, k, v, backend=self.ssa.backend)
        return o if gate is None else o * gate.to(o.dtype)

    def _sparse(self, q, k, v, gate):
        idx = ops.select_blocks(q, k, self.ssa.block_size, self.ssa.top_k, backend=self.ssa.backend)
        o = ops.sparse_attention(
            q, k, v, idx, self.ssa.block_size, backend=self.ssa.backend, deterministic=self.ssa.deterministic
        )
        return o if gate is None else o * gate.to(o.dtype)
