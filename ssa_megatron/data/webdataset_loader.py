"""Training-side reader of WebDataset shards: split across ranks and workers, resumable.

There are ``R = data_parallel_size * W`` readers (``W = max(num_workers, 1)``); reader
``rank * W + slot`` streams the shards at positions ``p`` with ``p % R == reader`` of each
epoch's shard order (a permutation seeded by ``seed + epoch``), so every node downloads only
its own shards and, within an epoch, every sample is read by exactly one reader. A rank's
DataLoader worker ``w`` serves reader slot ``(w + k0) % W`` after ``k0`` micro-batches were
consumed: the DataLoader's round-robin over workers then continues exactly the uninterrupted
sequence, and each reader skips the samples it had already produced (whole shards without
opening them, via the manifest's sample counts).
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import torch

from ssa_megatron.data.webdataset_shards import MANIFEST, SAMPLE_KEY, Manifest


class ShardAssignment:
    """Which shards each of ``readers`` readers streams, epoch by epoch."""

    def __init__(self, manifest: Manifest, urls: list[str], readers: int, seed: int):
        if len(manifest.shards) < readers:
            raise ValueError(
                f"the webdataset has {len(manifest.shards)} shards but {readers} readers need one each "
                "(data-parallel ranks x DataLoader workers); write more, smaller shards "
                "(tools/make_webdataset.py --samples-per-shard) or use fewer data.num_workers")
        self.manifest, self.urls, self.readers, self.seed = manifest, urls, readers, seed

    def shards(self, reader: int, epoch: int) -> list[int]:
        order = np.random.RandomState(self.seed + epoch).permutation(len(self.manifest.shards))
        return [int(s) for s in order[reader::self.readers]]

    def stream(self, reader: int, skip: int = 0, epochs: int | None = None) -> Iterator[np.ndarray]:
        """Samples of one reader, after skipping its first ``skip``; forever unless ``epochs``."""
        import webdataset as wds

        epoch = 0
        while epochs is None or epoch < epochs:
            for s in self.shards(reader, epoch):
                count = self.manifest.shards[s][1]
                if skip >= count:
                    skip -= count
                    continue
                for i, sample in enumerate(wds.tarfile_samples([{"url": self.urls[s]}])):
                    if i >= skip:
                        yield np.load(io.BytesIO(sample[SAMPLE_KEY]))
                skip = 0
            epoch += 1


def to_batch(samples: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """``[b, s + 1]`` windows -> the trainer's batch, as ``GPTDataset`` builds it (no padding)."""
    x = torch.from_numpy(np.stack(samples).astype(np.int64))
    b, s = x.shape[0], x.shape[1] - 1
    return {"tokens": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous(),
            "loss_mask": torch.ones(b, s, dtype=torch.float32),
            "position_ids": torch.arange(s, dtype=torch.int64).expand(b, s).contiguous()}


class _RankStream(torch.utils.data.IterableDataset):
    def __init__(self, assignment: ShardAssignment, *, micro_batch_size: int, rank: int, workers: int,
                 consumed_batches: int):
        self.assignment, self.b, self.rank, self.workers = assignment, micro_batch_size, rank, workers
        self.consumed_batches = consumed_batches

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        slot = ((info.id if info else 0) + self.consumed_batches) % self.workers
        done = len(range(slot, self.consumed_batches, self.workers))  # batches this slot produced
        samples = self.assignment.stream(self.rank * self.workers + slot, skip=done * self.b)
        while True:
            yield to_batch([next(samples) for _ in range(self.b)])


def load_manifest(path: str) -> Manifest:
    import webdataset as wds

    try:
        with wds.gopen(path, "rb") as f:
            return Manifest.parse(f.read().decode("utf-8"), path)
    except FileNotFoundError:
        raise FileNotFoundError(f"data.webdataset={path!r}: no such manifest; give the {MANIFEST} "
                                "written by tools/make_webdataset.py") from None


def shard_urls(manifest_path: str, manifest: Manifest, url_template: str | None) -> list[str]:
    """Where each shard is read from: ``url_template`` or the manifest's own directory."""
    if url_template is not None:
        return [url_template.format(name=name) for name, _ in manifest.shards]
    base = manifest_path.rsplit("/", 1)[0] + "/" if "/" in manifest_path else ""
    return [base + name for name, _ in manifest.shards]


def build_webdataset_iterator(manifest_path: str, *, micro_batch_size: int, data_parallel_rank: int,
                              data_parallel_size: int, consumed_samples: int, num_workers: int = 0,
                              seq_length: int | None = None, seed: int = 0,
                              url_template: str | None = None) -> Iterator[dict]:
    """Infinite iterator of ``{"tokens", "labels", "loss_mask", "position_ids"}``, each ``[b, s]``.

    ``consumed_samples`` counts samples over all DP ranks, as the trainer's does; it must be a
    multiple of ``micro_batch_size * data_parallel_size``.
    """
    manifest = load_manifest(manifest_path)
    if seq_length is not None and seq_length != manifest.seq_length:
        raise ValueError(f"{manifest_path} holds samples of {manifest.seq_length} tokens but the model's "
                         f"seq_length is {seq_length}; rebuild it with tools/make_webdataset.py --seq-length "
                         f"{seq_length}")
    per_step = micro_batch_size * data_parallel_size
    if micro_batch_size < 1 or not 0 <= data_parallel_rank < data_parallel_size:
        raise ValueError(f"micro_batch_size={micro_batch_size} must be >= 1 and data_parallel_rank="
                         f"{data_parallel_rank} in [0, {data_parallel_size})")
    if consumed_samples < 0 or consumed_samples % per_step:
        raise ValueError(f"consumed_samples={consumed_samples}: must be a non-negative multiple of "
                         f"micro_batch_size x data_parallel_size = {per_step}")
    workers = max(num_workers, 1)
    assignment = ShardAssignment(manifest, shard_urls(manifest_path, manifest, url_template),
                                 data_parallel_size * workers, seed)
    stream = _RankStream(assignment, micro_batch_size=micro_batch_size, rank=data_parallel_rank,
                         workers=workers, consumed_batches=consumed_samples // per_step)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers,
                                         persistent_workers=num_workers > 0)
    return iter(loader)
