"""The training loop: Megatron's schedules, DDP and optimizer around the SSA model.

``train(cfg)`` sets up the process groups, data, model chunks, optimizer and LR schedule, resumes
from ``checkpoint.load`` if given, then runs optimizer steps up to ``train.train_iters``, saving
every ``checkpoint.save_interval`` and at the end. Each step runs ``num_microbatches`` micro-batches
through ``get_forward_backward_func()`` (no pipelining, 1F1B or interleaved 1F1B); the SSA stream
of each micro-batch is drawn from (seed, iteration, micro-batch) in ``_forward_step`` and travels
with it. A signal, ``exit_duration_in_mins`` or ``exit_interval`` stops every rank at the same
step: it saves and exits with ``EXIT_CODE_SAVED`` (3) so a launcher can requeue the job.
Every ``train.alignment_grad_interval`` steps of SSA training, the step's micro-batches first run
once with the alignment loss alone in backward, to split the gradient into its LM and alignment parts
(``metrics.split_gradient``); the update itself is unchanged.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import time
from functools import partial

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from ssa_megatron.config import RunConfig
from ssa_megatron.model.step_state import SSAStepState
from ssa_megatron.train import checkpoint, distributed, metrics, preflight
from ssa_megatron.train.data_setup import TrainingData, build_training_data
from ssa_megatron.train.exit import EXIT_CODE_FINISHED, EXIT_CODE_SAVED, ExitConditions, write_exit_status
from ssa_megatron.train.init import initialize_parameters
from ssa_megatron.train.log import StepLogger
from ssa_megatron.train.model_provider import build_model_chunks, transformer_config

logger = logging.getLogger("ssa_megatron.train")


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a NaN/inf loss or gradient."""


@dataclasses.dataclass
class StepRecord:
    iteration: int
    lm_loss: float
    alignment_loss: float
    layer_alignment_losses: list[float]
    sparse_fraction: float
    grad_norm: float
    lr: float
    skipped: bool = False  # NaN/inf loss or gradient: no update was made
    lm_loss_by_mode: dict[str, float] = dataclasses.field(default_factory=dict)
    alignment_gradient: metrics.AlignmentGradient | None = None  # on train.alignment_grad_interval steps


@dataclasses.dataclass
class TrainResult:
    history: list[StepRecord]
    exit_code: int
    reason: str  # finished | signal SIGUSR1 | exit_duration | exit_interval
    iteration: int


