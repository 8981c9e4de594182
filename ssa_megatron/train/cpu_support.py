"""CPU-only support: run Megatron-core (gloo backend) on machines without a GPU. Tests and debugging only.

Megatron-core hard-codes CUDA in places that are plain bookkeeping on CPU: ``device="cuda"``
literals and ``torch.cuda.current_device()`` in the schedules, p2p, DDP buffers, optimizer and
RoPE; ``Tensor.cuda()``; ``torch.cuda.synchronize``/``current_stream``. This module neutralises exactly those, in one place:

- a ``TorchFunctionMode`` that rewrites every CUDA device argument of tensor factories and
  ``Tensor.to``/``Tensor.cuda`` to the CPU (no Megatron source is patched for these);
- ``Tensor.type()`` reports CPU tensors by their CUDA names (grad clipping asserts
  ``'torch.cuda.FloatTensor'``);
- ``torch.cuda.current_device``/``synchronize``/``current_stream``/``Stream`` and the CUDA RNG
  state getter (activation recompute) replaced by CPU stand-ins.

Runs on CPU use fp32 (bf16 matmuls there are 5-25x slower), which keeps Megatron's mixed-precision
optimizer (and its fp16/bf16 type checks) out of the way.

It is enabled only when the run's device is ``cpu`` and never on a machine with a GPU in use.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")


def _is_cuda_device(device) -> bool:
    if isinstance(device, int):
        return True  # Megatron's torch.cuda.current_device() index
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaToCpu(TorchFunctionMode):
    """Every CUDA device argument becomes the CPU; ``Tensor.cuda()`` is the identity."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Megatron checks grads against 'torch.cuda.FloatTensor': report CPU types by their CUDA names.
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if _is_cuda_device(kwargs.get("device")):
            kwargs = {**kwargs, "device": _CPU}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for ``torch.cuda.Stream`` (a class, so annotations like ``Stream | None`` still work
    in other libraries): work on CPU is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, _other):
        pass

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_mode: _CudaToCpu | None = None


def enable_cpu_support() -> None:
    """Idempotent: make Megatron-core run on CPU processes for the rest of this process."""
    global _mode
    if _mode is not None:
        return
    if torch.cuda.is_available():
        raise RuntimeError("CPU support must not be enabled on a machine that uses its GPU")
    torch.cuda.current_device = lambda: 0  # mapped to the CPU by the mode
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_stream = lambda *a, **k: _NullStream()
    torch.cuda.Stream = _NullStream
    # Activation recompute saves the CUDA RNG state around each checkpointed layer; dropout is 0
    # and nothing else draws on the "GPU", so an empty state stands in (Megatron's setter is a no-op here).
    torch.cuda.random.get_rng_state = lambda device="cuda": torch.empty(0, dtype=torch.uint8)
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    _mode = _CudaToCpu()
    _mode.__enter__()
