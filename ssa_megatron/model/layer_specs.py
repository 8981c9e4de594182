"""Megatron-core layer and block specs with SSA attention swapped in.

Megatron's own GPT layer spec (local or Transformer Engine) is taken as it is; only the
self-attention module (for the gate) and its ``core_attention`` slot change. SSA therefore
inherits every other Megatron layer feature (norms, SwiGLU MLP, bias-dropout-add, TP layers).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from ssa_megatron.model.config import SSAConfig
from ssa_megatron.model.core_attention import SSACoreAttention
from ssa_megatron.model.gated_attention import GatedSelfAttention, GatedSelfAttentionSubmodules
from ssa_megatron.model.step_state import SSAStepState


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def get_ssa_layer_spec(
    ssa: SSAConfig, step_state: SSAStepState, *, use_transformer_engine: bool | None = None, fused_rope: bool = False
) -> ModuleSpec:
    """One decoder layer: RMSNorm, gated SSA self-attention, RMSNorm, SwiGLU MLP.

    ``fused_rope``: RoPE by ``rope.apply_rope`` (one compiled kernel per tensor) instead of
    Megatron's unfused or Transformer Engine RoPE.

    ``use_transformer_engine=None`` picks TE when it is importable (it is optional: the local spec
    is complete on its own). With TE, the layer norm stays a separate module (not fused into the
    QKV projection) because the gate projection reads the same normalised input.
    """
    if use_transformer_engine is None:
        use_transformer_engine = transformer_engine_available()
    if use_transformer_engine:
        base, column_linear, norm = _transformer_engine_parts()
    else:
        base = get_gpt_layer_local_spec(normalization="RMSNorm")
        column_linear, norm = base.submodules.self_attention.submodules.linear_qkv, base.submodules.input_layernorm

    attention = base.submodules.self_attention
    fields = {f.name: getattr(attention.submodules, f.name) for f in dataclasses.fields(attention.submodules)}
    fields.update(
        linear_qkv=column_linear,
        linear_gate=column_linear,
        core_attention=functools.partial(SSACoreAttention, ssa=ssa, step_state=step_state),
    )
    gated = ModuleSpec(
        module=GatedSelfAttention, params={**attention.params, "fused_rope": fused_rope},
        submodules=GatedSelfAttentionSubmodules(**fields),
    )
    layer = dataclasses.replace(base.submodules, self_attention=gated, input_layernorm=norm)
    return dataclasses.replace(base, submodules=layer)


def _transformer_engine_parts():
    """TE layer spec with norm and QKV un-fused (see ``get_ssa_layer_spec``)."""
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TENorm
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    # The TE MLP keeps pre_mlp_layernorm fused into fc1, as in Megatron's default.
    base = get_gpt_layer_with_transformer_engine_spec(normalization="RMSNorm")
    return base, TEColumnParallelLinear, TENorm


def get_ssa_block_spec(
    config: TransformerConfig,
    ssa: SSAConfig,
    step_state: SSAStepState,
    *,
    vp_stage: int | None = None,
    use_transformer_engine: bool | None = None,
    fused_rope: bool = False,
) -> TransformerBlockSubmodules:
    """The decoder block of this pipeline stage (and virtual stage): SSA layers, then the final RMSNorm."""
    layer = get_ssa_layer_spec(ssa, step_state, use_transformer_engine=use_transformer_engine, fused_rope=fused_rope)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=layer.submodules.input_layernorm)
