"""Stream documents out of input pieces (JSONL, plain text, parquet; gzip/zstd compressed).

``iter_documents`` yields one tuple of texts per document (one text per key) and never holds
more than a read chunk plus one record in memory. Bad records are counted in ``ReadStats``
(the first few described by file and line, for the caller's warning) and skipped, or raise with
``strict``; a missing key is an error (it almost always means a wrong ``--json-keys``) unless
``skip_missing_keys``, then such records are counted apart and skipped.
"""

from __future__ import annotations

import gzip
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ssa_megatron.data.inputs import InputFile, Piece, file_pieces, splittable_separator

CHUNK = 1 << 22  # bytes read at a time from an input file
_SURROGATE = re.compile("[\ud800-\udfff]")
MAX_EXAMPLES = 5  # malformed records described per reader (all are counted)


@dataclass
class ReadStats:
    """Counters of one reader; ``bytes`` is on-disk input consumed (for progress)."""

    bytes: int = 0
    malformed: int = 0
    examples: list[str] = field(default_factory=list)
    missing_keys: int = 0  # records without a --json-keys key (skipped with skip_missing_keys)
    missing_example: str | None = None


class MalformedInput(ValueError):
    """A record that cannot be read, raised only in strict mode."""


def open_binary(path: str, compression: str | None) -> tuple[io.BufferedIOBase, io.BufferedIOBase]:
    """(decompressed stream, raw file); progress is measured on the raw file."""
    raw = open(path, "rb")
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    if compression == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(raw, read_size=CHUNK), raw
    return raw, raw


def _skip_through(f, sep: bytes) -> int:
    """Read past the next ``sep``; return the bytes consumed (all that remained if none)."""
    consumed, tail = 0, b""
    while chunk := f.read(CHUNK):
        data = tail + chunk
        at = data.find(sep)
        if at >= 0:
            consumed += at + len(sep) - len(tail)
            f.seek(f.tell() - (len(data) - at - len(sep)))
            return consumed
        consumed += len(chunk)
        tail = data[-(len(sep) - 1):] if len(sep) > 1 else b""
    return consumed


def iter_records(piece: Piece, sep: bytes, stats: ReadStats) -> Iterator[tuple[int, bytes]]:
    """(offset, record) for the ``sep``-delimited records that start inside the piece."""
    f, raw = open_binary(piece.path, piece.compression)
    with raw, f:  # GzipFile does not close the file it wraps
        pos = 0
        if piece.start > 0:
            # Records start at 0 and right after each separator; the first one at or after
            # ``start`` follows the first separator ending there, which begins >= start - len(sep).
            # (Valid for separators that cannot overlap themselves; see inputs.splittable_separator.)
            back = min(piece.start, len(sep))
            f.seek(piece.start - back)
            pos = piece.start - back + _skip_through(f, sep)
        base, reported = raw.tell(), 0
        pending: list[bytes] = []
        while pos < piece.end:
            chunk = f.read(CHUNK)
            if chunk and sep not in chunk:  # inside a long record: collect, join once
                pending.append(chunk)
                continue
            parts = b"".join([*pending, chunk]).split(sep)
            pending = [parts.pop()] if chunk else []
            for part in parts:
                if pos >= piece.end:
                    break
                yield pos, part
                pos += len(part) + len(sep)
            done = min(raw.tell() - base, piece.size)
            stats.bytes += done - reported
            reported = done
            if not chunk:
                break
        stats.bytes += piece.size - reported  # progress ends at exactly the piece size


def _line_number(piece: Piece, offset: int) -> str:
    """Human position of a record: a line number (counted on demand) or the byte offset."""
    if piece.compression is not None:
        return f"byte {offset} (decompressed)"
    with open(piece.path, "rb") as f:
        lines, remaining = 1, offset
        while remaining > 0:
            chunk = f.read(min(CHUNK, remaining))
            if not chunk:
                break
            lines += chunk.count(b"\n")
            remaining -= len(chunk)
    return f"line {lines}"


class _Locator:
    """``file:line N`` of a record. From a piece that starts the file, lines are counted as records
    stream by (also inside compressed files); a piece starting mid-file counts on demand."""

    def __init__(self, piece: Piece, sep: bytes):
        self.piece, self.sep = piece, sep
        self.next_line = 1 if piece.start == 0 else None
        self.line = self.offset = 0

    def begin(self, offset: int, record: bytes) -> None:
        """Call for every record, in order, before ``where``."""
        self.offset = offset
        if self.next_line is not None:
            self.line = self.next_line
            self.next_line += 1 if self.sep == b"\n" else record.count(b"\n") + self.sep.count(b"\n")

    def where(self) -> str:
        if self.next_line is not None:
            return f"{self.piece.path}:line {self.line}"
        return f"{self.piece.path}:{_line_number(self.piece, self.offset)}"


