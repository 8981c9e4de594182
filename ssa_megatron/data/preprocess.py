"""Raw text to Megatron indexed data: planned shards, parallel workers, restart, merge.

The inputs are cut into shards (``inputs.plan_shards``) kept in ``<output-prefix>.shards/``
(layout in ``shards``). Each worker process reads its shard's input pieces, tokenises batches
of documents and appends them to its own files (no single writer receiving per-document
objects); only small progress counters travel to the parent. A restart skips every shard whose done-marker and
files check out, so an interrupted run (or a failed SLURM array task) redoes only what is
missing. Shard pairs are published ``.bin`` then ``.idx`` (see ``indexed_writer``), the marker
after both.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import queue
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ssa_megatron.data.encoders import BACKENDS, append_eod, make_encoder
from ssa_megatron.data.exactness import check_exactness, sample_texts
from ssa_megatron.data.indexed_format import token_dtype
from ssa_megatron.data.indexed_writer import IndexedWriter, remove_temporaries
from ssa_megatron.data.inputs import Shard, input_identity, plan_shards, resolve_inputs, splittable_separator
from ssa_megatron.data.readers import ReadStats, iter_documents
from ssa_megatron.data.shards import (done_marker, merge_shards, merged_outputs, read_plan, save_plan,
                                      shard_is_done, shard_prefix, write_json_atomic)
from ssa_megatron.data.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class PreprocessConfig:
    """What ``tools/preprocess_data.py`` does; flag names follow Megatron-LM where it has one."""

    inputs: tuple[str, ...]  # files, globs or directories (--input)
    output_prefix: str  # outputs are <prefix>_<key>_document.{bin,idx} (--output-prefix)
    tokenizer: str  # HF tokenizer directory (--tokenizer)
    json_keys: tuple[str, ...] = ("text",)  # JSONL keys / parquet columns, one output each
    input_format: str = "auto"  # auto (by suffix) | jsonl | text | parquet
    text_separator: str | None = None  # text files: document separator; None = one per file
    workers: int = 1  # worker processes (--workers)
    append_eod: bool = True  # EOS id after every document (--append-eod)
    dtype: str = "auto"  # token dtype: auto (uint16 below 65500 ids, else int32) | uint16 | int32
    backend: str = "hf"  # hf (exact) | gigatoken (fast, checked against hf first)
    allow_inexact: bool = False  # run gigatoken even if it disagrees with hf on the sample
    exactness_sample: int = 1000  # documents compared hf vs gigatoken before running
    shard_size: int | None = None  # input bytes per shard; None: auto (see auto_shard_size)
    batch_size: int = 4 << 20  # text bytes per encode batch
    strict: bool = False  # malformed records fail instead of being counted and skipped
    skip_missing_keys: bool = False  # JSONL records without a --json-keys key: count and skip, not fail
    task_index: int = 0  # this SLURM array task; it takes shards i with i % task_count == index
    task_count: int = 1
    merge: bool = True  # merge all shards into the final outputs when every shard is done
    keep_shards: bool = False  # keep shard files after a merge
    progress: bool = True  # tqdm bar on stderr

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend={self.backend!r}: must be one of {', '.join(BACKENDS)}")
        if self.workers < 1:
            raise ValueError(f"--workers={self.workers}: must be >= 1")
        if not 0 <= self.task_index < self.task_count:
            raise ValueError(f"--task-index={self.task_index}: must be in [0, --task-count={self.task_count})")
        if not self.json_keys or len(set(self.json_keys)) != len(self.json_keys):
            raise ValueError(f"--json-keys={list(self.json_keys)}: give one or more distinct keys")

    @property
    def shards_dir(self) -> str:
        return self.output_prefix + ".shards"

    def keys(self, fmt_is_text: bool) -> tuple[str, ...]:
        return ("text",) if fmt_is_text else self.json_keys


MIN_SHARD, MAX_SHARD = 1 << 20, 256 << 20


def auto_shard_size(total_bytes: int, parallelism: int) -> int:
    """About four shards per worker (load balance), 1 MiB to 256 MiB each."""
    return max(MIN_SHARD, min(MAX_SHARD, -(-total_bytes // (4 * parallelism))))


@dataclass
class ShardStats:
    documents: int = 0
    tokens: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    malformed: int = 0
    empty: int = 0
    fallbacks: int = 0  # documents the fast backend left to hf (see GigatokenEncoder)
    examples: list[str] = field(default_factory=list)
    missing_keys: int = 0  # records without a --json-keys key, skipped (--skip-missing-keys)
    missing_example: str | None = None

    def add(self, other: "ShardStats") -> None:
        for name in ("documents", "tokens", "bytes_in", "bytes_out", "malformed", "empty", "fallbacks",
                     "missing_keys"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.examples.extend(other.examples[: max(0, 5 - len(self.examples))])
        self.missing_example = self.missing_example or other.missing_example


@dataclass(frozen=True)
class Job:
    """Everything a worker needs for one shard (picklable, no open handles)."""

    shard: Shard
    shards_dir: str
    keys: tuple[str, ...]
    dtype: str
    eod: int | None  # None: no EOD appended
    text_separator: str | None
    strict: bool
    batch_size: int
    skip_missing_keys: bool = False


def process_shard(job: Job, encoder, report) -> ShardStats:
    """Tokenise one shard into its own files; ``report(bytes_in, docs, tokens)`` after each batch."""
    index = job.shard.index
    if os.path.exists(done_marker(job.shards_dir, index)):  # redoing a shard that failed its check
        os.unlink(done_marker(job.shards_dir, index))
    writers = [IndexedWriter(shard_prefix(job.shards_dir, k, index), np.dtype(job.dtype)) for k in job.keys]
    stats, read = ShardStats(), ReadStats()
    batch: list[tuple[str, ...]] = []
    fallbacks_before = encoder.fallbacks

    def flush() -> None:
        if not batch:
            return
        docs = tokens = 0
        for k, writer in enumerate(writers):
            texts = [doc[k] for doc in batch if doc[k]]
            stats.empty += len(batch) - len(texts)
            ids, lengths = encoder.encode(texts)
            if job.eod is not None:
                ids, lengths = append_eod(ids, lengths, job.eod)
            writer.add_batch(ids, lengths)
            docs, tokens = docs + len(texts), tokens + len(ids)
        stats.documents += docs
        stats.tokens += tokens
        report(read.bytes - stats.bytes_in, docs, tokens)
        stats.bytes_in = read.bytes
        batch.clear()

    try:
        size = 0  # characters in the batch
        for piece in job.shard.pieces:
            for doc in iter_documents(piece, job.keys, read, text_separator=job.text_separator,
                                      strict=job.strict, skip_missing_keys=job.skip_missing_keys):
                batch.append(doc)
                size += len(doc[0])
                if size >= job.batch_size:
                    flush()
                    size = 0
        flush()
        report(read.bytes - stats.bytes_in, 0, 0)
        stats.bytes_in = read.bytes
        for writer in writers:
            writer.finish()
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    stats.bytes_out = sum(w.num_tokens * w.dtype.itemsize for w in writers)
    stats.malformed, stats.examples = read.malformed, read.examples
    stats.missing_keys, stats.missing_example = read.missing_keys, read.missing_example
    stats.fallbacks = encoder.fallbacks - fallbacks_before
    write_json_atomic(done_marker(job.shards_dir, index), asdict(stats))
    return stats


# ---- worker processes -------------------------------------------------------------------------
_worker: dict = {}


def _init_worker(backend: str, tokenizer_json: str, progress: mp.Queue) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker; workers are the parallelism
    _worker["encoder"] = make_encoder(backend, tokenizer_json)
    _worker["queue"] = progress


def _run_job(job: Job) -> ShardStats:
    q = _worker["queue"]
    return process_shard(job, _worker["encoder"], lambda *counts: q.put(counts))


class _Progress:
    """tqdm over input bytes, with tokens/s; silent when disabled or tqdm is missing."""

    def __init__(self, total_bytes: int, enabled: bool):
        self.tokens, self.start = 0, time.perf_counter()
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, file=sys.stderr,
                            desc="preprocess", smoothing=0.1)

    def __call__(self, nbytes: int, docs: int, tokens: int) -> None:
        self.tokens += tokens
        if self.bar is not None:
            rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{rate / 1e6:.2f}M tok/s", refresh=False)
            self.bar.update(nbytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_jobs(jobs: list[Job], config: PreprocessConfig, tokenizer_json: str,
              progress: _Progress) -> list[ShardStats]:
    if config.workers == 1 or len(jobs) <= 1:
        encoder = make_encoder(config.backend, tokenizer_json)
        return [process_shard(job, encoder, progress) for job in jobs]
    ctx = mp.get_context("spawn")  # a fresh interpreter: no inherited tokenizer thread pools
    q = ctx.Queue()
    with ctx.Pool(min(config.workers, len(jobs)), _init_worker,
                  (config.backend, tokenizer_json, q)) as pool:
        pending = [pool.apply_async(_run_job, (job,)) for job in jobs]
        while not all(r.ready() for r in pending):
            try:
                progress(*q.get(timeout=0.2))
            except queue.Empty:
                pass
            for r in pending:
                if r.ready() and not r.successful():
                    r.get()  # re-raises the worker's exception; the pool is terminated on exit
        while not q.empty():
            progress(*q.get())
        return [r.get() for r in pending]


# ---- the whole run -----------------------------------------------------------------------------
@dataclass
class Summary:
    documents: int
    tokens: int
    bytes_out: int
    bytes_in: int
    seconds: float
    shards_total: int
    shards_run: int
    shards_skipped: int
    malformed: int
    empty: int
    fallbacks: int
    dtype: str
    backend: str
    missing_keys: int
    mismatched: int | None  # gigatoken vs hf on the sample; None for the hf backend
    sampled: int | None
    outputs: list[str]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def line(self) -> str:
        parts = [f"{self.documents:,} documents", f"{self.tokens:,} tokens",
                 f"{self.bytes_out / 1e6:,.1f} MB written ({self.dtype})",
                 f"{self.seconds:.1f} s", f"{self.tokens_per_second / 1e6:.2f}M tokens/s (this run)",
                 f"shards {self.shards_run} run + {self.shards_skipped} already done of {self.shards_total}",
                 f"{self.malformed} malformed and {self.empty} empty records skipped"]
        if self.missing_keys:
            parts.append(f"{self.missing_keys} records without the key skipped (--skip-missing-keys)")
        if self.mismatched is not None:
            parts.append(f"{self.backend} vs hf: {self.mismatched}/{self.sampled} sampled documents differ "
                         f"({100 * self.mismatched / max(self.sampled, 1):.3f}%), {self.fallbacks} documents "
                         "with code points unknown to Python's Unicode database encoded by hf")
        return "preprocess: " + ", ".join(parts)


def _shard_size(config: PreprocessConfig, files) -> int:
    """The explicit size, else an existing plan's (a restart keeps its shards), else automatic."""
    if config.shard_size is not None:
        return config.shard_size
    plan = read_plan(config.shards_dir)
    if plan is not None:
        return plan["settings"]["shard_size"]
    return auto_shard_size(sum(f.size for f in files), config.workers * config.task_count)


