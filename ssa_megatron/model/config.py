"""The SSA attention settings: part of the model spec library, so code that builds an SSA layer needs
nothing from the training run config (which embeds this as its ``ssa`` section)."""

from __future__ import annotations

from dataclasses import dataclass

TRAINING_MODES = ("ssa", "full", "sparse")
ATTENTION_MODES = ("full", "sparse")


def require(ok: bool, message: str) -> None:
    """Config checks: ``ValueError(message)`` (naming field, value and fix) unless ``ok``."""
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True, kw_only=True)
class SSAConfig:
    """How attention is trained and run (see ../shared/SSA_SPEC.md)."""

    training_mode: str = "ssa"  # ssa (both streams + alignment) | full | sparse (the paper's 3 rows)
    attention_mode: str = "full"  # stream used outside training (eval, inference): full | sparse
    block_size: int = 16  # tokens per key block
    top_k: int = 16  # selected blocks per token and KV head, own block included
    alpha: float = 10.0  # weight of the layer-mean alignment loss
    backend: str = "auto"  # ops backend: auto (Triton on CUDA) | torch | triton
    deterministic: bool = False  # bitwise-reproducible sparse attention: fixed summation orders, no atomics (docs/kernels.md)

    def __post_init__(self):
        require(self.training_mode in TRAINING_MODES, f"ssa.training_mode={self.training_mode!r}: must be one of {TRAINING_MODES}")
        require(self.attention_mode in ATTENTION_MODES, f"ssa.attention_mode={self.attention_mode!r}: must be one of {ATTENTION_MODES}")
        require(isinstance(self.block_size, int) and self.block_size >= 1, f"ssa.block_size={self.block_size!r}: must be an int >= 1")
        require(isinstance(self.top_k, int) and self.top_k >= 1, f"ssa.top_k={self.top_k!r}: must be >= 1 (the own block counts)")
        require(self.alpha >= 0, f"ssa.alpha={self.alpha}: must be >= 0")
        require(self.backend in ("auto", "torch", "triton"), f"ssa.backend={self.backend!r}: must be auto, torch or triton")
        require(isinstance(self.deterministic, bool), f"ssa.deterministic={self.deterministic!r}: must be true or false")
