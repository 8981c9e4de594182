"""Helpers shared by the SSA Triton kernels: interpreter detection, autotune config lists, checks.

Triton decides at *decoration* time whether an ``@triton.jit`` function is compiled for the GPU or
run by the CPU interpreter (``TRITON_INTERPRET=1``, read lazily through ``triton.knobs`` in triton
>= 3.4). ``INTERPRET`` records the mode this package was imported in, so tests can check that the
kernels they run are the interpreted ones (see ``kernels/tests/conftest.py``).
"""

from __future__ import annotations

import math
import os

import torch
import triton

try:  # triton >= 3.4 reads TRITON_INTERPRET through its knobs
    INTERPRET: bool = bool(triton.knobs.runtime.interpret)
except AttributeError:  # pragma: no cover - older triton
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# 1 / ln(2): scores are kept in base 2 so the kernels use exp2/log2 (one MUFU op each).
LOG2E = 1.4426950408889634


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def configs(candidates: list[triton.Config]) -> list[triton.Config]:
    """Autotune candidates; only the first under the interpreter (timing it there is meaningless)
    or with ``SSA_KERNELS_AUTOTUNE=0`` (GPU correctness tests: one compile per shape)."""
    if INTERPRET or os.environ.get("SSA_KERNELS_AUTOTUNE", "1") == "0":
        return candidates[:1]
    if "SSA_KERNELS_CONFIG" in os.environ:  # one candidate per process: parallel compile warm-up (benchmark)
        i = int(os.environ["SSA_KERNELS_CONFIG"])
        return candidates[i : i + 1] or candidates[:1]
    return candidates


def launch(kernel, grid, *args, pinned: bool = False, **kwargs):
    """``kernel[grid](*args, **kwargs)`` for an autotuned kernel; ``pinned=True`` skips the tuning and
    runs its first candidate config (what the interpreter and ``SSA_KERNELS_AUTOTUNE=0`` also run).

    Deterministic mode pins: a config's tile sizes and warp count fix the summation order, and the
    autotuner picks by timing, so two processes may pick different configs and round differently.
    """
    if pinned:
        return kernel.fn[grid](*args, **kwargs, **kernel.configs[0].all_kwargs())
    return kernel[grid](*args, **kwargs)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands use IEEE fp32 dots (tf32 would cost ~5e-4 relative error); 16-bit use tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def kernel_dtype_ok(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"the Triton kernels take fp16, bf16 or fp32 tensors, got {t.dtype}")


def check_device(*tensors: torch.Tensor) -> None:
    """Triton kernels need CUDA tensors, or CPU tensors under the interpreter."""
    for t in tensors:
        if t.device.type != "cuda" and not INTERPRET:
            raise ValueError(
                f"ssa_kernels got a {t.device.type} tensor: the Triton kernels need CUDA tensors "
                "(CPU only under TRITON_INTERPRET=1, set before ssa_kernels is imported)"
            )


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any batch/seq/head strides but need the head dim contiguous."""
    return t if t.stride(-1) == 1 else t.contiguous()


def interpreter_upcast(dtype: torch.dtype) -> torch.dtype:
    """bf16 ``tl.dot`` is silently wrong in the interpreter (triton#11584): run it in fp32 there."""
    return torch.float32 if INTERPRET and dtype == torch.bfloat16 else dtype


def softmax_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
