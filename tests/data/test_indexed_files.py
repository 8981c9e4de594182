"""The .bin/.idx format written with numpy: read by Megatron unchanged, corruption detected,
crash-safe publication, and merging."""

from __future__ import annotations

import os

import numpy as np
import pytest

from ssa_megatron.data.indexed_format import read_header, read_index
from ssa_megatron.data.indexed_writer import IndexedWriter, commit_pair
from ssa_megatron.data.merge import merge_datasets
from ssa_megatron.data.shards import shard_is_done


def _write(prefix: str, docs: list[list[int]], dtype=np.uint16, batches: int = 2) -> None:
    writer = IndexedWriter(prefix, np.dtype(dtype))
    for part in np.array_split(np.arange(len(docs)), batches):
        chunk = [docs[i] for i in part]
        writer.add_batch(np.array([t for d in chunk for t in d], np.int64), np.array([len(d) for d in chunk]))
    writer.finish()


def _docs(n: int, high: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, high, rng.integers(1, 50)).tolist() for _ in range(n)]


@pytest.mark.parametrize("dtype,high", [(np.uint16, 65_000), (np.int32, 128_256)])
def test_numpy_writer_output_equals_megatron_builder_output_and_reads_back(tmp_path, dtype, high):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    docs = _docs(37, high)
    _write(str(tmp_path / "ours"), docs, dtype, batches=3)
    builder = IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=dtype)
    for d in docs:
        builder.add_document(torch.tensor(d), [len(d)])
    builder.finalize(str(tmp_path / "theirs.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"theirs{ext}").read_bytes()
    ds = IndexedDataset(str(tmp_path / "ours"))
    assert [ds[i].tolist() for i in range(len(ds))] == docs


def test_truncated_or_corrupt_files_are_detected_with_the_file_name(tmp_path):
    prefix = str(tmp_path / "d")
    _write(prefix, _docs(10, 500))
    good_bin, good_idx = (tmp_path / "d.bin").read_bytes(), (tmp_path / "d.idx").read_bytes()
    (tmp_path / "d.bin").write_bytes(good_bin[:-2])
    with pytest.raises(ValueError, match=r"d\.bin: .* bytes but .*d\.idx describes .*re-run preprocessing"):
        read_index(prefix)
    (tmp_path / "d.bin").write_bytes(good_bin)
    (tmp_path / "d.idx").write_bytes(good_idx[:-8])
    with pytest.raises(ValueError, match=r"d\.idx: .* bytes but its header describes .*truncated or corrupt"):
        read_header(prefix)
    (tmp_path / "d.idx").write_bytes(b"NOTMMIDX" + good_idx[8:])
    with pytest.raises(ValueError, match=r"d\.idx: not a Megatron \.idx file"):
        read_header(prefix)
    (tmp_path / "d.idx").write_bytes(good_idx[:20])
    with pytest.raises(ValueError, match="bad or truncated header"):
        read_header(prefix)
    os.unlink(tmp_path / "d.idx")
    with pytest.raises(FileNotFoundError, match=r"missing .*d\.idx"):
        read_header(prefix)


def test_a_crash_between_the_two_renames_never_looks_finished(tmp_path, monkeypatch):
    shards = str(tmp_path)
    prefix = os.path.join(shards, "text-00000")
    _write(prefix, _docs(5, 100))
    (tmp_path / "00000.done.json").write_text("{}")
    assert shard_is_done(shards, ("text",), 0)
    # A redo of the shard removes the marker first, then crashes while publishing the new pair.
    os.unlink(tmp_path / "00000.done.json")
    _write(str(tmp_path / "new"), _docs(9, 100, seed=1))
    os.rename(tmp_path / "new.bin", tmp_path / "new.tmp.bin")
    os.rename(tmp_path / "new.idx", tmp_path / "new.tmp.idx")
    real_replace = os.replace

    def crash_before_the_idx(src, dst):
        if str(dst).endswith(".idx"):
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_before_the_idx)
    with pytest.raises(KeyboardInterrupt):
        commit_pair(str(tmp_path / "new.tmp"), prefix)
    assert os.path.exists(prefix + ".bin") and not os.path.exists(prefix + ".idx")  # new .bin, no old .idx
    (tmp_path / "00000.done.json").write_text("{}")  # even with a stray marker
    assert not shard_is_done(shards, ("text",), 0)


def test_merge_equals_writing_everything_at_once_and_refuses_mixed_dtypes(tmp_path):
    a, b = _docs(20, 300, seed=1), _docs(13, 300, seed=2)
    _write(str(tmp_path / "a"), a)
    _write(str(tmp_path / "b"), b)
    _write(str(tmp_path / "ab"), a + b, batches=1)
    stats = merge_datasets([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "merged"))
    assert (stats.documents, stats.tokens) == (33, sum(map(len, a + b)))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"merged{ext}").read_bytes() == (tmp_path / f"ab{ext}").read_bytes()
    _write(str(tmp_path / "wide"), a, np.int32)
    with pytest.raises(ValueError, match="holds int32 tokens but .* holds uint16"):
        merge_datasets([str(tmp_path / "a"), str(tmp_path / "wide")], str(tmp_path / "bad"))
    assert not list(tmp_path.glob("bad*"))
