"""Process groups for a run: torch.distributed (NCCL on GPU, gloo on CPU) + Megatron's parallel state."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from ssa_megatron.config import RunConfig
from ssa_megatron.train.cpu_support import enable_cpu_support


@dataclass(frozen=True)
class DistributedContext:
    device: torch.device
    rank: int
    world_size: int
    tp_size: int
    pp_size: int
    dp_size: int
    dp_rank: int

    @property
    def is_logging_rank(self) -> bool:
        """The last rank holds the last pipeline stage (where the LM loss lives), as in Megatron."""
        return self.rank == self.world_size - 1


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no GPU is visible: use train.device=cpu (or auto)")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


def initialize(cfg: RunConfig) -> DistributedContext:
    """Join (or create, for a single process) the default group, then Megatron's model-parallel groups.

    Under ``torchrun`` the rendezvous comes from its environment; a plain ``python -m`` run becomes
    a one-process world on an in-memory store. The layout is checked against the world size before any group is built.
    """
    device = resolve_device(cfg.train.device)
    if device.type == "cpu":
        enable_cpu_support()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "RANK" in os.environ:
            dist.init_process_group(backend=backend)
        else:
            # One process: an in-memory store, so no TCP port is needed (a "free" port picked here could
            # be taken by another process before the store listens on it).
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    world_size = dist.get_world_size()
    dp_size = cfg.check_world_size(world_size)
    p = cfg.parallel
    vpp = p.virtual_pipeline_model_parallel_size
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp if vpp and vpp > 1 else None,
    )
    # Dropout is 0 and weights are initialised on the CPU generator (see the trainer), so the CUDA RNG
    # tracker never draws; on CPU, Megatron's no-op tracker stands in for it.
    tensor_parallel.model_parallel_cuda_manual_seed(
        cfg.train.seed, inference_rng_tracker=device.type == "cpu", force_reset_rng=True
    )
    torch.manual_seed(cfg.train.seed)
    return DistributedContext(
        device=device,
        rank=dist.get_rank(),
        world_size=world_size,
        tp_size=p.tensor_model_parallel_size,
        pp_size=p.pipeline_model_parallel_size,
        dp_size=dp_size,
        dp_rank=parallel_state.get_data_parallel_rank(),
    )


def shutdown() -> None:
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