def run_preprocess(config: PreprocessConfig) -> Summary:
    """Plan, (re)run this task's unfinished shards, merge if everything is done; return counts."""
    start = time.perf_counter()
    files = resolve_inputs(list(config.inputs), config.input_format)
    for f in files:
        if f.size == 0:
            log.warning("input %s is empty; it contributes no documents", f.path)
    if all(f.size == 0 for f in files):
        raise ValueError(f"every input file is empty ({', '.join(f.path for f in files[:3])}); "
                         "check --input")
    tokenizer = load_tokenizer(config.tokenizer)
    dtype = token_dtype(tokenizer.vocab_size, config.dtype)
    keys = config.keys(all(f.format == "text" for f in files))
    shard_size = _shard_size(config, files)
    shards = plan_shards(files, shard_size, splittable_text=splittable_separator(config.text_separator))
    save_plan(config.shards_dir, {
        "tokenizer_sha256": tokenizer.fingerprint, "dtype": dtype.name, "keys": list(keys),
        "append_eod": config.append_eod, "backend": config.backend, "text_separator": config.text_separator,
        "input_format": config.input_format, "shard_size": shard_size}, shards,
        [input_identity(f) for f in files])
    mismatched = sampled = None
    if config.backend != "hf":
        texts = sample_texts(shards, keys, config.exactness_sample, config.text_separator)
        mismatched, sampled = check_exactness(config.backend, tokenizer.tokenizer_json, texts,
                                              allow_inexact=config.allow_inexact)
    mine = [s for s in shards if s.index % config.task_count == config.task_index]
    merged = merged_outputs(config.shards_dir)  # a finished earlier run: nothing left to do
    todo = [] if merged else [s for s in mine if not shard_is_done(config.shards_dir, keys, s.index)]
    eod = tokenizer.eod if config.append_eod else None
    jobs = [Job(s, config.shards_dir, keys, dtype.name, eod, config.text_separator, config.strict,
                config.batch_size, config.skip_missing_keys) for s in todo]
    progress = _Progress(sum(s.size for s in todo), config.progress)
    try:
        _run_jobs(jobs, config, tokenizer.tokenizer_json, progress)
    finally:
        progress.close()
        for job in jobs:  # after a failure or interrupt: no half-written shard files remain
            for key in keys:
                remove_temporaries(shard_prefix(config.shards_dir, key, job.shard.index))
    total = ShardStats()
    for s in mine:
        with open(done_marker(config.shards_dir, s.index)) as f:
            total.add(ShardStats(**json.load(f)))
    if total.documents == 0 and config.task_count == 1:
        shutil.rmtree(config.shards_dir)  # nothing worth keeping
        raise ValueError(f"no documents found in {', '.join(config.inputs)} (every record was empty, "
                         f"malformed or without the key: {total.malformed} malformed, {total.empty} empty, "
                         f"{total.missing_keys} without the key); check the inputs and --json-keys")
    if total.malformed:
        more = total.malformed - len(total.examples)
        log.warning("skipped %d malformed records (--strict makes them fatal); the first %d:\n  %s%s",
                    total.malformed, len(total.examples), "\n  ".join(total.examples),
                    f"\n  ... and {more} more" if more > 0 else "")
    if total.missing_keys:
        log.warning("skipped %d records without the key (--skip-missing-keys), e.g. %s",
                    total.missing_keys, total.missing_example)
    outputs: list[str] = merged or []
    # Only a single-task run merges by itself: concurrent array tasks would race on the outputs.
    if config.merge and not merged and config.task_count == 1:
        outputs = merge_shards(config.shards_dir, keep_shards=config.keep_shards,
                               output_prefix=config.output_prefix)
    return Summary(documents=total.documents, tokens=total.tokens, bytes_out=total.bytes_out,
                   bytes_in=total.bytes_in, seconds=time.perf_counter() - start,
                   shards_total=len(shards), shards_run=len(todo), shards_skipped=len(mine) - len(todo),
                   malformed=total.malformed, empty=total.empty, fallbacks=total.fallbacks, dtype=dtype.name,
                   backend=config.backend, missing_keys=total.missing_keys, mismatched=mismatched, sampled=sampled, outputs=outputs)
