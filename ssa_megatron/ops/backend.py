"""Backend choice for the SSA ops: explicit, validated, and logged once per resolved choice."""

from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch

BACKENDS = ("auto", "torch", "triton")
logger = logging.getLogger(__name__)


@functools.cache
def triton_available() -> bool:
    """True when the Triton kernels can run: a CUDA device, or the interpreter (TRITON_INTERPRET=1)."""
    return importlib.util.find_spec("triton") is not None and importlib.util.find_spec("ssa_kernels") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Map ``auto`` to ``triton`` for CUDA tensors (when importable) and to ``torch`` otherwise.

    float64 always resolves to ``torch``: the kernels compute in fp16/bf16/fp32 only.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: must be one of {BACKENDS}")
    if backend == "auto":
        kernels_fit = device.type == "cuda" and dtype != torch.float64 and triton_available()
        backend = "triton" if kernels_fit else "torch"
        _log_choice(backend, device.type)
    elif backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs triton and the ssa_kernels package: pip install -e .")
        if device.type != "cuda" and not _interpreting():
            raise ValueError(f"backend='triton' on {device.type} tensors needs TRITON_INTERPRET=1 (tests only)")
    return backend


@functools.cache
def _log_choice(backend: str, device_type: str) -> None:
    logger.info("SSA ops: backend='auto' resolved to %r for %s tensors", backend, device_type)
