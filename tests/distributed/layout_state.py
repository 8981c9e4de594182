"""Move full (unsharded) model weights in and out of any TP x PP (x virtual PP) layout. Test support.

Global names: ``decoder.layers.<global index>.<...>`` whatever stage holds the layer. Tensor-parallel
params are concatenated along Megatron's ``partition_dim``; SwiGLU's fc1 holds ``[gate_r; up_r]`` on
each rank, so its full form is ``[gate; up]`` and shards are taken from each half.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from megatron.core import parallel_state

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def _global_names(chunk):
    module = chunk.module if hasattr(chunk, "module") else chunk
    layers = module.decoder.layers
    for name, param in module.named_parameters():
        match = _LAYER.match(name)
        if match:
            global_index = layers[int(match.group(1))].layer_number - 1
            name = f"decoder.layers.{global_index}." + name[match.end():]
        yield name, param


def _is_swiglu_fc1(name: str) -> bool:
    return name.endswith("mlp.linear_fc1.weight")


def gather_full_state(chunks) -> dict[str, torch.Tensor]:
    """Every rank returns the full model weights (CPU float32 copies)."""
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    local = {}
    for chunk in chunks:
        for name, param in _global_names(chunk):
            value = param.detach().float()  # gathered on the param's device (NCCL needs CUDA tensors)
            if getattr(param, "tensor_model_parallel", False) and tp > 1:
                dim = param.partition_dim
                shards = [torch.empty_like(value) for _ in range(tp)]
                dist.all_gather(shards, value.contiguous(), group=tp_group)
                if _is_swiglu_fc1(name):
                    halves = [s.chunk(2, dim=0) for s in shards]
                    value = torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
                else:
                    value = torch.cat(shards, dim=dim)
            local[name] = value.cpu()
    stages = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(stages, local, group=parallel_state.get_pipeline_model_parallel_group())
    full = {}
    for stage in stages:
        full.update(stage)
    tied = full.pop("output_layer.weight", None)
    if tied is not None and "embedding.word_embeddings.weight" in full:
        # Under PP the last stage keeps its own copy of the tied embedding: it must stay in sync.
        torch.testing.assert_close(tied, full["embedding.word_embeddings.weight"], rtol=0, atol=0)
    elif tied is not None:
        full["output_layer.weight"] = tied
    return full


def load_full_state(chunks, full: dict[str, torch.Tensor]) -> None:
    """Copy this rank's shard of every weight from ``full`` (as made by ``gather_full_state``)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    for chunk in chunks:
        for name, param in _global_names(chunk):
            source = full[name] if name in full else full["embedding.word_embeddings.weight"]  # tied output layer
            if getattr(param, "tensor_model_parallel", False) and tp > 1:
                if _is_swiglu_fc1(name):
                    gate, up = source.chunk(2, dim=0)
                    source = torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])
                else:
                    source = source.chunk(tp, dim=param.partition_dim)[rank]
            with torch.no_grad():
                param.copy_(source.to(param.dtype))
