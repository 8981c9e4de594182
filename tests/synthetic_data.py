"""In-memory training data for tests: fixed random token sequences in Megatron's sampler order."""

from __future__ import annotations

import torch

from ssa_megatron.train.data_setup import TrainingData


class SequenceBank:
    """``num_samples`` sequences of ``seq_length + 1`` tokens; sample i is the same in every process."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        # A repeating pattern with noise, so a model can learn something in a few steps.
        base = torch.randint(0, vocab_size, (num_samples, 8), generator=generator)
        self.tokens = base.repeat(1, (seq_length + 1) // 8 + 1)[:, : seq_length + 1]
        noise = torch.rand(self.tokens.shape, generator=generator) < 0.1
        self.tokens = torch.where(noise, torch.randint(0, vocab_size, self.tokens.shape, generator=generator), self.tokens)

    def __len__(self) -> int:
        return self.tokens.shape[0]


def iterate(bank: SequenceBank, micro_batch_size: int, dp_rank: int, dp_size: int, consumed: int = 0):
    """Megatron's pretraining sampler: each global slice of mbs x dp samples, rank r takes slice r."""
    position = consumed
    while True:
        start = (position + dp_rank * micro_batch_size) % len(bank)
        rows = bank.tokens[torch.arange(start, start + micro_batch_size) % len(bank)]
        position += micro_batch_size * dp_size
        seq = rows.shape[1] - 1
        yield {
            "tokens": rows[:, :-1].clone(),
            "labels": rows[:, 1:].clone(),
            "loss_mask": torch.ones(rows.shape[0], seq),
            "position_ids": torch.arange(seq).expand(rows.shape[0], seq).clone(),
        }


class InMemoryData(TrainingData):
    def _iterators(self, dataset, count, consumed_samples):
        return [iterate(dataset, self.micro_batch_size, self.dp_rank, self.dp_size, consumed_samples) for _ in range(count)]


def in_memory_data(vocab_size: int = 128, num_samples: int = 256, seed: int = 0):
    """A ``build_data(cfg, ctx)`` for ``Trainer``: the same samples whatever the parallel layout."""

    def build(cfg, ctx):
        bank = SequenceBank(num_samples, cfg.model.seq_length, vocab_size, seed)
        return InMemoryData(
            vocab_size=vocab_size, train=bank, valid=bank, micro_batch_size=cfg.train.micro_batch_size,
            dp_rank=ctx.dp_rank, dp_size=ctx.dp_size, num_workers=0,
        )

    return build
