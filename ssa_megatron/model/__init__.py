"""SSA on Megatron-core: the layer/block specs to build a model with, and their parts."""

from ssa_megatron.model.core_attention import SSACoreAttention
from ssa_megatron.model.gated_attention import GatedSelfAttention
from ssa_megatron.model.layer_specs import get_ssa_block_spec, get_ssa_layer_spec
from ssa_megatron.model.step_state import SSAStepState, draw_mode

__all__ = ["GatedSelfAttention", "SSACoreAttention", "SSAStepState", "draw_mode", "get_ssa_block_spec", "get_ssa_layer_spec"]
