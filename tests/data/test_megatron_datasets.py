"""Training-side data through megatron-core: blends, splits, DP slicing in Megatron's sampler
order, exact resume, gloo ranks, and the embedded default corpus end to end."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from ssa_megatron.data import (DataConfig, build_data_iterator, build_datasets, load_tokenizer,
                               prepare_default_corpus)
from ssa_megatron.data.default_corpus import stdlib_sources
from ssa_megatron.data.preprocess import PreprocessConfig, run_preprocess

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def two_prefixes(tmp_path_factory, documents, tokenizer_dir):
    from data_helpers import write_jsonl

    root = tmp_path_factory.mktemp("blend")
    prefixes = []
    for name, docs in (("a", documents[:150]), ("b", documents[150:])):
        path = write_jsonl(root / f"{name}.jsonl", docs)
        summary = run_preprocess(PreprocessConfig(inputs=(path,), output_prefix=str(root / name),
                                                  tokenizer=tokenizer_dir, progress=False))
        prefixes.append(summary.outputs[0])
    return prefixes


def _rows(batch) -> list[str]:
    return [hashlib.md5(r.numpy().tobytes()).hexdigest() for r in batch["tokens"]]


def test_weighted_blend_builds_train_and_valid_splits_without_torch_distributed(
        two_prefixes, tokenizer_dir, tmp_path):
    a, b = two_prefixes
    cfg = DataConfig(data_path=["0.7", a, "0.3", b], split="90,10,0", tokenizer=tokenizer_dir,
                     cache_dir=str(tmp_path))
    train, valid, test = build_datasets(cfg, seq_length=32, seed=1, num_samples=(200, 20, 0),
                                        tokenizer=load_tokenizer(tokenizer_dir))
    assert test is None and len(train) >= 200 and len(valid) >= 20
    share = np.bincount(np.asarray(train.dataset_index)) / len(train)
    assert abs(share[0] - 0.7) < 0.02
    sample = train[5]
    assert sample["tokens"].shape == (32,) and torch.equal(sample["tokens"][1:], sample["labels"][:-1])
    assert os.listdir(tmp_path / "indices")  # Megatron's index caches land under cache_dir


def test_two_dp_ranks_get_disjoint_slices_in_megatron_sampler_order(two_prefixes, tokenizer_dir, tmp_path):
    cfg = DataConfig(data_path=[two_prefixes[0]], tokenizer=tokenizer_dir, cache_dir=str(tmp_path))
    train, _, _ = build_datasets(cfg, seq_length=16, seed=2, num_samples=(64, 0, 0),
                                 tokenizer=load_tokenizer(tokenizer_dir))
    ranks = [build_data_iterator(train, micro_batch_size=2, data_parallel_rank=r, data_parallel_size=2,
                                 consumed_samples=0) for r in (0, 1)]
    for step in range(3):
        for r, it in enumerate(ranks):
            batch = next(it)
            assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids"}
            assert batch["tokens"].dtype == torch.int64 and batch["loss_mask"].dtype == torch.float32
            first = step * 4 + r * 2  # global batch of 4 samples; rank r takes [2r, 2r + 2)
            expected = torch.stack([train[first]["tokens"], train[first + 1]["tokens"]])
            assert torch.equal(batch["tokens"], expected)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_at_consumed_samples_reproduces_the_tail_of_an_uninterrupted_run(
        two_prefixes, tokenizer_dir, tmp_path, num_workers):
    cfg = DataConfig(data_path=[two_prefixes[1]], tokenizer=tokenizer_dir, cache_dir=str(tmp_path))
    train, _, _ = build_datasets(cfg, seq_length=16, seed=2, num_samples=(30, 0, 0),
                                 tokenizer=load_tokenizer(tokenizer_dir))
    steps = len(train) // 6 + 3  # runs past the end: the order wraps around

    def run(consumed: int, n: int) -> list[str]:
        it = build_data_iterator(train, micro_batch_size=3, data_parallel_rank=1, data_parallel_size=2,
                                 consumed_samples=consumed, num_workers=num_workers)
        return [row for _ in range(n) for row in _rows(next(it))]

    full = run(0, steps)
    assert run(5 * 6, steps - 5) == full[5 * 3:]


def test_missing_or_truncated_prefixes_fail_before_megatron_with_the_file_name(two_prefixes, tokenizer_dir,
                                                                                 tmp_path):
    tok = load_tokenizer(tokenizer_dir)
    missing = DataConfig(data_path=[str(tmp_path / "nope_text_document")], tokenizer=tokenizer_dir)
    with pytest.raises(FileNotFoundError, match=r"data.data_path: .*nope_text_document.*missing"):
        build_datasets(missing, seq_length=8, seed=0, num_samples=(1, 0, 0), tokenizer=tok)
    bin_bytes = open(two_prefixes[0] + ".bin", "rb").read()
    (tmp_path / "cut.bin").write_bytes(bin_bytes[:100])
    (tmp_path / "cut.idx").write_bytes(open(two_prefixes[0] + ".idx", "rb").read())
    truncated = DataConfig(data_path=[str(tmp_path / "cut")], tokenizer=tokenizer_dir)
    with pytest.raises(ValueError, match=r"cut\.bin: 100 bytes but .*truncated"):
        build_datasets(truncated, seq_length=8, seed=0, num_samples=(1, 0, 0), tokenizer=tok)


def test_data_from_another_tokenizer_fails_naming_the_file(two_prefixes, tokenizer_dir):
    """Token ids beyond the tokenizer's vocabulary: the data was preprocessed with another tokenizer."""
    tok = load_tokenizer(tokenizer_dir)
    largest = int(np.fromfile(two_prefixes[0] + ".bin", dtype=np.uint16).max())
    smaller = type("SmallerTokenizer", (), {"vocab_size": largest, "eod": tok.eod})()
    config = DataConfig(data_path=[two_prefixes[0]], tokenizer=tokenizer_dir)
    with pytest.raises(ValueError, match=rf"{os.path.basename(two_prefixes[0])}\.bin holds token id {largest} "
                                         rf"but the tokenizer .* has {largest} ids"):
        build_datasets(config, seq_length=8, seed=0, num_samples=(1, 0, 0), tokenizer=smaller)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_default_corpus_end_to_end_on_two_gloo_ranks_builds_once_and_caches(tmp_path):
    cache = str(tmp_path / "cache")
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    worker = os.path.join(os.path.dirname(__file__), "distributed_data_worker.py")
    procs = [subprocess.Popen([sys.executable, worker, cache], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert sum(err.count("building the default corpus") for _, err in outs) == 1  # the lock works
    assert results[0]["paths"] == results[1]["paths"] and results[0]["train"] >= 40
    assert not set(results[0]["rows"]) & set(results[1]["rows"])  # disjoint DP slices
    start = time.perf_counter()
    tokenizer_dir, prefix = prepare_default_corpus(cache)  # cached: no rebuild
    assert time.perf_counter() - start < 2 and [tokenizer_dir, prefix] == results[0]["paths"]
    tok = load_tokenizer(tokenizer_dir)
    assert tok.vocab_size == 4096
    cfg = DataConfig(data_path=[prefix], tokenizer=tokenizer_dir, cache_dir=cache)
    train, _, _ = build_datasets(cfg, seq_length=64, seed=3, num_samples=(40, 8, 0), tokenizer=tok)
    it = build_data_iterator(train, micro_batch_size=2, data_parallel_rank=0, data_parallel_size=2,
                             consumed_samples=0)
    assert _rows(next(it)) == results[0]["rows"][:2]  # same samples with or without torch.distributed
    corpus = "".join(open(path, encoding="utf-8").read() for path in stdlib_sources())
    for i in range(3):  # samples decode back to standard-library source, documents split at EOD
        pieces = tok.decode(train[i]["tokens"].tolist()).split("<|endoftext|>")
        assert all(piece in corpus for piece in pieces) and max(map(len, pieces)) > 20
