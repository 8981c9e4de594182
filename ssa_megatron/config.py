"""Run configuration: one frozen, keyword-only dataclass per concern, checked when built.

A run is a YAML file in ``configs/`` with the sections ``model``, ``ssa``, ``parallel``,
``train`` and ``data``; unknown keys are refused, every error names the field, its value and
the fix. Cross-section rules (heads vs. tensor parallelism, layers vs. pipeline stages) are
checked in :class:`RunConfig`, before any process group or GPU is touched.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ssa_megatron.data.config import DataConfig

TRAINING_MODES = ("ssa", "full", "sparse")
ATTENTION_MODES = ("full", "sparse")
DTYPES = ("fp32", "bf16")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Llama-style decoder: RMSNorm, SwiGLU, RoPE, GQA, head-wise sigmoid output gate."""

    num_layers: int = 16
    hidden_size: int = 2048
    ffn_hidden_size: int = 8192
    num_attention_heads: int = 32
    num_query_groups: int = 2  # key/value heads (GQA groups)
    kv_channels: int | None = None  # head dim; hidden_size // num_attention_heads when None
    seq_length: int = 8192
    vocab_size: int | None = None  # taken from the tokenizer when None
    rotary_base: int = 500_000
    norm_epsilon: float = 1e-5
    tie_embeddings: bool = True
    init_method_std: float = 0.02

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "seq_length"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, f"model.{name}={value!r}: must be a positive int")
        _require(
            self.num_attention_heads % self.num_query_groups == 0,
            f"model.num_attention_heads={self.num_attention_heads} must be a multiple of "
            f"model.num_query_groups={self.num_query_groups}",
        )
        if self.kv_channels is None:
            _require(
                self.hidden_size % self.num_attention_heads == 0,
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_attention_heads="
                f"{self.num_attention_heads}: set model.kv_channels (the head dim) explicitly",
            )
        else:
            _require(self.kv_channels >= 1, f"model.kv_channels={self.kv_channels}: must be >= 1")
        _require(self.vocab_size is None or self.vocab_size >= 2, f"model.vocab_size={self.vocab_size}: must be >= 2")

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads


