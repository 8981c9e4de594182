"""State every SSA core attention of one model replica shares during a training step.

The trainer owns one :class:`SSAStepState` per process and hands it to the layer spec. It is the
one owner of the full/sparse decision (:meth:`SSAStepState.stream`); the core attentions record
their alignment losses into it. Nothing here communicates: reductions live in ``train/metrics.py``.

The stream of a micro-batch travels *with* the micro-batch: the trainer passes
:meth:`SSAStepState.stream_tag` as the model's ``attention_mask`` argument (SSA attention is causal
and has no other use for it), so a layer recomputed during backward (activation recompute under
1F1B, where later micro-batches have already been drawn) computes the stream of its own micro-batch.
"""

from __future__ import annotations

import numpy as np
import torch

from ssa_megatron.model.config import SSAConfig


def draw_mode(seed: int, iteration: int, microbatch: int) -> str:
    """The attention stream (``full`` or ``sparse``, p = 1/2) of one micro-batch of SSA training.

    A pure function of (seed, iteration, micro-batch): every rank of a model replica (TP, PP, CP)
    draws the same mode with no communication, and a resumed run draws what the original would.
    """
    generator = np.random.default_rng([seed, iteration, microbatch])
    return "sparse" if generator.random() < 0.5 else "full"


STREAMS = ("full", "sparse")


def stream_tag(mode: str) -> torch.Tensor:
    """A CPU tensor naming the stream (reading it back never waits for a GPU)."""
    return torch.tensor([STREAMS.index(mode)], dtype=torch.int8)


class SSAStepState:
    """Mode of the current micro-batch, alignment-loss gradient scale, and per-layer loss records."""

    def __init__(self, ssa: SSAConfig, num_layers: int, tp_size: int = 1):
        self.ssa = ssa
        self.num_layers = num_layers
        self.tp_size = tp_size
        self.mode = ssa.attention_mode if ssa.training_mode == "ssa" else ssa.training_mode
        self.num_microbatches = 1
        self.alignment_weight = ssa.alpha  # the alignment loss's weight in this step's backward
        self.loss_scale = 1.0  # the optimizer's grad scale (fp16 loss scaling), 1 otherwise
        self._layer_losses: torch.Tensor | None = None  # [num_layers] sums of this step's per-micro-batch means
        self.sparse_microbatches = 0
        self.microbatches = 0

    def begin_step(self, num_microbatches: int, alignment_weight: float | None = None) -> None:
        """Reset the records; ``alignment_weight`` replaces ``ssa.alpha`` in this step's backward (the
        trainer's gradient diagnostic backpropagates the alignment loss alone at weight 1)."""
        self.num_microbatches = num_microbatches
        self.alignment_weight = self.ssa.alpha if alignment_weight is None else alignment_weight
        self._layer_losses = None
        self.sparse_microbatches = 0
        self.microbatches = 0

    def begin_microbatch(self, seed: int, iteration: int, microbatch: int) -> None:
        """Set the training stream of one micro-batch: drawn under ``ssa``, fixed for the baselines."""
        if self.ssa.training_mode == "ssa":
            self.mode = draw_mode(seed, iteration, microbatch)
        else:
            self.mode = self.ssa.training_mode
        self.microbatches += 1
        self.sparse_microbatches += self.mode == "sparse"

    def stream_tag(self) -> torch.Tensor:
        """The current micro-batch's stream, to pass as the model's ``attention_mask``."""
        return stream_tag(self.mode)

    def use_inference_mode(self, mode: str | None = None) -> None:
        """Streams outside training: ``mode`` (full|sparse), ``ssa.attention_mode`` by default."""
        self.mode = mode or self.ssa.attention_mode

    def stream(self, training: bool, tag: torch.Tensor | None = None) -> str:
        """The stream that feeds the residual: the baselines' own in training, else the tag, else the current mode."""
        if training and self.ssa.training_mode != "ssa":
            return self.ssa.training_mode
        if training and tag is not None:
            return STREAMS[int(tag.reshape(-1)[0])]
        return self.mode

    def computes_both_streams(self, training: bool) -> bool:
        """SSA training with autograd on: both streams and their alignment loss (else only the residual's)."""
        return training and self.ssa.training_mode == "ssa" and torch.is_grad_enabled()

    @property
    def alignment_grad_scale(self) -> float:
        """d(objective)/d(layer loss on this rank) = alpha / (layers x micro-batches x TP ranks).

        The objective is ``CE + alpha * mean_layers(L_align)`` averaged over micro-batches, where each
        TP rank's loss is the mean over its own heads: the model-wide layer loss is the mean over ranks.
        """
        return self.alignment_weight * self.loss_scale / (self.num_layers * self.num_microbatches * self.tp_size)

    def record_alignment(self, layer_number: int, loss: torch.Tensor) -> None:
        """Add one micro-batch's alignment loss of global layer ``layer_number`` (1-based)."""
        if self._layer_losses is None:
            self._layer_losses = torch.zeros(self.num_layers, dtype=torch.float32, device=loss.device)
        self._layer_losses[layer_number - 1] += loss.detach().float() / self.num_microbatches

    def layer_losses(self, device: torch.device) -> torch.Tensor:
        """This rank's ``[num_layers]`` record (zeros for layers it does not hold)."""
        if self._layer_losses is None:
            return torch.zeros(self.num_layers, dtype=torch.float32, device=device)
        return self._layer_losses.to(device)
