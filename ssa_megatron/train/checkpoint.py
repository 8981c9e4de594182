"""Checkpoints in Megatron-LM's layout, written with Megatron's ``dist_checkpointing`` (torch_dist).

    SAVE/iter_0000008/                      one checkpoint: every rank's shards + common.pt + metadata.json
    SAVE/iter_0000008/run_config.yaml       the resolved run file it was trained with
    SAVE/latest_checkpointed_iteration.txt  "8": written atomically, after every rank has finished

Contents: model, optimizer (sharded; the distributed optimizer in its ``fully_reshardable`` form),
LR scheduler, iteration, consumed samples (the data loader's exact position), skipped-step count,
each rank's RNG states and the run config. Tensors are stored by their global shape and offset,
so a checkpoint saved at one TP/PP/VPP/DP (with or without the distributed optimizer) loads at
another; RNG states are restored only at the layout that saved them (SSA's mode draw is a pure
function of (seed, iteration, micro-batch) and dropout is 0, so nothing else depends on them).

A crash mid-save leaves the previous checkpoint as "latest". Loading checks that every file a
checkpoint's metadata names is there and long enough, and falls back to the previous complete
checkpoint (with a warning naming the broken one) if the latest is damaged.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import random
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from ssa_megatron.config import RunConfig, config_from_dict, config_to_dict

logger = logging.getLogger("ssa_megatron.train")

TRACKER_FILE = "latest_checkpointed_iteration.txt"
RUN_CONFIG_FILE = "run_config.yaml"
FORMAT_VERSION = 1
_ITER_DIR = re.compile(r"^iter_(\d{7,})$")
# Model fields that fix the shapes of the weights: a checkpoint only loads into the same values.
SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "head_dim", "vocab_size", "tie_embeddings")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked: the message names it and the fix."""


def checkpoint_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def read_tracker(root: str | Path) -> int | None:
    path = Path(root) / TRACKER_FILE
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path} holds {text!r}, not an iteration number: fix or delete it")
    return int(text)