class Trainer:
    """Holds what a run builds once; ``step()`` is one optimizer step."""

    def __init__(self, cfg: RunConfig, build_data=build_training_data):
        """``build_data(cfg, ctx) -> TrainingData`` (tests pass one that serves in-memory data)."""
        self.config = transformer_config(cfg)  # validates the model against Megatron before any group exists
        self.load_plan = checkpoint.plan_load(cfg)  # a missing or misfit checkpoint fails here, before heavy work
        if cfg.train.wandb_project and importlib.util.find_spec("wandb") is None:
            raise ValueError("train.wandb_project is set but wandb is not installed: pip install wandb (or unset it)")
        preflight.check_run(cfg)  # memory, data splits, tokenizer, kernels; prints versions and the estimate
        self.ctx = distributed.initialize(cfg)
        self.data: TrainingData = build_data(cfg, self.ctx)
        if cfg.model.vocab_size is None:
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=self.data.vocab_size))
        elif cfg.model.vocab_size < self.data.vocab_size:
            raise ValueError(
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                f"({self.data.vocab_size}): leave model.vocab_size unset to take the tokenizer's"
            )
        self.cfg = cfg
        if self.load_plan:
            checkpoint.check_compatible(self.load_plan.saved_config, cfg, finetune=self.load_plan.finetune,
                                        where=self.load_plan.root)
        self.num_microbatches = cfg.train.global_batch_size // (cfg.train.micro_batch_size * self.ctx.dp_size)
        self.step_state = SSAStepState(cfg.ssa, cfg.model.num_layers, tp_size=self.ctx.tp_size)
        self.model = self._build_model()
        self.optimizer, self.scheduler = self._build_optimizer()
        self.config.grad_scale_func = self.optimizer.scale_loss
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.no_sync_func = [m.no_sync for m in self.model] if len(self.model) > 1 else self.model[0].no_sync

        self.progress = checkpoint.TrainingProgress()
        self.loaded_iteration: int | None = None
        self.load_seconds = 0.0
        if self.load_plan:
            self.progress, self.loaded_iteration, self.load_seconds = checkpoint.load_checkpoint(
                self.load_plan, cfg, self.model, self.optimizer, self.scheduler
            )
        self.consecutive_skips = 0
        self.async_saves: checkpoint.AsyncSaves | None = None
        self._train_iters = self.data.train_iterators(len(self.model), consumed_samples=self.progress.consumed_samples)

    def _build_model(self) -> list[DistributedDataParallel]:
        cfg = self.cfg
        chunks = build_model_chunks(cfg, self.config, self.step_state, cfg.model.vocab_size)
        if cfg.train.dtype == "bf16":
            # Megatron-LM's Float16Module does the same: norm weights too, so every param is in the
            # optimizer's bf16 groups (a torch RMSNorm would otherwise keep fp32 weights).
            chunks = [c.bfloat16() for c in chunks]
        initialize_parameters(chunks, self.config, cfg.train.seed, cfg.model.tie_embeddings)
        chunks = [c.to(self.ctx.device) for c in chunks]
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=cfg.parallel.use_distributed_optimizer
        )
        return [
            DistributedDataParallel(config=self.config, ddp_config=ddp_config, module=chunk, disable_bucketing=(i > 0))
            for i, chunk in enumerate(chunks)
        ]

    def _build_optimizer(self):
        t = self.cfg.train
        optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=t.lr,
                min_lr=t.min_lr,
                weight_decay=t.weight_decay,
                adam_beta1=t.adam_beta1,
                adam_beta2=t.adam_beta2,
                clip_grad=t.clip_grad,
                bf16=t.dtype == "bf16",
                params_dtype=self.config.params_dtype,
                use_distributed_optimizer=self.cfg.parallel.use_distributed_optimizer,
            ),
            self.model,
        )
        scheduler = OptimizerParamScheduler(
            optimizer,
            init_lr=0.0,
            max_lr=t.lr,
            min_lr=t.min_lr,
            lr_warmup_steps=int(t.lr_warmup_fraction * t.train_iters),
            lr_decay_steps=t.train_iters,
            lr_decay_style=t.lr_decay_style,
            start_wd=t.weight_decay,
            end_wd=t.weight_decay,
            wd_incr_steps=t.train_iters,
            wd_incr_style="constant",
            # the run file's schedule wins over the checkpoint's (e.g. a longer train_iters on resume)
            override_opt_param_scheduler=True,
            use_checkpoint_opt_param_scheduler=False,
        )
        return optimizer, scheduler

    @property
    def iteration(self) -> int:
        return self.progress.iteration

    # -- one micro-batch ---------------------------------------------------------------------------

    def _forward_step(self, counters: dict, iteration: int, lm_weight: float, data_iterator, model):
        """Megatron's forward-step contract: return (output, loss function); ``lm_weight`` scales the LM
        loss in backward (0: only the alignment loss, joined inside the layers, has a gradient)."""
        microbatch = counters.get(id(model), 0)
        counters[id(model)] = microbatch + 1
        stream, mode = None, None
        if model.training:
            # Key the draw by the global position of this micro-batch's data in the step, so any
            # data-parallel layout trains the same samples with the same modes.
            global_microbatch = microbatch * self.ctx.dp_size + self.ctx.dp_rank
            self.step_state.begin_microbatch(self.cfg.train.seed, iteration, global_microbatch)
            stream = self.step_state.stream_tag()  # carried as attention_mask: exact under recompute
            mode = self.step_state.mode
        batch = {k: v.to(self.ctx.device, non_blocking=True) for k, v in next(data_iterator).items()}
        output = model(batch["tokens"], batch["position_ids"], stream, labels=batch["labels"], loss_mask=batch["loss_mask"])
        loss_func = partial(_masked_mean_loss, batch["loss_mask"], mode)
        return output, (loss_func if lm_weight == 1 else partial(_weighted_loss, lm_weight, loss_func))

    def _run_schedule(self, iterators, *, forward_only: bool, iteration: int, lm_weight: float = 1.0) -> list[dict]:
        counters: dict = {}
        return get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, counters, iteration, lm_weight),
            data_iterator=iterators if len(self.model) > 1 else iterators[0],
            model=self.model,
            num_microbatches=self.num_microbatches,
            seq_length=self.cfg.model.seq_length,
            micro_batch_size=self.cfg.train.micro_batch_size,
            forward_only=forward_only,
        )

    # -- one optimizer step ------------------------------------------------------------------------

    def step(self) -> StepRecord:
        iterators, alignment_grads = self._train_iters, None
        if self._measures_alignment_gradient():
            # both passes must see the same micro-batches: take the step's from the loader once
            batches = [[next(it) for _ in range(self.num_microbatches)] for it in self._train_iters]
            alignment_grads = self._alignment_gradient([iter(b) for b in batches])
            iterators = [iter(b) for b in batches]
        self._begin_pass()
        losses = self._run_schedule(iterators, forward_only=False, iteration=self.iteration)
        lm_loss, lm_loss_by_mode = metrics.model_wide_lm_loss(losses, self.ctx.device)
        finite = math.isfinite(lm_loss) and self._gradients_finite()
        update_ok, grad_norm, split = False, float("nan"), None
        if finite:
            if alignment_grads is not None:  # before the step: clipping scales the gradients in place
                split = metrics.split_gradient(self.optimizer, alignment_grads, self.cfg.ssa.alpha)
            update_ok, norm, _ = self.optimizer.step()
            grad_norm = float(norm) if norm is not None else float("nan")
        if update_ok:
            self.scheduler.step(increment=1)
            self.consecutive_skips = 0
        else:
            self.progress.skipped_steps += 1
            self.consecutive_skips += 1
            logger.warning("iteration %d: NaN/inf loss or gradient (lm loss %s): update skipped (%d in a row)",
                           self.iteration + 1, lm_loss, self.consecutive_skips)
            if self.consecutive_skips >= self.cfg.train.max_skipped_steps:
                raise TrainingDiverged(
                    f"{self.consecutive_skips} consecutive steps had a NaN/inf loss or gradient (train.max_skipped_steps="
                    f"{self.cfg.train.max_skipped_steps}) at iteration {self.iteration + 1}: lower train.lr, raise "
                    "train.lr_warmup_fraction or check the data; resume from the last checkpoint with --load"
                )
        self.progress.iteration += 1
        self.progress.consumed_samples += self.cfg.train.global_batch_size
        align_mean, per_layer = metrics.model_wide_alignment_loss(self.step_state.layer_losses(self.ctx.device))
        return StepRecord(
            iteration=self.iteration,
            lm_loss=lm_loss,
            alignment_loss=align_mean,
            layer_alignment_losses=per_layer,
            sparse_fraction=self.step_state.sparse_microbatches / max(self.step_state.microbatches, 1),
            grad_norm=grad_norm,
            lr=self.optimizer.param_groups[0]["lr"],
            skipped=not update_ok,
            lm_loss_by_mode=lm_loss_by_mode,
            alignment_gradient=split,
        )

    def _begin_pass(self, alignment_weight: float | None = None) -> None:
        """Empty gradients and per-step records before a forward/backward pass over the step's micro-batches."""
        for m in self.model:
            m.train()
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.step_state.begin_step(self.num_microbatches, alignment_weight)
        self.step_state.loss_scale = float(self.optimizer.get_loss_scale())  # one host sync per step

    def _measures_alignment_gradient(self) -> bool:
        interval = self.cfg.train.alignment_grad_interval
        return bool(interval) and self.cfg.ssa.training_mode == "ssa" and (self.iteration + 1) % interval == 0

    def _alignment_gradient(self, iterators) -> list[torch.Tensor]:
        """grad of mean_layers(L_align) alone (weight 1, LM loss weighted 0) on this step's micro-batches,
        copied out of the optimizer before the real pass overwrites the buffers."""
        self._begin_pass(alignment_weight=1.0)
        self._run_schedule(iterators, forward_only=False, iteration=self.iteration, lm_weight=0.0)
        return metrics.optimizer_grads(self.optimizer, copy=True)

    def _gradients_finite(self) -> bool:
        """No NaN/inf in any rank's gradient buffers (a sum propagates both). Collective."""
        bad = torch.zeros(1, device=self.ctx.device)
        for chunk in self.model:
            for buffer in chunk.buffers:
                bad += (~torch.isfinite(buffer.grad_data.sum())).float()
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bad.item() == 0

    @torch.no_grad()
    def evaluate(self, mode: str | None = None) -> float:
        """Mean LM loss over ``train.eval_iters`` validation steps in attention ``mode`` (full|sparse)."""
        for m in self.model:
            m.eval()
        self.step_state.use_inference_mode(mode)
        iterators = self.data.valid_iterators(len(self.model))
        values = [
            metrics.model_wide_lm_loss(self._run_schedule(iterators, forward_only=True, iteration=self.iteration), self.ctx.device)[0]
            for _ in range(self.cfg.train.eval_iters)
        ]
        return sum(values) / len(values)

    def evaluation_modes(self) -> tuple[str, ...]:
        """SSA is validated in both attention modes; the baselines in ``ssa.attention_mode``."""
        return ("full", "sparse") if self.cfg.ssa.training_mode == "ssa" else (self.cfg.ssa.attention_mode,)

    def save(self) -> float:
        """Save a checkpoint of the current iteration (collective); returns the seconds training waited."""
        if self.cfg.checkpoint.async_save and self.async_saves is None:
            self.async_saves = checkpoint.AsyncSaves()
        return checkpoint.save_checkpoint(self.cfg, self.model, self.optimizer, self.scheduler, self.progress,
                                          protect=self.loaded_iteration, async_saves=self.async_saves)

    def finalize_saves(self, blocking: bool) -> None:
        """Commit asynchronous saves whose writes have finished on every rank (collective)."""
        if self.async_saves is not None:
            self.async_saves.finalize(blocking)

    def close(self) -> None:
        if self.async_saves is not None:
            self.async_saves.close()
        distributed.shutdown()


