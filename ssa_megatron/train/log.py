"""What a run reports: one Megatron-style ``|`` line per log interval (from the last rank), the same
values to TensorBoard (and W&B when ``train.wandb_project`` is set), and a progress bar in a terminal.

Throughput is averaged over the steps of the log interval and counts only their time (not
evaluation or checkpointing). MFU is model FLOPs (``metrics.flops_per_token``) against the
device's dense bf16 peak, where the device is known.
"""

from __future__ import annotations

import importlib.util
import logging
import sys

import torch
import yaml

from ssa_megatron.config import RunConfig, config_to_dict
from ssa_megatron.train import metrics
from ssa_megatron.train.distributed import DistributedContext

logger = logging.getLogger("ssa_megatron.train")


def _format_eta(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}"


class StepLogger:
    def __init__(self, cfg: RunConfig, ctx: DistributedContext, num_microbatches: int):
        self.cfg = cfg
        self.ctx = ctx
        self.num_microbatches = num_microbatches
        self.enabled = ctx.is_logging_rank
        self.tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
        self.flops_per_step = metrics.flops_per_token(cfg, cfg.model.vocab_size) * self.tokens_per_step
        self.peak_tflops = metrics.peak_bf16_tflops(ctx.device)
        self._writer = None
        self._wandb = None
        self._bar = None
        self._interval_seconds = 0.0
        self._interval_steps = 0
        self._total_seconds = 0.0
        self._total_steps = 0
        if self.enabled:
            # a no-op where the application (or pytest) configured logging already
            logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(message)s")
            logger.setLevel(logging.INFO)
            self._open_sinks()

    def _open_sinks(self) -> None:
        t = self.cfg.train
        if t.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(t.tensorboard_dir)
        if t.wandb_project:
            import wandb  # checked by the preflight

            self._wandb = wandb.init(project=t.wandb_project, config=config_to_dict(self.cfg), dir=t.tensorboard_dir,
                                     resume="allow")

    def log_start(self, iteration: int, loaded_iteration: int | None, load_seconds: float) -> None:
        if not self.enabled:
            return
        cfg, ctx = self.cfg, self.ctx
        logger.info("resolved run file:\n%s", yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip())
        logger.info(
            "SSA training: mode=%s | layers=%d | hidden=%d | heads=%d/%d | seq=%d | block=%d top-k=%d | "
            "TP=%d PP=%d DP=%d | micro-batches/step=%d | device=%s",
            cfg.ssa.training_mode, cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads,
            cfg.model.num_query_groups, cfg.model.seq_length, cfg.ssa.block_size, cfg.ssa.top_k,
            ctx.tp_size, ctx.pp_size, ctx.dp_size, self.num_microbatches, ctx.device.type,
        )
        found = {name: importlib.util.find_spec(name) is not None for name in ("transformer_engine", "apex")}
        logger.info(
            "optional accelerators: transformer-engine %s, apex %s%s",
            *("found" if found[n] else "absent" for n in found),
            "" if any(found.values()) else " (the PyTorch + Triton path is used)",
        )
        if cfg.train.alignment_grad_interval and cfg.ssa.training_mode != "ssa":
            logger.info("train.alignment_grad_interval=%d: not measured (training_mode=%s has no alignment loss)",
                        cfg.train.alignment_grad_interval, cfg.ssa.training_mode)
        if loaded_iteration is not None:
            logger.info("resumed from %s at iteration %d (continuing at %d) | load time: %.1f s",
                        self.cfg.checkpoint.load, loaded_iteration, iteration, load_seconds)
            self._scalar("checkpoint/load seconds", load_seconds, iteration)
        if sys.stdout.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=cfg.train.train_iters, initial=iteration, unit="step", dynamic_ncols=True)

    def log_step(self, record, seconds: float, skipped_total: int) -> None:
        self._interval_seconds += seconds
        self._interval_steps += 1
        self._total_seconds += seconds
        self._total_steps += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{record.lm_loss:.4f}")
        if record.alignment_gradient is not None:  # measured on its own interval: logged whenever present
            self._log_alignment_gradient(record.iteration, record.alignment_gradient)
        last = record.iteration == self.cfg.train.train_iters
        if record.iteration % self.cfg.train.log_interval and not last:
            return
        step_seconds = self._interval_seconds / self._interval_steps
        self._interval_seconds, self._interval_steps = 0.0, 0
        eta = self._total_seconds / self._total_steps * (self.cfg.train.train_iters - record.iteration)
        tflops = self.flops_per_step / step_seconds / self.ctx.world_size / 1e12
        values = {
            "lm loss": record.lm_loss,
            "alignment loss": record.alignment_loss,
            "sparse fraction": record.sparse_fraction,
            "grad norm": record.grad_norm,
            "learning rate": record.lr,
            "ms per iteration": step_seconds * 1e3,
            "tokens per second per GPU": self.tokens_per_step / step_seconds / self.ctx.world_size,
            "TFLOP/s per GPU": tflops,
            "skipped steps": skipped_total,
        }
        for stream, loss in record.lm_loss_by_mode.items():
            values[f"lm loss ({stream} stream)"] = loss
        mfu = ""
        if self.peak_tflops:
            values["MFU %"] = 100 * tflops / self.peak_tflops
            mfu = f" | MFU: {values['MFU %']:.1f}%"
        if self.ctx.device.type == "cuda":
            values["peak memory GiB"] = torch.cuda.max_memory_allocated() / 2**30
        self._print(
            f"iteration {record.iteration}/{self.cfg.train.train_iters} | consumed tokens: {record.iteration * self.tokens_per_step} | "
            f"elapsed ms/iter: {step_seconds * 1e3:.1f} | tokens/s/GPU: {values['tokens per second per GPU']:.0f} | "
            f"TFLOP/s/GPU: {tflops:.2f}{mfu} | lr: {record.lr:.3e} | lm loss: {record.lm_loss:.4f} | "
            f"alignment loss: {record.alignment_loss:.4e} | mode: {self._mode_summary(record.sparse_fraction)} | "
            f"grad norm: {record.grad_norm:.3f} | skipped: {skipped_total} | ETA {_format_eta(eta)}"
        )
        for key, value in values.items():
            self._scalar(f"train/{key}", value, record.iteration)
        for layer, value in enumerate(record.layer_alignment_losses, start=1):
            self._scalar(f"alignment/layer_{layer:02d}", value, record.iteration)

    def _log_alignment_gradient(self, iteration: int, split) -> None:
        alpha = self.cfg.ssa.alpha
        self._print(
            f"alignment gradient at iteration {iteration} | lm loss grad norm: {split.lm_norm:.4f} | "
            f"alignment loss grad norm (unweighted): {split.alignment_norm:.4e} | "
            f"alignment share of grad norm (alpha={alpha:g}): {split.share:.4f}"
        )
        self._scalar("alignment/grad norm (lm loss)", split.lm_norm, iteration)
        self._scalar("alignment/grad norm (alignment loss, unweighted)", split.alignment_norm, iteration)
        self._scalar("alignment/share of grad norm", split.share, iteration)

    def _mode_summary(self, sparse_fraction: float) -> str:
        if self.cfg.ssa.training_mode != "ssa":
            return self.cfg.ssa.training_mode
        return f"sparse {sparse_fraction:.2f} / full {1 - sparse_fraction:.2f}"

    def log_eval(self, iteration: int, mode: str, loss: float) -> None:
        if not self.enabled:
            return
        self._print(f"validation at iteration {iteration} | {mode} attention | lm loss: {loss:.4f}")
        self._scalar(f"valid/lm loss ({mode} attention)", loss, iteration)

    def log_save(self, iteration: int, seconds: float, directory: str) -> None:
        if not self.enabled:
            return
        self._print(f"saved checkpoint at iteration {iteration} to {directory} | save time: {seconds:.1f} s")
        self._scalar("checkpoint/save seconds", seconds, iteration)

    def _print(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line)
        else:
            logger.info(line)

    def _scalar(self, tag: str, value: float, step: int) -> None:
        if self._writer:
            self._writer.add_scalar(tag, value, step)
        if self._wandb:
            self._wandb.log({tag: value}, step=step)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer:
            self._writer.close()
        if self._wandb:
            self._wandb.finish()
