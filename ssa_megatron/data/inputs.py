"""Find input files and cut them into shards of roughly equal size, deterministically.

A shard is the unit of work (one worker, one set of output files) and of restart. It is a list
of pieces: a byte range of an uncompressed JSONL or separator-delimited text file, a range of
parquet row groups, or a whole file (compressed files, whole-file text documents). The plan
depends only on the sorted file list, file sizes and ``shard_bytes``, so every SLURM array
task computes the same plan and ``--workers`` never changes the output.
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import asdict, dataclass

FORMATS = ("jsonl", "text", "parquet")
COMPRESSION_SUFFIXES = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_SUFFIXES = (".txt", ".text", ".md")
# Files a directory or glob contributes when --input-format is auto.
KNOWN_SUFFIXES = JSONL_SUFFIXES + TEXT_SUFFIXES + (".parquet",)
TO_END = 1 << 62  # Piece.end of a compressed file: no byte limit


@dataclass(frozen=True)
class InputFile:
    path: str
    format: str  # jsonl | text | parquet
    compression: str | None  # gzip | zstd | None
    size: int  # bytes on disk


@dataclass(frozen=True)
class Piece:
    """Part of one input file: bytes [start, end) for splittable files (a record belongs to the
    piece its first byte lies in), row groups [start, end) for parquet, else the whole file."""

    path: str
    format: str
    compression: str | None
    start: int
    end: int
    size: int  # on-disk bytes this piece covers (progress and balancing)


@dataclass(frozen=True)
class Shard:
    index: int
    pieces: tuple[Piece, ...]

    @property
    def size(self) -> int:
        return sum(p.size for p in self.pieces)

    def to_json(self) -> dict:
        return {"index": self.index, "pieces": [asdict(p) for p in self.pieces]}

    @staticmethod
    def from_json(d: dict) -> "Shard":
        return Shard(d["index"], tuple(Piece(**p) for p in d["pieces"]))


def parse_size(text: str) -> int:
    """A byte count from the command line: '256M' -> 268435456, '2G', '64K', or plain bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    clean = text.strip().upper().removesuffix("B")
    try:
        if clean and clean[-1] in units:
            return int(float(clean[:-1]) * units[clean[-1]])
        return int(clean)
    except ValueError:
        raise ValueError(f"size {text!r}: expected bytes or a number with K/M/G/T, e.g. 256M") from None


def _split_suffix(path: str) -> tuple[str, str | None]:
    """(format suffix, compression) of a file name, e.g. 'a.jsonl.zst' -> ('.jsonl', 'zstd')."""
    root, ext = os.path.splitext(path.lower())
    compression = COMPRESSION_SUFFIXES.get(ext)
    if compression:
        ext = os.path.splitext(root)[1]
    return ext, compression


def splittable_separator(separator: str | None) -> bool:
    """Whether files delimited by ``separator`` can be cut at arbitrary bytes: a reader starting
    mid-file must find record starts unambiguously, which fails for separators that overlap
    themselves (e.g. "\\n\\n" inside "\\n\\n\\n"); such files are read whole."""
    if not separator:
        return False
    sep = separator.encode("utf-8")
    return not any(sep[:k] == sep[-k:] for k in range(1, len(sep)))


def detect_format(path: str, input_format: str = "auto") -> tuple[str, str | None]:
    ext, compression = _split_suffix(path)
    if input_format != "auto":
        if input_format not in FORMATS:
            raise ValueError(f"--input-format={input_format!r}: must be auto, {', '.join(FORMATS)}")
        return input_format, compression
    if ext in JSONL_SUFFIXES:
        return "jsonl", compression
    if ext == ".parquet":
        return "parquet", None
    return "text", compression


