"""Checks a run makes before it builds data or model: memory, data splits, and a start-of-run report.

``check_run(cfg)`` is the first thing ``Trainer`` does (before process groups, data and model):

- the head dim against the Triton kernels once ``train.device: auto`` is resolved (``config.py`` checks
  an explicit device);
- the tokenizer loads (a garbage ``tokenizer.json`` fails here, naming the file) and its vocabulary;
- every dataset prefix has documents in each split with a weight (Megatron's dataset builder loops
  forever on an empty split, see ``data.datasets.check_splits``);
- an estimate of the memory per rank (weights, gradients, optimizer state, activations, logits)
  against what the device has: a run that cannot fit stops with the estimate and the knobs;
- rank 0 prints the versions (torch, megatron-core, triton, CUDA), the parameter count, the device
  and the estimate.

The estimate is calibrated on the paper's 1B model at seq 8192 on an H100 (34.7 GiB measured peak,
``docs/benchmarks/training_1gpu.md``; the estimate gives 34.4 GiB). ``SSA_SKIP_MEMORY_CHECK=1``
turns the refusal into a warning.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from dataclasses import dataclass

import torch

from ssa_megatron.config import RunConfig, check_kernel_head_dim

logger = logging.getLogger("ssa_megatron.train")

GiB = 1 << 30
# Activation bytes kept for backward per token, per layer, per hidden unit, per byte of the
# activation dtype: Megatron's ~34 s*b*h (no dropout, flash-style attention) plus SSA's second
# stream, selection and gate; calibrated on the 1B model (see the module docstring).
ACTIVATION_FACTOR = 34
# CUDA context + allocator slack, or on CPU the process itself (torch, megatron-core imports).
OVERHEAD = 1 * GiB


def padded_vocab(vocab_size: int, tp: int) -> int:
    from ssa_megatron.train.model_provider import padded_vocab_size

    return padded_vocab_size(vocab_size, tp)


def count_parameters(cfg: RunConfig, vocab_size: int) -> int:
    """Parameters of the whole model (all ranks together), exactly as the SSA GPT builds it."""
    m = cfg.model
    h, d, ffn = m.hidden_size, m.head_dim, m.ffn_hidden_size
    attention = h * (m.num_attention_heads + 2 * m.num_query_groups) * d  # fused QKV
    attention += m.num_attention_heads * d * h  # output projection
    attention += h * m.num_attention_heads  # head-wise output gate
    mlp = h * 2 * ffn + ffn * h  # SwiGLU fc1 [gate; up] + fc2
    layer = attention + mlp + 2 * h  # + input and pre-MLP RMSNorm weights
    vocab = padded_vocab(vocab_size, cfg.parallel.tensor_model_parallel_size)
    embeddings = vocab * h * (1 if m.tie_embeddings else 2)
    return m.num_layers * layer + embeddings + h  # + final norm


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank (the busiest one: the first pipeline stage, or the last for the logits)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    overhead: int = OVERHEAD

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits + self.overhead

    def describe(self) -> str:
        parts = ", ".join(f"{name} {getattr(self, name) / GiB:.1f}" for name in
                          ("weights", "gradients", "optimizer", "activations", "logits", "overhead"))
        return f"{self.total / GiB:.1f} GiB ({parts} GiB)"


def estimate_memory(cfg: RunConfig, vocab_size: int, world_size: int = 1) -> MemoryEstimate:
    m, t, p = cfg.model, cfg.train, cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    dp = max(world_size // (tp * pp), 1)
    elem = 2 if t.dtype == "bf16" else 4
    params = count_parameters(cfg, vocab_size) / (tp * pp)
    optimizer = params * (8 + (4 if elem == 2 else 0))  # Adam m, v (+ fp32 master weights under bf16)
    if p.use_distributed_optimizer:
        optimizer /= dp
    microbatches = max(t.global_batch_size // (t.micro_batch_size * dp), 1)
    tokens = t.micro_batch_size * m.seq_length
    per_layer = ACTIVATION_FACTOR * m.hidden_size * elem * tokens / tp
    layers = m.num_layers / pp
    if getattr(t, "recompute_granularity", None) == "full":  # only each layer's input is kept, + one layer
        stage = layers * m.hidden_size * elem * tokens / tp + per_layer
    else:
        stage = layers * per_layer
    in_flight = min(pp, microbatches)  # 1F1B: the first stage holds up to pp micro-batches
    logits = tokens * padded_vocab(vocab_size, tp) / tp * (elem + 8)  # logits + fp32 softmax + gradient
    return MemoryEstimate(weights=int(params * elem), gradients=int(params * 4), optimizer=int(optimizer),
                          activations=int(stage * in_flight), logits=int(logits))


def available_memory(device: torch.device) -> tuple[int, str]:
    """(bytes this rank may use, what they are) on ``device``."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device.type == "cuda":
        index = device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", "0"))
        free, _ = torch.cuda.mem_get_info(index)
        return free, f"free on {torch.cuda.get_device_name(index)} (cuda:{index})"
    import psutil

    available = psutil.virtual_memory().available
    share = f", shared by {local_ranks} local ranks" if local_ranks > 1 else ""
    return available // local_ranks, f"available RAM on this CPU machine{share}"


