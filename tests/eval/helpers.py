"""Tiny random HF SSA models and sample text for the evaluation tests (no Megatron)."""

from __future__ import annotations

import torch

from ssa_megatron.convert.hf_model.configuration_ssa import SSAConfig
from ssa_megatron.convert.hf_model.modeling_ssa import SSAForCausalLM

WORDS = (
    "the quick brown fox jumps over a lazy dog while seven small birds sing in the old green tree "
    "and the river runs past quiet houses where people read long books about distant stars"
).split()


def tiny_model(seed: int = 0, *, vocab: int = 300, heads: int = 4, kv_heads: int = 2, layers: int = 2,
               block_size: int = 4, top_k: int = 2, std: float = 0.3) -> SSAForCausalLM:
    """A random SSA model; a large init makes attention peaked, so the selection matters."""
    torch.manual_seed(seed)
    config = SSAConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, max_position_embeddings=512, rope_theta=10000.0, block_size=block_size,
        top_k=top_k, initializer_range=std, bos_token_id=None, eos_token_id=1, pad_token_id=1,
    )
    model = SSAForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, std)
    return model


def sample_text(n_words: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(WORDS), (n_words,), generator=g).tolist()
    lines = [" ".join(WORDS[i] for i in picks[j : j + 12]) + "." for j in range(0, n_words, 12)]
    return "\n".join(lines)