def resolve_inputs(patterns: list[str], input_format: str = "auto") -> list[InputFile]:
    """Expand files, globs and directories (recursively) into a sorted, de-duplicated list.

    Directories and globs keep only known data suffixes (``.jsonl``, ``.json``, ``.txt``,
    ``.parquet``, optionally ``.gz``/``.zst``) unless ``input_format`` is given; a file named
    explicitly is always taken. Raises FileNotFoundError naming a pattern that matches nothing.
    """
    if not patterns:
        raise ValueError("--input: give at least one file, glob or directory")
    paths: list[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = [os.path.join(d, f) for d, _, files in os.walk(pattern) for f in files]
        elif glob.has_magic(pattern):
            found = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
        elif os.path.isfile(pattern):
            paths.append(pattern)
            continue
        else:
            raise FileNotFoundError(f"--input {pattern!r}: no such file or directory")
        found = sorted(p for p in found if not os.path.basename(p).startswith(".")
                       and (input_format != "auto" or _split_suffix(p)[0] in KNOWN_SUFFIXES))
        if not found:
            raise FileNotFoundError(
                f"--input {pattern!r}: no input files there (looked for {', '.join(KNOWN_SUFFIXES)}, "
                "optionally .gz/.zst); pass --input-format to take other files")
        paths.extend(found)
    files, seen = [], set()
    for path in paths:
        real = os.path.realpath(path)
        if real in seen:
            continue
        seen.add(real)
        fmt, compression = detect_format(path, input_format)
        files.append(InputFile(os.path.abspath(path), fmt, compression, os.path.getsize(path)))
    return files


FINGERPRINT_BLOCK = 1 << 16


def input_identity(f: InputFile) -> dict:
    """What a restart compares to know an input is the one the shards were cut from: size,
    modification time and a content fingerprint (sha256 of the first, middle and last 64 KiB,
    so it costs three reads whatever the size)."""
    st = os.stat(f.path)
    digest = hashlib.sha256()
    with open(f.path, "rb") as fh:
        for start in sorted({0, max(0, st.st_size // 2 - FINGERPRINT_BLOCK // 2), max(0, st.st_size - FINGERPRINT_BLOCK)}):
            fh.seek(start)
            digest.update(fh.read(FINGERPRINT_BLOCK))
    return {"path": f.path, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest.hexdigest()[:16]}


def file_pieces(f: InputFile, shard_bytes: int, splittable_text: bool) -> list[Piece]:
    """Cut one file into pieces of about ``shard_bytes`` where its format allows."""
    if f.format == "parquet":
        import pyarrow.parquet as pq  # only parquet inputs pay for the import

        meta = pq.ParquetFile(f.path).metadata
        sizes = [sum(meta.row_group(i).column(c).total_compressed_size
                     for c in range(meta.num_columns)) for i in range(meta.num_row_groups)]
        pieces, start, acc = [], 0, 0
        for i, size in enumerate(sizes):
            acc += size
            if acc >= shard_bytes or i == len(sizes) - 1:
                pieces.append(Piece(f.path, f.format, None, start, i + 1, acc))
                start, acc = i + 1, 0
        return pieces
    if f.compression is not None:  # offsets inside are decompressed bytes: read to the end
        return [Piece(f.path, f.format, f.compression, 0, TO_END, f.size)]
    if not (f.format == "jsonl" or splittable_text) or f.size <= shard_bytes:
        return [Piece(f.path, f.format, None, 0, f.size, f.size)]
    bounds = list(range(0, f.size, shard_bytes)) + [f.size]
    return [Piece(f.path, f.format, None, a, b, b - a) for a, b in zip(bounds[:-1], bounds[1:])]


def plan_shards(files: list[InputFile], shard_bytes: int, *, splittable_text: bool = False) -> list[Shard]:
    """Pack the files' pieces, in order, into shards of about ``shard_bytes`` each.

    ``splittable_text`` is true when text files hold separator-delimited documents (a text file
    without a separator is a single document and cannot be split).
    """
    if shard_bytes <= 0:
        raise ValueError(f"--shard-size must be positive, got {shard_bytes} bytes")
    shards: list[Shard] = []
    current: list[Piece] = []
    for f in files:
        for piece in file_pieces(f, shard_bytes, splittable_text):
            if current and sum(p.size for p in current) + piece.size > shard_bytes:
                shards.append(Shard(len(shards), tuple(current)))
                current = []
            current.append(piece)
    if current:
        shards.append(Shard(len(shards), tuple(current)))
    return shards
