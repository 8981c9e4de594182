"""Training-side data for a run: tokenizer, Megatron datasets, and per-chunk iterators.

With neither ``data.data_path`` nor ``data.webdataset`` the run uses the embedded default corpus (the Python standard
library's sources -> a trained BPE -> Megatron indexed data), built once under ``data.cache_dir``.
"""

from __future__ import annotations

import dataclasses

from ssa_megatron import data
from ssa_megatron.config import RunConfig
from ssa_megatron.train.distributed import DistributedContext


@dataclasses.dataclass
class TrainingData:
    """Datasets of a run and how each model chunk gets an iterator over them.

    ``train``/``valid`` are Megatron datasets, or for WebDataset shards the ``index.json`` path
    (``webdataset=True``; no validation split then).
    """

    vocab_size: int
    train: object
    valid: object | None
    micro_batch_size: int
    dp_rank: int
    dp_size: int
    num_workers: int
    seq_length: int = 0
    seed: int = 0
    webdataset: bool = False
    webdataset_url_template: str | None = None

    def _iterators(self, dataset, count: int, consumed_samples: int) -> list:
        # One iterator per model chunk: every virtual pipeline stage reads the same micro-batches.
        common = dict(
            micro_batch_size=self.micro_batch_size,
            data_parallel_rank=self.dp_rank,
            data_parallel_size=self.dp_size,
            consumed_samples=consumed_samples,
            num_workers=self.num_workers,
        )
        if self.webdataset:
            return [
                data.build_webdataset_iterator(
                    dataset, seq_length=self.seq_length, seed=self.seed, url_template=self.webdataset_url_template, **common
                )
                for _ in range(count)
            ]
        return [data.build_data_iterator(dataset, **common) for _ in range(count)]

    def train_iterators(self, count: int, consumed_samples: int) -> list:
        return self._iterators(self.train, count, consumed_samples)

    def valid_iterators(self, count: int) -> list:
        if self.valid is None:
            raise ValueError(
                "train.eval_interval > 0 but there is no validation data: give data.split a valid weight "
                "(WebDataset shards have no validation split: set train.eval_interval: 0)"
            )
        return self._iterators(self.valid, count, consumed_samples=0)


def build_training_data(cfg: RunConfig, ctx: DistributedContext) -> TrainingData:
    data_cfg = cfg.data
    if data_cfg.data_path is None and data_cfg.webdataset is None:
        tokenizer_dir, prefix = data.prepare_default_corpus(data_cfg.cache_dir)
        data_cfg = dataclasses.replace(data_cfg, data_path=[prefix], tokenizer=tokenizer_dir)
    tokenizer = data.load_tokenizer(data_cfg.tokenizer)
    t = cfg.train
    if data_cfg.webdataset is not None:
        train, valid = data_cfg.webdataset, None
    else:
        evaluations = t.train_iters // t.eval_interval if t.eval_interval else 0
        num_samples = (t.train_iters * t.global_batch_size, evaluations * t.eval_iters * t.global_batch_size, 0)
        train, valid, _ = data.build_datasets(
            data_cfg, seq_length=cfg.model.seq_length, seed=t.seed, num_samples=num_samples, tokenizer=tokenizer
        )
    return TrainingData(
        vocab_size=tokenizer.vocab_size,
        train=train,
        valid=valid,
        micro_batch_size=t.micro_batch_size,
        dp_rank=ctx.dp_rank,
        dp_size=ctx.dp_size,
        num_workers=data_cfg.num_workers,
        seq_length=cfg.model.seq_length,
        seed=t.seed,
        webdataset=data_cfg.webdataset is not None,
        webdataset_url_template=data_cfg.webdataset_url_template,
    )
