"""One Megatron-style ``|`` line per logging interval (from the last rank), plus TensorBoard if installed."""

from __future__ import annotations

import importlib.util
import logging
import sys

from ssa_megatron.config import RunConfig
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
        self.enabled = ctx.is_logging_rank
        self.tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
        self.flops_per_step = metrics.flops_per_token(cfg, cfg.model.vocab_size) * self.tokens_per_step
        self._writer = None
        if self.enabled:
            logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(message)s", force=True)
            logger.info(
                "SSA training: mode=%s | layers=%d | hidden=%d | heads=%d/%d | seq=%d | block=%d top-k=%d | "
                "TP=%d PP=%d DP=%d | micro-batches/step=%d | device=%s",
                cfg.ssa.training_mode, cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads,
                cfg.model.num_query_groups, cfg.model.seq_length, cfg.ssa.block_size, cfg.ssa.top_k,
                ctx.tp_size, ctx.pp_size, ctx.dp_size, num_microbatches, ctx.device.type,
            )
            found = {name: importlib.util.find_spec(name) is not None for name in ("transformer_engine", "apex")}
            logger.info(
                "optional accelerators: transformer-engine %s, apex %s%s",
                *("found" if found[n] else "absent" for n in found),
                "" if any(found.values()) else " (the PyTorch + Triton path is used)",
            )
            if cfg.train.tensorboard_dir and importlib.util.find_spec("tensorboard"):
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(cfg.train.tensorboard_dir)
            elif cfg.train.tensorboard_dir:
                logger.warning("train.tensorboard_dir is set but tensorboard is not installed: pip install tensorboard")
        self._total_seconds = 0.0

    def log_step(self, record, seconds: float) -> None:
        self._total_seconds += seconds
        last = record.iteration == self.cfg.train.train_iters
        if not self.enabled or (record.iteration % self.cfg.train.log_interval and not last):
            return
        total = self.cfg.train.train_iters
        eta = self._total_seconds / record.iteration * (total - record.iteration)
        tflops = self.flops_per_step / seconds / self.ctx.world_size / 1e12
        values = {
            "lm loss": record.lm_loss,
            "alignment loss": record.alignment_loss,
            "sparse fraction": record.sparse_fraction,
            "grad norm": record.grad_norm,
            "learning rate": record.lr,
            "tokens per second per GPU": self.tokens_per_step / seconds / self.ctx.world_size,
            "TFLOP/s per GPU": tflops,
        }
        logger.info(
            "iteration %d/%d | consumed tokens: %d | elapsed ms/iter: %.1f | tokens/s/GPU: %.0f | TFLOP/s/GPU: %.2f | "
            "lr: %.3e | lm loss: %.4f | alignment loss: %.4e | mode: %s | grad norm: %.3f | ETA %s",
            record.iteration, total, record.iteration * self.tokens_per_step, seconds * 1e3,
            values["tokens per second per GPU"], tflops, record.lr, record.lm_loss, record.alignment_loss,
            self._mode_summary(record.sparse_fraction), record.grad_norm, _format_eta(eta),
        )
        if self._writer:
            for key, value in values.items():
                self._writer.add_scalar(f"train/{key}", value, record.iteration)
            for layer, value in enumerate(record.layer_alignment_losses, start=1):
                self._writer.add_scalar(f"alignment/layer_{layer:02d}", value, record.iteration)

    def _mode_summary(self, sparse_fraction: float) -> str:
        if self.cfg.ssa.training_mode != "ssa":
            return self.cfg.ssa.training_mode
        return f"sparse {sparse_fraction:.2f} / full {1 - sparse_fraction:.2f}"

    def log_eval(self, iteration: int, loss: float) -> None:
        if not self.enabled:
            return
        logger.info("validation at iteration %d | %s attention | lm loss: %.4f", iteration, self.cfg.ssa.attention_mode, loss)
        if self._writer:
            self._writer.add_scalar(f"valid/lm loss ({self.cfg.ssa.attention_mode})", loss, iteration)

    def close(self) -> None:
        if self._writer:
            self._writer.close()
