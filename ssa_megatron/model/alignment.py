"""Join the alignment loss to the backward pass on the layer's own pipeline stage.

The pattern of Megatron's ``MoEAuxLossAutoScaler``: an identity on the layer output whose
backward also returns a constant gradient for the auxiliary loss, so the loss needs no path to
the LM loss and nothing extra crosses pipeline stages.
"""

from __future__ import annotations

import torch


class AttachAuxLoss(torch.autograd.Function):
    """Identity on ``output``; in backward, ``d(objective)/d(aux_loss) = scale``."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux_loss, ctx.scale), None


def attach_aux_loss(output: torch.Tensor, aux_loss: torch.Tensor, scale: float) -> torch.Tensor:
    return AttachAuxLoss.apply(output, aux_loss, scale)
