"""Run configuration: one frozen, keyword-only dataclass per concern, checked when built.

A run is a YAML file in ``configs/`` with the sections ``model``, ``ssa``, ``parallel``,
``train`` and ``data``; unknown keys are refused, every error names the field, its value and
the fix. Cross-section rules (heads vs. tensor parallelism, layers vs. pipeline stages) are
checked in :class:`RunConfig`, before any process group or GPU is touched.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ssa_megatron.data.config import DataConfig
from ssa_megatron.model.config import SSAConfig  # the model's own settings, the run file's ssa: section
from ssa_megatron.model.config import require as _require

DTYPES = ("fp32", "bf16")


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
    # fused linear + cross-entropy (no full logits), RMSNorm, SwiGLU and RoPE kernels; false: Megatron's
    # plain PyTorch pieces (same results to rounding; for A/B comparisons and debugging)
    fused_kernels: bool = True

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
class ParallelConfig:
    tensor_model_parallel_size: int = 1  # TP: splits query heads and KV groups over ranks; must divide num_query_groups
    pipeline_model_parallel_size: int = 1  # PP: pipeline stages; must divide num_layers
    virtual_pipeline_model_parallel_size: int | None = None  # model chunks per pipeline stage (interleaved 1F1B)
    sequence_parallel: bool = False  # Megatron sequence parallelism (needs TP > 1 and transformer-engine norms)
    use_distributed_optimizer: bool = False  # shard the optimizer state over data-parallel ranks

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
    micro_batch_size: int = 1  # sequences per forward/backward on one rank
    global_batch_size: int = 8  # sequences per optimizer step, all data-parallel ranks together
    train_iters: int = 100  # optimizer steps of the whole run
    lr: float = 1e-3  # peak learning rate (after warmup)
    min_lr: float = 0.0  # learning rate at the end of the decay
    lr_warmup_fraction: float = 0.01  # fraction of train_iters with a linear warmup
    lr_decay_style: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.1  # AdamW weight decay
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0  # gradient-norm clipping (0 disables)
    seed: int = 1234  # weights, data order and the full/sparse draw
    dtype: str = "bf16"  # fp32 | bf16 (params and activations; master weights are fp32)
    device: str = "auto"  # auto (cuda if available) | cuda | cpu (gloo; tests, debugging)
    log_interval: int = 1  # iterations between log lines
    eval_interval: int = 0  # 0: no evaluation
    eval_iters: int = 2  # validation steps per evaluation
    tensorboard_dir: str | None = None  # TensorBoard event files
    wandb_project: str | None = None  # also log to Weights & Biases (WANDB_MODE=offline works without a network)
    # Exit conditions: each makes every rank save (when checkpoint.save is set) and exit with code 3.
    exit_duration_in_mins: float | None = None  # wall time of this process, e.g. ahead of a job's time limit
    exit_interval: int | None = None  # stop at iterations that are multiples of this
    exit_signal_handler: bool = False  # stop on the signals below (Slurm's pre-emption/time-limit warnings)
    exit_signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1", "SIGUSR2")
    max_skipped_steps: int = 10  # abort after this many consecutive steps with a NaN/inf loss or gradient
    alignment_grad_interval: int = 0  # every N steps: LM vs alignment gradient norms (+1 fwd/bwd; SSA only; 0 off)
    # Megatron's activation recompute: full (uniform|block over recompute_num_layers) or selective
    recompute_granularity: str | None = None
    recompute_method: str | None = None
    recompute_num_layers: int | None = None

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
        _require(self.exit_interval is None or self.exit_interval >= 1, f"train.exit_interval={self.exit_interval}: must be >= 1 or null")
        _require(
            self.exit_duration_in_mins is None or self.exit_duration_in_mins > 0,
            f"train.exit_duration_in_mins={self.exit_duration_in_mins}: must be > 0 or null",
        )
        known_signals = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP")
        for name in self.exit_signals:
            _require(name in known_signals, f"train.exit_signals: {name!r} is not one of {known_signals}")
        _require(self.max_skipped_steps >= 1, f"train.max_skipped_steps={self.max_skipped_steps}: must be >= 1")
        _require(self.alignment_grad_interval >= 0,
                 f"train.alignment_grad_interval={self.alignment_grad_interval}: must be >= 0 (0 disables)")
        _require(
            self.recompute_granularity in (None, "full", "selective"),
            f"train.recompute_granularity={self.recompute_granularity!r}: must be full, selective or null",
        )
        if self.recompute_granularity == "full":
            _require(
                self.recompute_method in ("uniform", "block") and (self.recompute_num_layers or 0) >= 1,
                f"train.recompute_granularity=full needs recompute_method uniform|block (got {self.recompute_method!r}) "
                f"and recompute_num_layers >= 1 (got {self.recompute_num_layers!r}); e.g. uniform with 1 recomputes every layer",
            )
        else:
            _require(
                self.recompute_method is None and self.recompute_num_layers is None,
                "train.recompute_method / recompute_num_layers apply only with recompute_granularity=full",
            )


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Where checkpoints go and what a resume restores (Megatron-LM's flag names and layout)."""

    save: str | None = None  # directory: SAVE/iter_0000008/ + SAVE/latest_checkpointed_iteration.txt
    load: str | None = None  # resume from here (the latest good checkpoint); missing + equal to save = fresh start
    ckpt_step: int | None = None  # load this iteration instead of the latest
    save_interval: int | None = None  # iterations between saves (a save also happens at the end and on exit)
    keep_last_checkpoints: int | None = None  # delete older ones (never the one loaded or the latest)
    async_save: bool = False  # write the tensors in a background process while training goes on
    no_load_optim: bool = False  # load the weights but start a fresh optimizer
    no_load_rng: bool = False  # do not restore the random generators
    finetune: bool = False  # load weights only; iteration, optimizer, scheduler and data position start at 0

    def __post_init__(self):
        _require(self.save_interval is None or self.save_interval >= 1, f"checkpoint.save_interval={self.save_interval}: must be >= 1 or null")
        _require(
            self.keep_last_checkpoints is None or self.keep_last_checkpoints >= 1,
            f"checkpoint.keep_last_checkpoints={self.keep_last_checkpoints}: must be >= 1 or null (keep all)",
        )
        _require(self.ckpt_step is None or self.ckpt_step >= 0, f"checkpoint.ckpt_step={self.ckpt_step}: must be >= 0")
        _require(self.ckpt_step is None or self.load is not None, "checkpoint.ckpt_step needs checkpoint.load")
        _require(self.save_interval is None or self.save is not None, "checkpoint.save_interval needs checkpoint.save (a directory)")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    ssa: SSAConfig = field(default_factory=SSAConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
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
        check_run_rules(self)

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


# ---- cross-field rules that need more than one section ----------------------------------------------


def uses_sparse_stream(ssa: SSAConfig) -> bool:
    """Whether block selection + sparse attention run at all (training or evaluation)."""
    return ssa.training_mode in ("ssa", "sparse") or ssa.attention_mode == "sparse"


def triton_head_dim_ok(head_dim: int) -> bool:
    """What ``kernels/ssa_kernels`` (select.py, sparse.py) accept: a power of two >= 16."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def check_kernel_head_dim(cfg: RunConfig, device_type: str) -> None:
    """Refuse a head dim the Triton kernels cannot take when the backend will resolve to them.

    ``ssa.backend=triton`` always uses them; ``auto`` uses them on CUDA (``device_type`` is the
    resolved device: ``train.device`` when explicit, else what the machine has). Full attention
    runs on SDPA with every backend, so only runs that use the sparse stream are concerned.
    """
    ssa, d = cfg.ssa, cfg.model.head_dim
    kernels = ssa.backend == "triton" or (ssa.backend == "auto" and device_type == "cuda")
    if not kernels or not uses_sparse_stream(ssa) or triton_head_dim_ok(d):
        return
    source = (f"model.kv_channels={d}" if cfg.model.kv_channels is not None else
              f"model.hidden_size / model.num_attention_heads = {cfg.model.hidden_size} / "
              f"{cfg.model.num_attention_heads} = {d}")
    why = "ssa.backend=triton" if ssa.backend == "triton" else "ssa.backend=auto on CUDA"
    raise ValueError(f"head dim {source}: the Triton kernels ({why}) need a power of two >= 16 (16, 32, 64, "
                     "128, ...); change the head dim (model.kv_channels) or set ssa.backend: torch (slower)")


def check_run_rules(cfg: RunConfig) -> None:
    """Rules across sections that would otherwise cost a silent wrong run or a late failure."""
    ssa, seq = cfg.ssa, cfg.model.seq_length
    if uses_sparse_stream(ssa):
        # A token attends to its own block plus top_k - 1 earlier ones; with top_k >= the number of
        # blocks every token sees every earlier block: sparse == full attention, only slower.
        blocks = -(-seq // ssa.block_size)
        _require(
            ssa.block_size < seq,
            f"ssa.block_size={ssa.block_size} >= model.seq_length={seq}: one key block covers the whole "
            "sequence, so sparse attention equals full attention (and runs slower); use a block size "
            f"well below the sequence (e.g. 16 or 64), or ssa.training_mode: full",
        )
        _require(
            ssa.top_k < blocks,
            f"ssa.top_k={ssa.top_k} >= the {blocks} key blocks of model.seq_length={seq} / ssa.block_size="
            f"{ssa.block_size}: every token would attend to every block, so sparse attention equals full "
            f"attention (and runs slower); set ssa.top_k below {blocks} (or a smaller block size), or "
            "ssa.training_mode: full",
        )
    if cfg.train.device != "auto":
        check_kernel_head_dim(cfg, cfg.train.device)
    if cfg.train.eval_interval > 0:
        _require(
            cfg.data.webdataset is None,
            f"train.eval_interval={cfg.train.eval_interval} but data.webdataset has no validation split: "
            "set train.eval_interval: 0",
        )
        from ssa_megatron.data.config import parse_split

        _require(
            parse_split(cfg.data.split)[1] > 0,
            f"train.eval_interval={cfg.train.eval_interval} but data.split={cfg.data.split!r} gives the "
            "validation split no weight: give it one (e.g. '98,2,0') or set train.eval_interval: 0",
        )


# ---- building from YAML: types from the dataclass hints, YAML 1.1 number quirks --------------------


def _kind(value) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a mapping", type(None): "null"}
    return names.get(type(value), type(value).__name__)


_DESCRIBE = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _check_type(value, hint, name: str):
    """``value`` converted to what ``hint`` asks (int -> float, integral float -> int, list ->
    tuple), or ValueError naming the field. Containers other than tuples are left to the
    dataclass's own ``__post_init__`` checks (they give better, field-specific messages)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _check_type(value, option, name)
            except ValueError as e:
                errors.append(e)
        wanted = " or ".join(_DESCRIBE.get(o, getattr(o, "__name__", str(o))) for o in options)
        null = " or null" if type(None) in args else ""
        raise ValueError(f"{name}={value!r}: must be {wanted}{null}, got {_kind(value)}"
                         + _quote_hint(value, options))
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name}={value!r}: must be a list, got {_kind(value)}")
        item = args[0] if args else typing.Any
        return tuple(_check_type(v, item, f"{name}[{i}]") for i, v in enumerate(value))
    if hint not in _DESCRIBE:
        return value
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool)
        or isinstance(value, float) and math.isfinite(value) and value.is_integer(),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[hint]
    if not ok:
        raise ValueError(f"{name}={value!r}: must be {_DESCRIBE[hint]}, got {_kind(value)}"
                         + _quote_hint(value, [hint]))
    if hint is float and not math.isfinite(value):
        raise ValueError(f"{name}={value!r}: must be a finite number")
    return int(value) if hint is int else float(value) if hint is float else value


