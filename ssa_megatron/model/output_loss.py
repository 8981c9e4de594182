"""Fused output layer + cross-entropy: the LM loss and its gradients without a micro-batch's logits.

Megatron's output layer writes the logits ``[s, b, V / tp]`` and its vocab-parallel cross-entropy
then works on fp32 copies: at Llama-3's 128,256-token vocabulary an 8k micro-batch holds 2 GiB of
bf16 logits and ~8 GiB of fp32 temporaries, and the passes over them cost more than the GEMM.
Here the logits exist one chunk of tokens at a time (``LOGITS_CHUNK_BYTES``): per chunk, one GEMM,
the rows' logsumexp over this rank's vocabulary shard (``ops.cross_entropy_stats``), one
all-gather over the tensor-parallel ranks, and, when gradients are wanted, ``softmax - onehot``
written over the logits (``ops.cross_entropy_grad_``) and the two gradient GEMMs, so nothing of
the chunk survives it.

The gradients are taken in the forward, before the loss's own gradient is known. The hidden
states' gradient scales per token afterwards, exactly. The weight's gradient is summed over
tokens, so it is taken with the loss mask as token weights and scaled once in backward: exact when
the gradient reaching the per-token losses is proportional to the mask, as it is for a masked mean
(the trainer's loss) or sum; anything else is refused in backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel

from ssa_megatron import ops

LOGITS_CHUNK_BYTES = 1 << 29  # logits held at once; tokens per chunk = this / (vocab shard x element size)


class LinearCrossEntropy(torch.autograd.Function):
    """Per-token ``-log softmax(hidden @ weight^T)[label]`` over a vocabulary sharded by tensor parallelism."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, token_weights, tp_group, backend):
        """hidden ``[n, h]`` (the same on every TP rank), weight ``[V/tp, h]``, labels ``[n]`` (global ids),
        token_weights ``[n]`` float32 (the loss mask) -> per-token loss ``[n]`` float32."""
        n, shard = hidden.shape[0], weight.shape[0]
        start = dist.get_rank(tp_group) * shard if tp_group is not None else 0
        local = labels - start
        local = torch.where((local >= 0) & (local < shard), local, -1)
        with_grad = any(ctx.needs_input_grad[:2])  # (grad mode is off inside forward)
        chunk = max(1, min(n, LOGITS_CHUNK_BYTES // (shard * hidden.element_size())))
        loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if with_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if with_grad else None
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            h = hidden[lo:hi]
            logits = h @ weight.t()
            lse, target = _reduce_over_ranks(*ops.cross_entropy_stats(logits, local[lo:hi], backend=backend), tp_group)
            loss[lo:hi] = lse - target
            if with_grad:
                grad = ops.cross_entropy_grad_(logits, local[lo:hi], lse, backend=backend)
                torch.mm(grad, weight, out=grad_hidden[lo:hi])
                _accumulate_matmul(grad_weight, grad.t(), h * token_weights[lo:hi, None].to(h.dtype))
        if with_grad:
            ctx.save_for_backward(grad_hidden, grad_weight, token_weights)
            ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, w = ctx.saved_tensors
        grad_loss = grad_loss.float()
        scale = (grad_loss @ w) / (w @ w).clamp_min(torch.finfo(torch.float32).tiny)
        _require_proportional(grad_loss, scale * w)
        d_hidden = (grad_hidden.float() * grad_loss[:, None]).to(grad_hidden.dtype)
        d_weight = (grad_weight * scale).to(ctx.weight_dtype)
        return d_hidden, d_weight, None, None, None, None


def _reduce_over_ranks(lse, target, group):
    """Combine the shards' (logsumexp, target logit) of each row: one all-gather."""
    if group is None or dist.get_world_size(group) == 1:
        return lse, target
    world = dist.get_world_size(group)
    parts = torch.empty(world * 2, lse.numel(), dtype=lse.dtype, device=lse.device)  # gloo wants [world * 2, n]
    dist.all_gather_into_tensor(parts, torch.stack([lse, target]), group=group)
    parts = parts.view(world, 2, -1)
    return torch.logsumexp(parts[:, 0], dim=0), parts[:, 1].sum(0)  # only the label's shard has a target


def _accumulate_matmul(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` in acc's float32, from 16-bit operands without a 16-bit rounding of the product."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif acc.device.type == "cuda":
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)  # cuBLAS accumulates into fp32 in place
    else:  # CPU has no mixed-dtype addmm
        acc.addmm_(a.float(), b.float())


def _require_proportional(grad_loss: torch.Tensor, expected: torch.Tensor) -> None:
    """The weight gradient assumes ``grad_loss = scale * token_weights``; checked without a host sync on GPU."""
    # a NaN/inf gradient passes: it reaches the weights, and the trainer skips the step
    ok = ((grad_loss - expected).abs().max() <= 1e-4 * grad_loss.abs().max() + 1e-30) | ~torch.isfinite(grad_loss).all()
    message = ("the fused cross-entropy's weight gradient needs the loss gradient proportional to the loss mask "
               "(a masked mean or sum of the per-token losses); set model.fused_kernels=false for other reductions")
    if grad_loss.device.type == "cuda":
        torch._assert_async(ok, message)
    elif not ok:
        raise ValueError(message)


def linear_cross_entropy(hidden_states, weight, labels, loss_mask, *, sequence_parallel: bool, tp_group,
                         backend: str = "auto"):
    """Per-token LM loss ``[b, s]`` from the final hidden states ``[s(/tp), b, h]`` and the output weight."""
    if sequence_parallel:
        hidden_states = tensor_parallel.gather_from_sequence_parallel_region(
            hidden_states, tensor_parallel_output_grad=True, group=tp_group)
    else:  # the hidden-state gradient is a partial sum over vocabulary shards: all-reduced in backward
        hidden_states = tensor_parallel.copy_to_tensor_model_parallel_region(hidden_states, group=tp_group)
    s, b, h = hidden_states.shape
    token_weights = torch.ones(b, s, device=labels.device) if loss_mask is None else loss_mask.float()
    loss = LinearCrossEntropy.apply(
        hidden_states.reshape(s * b, h), weight, labels.t().reshape(-1), token_weights.t().reshape(-1).contiguous(),
        tp_group, backend)
    return loss.view(s, b).t()


class FusedLossGPTModel(GPTModel):
    """Megatron's ``GPTModel`` whose training and evaluation loss (``labels`` given) is ``linear_cross_entropy``.

    Everything else (logits for inference, multi-token prediction, the embedding/output weights and
    their checkpoint keys) is ``GPTModel``'s own: only the loss path of ``_postprocess`` is replaced.
    ``loss_mask`` (``forward(..., loss_mask=)``) weights the tokens for the weight gradient.
    """

    def __init__(self, *args, ops_backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.ops_backend = ops_backend

    def _postprocess(self, **kwargs):
        fused = (self.post_process and kwargs.get("labels") is not None and not self.config.mtp_num_layers
                 and kwargs.get("inference_context") is None)
        if not fused:
            return super()._postprocess(**kwargs)
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else self.output_layer.weight
        return linear_cross_entropy(kwargs["hidden_states"], weight, kwargs["labels"], kwargs.get("loss_mask"),
                                    sequence_parallel=self.config.sequence_parallel, tp_group=self.tp_group,
                                    backend=self.ops_backend)
