"""SSA on Megatron-core: the layer/block specs to build a model with, and their parts.

``SSAConfig`` loads eagerly; the Megatron parts are imported on first use, so reading a run config
(which embeds ``SSAConfig``) needs neither torch nor megatron-core.
"""

from __future__ import annotations

import importlib

from ssa_megatron.model.config import SSAConfig

_LAZY = {
    "SSACoreAttention": "ssa_megatron.model.core_attention",
    "GatedSelfAttention": "ssa_megatron.model.gated_attention",
    "get_ssa_block_spec": "ssa_megatron.model.layer_specs",
    "get_ssa_layer_spec": "ssa_megatron.model.layer_specs",
    "SSAStepState": "ssa_megatron.model.step_state",
    "draw_mode": "ssa_megatron.model.step_state",
    "FusedLossGPTModel": "ssa_megatron.model.output_loss",
    "linear_cross_entropy": "ssa_megatron.model.output_loss",
}

__all__ = ["SSAConfig", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