def _masked_mean_loss(loss_mask: torch.Tensor, stream: str | None, per_token_loss: torch.Tensor):
    """Mean cross-entropy over the tokens the mask keeps; the schedule divides by micro-batches."""
    mask = loss_mask.reshape(-1).float()
    loss = (per_token_loss.reshape(-1).float() * mask).sum() / mask.sum().clamp(min=1)
    # clone: the schedule divides the returned loss in place by the number of micro-batches
    return loss, {"lm loss": loss.detach().clone(), "stream": stream}


def _weighted_loss(weight: float, loss_func, per_token_loss: torch.Tensor):
    """``loss_func``'s loss times ``weight`` in backward; the logged value stays unweighted."""
    loss, logged = loss_func(per_token_loss)
    return loss * weight, logged


def train(cfg: RunConfig, build_data=build_training_data) -> TrainResult:
    """Run (or resume) a training job; returns the per-step records (also logged) and the exit code."""
    trainer = Trainer(cfg, build_data)
    cfg = trainer.cfg
    logger_ = StepLogger(cfg, trainer.ctx, trainer.num_microbatches)
    exits = ExitConditions(cfg.train, trainer.ctx.device, saving=cfg.checkpoint.save is not None)
    history: list[StepRecord] = []
    reason, saved_at = "finished", None
    try:
        logger_.log_start(trainer.iteration, trainer.loaded_iteration, trainer.load_seconds)
        while trainer.iteration < cfg.train.train_iters:
            start = time.perf_counter()
            record = trainer.step()
            logger_.log_step(record, time.perf_counter() - start, trainer.progress.skipped_steps)
            history.append(record)
            if cfg.train.eval_interval and record.iteration % cfg.train.eval_interval == 0:
                for mode in trainer.evaluation_modes():
                    logger_.log_eval(record.iteration, mode, trainer.evaluate(mode))
            trainer.finalize_saves(blocking=False)
            stop = exits.check(trainer.iteration)
            due = cfg.checkpoint.save_interval and trainer.iteration % cfg.checkpoint.save_interval == 0
            if cfg.checkpoint.save and (stop or due or trainer.iteration == cfg.train.train_iters):
                logger_.log_save(trainer.iteration, trainer.save(), cfg.checkpoint.save)
                saved_at = trainer.iteration
            if stop:
                reason = stop
                break
        if cfg.checkpoint.save and saved_at != trainer.iteration and reason == "finished":
            logger_.log_save(trainer.iteration, trainer.save(), cfg.checkpoint.save)  # e.g. resumed at the end
        trainer.finalize_saves(blocking=True)  # the last checkpoint is committed before anything says so
        exit_code = EXIT_CODE_FINISHED if reason == "finished" else EXIT_CODE_SAVED
        if reason != "finished":
            logger.info("stopping at iteration %d (%s)%s: exit code %d", trainer.iteration, reason,
                        ", checkpoint saved" if cfg.checkpoint.save else ", no checkpoint.save set: nothing saved", exit_code)
        if cfg.checkpoint.save and dist.get_rank() == 0:
            write_exit_status(cfg.checkpoint.save, exit_code=exit_code, reason=reason, iteration=trainer.iteration,
                              train_iters=cfg.train.train_iters)
    finally:
        exits.restore_handlers()
        logger_.close()
        trainer.close()
    return TrainResult(history=history, exit_code=exit_code, reason=reason, iteration=trainer.iteration)
