"""Megatron ``SelfAttention`` with the paper's head-wise sigmoid output gate.

``g = sigmoid(x @ W_g)``, ``W_g: hidden -> num_query_heads``: one scalar per query head and token,
computed from the layer input and multiplying that head's attention output before the output
projection. The gate must act *inside* the core attention (the alignment loss compares gated
outputs), so this subclass computes it and hands it to the core attention for one forward.
``W_g`` is column-parallel: each tensor-parallel rank holds the rows of its own query heads.

With ``fused_rope`` the rotary embedding is withheld from Megatron's attention (its fused RoPE
needs Transformer Engine, its unfused one is ~8 kernels per tensor) and applied by the core
attention with ``rope.apply_rope`` instead, in training and evaluation forwards (Megatron's own
path keeps inference with a KV cache and packed sequences).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules


@dataclass
class GatedSelfAttentionSubmodules(SelfAttentionSubmodules):
    linear_gate: type | None = None  # column-parallel linear hidden -> num_attention_heads


class GatedSelfAttention(SelfAttention):
    def __init__(self, config, submodules: GatedSelfAttentionSubmodules, layer_number: int, *,
                 fused_rope: bool = False, **kwargs):
        super().__init__(config, submodules, layer_number, **kwargs)
        if fused_rope and (config.rotary_interleaved or getattr(config, "yarn_rotary_scaling_factor", None)):
            raise ValueError("the fused RoPE implements plain (non-interleaved, unscaled) RoPE: set fused_kernels=false")
        self.fused_rope = fused_rope
        if config.recompute_granularity == "selective" and "core_attn" in (config.recompute_modules or []):
            raise ValueError(
                "selective recompute of core_attn is not supported with the SSA gate: "
                "use recompute_granularity='full' or drop 'core_attn' from recompute_modules"
            )
        self.linear_gate = submodules.linear_gate(
            config.hidden_size,
            config.num_attention_heads,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=False,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="gate",
            tp_group=self.pg_collection.tp,
        )

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        # hidden_states [s(/tp with sequence parallel), b, h] -> gate logits [s, b, np]
        gate_logits, _ = self.linear_gate(hidden_states)
        gate = torch.sigmoid(gate_logits.float()).to(hidden_states.dtype)
        freqs = kwargs.get("rotary_pos_emb")
        ours = (self.fused_rope and isinstance(freqs, torch.Tensor) and kwargs.get("inference_context") is None
                and kwargs.get("packed_seq_params") is None)
        if ours:
            kwargs["rotary_pos_emb"] = None  # Megatron skips RoPE; the core attention applies it
        with self.core_attention.gated_by(gate, rope_freqs=freqs if ours else None):
            return super().forward(hidden_states, *args, **kwargs)
