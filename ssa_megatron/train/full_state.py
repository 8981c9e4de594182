"""Full (unsharded) model weights under layout-independent names, and this rank's shard of them.

Global names are those of a one-process ``GPTModel``: ``decoder.layers.<global index>.<...>``
whatever pipeline stage (or virtual stage) holds the layer. Tensor-parallel params split along
Megatron's ``partition_dim``; SwiGLU's fc1 holds ``[gate_r; up_r]`` on each rank, so its full form
is ``[gate; up]`` and each rank's shard takes its slice of both halves. The fused QKV weight is
interleaved per KV group, so contiguous row slices are whole groups: a plain split is right.

Used for layout-independent initialisation (``init.py``), the layout-equality tests and export.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
TIED_OUTPUT = "output_layer.weight"
EMBEDDING = "embedding.word_embeddings.weight"


def global_named_parameters(chunks) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """``(global name, param)`` of every parameter of this rank's model chunks (DDP-wrapped or not)."""
    for chunk in chunks:
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


def is_tensor_parallel(param) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False)) and parallel_state.get_tensor_model_parallel_world_size() > 1


def full_shape(name: str, param) -> torch.Size:
    """Shape of the whole tensor of which ``param`` is this rank's shard."""
    shape = list(param.shape)
    if is_tensor_parallel(param):
        shape[param.partition_dim] *= parallel_state.get_tensor_model_parallel_world_size()
    return torch.Size(shape)


def shard_of(name: str, param, full: torch.Tensor) -> torch.Tensor:
    """This rank's slice of the full tensor ``full`` for ``param``."""
    if not is_tensor_parallel(param):
        return full
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    if _is_swiglu_fc1(name):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])
    return full.chunk(tp, dim=param.partition_dim)[rank]


def gather_full_state(chunks) -> dict[str, torch.Tensor]:
    """Every rank returns the full model weights (CPU float32 copies). Collective over all ranks."""
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    local = {}
    for name, param in global_named_parameters(chunks):
        value = param.detach().float()  # gathered on the param's device (NCCL needs CUDA tensors)
        if is_tensor_parallel(param):
            shards = [torch.empty_like(value) for _ in range(tp)]
            dist.all_gather(shards, value.contiguous(), group=tp_group)
            if _is_swiglu_fc1(name):
                halves = [s.chunk(2, dim=0) for s in shards]
                value = torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
            else:
                value = torch.cat(shards, dim=param.partition_dim)
        local[name] = value.cpu()
    stages = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(stages, local, group=parallel_state.get_pipeline_model_parallel_group())
    full = {}
    for stage in stages:
        full.update(stage)
    tied = full.pop(TIED_OUTPUT, None)
    if tied is not None and EMBEDDING in full:
        # Under PP the last stage keeps its own copy of the tied embedding: it must stay in sync.
        torch.testing.assert_close(tied, full[EMBEDDING], rtol=0, atol=0)
    elif tied is not None:
        full[TIED_OUTPUT] = tied
    return full


def load_full_state(chunks, full: dict[str, torch.Tensor]) -> None:
    """Copy this rank's shard of every weight from ``full`` (as made by ``gather_full_state``)."""
    for name, param in global_named_parameters(chunks):
        source = full[name] if name in full else full[EMBEDDING]  # tied output layer
        with torch.no_grad():
            param.copy_(shard_of(name, param, source).to(param.dtype))