def _malformed(stats: ReadStats, strict: bool, where: Callable[[], str], why: str) -> None:
    """Count a bad record (describing the first few), or raise in strict mode. ``where`` is
    computed only when used (counting lines is slow)."""
    if strict:
        raise MalformedInput(f"{where()}: {why}; fix the input or drop --strict to count and skip "
                             "bad records")
    stats.malformed += 1
    if len(stats.examples) < MAX_EXAMPLES:
        stats.examples.append(f"{where()}: {why}")


def _jsonl_documents(piece: Piece, keys: tuple[str, ...], stats: ReadStats, strict: bool,
                     skip_missing_keys: bool = False) -> Iterator[tuple[str, ...]]:
    locator = _Locator(piece, b"\n")
    where = locator.where
    for offset, record in iter_records(piece, b"\n", stats):
        locator.begin(offset, record)
        if not record.strip():
            continue
        try:
            obj = json.loads(record)
        except ValueError as e:
            _malformed(stats, strict, where, f"not valid JSON ({e})")
            continue
        if not isinstance(obj, dict):
            _malformed(stats, strict, where, f"a JSON {type(obj).__name__}, not an object")
            continue
        try:
            texts = tuple(obj[k] for k in keys)
        except KeyError as e:
            message = (f"{where()}: no key {e.args[0]!r} in the JSON object (its keys: "
                       f"{', '.join(map(repr, list(obj)[:10]))})")
            if not skip_missing_keys:
                raise ValueError(f"{message}; pass --json-keys with the key that holds the text, or "
                                 "--skip-missing-keys to skip and count such records") from None
            stats.missing_keys += 1
            stats.missing_example = stats.missing_example or message
            continue
        if not all(isinstance(t, str) for t in texts):
            _malformed(stats, strict, where, f"the value of {keys} is not a string")
            continue
        if any(not t.isascii() and _SURROGATE.search(t) for t in texts):  # JSON "\ud800" escapes
            _malformed(stats, strict, where,
                       "text holds a lone UTF-16 surrogate (invalid Unicode, no tokenizer accepts it)")
            continue
        yield texts


def _text_documents(piece: Piece, separator: str | None, stats: ReadStats,
                    strict: bool) -> Iterator[tuple[str, ...]]:
    if separator is None:  # the whole file is one document
        f, raw = open_binary(piece.path, piece.compression)
        with raw, f:
            records = [(0, f.read())]
        stats.bytes += piece.size
        locator = _Locator(piece, b"")
    else:
        records = iter_records(piece, separator.encode("utf-8"), stats)
        locator = _Locator(piece, separator.encode("utf-8"))
    for offset, record in records:
        locator.begin(offset, record)
        if not record:
            continue
        try:
            yield (record.decode("utf-8"),)
        except UnicodeDecodeError as e:
            _malformed(stats, strict, locator.where, f"not UTF-8 text ({e})")


def _parquet_documents(piece: Piece, keys: tuple[str, ...], stats: ReadStats,
                       strict: bool) -> Iterator[tuple[str, ...]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(piece.path)
    names = pf.schema_arrow.names
    missing = [k for k in keys if k not in names]
    if missing:
        raise ValueError(f"{piece.path}: no column {missing[0]!r} (columns: {', '.join(names[:10])}); "
                         "pass --json-keys with the column that holds the text")
    meta = pf.metadata
    for rg in range(piece.start, piece.end):
        for batch in pf.iter_batches(batch_size=4096, row_groups=[rg], columns=list(keys)):
            columns = [batch.column(k).to_pylist() for k in keys]
            for row, texts in enumerate(zip(*columns)):
                if not all(isinstance(t, str) for t in texts):
                    _malformed(stats, strict, lambda: f"{piece.path}: row group {rg}, row {row}",
                               "null or non-string text")
                    continue
                yield texts
        stats.bytes += sum(meta.row_group(rg).column(c).total_compressed_size
                           for c in range(meta.num_columns))


def iter_documents(piece: Piece, keys: tuple[str, ...], stats: ReadStats, *,
                   text_separator: str | None = None, strict: bool = False,
                   skip_missing_keys: bool = False) -> Iterator[tuple[str, ...]]:
    """Documents of one piece as tuples aligned with ``keys`` (text files have one text)."""
    if piece.format == "jsonl":
        return _jsonl_documents(piece, keys, stats, strict, skip_missing_keys)
    if piece.format == "parquet":
        return _parquet_documents(piece, keys, stats, strict)
    return _text_documents(piece, text_separator, stats, strict)


def iter_texts(files: list[InputFile], keys: tuple[str, ...], stats: ReadStats, *,
               text_separator: str | None = None, max_bytes: int | None = None,
               strict: bool = False) -> Iterator[str]:
    """Every non-empty text of the files, in order, stopping after ``max_bytes`` characters
    (a sample for tokenizer training)."""
    seen = 0
    for f in files:
        for piece in file_pieces(f, 1 << 62, splittable_separator(text_separator)):
            for doc in iter_documents(piece, keys, stats, text_separator=text_separator,
                                      strict=strict):
                for text in doc:
                    if text:
                        yield text
                        seen += len(text)
                        if max_bytes is not None and seen >= max_bytes:
                            return
