"""Input readers: byte-range pieces split records exactly once, whatever the chunking."""

from __future__ import annotations

import random

import pytest

from ssa_megatron.data import readers
from ssa_megatron.data.inputs import InputFile, Piece, file_pieces, plan_shards, splittable_separator
from ssa_megatron.data.readers import ReadStats, iter_documents, iter_records


@pytest.mark.parametrize("sep", [b"\n", b"<|sep|>"])
def test_pieces_cut_anywhere_yield_every_record_once_in_order(tmp_path, monkeypatch, sep):
    monkeypatch.setattr(readers, "CHUNK", 5)  # separators and records straddle read chunks
    rng = random.Random(0)
    records = [bytes(rng.choice(b"abc <|>\t") for _ in range(rng.randrange(0, 30))) for _ in range(200)]
    records = [r.replace(sep, b"") for r in records]
    path = tmp_path / "r.txt"
    path.write_bytes(sep.join(records))
    size = path.stat().st_size
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, size), rng.randrange(1, 12)))
        bounds = [0, *cuts, size]
        got, stats = [], ReadStats()
        for a, b in zip(bounds[:-1], bounds[1:]):
            got += [r for _, r in iter_records(Piece(str(path), "text", None, a, b, b - a), sep, stats)]
        assert got == records
        assert stats.bytes == size  # progress adds up to the file


def test_file_pieces_split_only_what_can_be_split(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_bytes(b"x" * 1000)
    plain = InputFile(str(f), "jsonl", None, 1000)
    assert [(p.start, p.end) for p in file_pieces(plain, 300, False)] == [(0, 300), (300, 600), (600, 900),
                                                                           (900, 1000)]
    assert len(file_pieces(InputFile(str(f), "text", None, 1000), 300, False)) == 1  # one document per file
    assert len(file_pieces(InputFile(str(f), "jsonl", "gzip", 1000), 300, False)) == 1


def test_self_overlapping_separators_are_never_cut_mid_file(tmp_path):
    assert splittable_separator("\n") and splittable_separator("<|endoftext|>")
    assert not splittable_separator("\n\n")  # "a\n\n\nb": does "b" or "\nb" start a record?
    f = tmp_path / "p.txt"
    f.write_text("a\n\n\nb\n\nc" * 50)
    [shard] = plan_shards([InputFile(str(f), "text", None, f.stat().st_size)], 10**6,
                          splittable_text=splittable_separator("\n\n"))
    pieces = plan_shards([InputFile(str(f), "text", None, f.stat().st_size)], 16,
                         splittable_text=splittable_separator("\n\n"))
    assert len(pieces) == 1 and pieces[0].pieces == shard.pieces


def test_missing_parquet_column_names_the_columns(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "t.parquet")
    piece = Piece(str(tmp_path / "t.parquet"), "parquet", None, 0, 1, 1)
    with pytest.raises(ValueError, match=r"t\.parquet: no column 'text' \(columns: content\).*--json-keys"):
        list(iter_documents(piece, ("text",), ReadStats()))
    assert list(iter_documents(piece, ("content",), ReadStats())) == [("a",), ("b",)]