def saved_iterations(root: str | Path) -> list[int]:
    """Iterations with a checkpoint directory under ``root``, newest first (complete or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [int(m.group(1)) for p in root.iterdir() if (m := _ITER_DIR.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def damage(path: Path) -> str | None:
    """Why the checkpoint in ``path`` cannot load (missing or truncated files), or None if it looks whole."""
    for name in ("metadata.json", ".metadata", RUN_CONFIG_FILE):
        if not (path / name).is_file():
            return f"{name} is missing (a save that did not finish)"
    try:
        metadata = torch.distributed.checkpoint.FileSystemReader(str(path)).read_metadata()
    except Exception as err:  # noqa: BLE001 - any unreadable metadata means the same thing
        return f".metadata cannot be read ({type(err).__name__}: {err})"
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in needed.items():
        file = path / name
        if not file.is_file():
            return f"shard file {name} is missing"
        if file.stat().st_size < size:
            return f"shard file {name} is truncated ({file.stat().st_size} of {size} bytes)"
    return None


def read_run_config(path: Path) -> RunConfig:
    return config_from_dict(yaml.safe_load((path / RUN_CONFIG_FILE).read_text()))


# -- what to load -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoadPlan:
    """Checkpoints to try, newest first (the first one that loads wins), and how to use them."""

    root: Path
    candidates: tuple[int, ...]
    saved_config: RunConfig
    finetune: bool  # weights only: iteration, optimizer, scheduler and data position start at 0
    load_optimizer: bool
    load_rng: bool


def plan_load(cfg: RunConfig) -> LoadPlan | None:
    """Which checkpoint a run starts from (None: from scratch), checked before any heavy work.

    A missing or empty ``checkpoint.load`` equal to ``checkpoint.save`` is a fresh start (how a
    requeued job's first attempt begins); any other missing checkpoint is an error.
    """
    c = cfg.checkpoint
    if c.load is None:
        return None
    root = Path(c.load)
    latest = read_tracker(root)
    if latest is None and c.ckpt_step is None:
        if c.save is not None and Path(c.save).resolve() == root.resolve():
            logger.info("no checkpoint in %s yet: starting from scratch (it is also the save directory)", root)
            return None
        raise CheckpointError(
            f"checkpoint.load={c.load}: no {TRACKER_FILE} there"
            + ("" if root.is_dir() else " (the directory does not exist)")
            + ": point --load at a run's save directory, or drop --load to start from scratch"
        )
    if c.ckpt_step is not None:
        candidates = (c.ckpt_step,)  # an explicit step never falls back to another one
        if not checkpoint_dir(root, c.ckpt_step).is_dir():
            raise CheckpointError(
                f"checkpoint.ckpt_step={c.ckpt_step}: {checkpoint_dir(root, c.ckpt_step)} does not exist; "
                f"saved iterations: {saved_iterations(root)}"
            )
    else:
        candidates = (latest, *[i for i in saved_iterations(root) if i < latest])
    usable = []
    for iteration in candidates:
        problem = damage(checkpoint_dir(root, iteration))
        if problem is None:
            usable.append(iteration)
        elif c.ckpt_step is not None:
            raise CheckpointError(f"checkpoint {checkpoint_dir(root, iteration)} cannot be loaded: {problem}")
        else:
            logger.warning("WARNING: checkpoint %s cannot be loaded: %s; trying the previous one",
                           checkpoint_dir(root, iteration), problem)
    if not usable:
        raise CheckpointError(f"checkpoint.load={c.load}: no complete checkpoint among iterations {list(candidates)}")
    saved = read_run_config(checkpoint_dir(root, usable[0]))
    common = dist_checkpointing.load_common_state_dict(str(checkpoint_dir(root, usable[0])))
    model_only = common.get("content") == "model"
    if model_only and not c.finetune:
        logger.info("%s holds weights only (a conversion): loading it with finetune semantics", checkpoint_dir(root, usable[0]))
    finetune = c.finetune or model_only
    check_compatible(saved, cfg, finetune=finetune, where=checkpoint_dir(root, usable[0]))
    load_optimizer = not (finetune or c.no_load_optim)
    if load_optimizer and saved.parallel.use_distributed_optimizer != cfg.parallel.use_distributed_optimizer:
        # Megatron's two optimizer formats do not load into each other (param-group keys differ)
        raise CheckpointError(
            f"checkpoint {checkpoint_dir(root, usable[0])} was saved with parallel.use_distributed_optimizer="
            f"{saved.parallel.use_distributed_optimizer}, this run has {cfg.parallel.use_distributed_optimizer}: "
            "resume with the same setting, or add --no-load-optim to start a fresh optimizer from its weights"
        )
    return LoadPlan(
        root=root,
        candidates=tuple(usable),
        saved_config=saved,
        finetune=finetune,
        load_optimizer=load_optimizer,
        load_rng=not (finetune or c.no_load_rng),
    )


def check_compatible(saved: RunConfig, cfg: RunConfig, *, finetune: bool, where: Path) -> None:
    """Refuse a checkpoint of another model shape (or, unless fine-tuning, another training mode)."""
    differences = []
    for name in SHAPE_FIELDS:
        want, have = getattr(cfg.model, name), getattr(saved.model, name)
        if name == "vocab_size" and want is None:
            continue  # compared once the tokenizer is known (the trainer calls this again)
        if want != have:
            differences.append(f"model.{name}: checkpoint {have}, this run {want}")
    if not finetune and saved.ssa.training_mode != cfg.ssa.training_mode:
        differences.append(f"ssa.training_mode: checkpoint {saved.ssa.training_mode}, this run {cfg.ssa.training_mode} "
                           "(use --finetune to continue a checkpoint in another training mode)")
    if differences:
        raise CheckpointError(f"checkpoint {where} does not fit this run: " + "; ".join(differences))


# -- state dicts --------------------------------------------------------------------------------


def _metadata(cfg: RunConfig) -> dict:
    """Megatron's sharded-state-dict options (a fresh dict each time: Megatron writes into it)."""
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if cfg.parallel.use_distributed_optimizer:
        # The only distributed-optimizer format that reloads at another TP/PP (MEGATRON_NOTES.md).
        metadata["distrib_optim_sharding_type"] = "fully_reshardable"
    return metadata


def _model_state(chunks, cfg: RunConfig) -> dict:
    modules = [c.module if hasattr(c, "module") else c for c in chunks]
    if len(modules) == 1:
        return {"model": modules[0].sharded_state_dict(metadata=_metadata(cfg))}
    return {f"model{i}": m.sharded_state_dict(metadata=_metadata(cfg)) for i, m in enumerate(modules)}


def _merged(model_state: dict) -> dict:
    """All chunks' model entries in one dict: what the optimizer matches its params against."""
    merged = {}
    for part in model_state.values():
        merged.update(part)
    return merged


def _load_model_state(chunks, state: dict, loaded: dict) -> None:
    for chunk, key in zip(chunks, state):
        module = chunk.module if hasattr(chunk, "module") else chunk
        module.load_state_dict(loaded[key], strict=True)


def _layout() -> dict:
    return {
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
    }


def _rng_object(state: dict | None) -> ShardedObject:
    layout = _layout()
    offset = (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank(),
              parallel_state.get_data_parallel_rank())
    return ShardedObject("rng_state", state, (layout["pp"], layout["tp"], layout["dp"]), offset, replica_id=0)


def _rng_state() -> dict:
    numpy_state = np.random.get_state()
    return {
        "random": random.getstate(),
        "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].copy()), *numpy_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if state["tracker"]:
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _inner_optimizers(optimizer):
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        yield opt.optimizer


def prime_optimizer_state(optimizer) -> None:
    """Give a never-stepped Adam the state tensors a load fills (Megatron's distributed optimizer
    over torch's Adam asserts on their absence when building its loading state dict)."""
    for inner in _inner_optimizers(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}


def _own_step_tensors(optimizer) -> None:
    """After a load Megatron's distributed optimizer shares one ``step`` tensor between all params:
    torch's Adam would advance it once per param per step. Give each param its own."""
    for inner in _inner_optimizers(optimizer):
        for state in inner.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def _load_optimizer(optimizer, state) -> None:
    """``optimizer.load_state_dict`` that survives Megatron's distributed optimizer over torch's Adam.

    Its ``fully_reshardable`` load copies every key of a param's Adam state from the checkpoint, but
    the checkpoint has no per-param ``step`` (it keeps one in the param groups): ``KeyError: 'step'``.
    So the param states are loaded with ``step`` set aside, then each param gets its own step.
    """
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    states = state if isinstance(state, list) else [state]
    param_states = []
    for opt_state in states:
        param_states.append((opt_state.pop("param_state", None), opt_state.pop("param_state_sharding_type", None)))
    optimizer.load_state_dict(state)
    for opt, (param_state, sharding_type) in zip(chained, param_states):
        if param_state is None:
            continue
        assert sharding_type == "fully_reshardable", sharding_type
        steps = {p: s.pop("step") for p, s in opt.optimizer.state.items() if "step" in s}
        opt.load_parameter_state_from_fully_reshardable(param_state)
        for p, step in steps.items():
            opt.optimizer.state[p]["step"] = step
    _own_step_tensors(optimizer)


# -- save -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainingProgress:
    iteration: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_run_config(path: Path, cfg: RunConfig) -> None:
    _write_atomically(path / RUN_CONFIG_FILE, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def start_writer_helper(signals: list[str]) -> None:
    """Start Megatron's checkpoint-writer helper process now, with ``signals`` ignored in it.

    The writer reports results through a queue held by a spawned ``multiprocessing`` manager, started
    at the first save. A launcher that signals every process of a job (Slurm on preemption, scancel,
    the time limit; submitit) would kill that manager and break the save the signal asked for. A
    spawned process inherits ignored signals (not Python handlers), so it is started here, before
    the trainer installs its handlers, with them ignored.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    start = getattr(filesystem_async, "get_write_results_queue", None) or filesystem_async._get_write_results_queue
    previous = {name: signal.signal(getattr(signal, name), signal.SIG_IGN) for name in signals}
    try:
        start()
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)


class AsyncSaves:
    """Megatron's asynchronous save: tensors are written by a background process while training goes
    on; the tracker is written (by the finalize step, on every rank together) only once every rank's
    write has finished. ``finalize(blocking=False)`` after each step, ``finalize(blocking=True)`` before exit."""

    def __init__(self):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.queue = AsyncCallsQueue()

    def schedule(self, request) -> None:
        self.queue.schedule_async_request(request)

    def finalize(self, blocking: bool) -> None:
        self.queue.maybe_finalize_async_calls(blocking=blocking)

    def close(self) -> None:
        self.finalize(blocking=True)
        self.queue.close()


def _save_options(async_save: bool) -> dict:
    options = {"async_sharded_save": async_save}
    if async_save and "async_strategy" in inspect.signature(dist_checkpointing.save).parameters:
        options["async_strategy"] = "mcore"  # megatron-core >= 0.19 defaults to nvidia-resiliency-ext's
    return options


def save_checkpoint(cfg: RunConfig, chunks, optimizer, scheduler, progress: TrainingProgress, *,
                    protect: int | None = None, async_saves: AsyncSaves | None = None) -> float:
    """Save every rank's part to ``checkpoint.save/iter_N``, then (rank 0) point the tracker at it.

    Collective. Returns the seconds training waited. ``protect``: an iteration never deleted by the
    ``keep_last_checkpoints`` rotation (the one this run loaded). With ``async_saves`` the tensors are
    written in the background and the tracker follows when every rank has finished.
    """
    start = time.perf_counter()
    root = Path(cfg.checkpoint.save)
    path = checkpoint_dir(root, progress.iteration)
    if dist.get_rank() == 0:
        if path.exists():  # a save of this iteration that did not finish: never mix its files in
            shutil.rmtree(path)
        path.mkdir(parents=True)
    dist.barrier()
    state = _model_state(chunks, cfg)
    state["optimizer"] = optimizer.sharded_state_dict(_merged(state), is_loading=False, metadata=_metadata(cfg))
    state["opt_param_scheduler"] = scheduler.state_dict()
    state["rng_state"] = _rng_object(_rng_state())
    state.update(_common(cfg, progress, content="full"))

    def commit() -> None:  # every rank's shards are on disk
        if dist.get_rank() == 0:
            _write_run_config(path, cfg)
            _write_atomically(root / TRACKER_FILE, f"{progress.iteration}\n")
            _rotate(root, cfg.checkpoint.keep_last_checkpoints, keep={progress.iteration, protect})

    request = dist_checkpointing.save(state, str(path), **_save_options(async_saves is not None))
    if async_saves is not None:
        request.add_finalize_fn(commit)
        async_saves.schedule(request)
    else:
        dist.barrier()
        commit()
        dist.barrier()
    return time.perf_counter() - start


def _common(cfg: RunConfig, progress: TrainingProgress, content: str) -> dict:
    return {
        "checkpoint_version": FORMAT_VERSION,
        "content": content,  # "full" (a training checkpoint) or "model" (weights only, from a conversion)
        "iteration": progress.iteration,
        "consumed_samples": progress.consumed_samples,
        "skipped_steps": progress.skipped_steps,
        "layout": _layout(),
        "run_config": config_to_dict(cfg),
    }


def _rotate(root: Path, keep_last: int | None, keep: set) -> None:
    if keep_last is None:
        return
    for iteration in saved_iterations(root)[keep_last:]:
        if iteration not in keep:
            shutil.rmtree(checkpoint_dir(root, iteration), ignore_errors=True)
            logger.info("deleted checkpoint %s (checkpoint.keep_last_checkpoints=%d)", checkpoint_dir(root, iteration), keep_last)


# -- load -----------------------------------------------------------------------------------------


def load_checkpoint(plan: LoadPlan, cfg: RunConfig, chunks, optimizer, scheduler) -> tuple[TrainingProgress, int, float]:
    """Load the first candidate of ``plan`` that loads on every rank. Collective.

    Returns (progress to continue from, the iteration loaded, seconds).
    """
    start = time.perf_counter()
    for attempt, iteration in enumerate(plan.candidates):
        path = checkpoint_dir(plan.root, iteration)
        try:
            progress = _load_one(path, plan, cfg, chunks, optimizer, scheduler)
        except Exception as err:  # torch DCP gathers read errors, so every rank gets here together
            if attempt + 1 == len(plan.candidates) or cfg.checkpoint.ckpt_step is not None:
                raise CheckpointError(f"checkpoint {path} cannot be loaded: {type(err).__name__}: {err}") from err
            logger.warning("WARNING: checkpoint %s cannot be loaded (%s: %s); trying the previous one",
                           path, type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            continue
        return progress, iteration, time.perf_counter() - start
    raise AssertionError("unreachable: plan_load returns at least one candidate")


def _load_one(path: Path, plan: LoadPlan, cfg: RunConfig, chunks, optimizer, scheduler) -> TrainingProgress:
    model_state = _model_state(chunks, cfg)
    state = dict(model_state)
    if plan.load_optimizer:
        prime_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(_merged(model_state), is_loading=True, metadata=_metadata(cfg))
    common = dist_checkpointing.load_common_state_dict(str(path))
    # RNG states exist per (pp, tp, dp) position: only the layout that saved them can take them back
    load_rng = plan.load_rng and common.get("content") == "full" and common.get("layout") == _layout()
    if load_rng:
        state["rng_state"] = _rng_object(None)
    elif plan.load_rng and dist.get_rank() == 0:
        logger.info("RNG states not restored: the checkpoint was saved at layout %s, this run is %s",
                    common.get("layout"), _layout())
    loaded = dist_checkpointing.load(state, str(path))
    _load_model_state(chunks, model_state, loaded)
    if plan.load_optimizer:
        with torch.no_grad():
            _load_optimizer(optimizer, loaded["optimizer"])
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    else:
        optimizer.reload_model_params()  # the optimizer's master copies follow the loaded weights
    if load_rng:
        _set_rng_state(loaded["rng_state"])
    if plan.finetune:
        return TrainingProgress()
    return TrainingProgress(
        iteration=common["iteration"], consumed_samples=common["consumed_samples"], skipped_steps=common.get("skipped_steps", 0)
    )


# -- whole models, for conversion -----------------------------------------------------------------


def export_config(cfg: RunConfig) -> RunConfig:
    """The run config for a one-process CPU model of the same network (conversion, export)."""
    return dataclasses.replace(
        cfg,
        parallel=dataclasses.replace(cfg.parallel, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                     virtual_pipeline_model_parallel_size=None, sequence_parallel=False,
                                     use_distributed_optimizer=False),
        train=dataclasses.replace(cfg.train, device="cpu", dtype="fp32", recompute_granularity=None,
                                  recompute_method=None, recompute_num_layers=None),
        checkpoint=type(cfg.checkpoint)(),
    )


class _OneProcessModel:
    """A TP1/PP1 CPU model of ``cfg``'s network in a one-process world (for conversion tools)."""

    def __init__(self, cfg: RunConfig):
        from ssa_megatron.model.step_state import SSAStepState
        from ssa_megatron.train import distributed
        from ssa_megatron.train.model_provider import build_model_chunks, transformer_config

        if cfg.model.vocab_size is None:
            raise CheckpointError("the run config has no model.vocab_size: set it to the tokenizer's vocabulary size")
        self.cfg = export_config(cfg)
        config = transformer_config(self.cfg)
        self._distributed = distributed
        distributed.initialize(self.cfg)
        state = SSAStepState(self.cfg.ssa, self.cfg.model.num_layers)
        self.chunks = build_model_chunks(self.cfg, config, state, self.cfg.model.vocab_size)

    def close(self) -> None:
        self._distributed.shutdown()


def _in_a_cpu_process(fn, *args):
    """``fn(*args)`` here, or, where a GPU is visible, in a spawned process that sees none.

    The one-process model runs on the CPU through ``cpu_support``, which patches ``torch.cuda`` for
    the whole process and so must never run in one that uses its GPU (an evaluation on a GPU node
    loads the checkpoint, then runs the model on the GPU). Tensors cross in shared memory; an error
    in the child is raised here as it was raised there.
    """
    if not torch.cuda.is_available():
        return fn(*args)
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="ssa_cpu_load_") as tmp:
        out = os.path.join(tmp, "result.pt")
        hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # read by the child's CUDA runtime at its start
        try:
            child = mp.get_context("spawn").Process(target=_cpu_process_main, args=(fn, args, out))
            child.start()
        finally:
            if hidden is None:
                del os.environ["CUDA_VISIBLE_DEVICES"]
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = hidden
        child.join()
        if not os.path.exists(out):
            raise CheckpointError(f"the CPU process loading/saving the checkpoint died (exit code {child.exitcode})")
        outcome = torch.load(out, weights_only=False)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _cpu_process_main(fn, args, out: str) -> None:
    try:
        outcome = {"result": fn(*args)}
    except Exception as err:  # handed to the parent, which raises it
        outcome = {"error": err}
    torch.save(outcome, out)


def load_full_state_dict(load_dir: str | Path, ckpt_step: int | None = None) -> tuple[RunConfig, dict[str, torch.Tensor]]:
    """(the run config, the full float32 weights in one-process GPTModel names) of a saved checkpoint.

    Any saved layout loads in one CPU process (tensors are stored by global shape and offset); on a
    machine with a GPU, in a child process. Starts and ends its own one-process world: call it where
    no other is initialised.
    """
    return _in_a_cpu_process(_load_full_state_dict, load_dir, ckpt_step)


def _load_full_state_dict(load_dir, ckpt_step):
    from ssa_megatron.train.full_state import gather_full_state

    root = Path(load_dir)
    iteration = ckpt_step if ckpt_step is not None else read_tracker(root)
    if iteration is None:
        raise CheckpointError(f"{root}: no {TRACKER_FILE}; is this a checkpoint directory (the run's --save)?")
    path = checkpoint_dir(root, iteration)
    problem = damage(path) if path.is_dir() else f"{path} does not exist (saved: {saved_iterations(root)})"
    if problem:
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {problem}")
    cfg = read_run_config(path)
    model = _OneProcessModel(cfg)
    try:
        state = _model_state(model.chunks, model.cfg)
        _load_model_state(model.chunks, state, dist_checkpointing.load(state, str(path)))
        return cfg, gather_full_state(model.chunks)
    finally:
        model.close()


def save_model_checkpoint(cfg: RunConfig, full_state: dict[str, torch.Tensor], save_dir: str | Path) -> Path:
    """Write full weights as a weights-only checkpoint (iteration 0) that ``ssa-pretrain --load`` continues
    from with fine-tuning semantics (fresh optimizer and data position). Starts its own one-process world
    (on the CPU; in a child process where a GPU is visible)."""
    return _in_a_cpu_process(_save_model_checkpoint, cfg, full_state, save_dir)


def _save_model_checkpoint(cfg, full_state, save_dir):
    from ssa_megatron.train.full_state import load_full_state

    root = Path(save_dir)
    path = checkpoint_dir(root, 0)
    model = _OneProcessModel(cfg)
    try:
        load_full_state(model.chunks, full_state)
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        state = _model_state(model.chunks, model.cfg)
        state.update(_common(cfg, TrainingProgress(), content="model"))
        dist_checkpointing.save(state, str(path))
        _write_run_config(path, cfg)
        _write_atomically(root / TRACKER_FILE, "0\n")
    finally:
        model.close()
    return path
