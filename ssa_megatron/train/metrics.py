"""Model-wide training metrics, reduced so that every rank reports the same numbers.

Every collective here runs on every rank, whatever it recorded (a stage with no layers of a kind
contributes zeros): no early return can leave other ranks waiting in an all-reduce.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer.clip_grads import get_grad_norm_fp32

from ssa_megatron.config import RunConfig
from ssa_megatron.model.step_state import STREAMS


def model_wide_alignment_loss(layer_losses: torch.Tensor) -> tuple[float, list[float]]:
    """(mean over all layers, per-layer values) of the alignment loss of one step.

    ``layer_losses`` is this rank's ``[num_layers]`` record, filled only at its own global layers.
    Pipeline stages hold disjoint layers (SUM), tensor-parallel ranks each hold the mean over their
    own heads (mean over ranks = model-wide mean), data-parallel replicas saw different data (mean).
    """
    losses = layer_losses.clone()
    dist.all_reduce(losses, group=parallel_state.get_pipeline_model_parallel_group())
    dist.all_reduce(losses, group=parallel_state.get_tensor_model_parallel_group())
    losses /= parallel_state.get_tensor_model_parallel_world_size()
    dist.all_reduce(losses, group=parallel_state.get_data_parallel_group())
    losses /= parallel_state.get_data_parallel_world_size()
    per_layer = losses.tolist()
    return sum(per_layer) / len(per_layer), per_layer


def model_wide_lm_loss(microbatch_losses: list[dict], device: torch.device) -> tuple[float, dict[str, float]]:
    """(mean LM loss of the step, mean per training stream) over micro-batches and data-parallel
    replicas, known on every rank. Collective on every rank: one DP all-reduce, one PP broadcast.

    Only the last pipeline stage has losses. Every replica runs the same number of micro-batches, so
    the mean over all of them is the mean of the replicas' means. Streams no micro-batch drew (and every
    stream outside training, where micro-batches carry none) are absent from the second value.
    """
    # [loss sum, count] for all micro-batches, then for each of STREAMS
    sums = torch.zeros(2 + 2 * len(STREAMS), dtype=torch.float32, device=device)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for d in microbatch_losses:
            slots = [0] if d.get("stream") is None else [0, 2 + 2 * STREAMS.index(d["stream"])]
            for slot in slots:
                sums[slot] += d["lm loss"].float()
                sums[slot + 1] += 1
        dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
    last_stage_rank = parallel_state.get_pipeline_model_parallel_last_rank()
    dist.broadcast(sums, src=last_stage_rank, group=parallel_state.get_pipeline_model_parallel_group())
    values = sums.tolist()
    mean = values[0] / values[1] if values[1] else 0.0
    by_stream = {stream: values[2 + 2 * i] / values[3 + 2 * i] for i, stream in enumerate(STREAMS) if values[3 + 2 * i]}
    return mean, by_stream


@dataclasses.dataclass(frozen=True)
class AlignmentGradient:
    """One step's gradient split into ``grad(CE)`` and ``alpha * grad(mean_layers L_align)``."""

    lm_norm: float  # ||grad CE||
    alignment_norm: float  # ||grad mean_layers(L_align)||, unweighted (so it is known at alpha = 0 too)
    share: float  # alpha * alignment_norm / (alpha * alignment_norm + lm_norm): the alignment term's share


def optimizer_grads(optimizer, copy: bool = False) -> list[torch.Tensor]:
    """The gradients the optimizer's grad norm counts (shared and TP-duplicate parameters once; this
    rank's shard under the distributed optimizer), after it has taken them from the DDP buffers.

    ``copy``: clones, for gradients that must outlive the next ``zero_grad_buffer``. Under bf16/fp32
    there is no grad scaler, so ``prepare_grads`` only copies and may run again in ``optimizer.step``.
    """
    optimizer.prepare_grads()
    grads = [g for o in getattr(optimizer, "chained_optimizers", [optimizer]) for g in _grads_for_norm(o)]
    return [g.clone() for g in grads] if copy else grads


def _grads_for_norm(optimizer) -> list[torch.Tensor]:
    """The optimizer's own filter for grad-norm gradients; megatron-core renamed it in 0.17
    (``get_main_grads_for_grad_norm`` -> ``get_grads_for_grad_norm``)."""
    if hasattr(optimizer, "get_grads_for_grad_norm"):
        return optimizer.get_grads_for_grad_norm()
    return optimizer.get_main_grads_for_grad_norm()


def split_gradient(optimizer, alignment_grads: list[torch.Tensor], alpha: float) -> AlignmentGradient:
    """Split the step's gradient (in the optimizer now) given ``alignment_grads`` = grad(mean_layers L_align)
    of the same micro-batches and weights (``optimizer_grads(copy=True)`` after a pass at weight 1).

    The total is ``grad CE + alpha * alignment``, so the LM part is their difference. Norms are
    model-wide, reduced like Megatron's own grad norm (collective on every rank).
    """
    total = optimizer_grads(optimizer)
    group = optimizer.get_grad_stats_parallel_group()
    alignment = float(get_grad_norm_fp32(alignment_grads, grad_stats_parallel_group=group))
    lm = float(get_grad_norm_fp32([t - alpha * a for t, a in zip(total, alignment_grads)], grad_stats_parallel_group=group))
    weighted = alpha * alignment
    return AlignmentGradient(lm_norm=lm, alignment_norm=alignment,
                             share=weighted / (weighted + lm) if weighted + lm > 0 else 0.0)


def flops_per_token(cfg: RunConfig, vocab_size: int) -> float:
    """Model FLOPs (forward + backward = 3x forward) per trained token, for TFLOP/s/GPU.

    Matmuls: 2 FLOPs per weight per token (QKV, gate, output projection, SwiGLU, logits).
    Attention per layer and token: full stream ``2 * 2 * hq * d * s / 2`` (QK^T and PV over the
    causal half); the sparse stream the same with ``min(s / 2, block_size * top_k)`` keys.
    Which streams count follows the training mode (SSA computes both).
    """
    m, s = cfg.model, cfg.model.seq_length
    d, hq, hkv = m.head_dim, m.num_attention_heads, m.num_query_groups
    attn_weights = m.hidden_size * d * (hq + 2 * hkv) + m.hidden_size * hq + hq * d * m.hidden_size
    mlp_weights = 3 * m.hidden_size * m.ffn_hidden_size
    dense = 2 * (m.num_layers * (attn_weights + mlp_weights) + m.hidden_size * vocab_size)
    full = 4 * hq * d * s / 2
    sparse = 4 * hq * d * min(s / 2, cfg.ssa.block_size * cfg.ssa.top_k)
    streams = {"ssa": full + sparse, "full": full, "sparse": sparse}[cfg.ssa.training_mode]
    return 3 * (dense + m.num_layers * streams)


# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) by device name, for MFU.
_PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0, "B200": 2250.0, "B100": 1750.0,
                     "A100": 312.0, "A800": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_bf16_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak if known (None on CPU or an unknown GPU: no MFU is shown)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(_PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return _PEAK_BF16_TFLOPS[key]
    return None