@dataclass(frozen=True, kw_only=True)
class SSAConfig:
    """How attention is trained and run (see ../shared/SSA_SPEC.md)."""

    training_mode: str = "ssa"  # ssa (both streams + alignment) | full | sparse (the paper's 3 rows)
    attention_mode: str = "full"  # stream used outside training (eval, inference): full | sparse
    block_size: int = 16  # tokens per key block
    top_k: int = 16  # selected blocks per token and KV head, own block included
    alpha: float = 10.0  # weight of the layer-mean alignment loss
    backend: str = "auto"  # ops backend: auto (Triton on CUDA) | torch | triton

    def __post_init__(self):
        _require(self.training_mode in TRAINING_MODES, f"ssa.training_mode={self.training_mode!r}: must be one of {TRAINING_MODES}")
        _require(self.attention_mode in ATTENTION_MODES, f"ssa.attention_mode={self.attention_mode!r}: must be one of {ATTENTION_MODES}")
        _require(isinstance(self.block_size, int) and self.block_size >= 1, f"ssa.block_size={self.block_size!r}: must be an int >= 1")
        _require(isinstance(self.top_k, int) and self.top_k >= 1, f"ssa.top_k={self.top_k!r}: must be >= 1 (the own block counts)")
        _require(self.alpha >= 0, f"ssa.alpha={self.alpha}: must be >= 0")
        _require(self.backend in ("auto", "torch", "triton"), f"ssa.backend={self.backend!r}: must be auto, torch or triton")


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None  # model chunks per pipeline stage (interleaved 1F1B)
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False

    def __post_init__(self):
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, f"parallel.{name}={value!r}: must be an int >= 1")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None:
            _require(vpp >= 1, f"parallel.virtual_pipeline_model_parallel_size={vpp}: must be >= 1 or null")
            _require(
                vpp == 1 or self.pipeline_model_parallel_size > 1,
                f"parallel.virtual_pipeline_model_parallel_size={vpp} needs pipeline_model_parallel_size > 1",
            )


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    micro_batch_size: int = 1
    global_batch_size: int = 8  # sequences per optimizer step, all data-parallel ranks together
    train_iters: int = 100
    lr: float = 1e-3
    min_lr: float = 0.0
    lr_warmup_fraction: float = 0.01
    lr_decay_style: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    seed: int = 1234
    dtype: str = "bf16"  # fp32 | bf16 (params and activations; master weights are fp32)
    device: str = "auto"  # auto (cuda if available) | cuda | cpu (gloo; tests, debugging)
    log_interval: int = 1
    eval_interval: int = 0  # 0: no evaluation
    eval_iters: int = 2
    tensorboard_dir: str | None = None  # TensorBoard event files (needs `pip install tensorboard`)

    def __post_init__(self):
        for name in ("micro_batch_size", "global_batch_size", "train_iters", "log_interval", "eval_iters"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, f"train.{name}={value!r}: must be an int >= 1")
        _require(self.lr > 0 and 0 <= self.min_lr <= self.lr, f"train.lr={self.lr}, train.min_lr={self.min_lr}: need 0 <= min_lr <= lr, lr > 0")
        _require(0 <= self.lr_warmup_fraction < 1, f"train.lr_warmup_fraction={self.lr_warmup_fraction}: must be in [0, 1)")
        _require(self.lr_decay_style in ("cosine", "linear", "constant"), f"train.lr_decay_style={self.lr_decay_style!r}: cosine, linear or constant")
        _require(self.dtype in DTYPES, f"train.dtype={self.dtype!r}: must be one of {DTYPES}")
        _require(self.device in ("auto", "cuda", "cpu"), f"train.device={self.device!r}: must be auto, cuda or cpu")
        _require(self.clip_grad >= 0, f"train.clip_grad={self.clip_grad}: must be >= 0 (0 disables)")
        _require(self.eval_interval >= 0, f"train.eval_interval={self.eval_interval}: must be >= 0 (0 disables)")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    ssa: SSAConfig = field(default_factory=SSAConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self):
        tp, pp = self.parallel.tensor_model_parallel_size, self.parallel.pipeline_model_parallel_size
        vpp = self.parallel.virtual_pipeline_model_parallel_size or 1
        m = self.model
        _require(
            m.num_attention_heads % tp == 0,
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
            f"parallel.tensor_model_parallel_size={tp}: pick a TP size that divides the query heads",
        )
        # Block selection sums importance over the query heads of a KV group, so a group must live on one rank.
        _require(
            m.num_query_groups % tp == 0,
            f"model.num_query_groups={m.num_query_groups} is not divisible by parallel.tensor_model_parallel_size={tp}: "
            "SSA selects blocks per KV group, so each rank must hold whole groups; use TP <= num_query_groups",
        )
        _require(
            m.num_layers % (pp * vpp) == 0,
            f"model.num_layers={m.num_layers} is not divisible by pipeline_model_parallel_size x "
            f"virtual_pipeline_model_parallel_size = {pp} x {vpp}",
        )
        _require(
            self.train.global_batch_size % self.train.micro_batch_size == 0,
            f"train.global_batch_size={self.train.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={self.train.micro_batch_size}",
        )
        _require(
            self.parallel.sequence_parallel is False or tp > 1,
            "parallel.sequence_parallel=true needs tensor_model_parallel_size > 1",
        )

    def check_world_size(self, world_size: int) -> int:
        """Data-parallel size for ``world_size`` ranks; raises when the layout does not fit."""
        tp, pp = self.parallel.tensor_model_parallel_size, self.parallel.pipeline_model_parallel_size
        _require(
            world_size % (tp * pp) == 0,
            f"world size {world_size} is not divisible by tensor x pipeline parallel size = {tp} x {pp}",
        )
        dp = world_size // (tp * pp)
        per_step = self.train.micro_batch_size * dp
        _require(
            self.train.global_batch_size % per_step == 0,
            f"train.global_batch_size={self.train.global_batch_size} is not a multiple of micro_batch_size x "
            f"data-parallel size = {self.train.micro_batch_size} x {dp}",
        )
        vpp = self.parallel.virtual_pipeline_model_parallel_size
        if vpp and vpp > 1:
            _require(
                (self.train.global_batch_size // per_step) % pp == 0,
                f"interleaved pipelining needs the number of micro-batches ({self.train.global_batch_size // per_step}) "
                f"to be a multiple of pipeline_model_parallel_size={pp}",
            )
        return dp


def _build(cls, values: dict, where: str):
    """Build a config dataclass from a mapping, refusing keys it does not have."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    return cls(**values)


def config_from_dict(values: dict) -> RunConfig:
    if not isinstance(values, dict):
        raise ValueError(f"config must be a mapping of sections, got {type(values).__name__}")
    hints = typing.get_type_hints(RunConfig)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ValueError(f"unknown config section(s) {unknown}; known sections: {sorted(hints)}")
    return RunConfig(**{name: _build(hints[name], section or {}, name) for name, section in values.items()})


def load_config(path: str | Path, overrides: dict[str, dict] | None = None) -> RunConfig:
    """Read a YAML run file and apply ``{section: {key: value}}`` overrides (from the CLI)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist (see configs/ for examples)")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: top level must be a mapping of sections, got {type(values).__name__}")
    for section, entries in (overrides or {}).items():
        values.setdefault(section, {})
        values[section] = {**(values[section] or {}), **entries}
    try:
        return config_from_dict(values)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: {err}") from err


def config_to_dict(config: RunConfig) -> dict:
    return dataclasses.asdict(config)
