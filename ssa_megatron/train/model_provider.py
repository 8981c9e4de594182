"""The trainer's model provider: the run config -> Megatron's ``TransformerConfig`` and ``GPTModel`` chunks.

One model chunk per virtual pipeline stage of this rank (one chunk without interleaving).
Process groups must already be initialised (``ssa_megatron.train.distributed``). It lives in
``train/`` because it reads the run config and ``parallel_state``; ``model/`` is the spec library.
"""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from ssa_megatron.config import RunConfig
from ssa_megatron.model.layer_specs import get_ssa_block_spec
from ssa_megatron.model.output_loss import FusedLossGPTModel
from ssa_megatron.train.distributed import resolve_device
from ssa_megatron.model.step_state import SSAStepState

# The embedding/output rows are padded to a multiple of this (fast GEMM shapes).
VOCAB_PAD_MULTIPLE = 128


def padded_vocab_size(vocab_size: int, tensor_parallel_size: int) -> int:
    """Rows of the embedding and output layer, the same at every TP size that divides 128.

    Megatron-LM pads to 128 x TP, which makes the model depend on the layout: a checkpoint loaded at
    another TP would gain zero logits that join the softmax. Any power-of-two TP <= 128 divides 128.
    """
    multiple = math.lcm(VOCAB_PAD_MULTIPLE, tensor_parallel_size)
    return -(-vocab_size // multiple) * multiple


def compiled_fusions(cfg: RunConfig) -> bool:
    """RoPE and SwiGLU as ``torch.compile``'d kernels: on GPUs, where they save ~40 ms per 1B step.

    On CPU (tests, debugging) compiling costs seconds per process and saves nothing, so the plain
    modules run there; ``tests/train/test_fused_kernels.py`` compiles them on CPU on purpose.
    """
    return cfg.model.fused_kernels and resolve_device(cfg.train.device).type == "cuda"


def transformer_config(cfg: RunConfig) -> TransformerConfig:
    """Megatron's ``TransformerConfig`` for the run: fused kernels off unless their libraries exist."""
    m, p = cfg.model, cfg.parallel
    have_fused_norms = any(importlib.util.find_spec(name) for name in ("transformer_engine", "apex"))
    if p.sequence_parallel and not have_fused_norms:
        raise ValueError(
            "parallel.sequence_parallel=true needs Transformer Engine or apex norms "
            "(PyTorch's RMSNorm in Megatron's local spec refuses sequence parallelism): set it to false"
        )
    dtype = torch.bfloat16 if cfg.train.dtype == "bf16" else torch.float32
    vpp = p.virtual_pipeline_model_parallel_size
    t = cfg.train
    recompute = {}
    if t.recompute_granularity is not None:
        recompute = dict(recompute_granularity=t.recompute_granularity)
        if t.recompute_granularity == "full":
            recompute.update(recompute_method=t.recompute_method, recompute_num_layers=t.recompute_num_layers)
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp if vpp and vpp > 1 else None,
        # Interleaved 1F1B sends activations and gradients to the same peer at once: Megatron-LM's
        # default there is separate, overlapped p2p ops (a batched pair can be matched out of order).
        overlap_p2p_comm=bool(vpp and vpp > 1),
        batch_p2p_comm=not (vpp and vpp > 1),
        sequence_parallel=p.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # Fusions that need apex/TE or CUDA-only JIT: the plain PyTorch path is complete without them.
        bias_activation_fusion=compiled_fusions(cfg),  # SwiGLU: Megatron's torch.compile'd kernel (no apex/TE)
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        **recompute,
    )


def build_model_chunks(cfg: RunConfig, config: TransformerConfig, step_state: SSAStepState, vocab_size: int) -> list[GPTModel]:
    """This rank's model chunks (one per virtual pipeline stage), on the current device."""
    vpp = config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        model_class, extra = (FusedLossGPTModel, {"ops_backend": cfg.ssa.backend}) if cfg.model.fused_kernels else (GPTModel, {})
        model = model_class(
            config=config,
            transformer_layer_spec=get_ssa_block_spec(config, cfg.ssa, step_state, vp_stage=stage,
                                                       fused_rope=compiled_fusions(cfg)),
            vocab_size=padded_vocab_size(vocab_size, config.tensor_model_parallel_size),
            max_sequence_length=cfg.model.seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            share_embeddings_and_output_weights=cfg.model.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=cfg.model.rotary_base,
            vp_stage=stage,
            **extra,
        )
        chunks.append(model)
    return chunks
