"""WebDataset shards: packing, exactly-once reading across ranks and workers, exact resume."""

from __future__ import annotations

import collections
import io

import numpy as np
import pytest
import torch
from data_helpers import run_tool

from ssa_megatron.data import build_webdataset_iterator
from ssa_megatron.data.indexed_format import read_index, read_sequence
from ssa_megatron.data.preprocess import PreprocessConfig, run_preprocess
from ssa_megatron.data.webdataset_loader import ShardAssignment, load_manifest, shard_urls
from ssa_megatron.data.webdataset_shards import write_webdataset

SEQ = 16


@pytest.fixture(scope="module")
def prefix(tmp_path_factory, corpus_jsonl, tokenizer_dir) -> str:
    out = tmp_path_factory.mktemp("wds") / "c"
    return run_preprocess(PreprocessConfig(inputs=(corpus_jsonl,), output_prefix=str(out),
                                           tokenizer=tokenizer_dir, progress=False)).outputs[0]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, prefix) -> str:
    out = tmp_path_factory.mktemp("wds") / "shards"
    write_webdataset(prefix, str(out), seq_length=SEQ, samples_per_shard=97, seed=5, progress=False)
    return str(out / "index.json")


def _all_samples(manifest_path: str, readers: int, epoch_seed: int = 0, epochs: int = 1):
    manifest = load_manifest(manifest_path)
    assignment = ShardAssignment(manifest, shard_urls(manifest_path, manifest, None), readers, epoch_seed)
    return [[s.tobytes() for s in assignment.stream(r, epochs=epochs)] for r in range(readers)]


def test_samples_are_consecutive_windows_of_the_document_stream(tmp_path, prefix):
    import webdataset as wds

    index = read_index(prefix)
    stream = np.concatenate([read_sequence(prefix, index, i) for i in range(len(index.sequence_lengths))])
    manifest = write_webdataset(prefix, str(tmp_path / "w"), seq_length=SEQ, samples_per_shard=50, seed=None,
                                progress=False)
    assert manifest.num_samples == (len(stream) - 1) // SEQ
    assert [n for _, n in manifest.shards][:-1] == [50] * (len(manifest.shards) - 1)
    urls = [{"url": str(tmp_path / "w" / name)} for name, _ in manifest.shards]  # in writing order
    samples = [np.load(io.BytesIO(s["tokens.npy"])) for s in wds.tarfile_samples(urls)]
    windows = [stream[g * SEQ:g * SEQ + SEQ + 1] for g in range(manifest.num_samples)]
    assert len(samples) == len(windows) and all(np.array_equal(a, b) for a, b in zip(samples, windows))


def test_every_sample_is_read_exactly_once_across_simulated_ranks_and_workers(shards):
    everything = collections.Counter(_all_samples(shards, readers=1)[0])
    for readers in (2, 6):  # e.g. 2 DP ranks x 3 DataLoader workers
        for seed in (0, 1):  # two different epochs' shard orders
            per_reader = _all_samples(shards, readers=readers, epoch_seed=seed)
            assert all(per_reader)  # every reader has work
            assert collections.Counter(s for r in per_reader for s in r) == everything


@pytest.mark.parametrize("num_workers", [0, 2])
def test_iterator_resumes_at_consumed_samples_exactly(shards, num_workers):
    def run(consumed: int, steps: int) -> list[torch.Tensor]:
        it = build_webdataset_iterator(shards, micro_batch_size=3, data_parallel_rank=1, data_parallel_size=2,
                                       consumed_samples=consumed, num_workers=num_workers, seq_length=SEQ)
        return [next(it)["tokens"] for _ in range(steps)]

    manifest = load_manifest(shards)
    steps = manifest.num_samples // 6 + 4  # past one epoch of this rank's shards
    full = run(0, steps)
    resumed = run(7 * 6, steps - 7)
    assert all(torch.equal(a, b) for a, b in zip(full[7:], resumed))


def test_batches_have_the_gpt_dataset_format(shards):
    batch = next(build_webdataset_iterator(shards, micro_batch_size=4, data_parallel_rank=0,
                                           data_parallel_size=1, consumed_samples=0))
    assert {k: (tuple(v.shape), v.dtype) for k, v in batch.items()} == {
        "tokens": ((4, SEQ), torch.int64), "labels": ((4, SEQ), torch.int64),
        "loss_mask": ((4, SEQ), torch.float32), "position_ids": ((4, SEQ), torch.int64)}
    assert torch.equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])
    assert torch.equal(batch["position_ids"][2], torch.arange(SEQ))


def test_webdataset_errors_name_the_problem_and_the_fix(shards, prefix, tmp_path):
    kw = dict(micro_batch_size=2, data_parallel_rank=0, data_parallel_size=2, consumed_samples=0)
    with pytest.raises(ValueError, match="shards but 100 readers need one each.*--samples-per-shard"):
        build_webdataset_iterator(shards, **{**kw, "data_parallel_size": 100})
    with pytest.raises(ValueError, match="samples of 16 tokens but the model's seq_length is 32"):
        build_webdataset_iterator(shards, seq_length=32, **kw)
    with pytest.raises(ValueError, match="consumed_samples=3: must be a non-negative multiple of .* = 4"):
        build_webdataset_iterator(shards, **{**kw, "consumed_samples": 3})
    with pytest.raises(FileNotFoundError, match="no such manifest"):
        build_webdataset_iterator(str(tmp_path / "index.json"), **kw)
    (tmp_path / "index.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a manifest written by tools/make_webdataset.py"):
        build_webdataset_iterator(str(tmp_path / "index.json"), **kw)
    existing = run_tool("make_webdataset", "--input-prefix", prefix, "--output-dir", tmp_path,
                        "--seq-length", 8, check=False)
    assert existing.returncode == 2 and "already exists" in existing.stderr


def test_make_webdataset_cli_writes_shards_and_manifest(tmp_path, prefix):
    out = run_tool("make_webdataset", "--input-prefix", prefix, "--output-dir", tmp_path / "w",
                   "--seq-length", 32, "--samples-per-shard", 64, "--no-progress")
    manifest = load_manifest(str(tmp_path / "w" / "index.json"))
    assert f"{manifest.num_samples:,} samples of 32 tokens in {len(manifest.shards)} shards" in out.stdout
    assert sorted(p.name for p in (tmp_path / "w").iterdir())[-1] == "shard-%06d.tar" % (len(manifest.shards) - 1)
    assert not (tmp_path / "w.tmp").exists()
