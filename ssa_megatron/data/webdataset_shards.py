"""Write fixed-length token sequences as WebDataset tar shards, for streaming from object storage.

Each sample is ``seq_length + 1`` consecutive tokens of the document stream (documents in a
seeded random order, EODs kept), consecutive samples overlapping by one token, as Megatron's
``GPTDataset`` packs them: ``tokens = x[:-1]``, ``labels = x[1:]``. A sample is one tar member
``<key>.tokens.npy``. ``index.json`` beside the shards records the sample count of every shard,
which is what lets the reader split shards across ranks and workers and resume at a sample.
The directory is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

import numpy as np

from ssa_megatron.data.indexed_format import bin_path, read_index

MANIFEST = "index.json"
FORMAT = "ssa_megatron.webdataset/1"
SHARD_PATTERN = "shard-%06d.tar"
SAMPLE_KEY = "tokens.npy"


@dataclass(frozen=True)
class Manifest:
    seq_length: int
    dtype: str
    shards: tuple[tuple[str, int], ...]  # (file name, samples)

    @property
    def num_samples(self) -> int:
        return sum(n for _, n in self.shards)

    @staticmethod
    def parse(text: str, where: str) -> "Manifest":
        try:
            d = json.loads(text)
            if d.get("format") != FORMAT:
                raise ValueError(f"format {d.get('format')!r}, expected {FORMAT!r}")
            return Manifest(int(d["seq_length"]), d["dtype"],
                            tuple((s["name"], int(s["samples"])) for s in d["shards"]))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{where}: not a manifest written by tools/make_webdataset.py ({e}); "
                             "re-run that tool") from None


def _packed_samples(prefix: str, seq_length: int, seed: int | None):
    """Yield ``seq_length + 1`` token windows of the (shuffled) document stream."""
    index = read_index(prefix)
    tokens = np.memmap(bin_path(prefix), dtype=index.dtype, mode="r")
    order = np.arange(len(index.sequence_lengths))
    if seed is not None:
        np.random.default_rng(seed).shuffle(order)
    starts = index.sequence_pointers // index.dtype.itemsize
    carry = np.empty(0, index.dtype)
    for doc in order:
        buf = np.concatenate([carry, tokens[starts[doc]:starts[doc] + index.sequence_lengths[doc]]])
        n = (len(buf) - 1) // seq_length
        for i in range(n):
            yield buf[i * seq_length:(i + 1) * seq_length + 1]
        carry = buf[n * seq_length:]


def write_webdataset(prefix: str, output_dir: str, *, seq_length: int, samples_per_shard: int,
                     seed: int | None = 0, progress: bool = True) -> Manifest:
    """Pack ``prefix``'s documents into tar shards under ``output_dir`` (created; must not exist)."""
    import webdataset as wds

    if seq_length < 1 or samples_per_shard < 1:
        raise ValueError(f"--seq-length={seq_length} and --samples-per-shard={samples_per_shard} must be >= 1")
    if os.path.exists(output_dir):
        raise FileExistsError(f"{output_dir} already exists; remove it or choose another --output-dir")
    index = read_index(prefix)
    total = max(0, (index.num_tokens - 1) // seq_length)
    if total == 0:
        raise ValueError(f"{prefix} has {index.num_tokens} tokens, fewer than one sample of "
                         f"--seq-length {seq_length} + 1")
    tmp = output_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="sample", desc="webdataset")
    try:
        with wds.ShardWriter(os.path.join(tmp, SHARD_PATTERN), maxcount=samples_per_shard,
                             maxsize=float("inf"), verbose=0) as sink:
            for g, sample in enumerate(_packed_samples(prefix, seq_length, seed)):
                sink.write({"__key__": f"{g:012d}", SAMPLE_KEY: np.ascontiguousarray(sample)})
                if bar is not None:
                    bar.update()
        shards = [(SHARD_PATTERN % i, min(samples_per_shard, total - i * samples_per_shard))
                  for i in range(-(-total // samples_per_shard))]
        manifest = {"format": FORMAT, "source": os.path.abspath(prefix), "seq_length": seq_length,
                    "dtype": index.dtype.name, "seed": seed, "num_samples": total,
                    "shards": [{"name": n, "samples": c} for n, c in shards]}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        os.replace(tmp, output_dir)
    finally:
        if bar is not None:
            bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return Manifest(seq_length, index.dtype.name, tuple(shards))