MEMORY_KNOBS = ("lower train.micro_batch_size or model.seq_length, set train.recompute_granularity: full "
                "(with recompute_method: uniform, recompute_num_layers: 1), use more tensor/pipeline-parallel "
                "ranks, parallel.use_distributed_optimizer with data parallelism, or a smaller model")


def check_memory(estimate: MemoryEstimate, available: int, where: str) -> None:
    if estimate.total <= available:
        return
    message = (f"estimated memory per rank {estimate.describe()} exceeds the {available / GiB:.1f} GiB {where}: "
               f"{MEMORY_KNOBS}")
    if os.environ.get("SSA_SKIP_MEMORY_CHECK", "0") not in ("", "0"):
        logger.warning("%s (SSA_SKIP_MEMORY_CHECK is set: going on)", message)
        return
    raise ValueError(f"{message} (SSA_SKIP_MEMORY_CHECK=1 runs anyway)")


def _vocab_size(cfg: RunConfig) -> int:
    """The tokenizer's vocabulary (loading it checks the tokenizer files), or the model's if set."""
    if cfg.data.tokenizer:
        from ssa_megatron.data.tokenizer import load_tokenizer

        vocab = load_tokenizer(cfg.data.tokenizer).vocab_size
    elif cfg.data.data_path is None and cfg.data.webdataset is None:
        from ssa_megatron.data.default_corpus import VOCAB_SIZE

        vocab = VOCAB_SIZE
    else:
        vocab = 2
    return max(vocab, cfg.model.vocab_size or 0)


def versions() -> str:
    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "absent"

    cuda = torch.version.cuda or "none (CPU build)"
    return (f"torch {torch.__version__}, megatron-core {version('megatron-core')}, triton {version('triton')}, "
            f"CUDA {cuda}")


def check_run(cfg: RunConfig) -> None:
    """Everything that can be checked before process groups, data or model exist; raises ValueError."""
    from ssa_megatron.data.config import parse_blend
    from ssa_megatron.data.datasets import check_splits
    from ssa_megatron.train.distributed import resolve_device

    device = resolve_device(cfg.train.device)
    check_kernel_head_dim(cfg, device.type)
    vocab = _vocab_size(cfg)
    if cfg.data.data_path is not None:
        check_splits(parse_blend(cfg.data.data_path)[0], cfg.data.split)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    estimate = estimate_memory(cfg, vocab, world_size)
    available, where = available_memory(device)
    if os.environ.get("RANK", "0") == "0":
        params = count_parameters(cfg, vocab)
        logger.info("versions: %s | device: %s, %d rank(s)", versions(), _device_name(device), world_size)
        logger.info("model: %.1fM parameters (vocab %d padded to %d) | estimated memory per rank %s of %.1f GiB %s",
                    params / 1e6, vocab, padded_vocab(vocab, cfg.parallel.tensor_model_parallel_size),
                    estimate.describe(), available / GiB, where)
    check_memory(estimate, available, where)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(int(os.environ.get('LOCAL_RANK', '0')))})"
    return "cpu (gloo)"