def _quote_hint(value, options) -> str:
    if isinstance(value, str) and (int in options or float in options):
        try:
            float(value)
        except ValueError:
            return ""
        return " (write the number without quotes)"
    return ""


def _build(cls, values: dict, where: str):
    """Build a config dataclass from a mapping: unknown keys refused, every value checked against
    the field's type hint (so fields added later are covered), then the class's own checks."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping of keys, got {_kind(values)}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    return cls(**{key: _check_type(value, hints[key], f"{where}.{key}") for key, value in values.items()})


def config_from_dict(values: dict) -> RunConfig:
    if not isinstance(values, dict):
        raise ValueError(f"config must be a mapping of sections, got {type(values).__name__}")
    hints = typing.get_type_hints(RunConfig)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ValueError(f"unknown config section(s) {unknown}; known sections: {sorted(hints)}")
    return RunConfig(**{name: _build(hints[name], section or {}, name) for name, section in values.items()})


class _Loader(yaml.SafeLoader):
    """PyYAML implements YAML 1.1, where ``1e-3`` (no dot) is a string; read it as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?"
               r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF)|[-+]\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def read_run_file(path: str | Path) -> dict:
    """The sections of a YAML run file; every problem names the file and the fix."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--config {path}: is a directory; give a YAML run file, e.g. configs/tiny_cpu.yaml")
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist (see configs/ for examples)")
    try:
        values = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start}); give a YAML run file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ValueError(f"{path}: not valid YAML: {where}{what}") from None
    if values is None:
        raise ValueError(f"{path}: the run file is empty; start from one in configs/ (e.g. configs/tiny_cpu.yaml)")
    if not isinstance(values, dict):
        raise ValueError(f"{path}: top level must be a mapping of sections, got {_kind(values)}")
    sections = typing.get_type_hints(RunConfig)
    unknown = sorted(set(values) - set(sections))
    if unknown:
        raise ValueError(f"{path}: unknown config section(s) {unknown}; known sections: {sorted(sections)}")
    if not values.get("model"):
        raise ValueError(f"{path}: no model: section; a run file must give the model (the built-in defaults are "
                         "the 1B model at seq 8192): copy one from configs/, e.g. configs/tiny_cpu.yaml")
    return values


_FIELD = re.compile(r"\b([a-z_]+)\.([a-z_0-9]+)\b")


def _blame(path: Path, err: Exception, overrides: dict[str, dict]) -> str:
    """Prefix an error with where its values came from: the run file, the command line, or both."""
    message = str(err)
    given = {f"{s}.{k}" for s, entries in overrides.items() for k in entries}
    sections = set(typing.get_type_hints(RunConfig))
    named = {f"{s}.{k}" for s, k in _FIELD.findall(message) if s in sections}
    flags = sorted("--" + f.split(".", 1)[1].replace("_", "-") for f in named & given)
    if not flags:
        return f"{path}: {message}"
    if named - given:
        return f"{path} + command line ({', '.join(flags)}): {message}"
    return f"command line ({', '.join(flags)}): {message}"


def load_config(path: str | Path, overrides: dict[str, dict] | None = None) -> RunConfig:
    """Read a YAML run file and apply ``{section: {key: value}}`` overrides (from the CLI)."""
    path = Path(path)
    values = read_run_file(path)
    overrides = overrides or {}
    for section, entries in overrides.items():
        values.setdefault(section, {})
        values[section] = {**(values[section] or {}), **entries}
    try:
        return config_from_dict(values)
    except (ValueError, TypeError) as err:
        raise ValueError(_blame(path, err, overrides)) from err


def config_to_dict(config: RunConfig) -> dict:
    """Plain types only (lists for tuples): what YAML and weights-only unpickling read back."""
    return _plain(dataclasses.asdict(config))


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def field_help(section: str, key: str) -> str | None:
    """The comment (or field docstring) beside ``section.key`` in its dataclass: help text for CLI flags."""
    import inspect

    cls = typing.get_type_hints(RunConfig).get(section)
    if cls is None:
        return None
    lines = inspect.getsource(cls).splitlines()
    for i, line in enumerate(lines):
        if re.match(rf"\s+{re.escape(key)}\s*:", line):
            if "#" in line:
                return line.split("#", 1)[1].strip()
            following = lines[i + 1].strip() if i + 1 < len(lines) else ""
            if following.startswith('"""'):
                return following.strip('"').strip()
            above = lines[i - 1].strip()
            return above[1:].strip() if above.startswith("#") else None
    return None
