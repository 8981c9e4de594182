"""The training loop: Megatron's schedules, DDP and optimizer around the SSA model.

``train(cfg)`` sets up the process groups, data, model chunks, optimizer and LR schedule, then
runs ``train.train_iters`` optimizer steps. Each step runs ``num_microbatches`` micro-batches
through ``get_forward_backward_func()`` (no pipelining, 1F1B or interleaved 1F1B); the SSA mode
of each micro-batch is drawn from (seed, iteration, micro-batch) in ``forward_step``.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from ssa_megatron.config import RunConfig
from ssa_megatron.model.builder import build_model_chunks, transformer_config
from ssa_megatron.model.step_state import SSAStepState
from ssa_megatron.train import distributed, metrics
from ssa_megatron.train.data_setup import TrainingData, build_training_data
from ssa_megatron.train.log import StepLogger


@dataclasses.dataclass
class StepRecord:
    iteration: int
    lm_loss: float
    alignment_loss: float
    layer_alignment_losses: list[float]
    sparse_fraction: float
    grad_norm: float
    lr: float


class Trainer:
    """Holds what a run builds once; ``step()`` is one optimizer step."""

    def __init__(self, cfg: RunConfig, build_data=build_training_data):
        """``build_data(cfg, ctx) -> TrainingData`` (tests pass one that serves in-memory data)."""
        self.config = transformer_config(cfg)  # validates the model against Megatron before any group exists
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
        self.num_microbatches = cfg.train.global_batch_size // (cfg.train.micro_batch_size * self.ctx.dp_size)
        self.step_state = SSAStepState(cfg.ssa, cfg.model.num_layers, tp_size=self.ctx.tp_size)
        chunks = [c.to(self.ctx.device) for c in build_model_chunks(cfg, self.config, self.step_state, cfg.model.vocab_size)]
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=cfg.parallel.use_distributed_optimizer
        )
        self.model = [
            DistributedDataParallel(config=self.config, ddp_config=ddp_config, module=chunk,
                                    disable_bucketing=(i > 0))
            for i, chunk in enumerate(chunks)
        ]
        t = cfg.train
        self.optimizer = get_megatron_optimizer(
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
                use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
            ),
            self.model,
        )
        warmup = int(t.lr_warmup_fraction * t.train_iters)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0,
            max_lr=t.lr,
            min_lr=t.min_lr,
            lr_warmup_steps=warmup,
            lr_decay_steps=t.train_iters,
            lr_decay_style=t.lr_decay_style,
            start_wd=t.weight_decay,
            end_wd=t.weight_decay,
            wd_incr_steps=t.train_iters,
            wd_incr_style="constant",
        )
        self.config.grad_scale_func = self.optimizer.scale_loss
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.no_sync_func = [m.no_sync for m in self.model] if len(self.model) > 1 else self.model[0].no_sync
        self.iteration = 0
        self._train_iters = self.data.train_iterators(len(self.model), consumed_samples=0)

    # -- one micro-batch ---------------------------------------------------------------------------

    def _forward_step(self, counters: dict, iteration: int, data_iterator, model):
        """Megatron's forward-step contract: return (output, loss function)."""
        microbatch = counters.get(id(model), 0)
        counters[id(model)] = microbatch + 1
        if model.training:
            # Key the draw by the global position of this micro-batch's data in the step, so any
            # data-parallel layout trains the same samples with the same modes.
            global_microbatch = microbatch * self.ctx.dp_size + self.ctx.dp_rank
            self.step_state.begin_microbatch(self.cfg.train.seed, iteration, global_microbatch)
            self.step_state.loss_scale = float(self.optimizer.get_loss_scale())
        batch = {k: v.to(self.ctx.device, non_blocking=True) for k, v in next(data_iterator).items()}
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, partial(_masked_mean_loss, batch["loss_mask"])

    def _run_schedule(self, iterators, *, forward_only: bool, iteration: int) -> list[dict]:
        counters: dict = {}
        return get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, counters, iteration),
            data_iterator=iterators if len(self.model) > 1 else iterators[0],
            model=self.model,
            num_microbatches=self.num_microbatches,
            seq_length=self.cfg.model.seq_length,
            micro_batch_size=self.cfg.train.micro_batch_size,
            forward_only=forward_only,
        )

    # -- one optimizer step ------------------------------------------------------------------------

    def step(self) -> StepRecord:
        for m in self.model:
            m.train()
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.step_state.begin_step(self.num_microbatches)
        losses = self._run_schedule(self._train_iters, forward_only=False, iteration=self.iteration)
        update_ok, grad_norm, _ = self.optimizer.step()
        if update_ok:
            self.scheduler.step(increment=1)
        self.iteration += 1
        lm_loss = metrics.model_wide_lm_loss(losses, self.ctx.device)
        align_mean, per_layer = metrics.model_wide_alignment_loss(self.step_state.layer_losses(self.ctx.device))
        return StepRecord(
            iteration=self.iteration,
            lm_loss=lm_loss,
            alignment_loss=align_mean,
            layer_alignment_losses=per_layer,
            sparse_fraction=self.step_state.sparse_microbatches / max(self.step_state.microbatches, 1),
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            lr=self.optimizer.param_groups[0]["lr"],
        )

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean LM loss over ``train.eval_iters`` validation steps, with ``ssa.attention_mode``."""
        for m in self.model:
            m.eval()
        self.step_state.use_inference_mode()
        iterators = self.data.valid_iterators(len(self.model))
        values = [
            metrics.model_wide_lm_loss(self._run_schedule(iterators, forward_only=True, iteration=self.iteration), self.ctx.device)
            for _ in range(self.cfg.train.eval_iters)
        ]
        return sum(values) / len(values)

    def close(self) -> None:
        distributed.shutdown()


def _masked_mean_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Mean cross-entropy over the tokens the mask keeps; the schedule divides by micro-batches."""
    mask = loss_mask.reshape(-1).float()
    loss = (per_token_loss.reshape(-1).float() * mask).sum() / mask.sum().clamp(min=1)
    # clone: the schedule divides the returned loss in place by the number of micro-batches
    return loss, {"lm loss": loss.detach().clone()}


def train(cfg: RunConfig, build_data=build_training_data) -> list[StepRecord]:
    """Run a whole training job; returns the per-step records (also logged)."""
    trainer = Trainer(cfg, build_data)
    logger = StepLogger(trainer.cfg, trainer.ctx, trainer.num_microbatches)
    history = []
    try:
        start = time.perf_counter()
        for _ in range(cfg.train.train_iters):
            record = trainer.step()
            history.append(record)
            elapsed, start = time.perf_counter() - start, time.perf_counter()
            logger.log_step(record, elapsed)
            if cfg.train.eval_interval and record.iteration % cfg.train.eval_interval == 0:
                logger.log_eval(record.iteration, trainer.evaluate())
    finally:
        logger.close()
        trainer.close()
    return history
