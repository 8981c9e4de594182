"""Micro-batch iterators over Megatron datasets, in Megatron's pretraining-sampler order.

Global sample ``g`` belongs to global batch ``g // (b * dp)``; DP rank ``r`` takes the slice
``[r * b, (r + 1) * b)`` of each global batch (Megatron-LM's ``MegatronPretrainingSampler``).
Training resumes at ``consumed_samples`` (a global count) exactly; past the end of the
dataset the order wraps around (sample ``g`` is item ``g mod len``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


class PretrainingBatchSampler:
    """Index lists of one DP rank's micro-batches, from ``consumed_samples`` on, forever."""

    def __init__(self, dataset_size: int, *, micro_batch_size: int, data_parallel_rank: int,
                 data_parallel_size: int, consumed_samples: int):
        if dataset_size <= 0:
            raise ValueError("the dataset is empty: give its split a weight in data.split, or more data")
        if micro_batch_size < 1 or data_parallel_size < 1 or not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"micro_batch_size={micro_batch_size} and data_parallel_size={data_parallel_size} "
                             f"must be >= 1 and data_parallel_rank={data_parallel_rank} in [0, size)")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples={consumed_samples}: must be >= 0")
        self.size, self.b, self.rank, self.dp = dataset_size, micro_batch_size, data_parallel_rank, data_parallel_size
        self.consumed = consumed_samples

    def __iter__(self) -> Iterator[list[int]]:
        g = self.consumed
        while True:
            first = g + self.rank * self.b
            yield [(first + i) % self.size for i in range(self.b)]
            g += self.b * self.dp


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack the keys the trainer uses: tokens/labels/position_ids int64, loss_mask float32."""
    return {key: torch.stack([s[key] for s in samples]) for key in BATCH_KEYS}


def build_data_iterator(dataset, *, micro_batch_size: int, data_parallel_rank: int, data_parallel_size: int,
                        consumed_samples: int, num_workers: int = 0) -> Iterator[dict]:
    """Infinite iterator of ``{"tokens", "labels", "loss_mask", "position_ids"}``, each ``[b, s]``."""
    if dataset is None:
        raise ValueError("no dataset for this split: give it a weight in data.split")
    sampler = PretrainingBatchSampler(len(dataset), micro_batch_size=micro_batch_size,
                                      data_parallel_rank=data_parallel_rank,
                                      data_parallel_size=data_parallel_size, consumed_samples=consumed_samples)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                         collate_fn=collate, persistent_workers=num_workers > 0)
    return iter(loader)
