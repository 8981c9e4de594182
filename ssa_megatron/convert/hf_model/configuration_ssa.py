"""Configuration of the SSA (Sparse Sparse Attention) causal LM exported by ssa_megatron.

Self-contained (torch + transformers only): it is shipped beside the weights and loaded with
``AutoConfig.from_pretrained(dir, trust_remote_code=True)``. Llama's keys plus three for attention:

- ``attention_mode``: ``"full"`` (causal SDPA) or ``"sparse"`` (exact top-k block selection, as trained);
- ``block_size``: tokens per key block; ``top_k``: blocks per token and KV head, the own block included.

All three can be overridden at load (``from_pretrained(dir, trust_remote_code=True, top_k=64)``) and
per call (``model(ids, attention_mode="sparse", top_k=8)``; in ``generate()`` the attention budget is
``sparse_top_k``, because ``top_k`` there is the sampling parameter).
"""

from __future__ import annotations

from transformers import PretrainedConfig

ATTENTION_MODES = ("full", "sparse")
# Sparse prefill: "auto" runs the Triton kernels of ``ssa_kernels`` on CUDA when importable, else torch.
SPARSE_BACKENDS = ("auto", "torch", "triton")


def check_attention_args(attention_mode, block_size, top_k) -> None:
    """Raise ``ValueError`` naming the field, the value and the fix."""
    if attention_mode not in ATTENTION_MODES:
        raise ValueError(f"attention_mode={attention_mode!r}: must be one of {ATTENTION_MODES}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r}: must be an int >= 1 (tokens per key block, e.g. 16)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k={top_k!r}: must be an int >= 1 (selected blocks per token, the own block counts as one)")


class SSAConfig(PretrainedConfig):
    model_type = "ssa_llama"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 128256,
        hidden_size: int = 2048,
        intermediate_size: int = 8192,
        num_hidden_layers: int = 16,
        num_attention_heads: int = 32,
        num_key_value_heads: int = 2,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 8192,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 500000.0,
        use_cache: bool = True,
        tie_word_embeddings: bool = True,
        attention_mode: str = "full",
        block_size: int = 16,
        top_k: int = 16,
        sparse_backend: str = "auto",
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        **kwargs,
    ):
        check_attention_args(attention_mode, block_size, top_k)
        if sparse_backend not in SPARSE_BACKENDS:
            raise ValueError(f"sparse_backend={sparse_backend!r}: must be one of {SPARSE_BACKENDS}")
        if num_key_value_heads < 1 or num_attention_heads % num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={num_attention_heads} must be a multiple of num_key_value_heads={num_key_value_heads}"
            )
        if hidden_act != "silu":
            raise ValueError(f"hidden_act={hidden_act!r}: SSA models use SwiGLU ('silu')")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = float(rope_theta)
        self.use_cache = use_cache
        self.attention_mode = attention_mode
        self.block_size = block_size
        self.top_k = top_k
        self.sparse_backend = sparse_backend
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    # ``top_k`` here is the sparse-attention budget, not the sampling parameter of the same name that
    # transformers looks for in model configs (and refuses there): keep it out of that check.
    def _get_generation_parameters(self):  # transformers >= 5
        params = super()._get_generation_parameters()
        params.pop("top_k", None)
        return params

    def _get_non_default_generation_parameters(self):  # transformers 4
        params = super()._get_non_default_generation_parameters()
        params.pop("top_k", None)
        return params
