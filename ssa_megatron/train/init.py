"""Layout-independent initialisation: the same ``train.seed`` gives the same full model at any TP/PP/VPP/DP.

Megatron draws each tensor-parallel shard from ``seed + 2718 + tp_rank`` (and Megatron-LM adds
``100 x pp_rank``), so the initial model depends on the layout, and at PP > 1 stages can start
from identical copies of different layers. Here every weight matrix is drawn whole, on the CPU,
from a generator seeded by (seed, its global name), with Megatron's own init function for it; each
rank keeps its shard (``full_state.shard_of``). Norm weights keep Megatron's deterministic ones.
"""

from __future__ import annotations

import hashlib

import torch

from ssa_megatron.train.full_state import EMBEDDING, TIED_OUTPUT, full_shape, global_named_parameters, shard_of

# Megatron scales the init of the projections that write into the residual stream by 1/sqrt(2 x layers).
_OUTPUT_PROJECTIONS = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")


def parameter_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _init_function(name: str, config):
    if name.endswith(_OUTPUT_PROJECTIONS):
        return config.output_layer_init_method
    if name == EMBEDDING:
        return getattr(config, "embedding_init_method", None) or config.init_method
    return config.init_method


@torch.no_grad()
def initialize_parameters(chunks, config, seed: int, tie_embeddings: bool) -> None:
    """Re-draw every weight matrix of this rank's (unwrapped) model chunks from (seed, global name)."""
    for name, param in global_named_parameters(chunks):
        if param.dim() < 2:
            continue  # norm weights: ones, whatever the layout
        # A tied output layer (the last stage's copy under PP) is the embedding.
        source_name = EMBEDDING if tie_embeddings and name == TIED_OUTPUT else name
        full = torch.empty(full_shape(name, param), dtype=torch.float32)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(parameter_seed(seed, source_name))
            _init_function(source_name, config)(full)
        param.copy_(shard_of(name, param, full).to(param.dtype))
