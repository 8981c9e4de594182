"""Raw text to Megatron indexed data: planned shards, parallel workers, restart, merge.

Layout for ``--output-prefix out/corpus`` and ``--json-keys text``::

    out/corpus.shards/plan.json             inputs cut into shards + the settings (restart check)
    out/corpus.shards/text-00007.{bin,idx}  shard 7, written by one worker
    out/corpus.shards/00007.done.json       shard 7's counters, written last: "shard finished"
    out/corpus_text_document.{bin,idx}      the merged result (Megatron-LM's naming)

Each worker process reads its shard's input pieces, tokenises batches of documents and
appends them to its own files (no single writer receiving per-document objects); only small
progress counters travel to the parent. A restart skips every shard whose done-marker and
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

from ssa_megatron.data.encoders import BACKENDS, append_eod, make_encoder, mismatch_rate
from ssa_megatron.data.indexed_format import read_header, token_dtype
from ssa_megatron.data.indexed_writer import IndexedWriter, remove_pair, remove_temporaries
from ssa_megatron.data.inputs import Shard, plan_shards, resolve_inputs
from ssa_megatron.data.merge import merge_datasets
from ssa_megatron.data.readers import ReadStats, iter_documents
from ssa_megatron.data.tokenizer import load_tokenizer

log = logging.getLogger(__name__)
PLAN_VERSION = 1
SAMPLE_CHARS = 4096  # characters of each sampled document compared hf vs fast backend


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


def output_prefix_for(output_prefix: str, key: str) -> str:
    """Megatron-LM's name for a preprocessed key: ``<prefix>_<key>_document``."""
    return f"{output_prefix}_{key}_document"


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

    def add(self, other: "ShardStats") -> None:
        for name in ("documents", "tokens", "bytes_in", "bytes_out", "malformed", "empty", "fallbacks"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.examples.extend(other.examples[: max(0, 5 - len(self.examples))])


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


def shard_prefix(shards_dir: str, key: str, index: int) -> str:
    return os.path.join(shards_dir, f"{key}-{index:05d}")


def done_marker(shards_dir: str, index: int) -> str:
    return os.path.join(shards_dir, f"{index:05d}.done.json")


def shard_is_done(shards_dir: str, keys: tuple[str, ...], index: int) -> bool:
    """Finished = marker written (last) and every key's pair passes the header/size check."""
    if not os.path.isfile(done_marker(shards_dir, index)):
        return False
    try:
        for key in keys:
            read_header(shard_prefix(shards_dir, key, index))
    except (OSError, ValueError) as e:
        log.warning("shard %d will be redone: %s", index, e)
        return False
    return True


def _atomic_write_json(path: str, obj) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


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
                                      strict=job.strict):
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
    stats.fallbacks = encoder.fallbacks - fallbacks_before
    _atomic_write_json(done_marker(job.shards_dir, index), asdict(stats))
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
        if self.mismatched is not None:
            parts.append(f"{self.backend} vs hf: {self.mismatched}/{self.sampled} sampled documents differ "
                         f"({100 * self.mismatched / max(self.sampled, 1):.3f}%), {self.fallbacks} documents "
                         "with code points unknown to Python's Unicode database encoded by hf")
        return "preprocess: " + ", ".join(parts)


def _plan_path(config: PreprocessConfig) -> str:
    return os.path.join(config.shards_dir, "plan.json")


def _shard_size(config: PreprocessConfig, files) -> int:
    """The explicit size, else an existing plan's (a restart keeps its shards), else automatic."""
    if config.shard_size is not None:
        return config.shard_size
    if os.path.isfile(_plan_path(config)):
        with open(_plan_path(config)) as f:
            return json.load(f)["settings"]["shard_size"]
    return auto_shard_size(sum(f.size for f in files), config.workers * config.task_count)


def _settings(config: PreprocessConfig, tokenizer, dtype: np.dtype, keys, shard_size: int) -> dict:
    return {"version": PLAN_VERSION, "tokenizer_sha256": tokenizer.fingerprint, "dtype": dtype.name,
            "keys": list(keys), "append_eod": config.append_eod, "backend": config.backend,
            "text_separator": config.text_separator, "input_format": config.input_format,
            "shard_size": shard_size}


def _load_or_write_plan(config: PreprocessConfig, settings: dict, shards: list[Shard]) -> None:
    """Persist the plan; on restart refuse to mix shards of different inputs or settings."""
    os.makedirs(config.shards_dir, exist_ok=True)
    path = _plan_path(config)
    plan = {"settings": settings, "shards": [s.to_json() for s in shards]}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old != plan:
            what = [k for k in settings if old.get("settings", {}).get(k) != settings[k]] or ["input files"]
            raise ValueError(
                f"{config.shards_dir} holds shards of a different run ({', '.join(what)} changed); "
                "delete that directory to start over, or use another --output-prefix")
        return
    _atomic_write_json(path, plan)


def _sample_texts(shards: list[Shard], keys, config: PreprocessConfig) -> list[str]:
    """Up to ``exactness_sample`` texts from the starts of up to 16 evenly spaced shards, each
    cut to its first ``SAMPLE_CHARS`` characters so the check stays about a second long."""
    picked = shards[:: max(1, len(shards) // 16)][:16]
    per_shard = max(1, config.exactness_sample // len(picked))
    texts: list[str] = []
    for shard in picked:
        taken, stats = 0, ReadStats()
        for piece in shard.pieces:
            for doc in iter_documents(piece, keys, stats, text_separator=config.text_separator):
                texts.extend(t[:SAMPLE_CHARS] for t in doc if t)
                taken += 1
                if taken >= per_shard:
                    break
            if taken >= per_shard:
                break
    return texts[: config.exactness_sample]


def check_exactness(config: PreprocessConfig, tokenizer_json: str, shards, keys) -> tuple[int, int]:
    """Compare the fast backend with hf on a sample; refuse a mismatch unless allowed."""
    texts = _sample_texts(shards, keys, config)
    different, total = mismatch_rate(make_encoder("hf", tokenizer_json),
                                     make_encoder(config.backend, tokenizer_json), texts)
    if different and not config.allow_inexact:
        raise ValueError(
            f"--backend {config.backend} tokenised {different} of {total} sampled documents differently "
            f"from the Hugging Face tokenizer ({100 * different / total:.3f}%); use --backend hf for "
            "exact tokens, or pass --allow-inexact to accept the difference")
    if different:
        log.warning("%s differs from hf on %d/%d sampled documents; continuing (--allow-inexact)",
                    config.backend, different, total)
    return different, total


def _merged_marker(shards_dir: str) -> str:
    return os.path.join(shards_dir, "merged.json")


def merged_outputs(shards_dir: str) -> list[str] | None:
    """The outputs of an earlier complete merge of this shard directory, if they still check out."""
    try:
        with open(_merged_marker(shards_dir)) as f:
            outputs = json.load(f)["outputs"]
        for out in outputs:
            read_header(out)
    except (OSError, ValueError, KeyError):
        return None
    return outputs


def merge_shards(shards_dir: str, *, keep_shards: bool = False, output_prefix: str | None = None) -> list[str]:
    """Merge a finished shard directory into ``<output_prefix>_<key>_document`` per key.

    ``output_prefix`` defaults to the shard directory's name without ``.shards``.
    """
    plan_path = os.path.join(shards_dir, "plan.json")
    if not os.path.isfile(plan_path):
        raise FileNotFoundError(f"{plan_path} not found; pass the .shards directory written by "
                                "tools/preprocess_data.py")
    with open(plan_path) as f:
        plan = json.load(f)
    keys, indices = tuple(plan["settings"]["keys"]), [s["index"] for s in plan["shards"]]
    missing = [i for i in indices if not shard_is_done(shards_dir, keys, i)]
    if missing:
        raise ValueError(
            f"{shards_dir}: {len(missing)} of {len(indices)} shards are not finished (e.g. {missing[:5]}); "
            "re-run the preprocessing tasks that own them (shard i belongs to task i % task_count)")
    output_prefix = output_prefix or shards_dir.removesuffix(".shards")
    if os.path.exists(_merged_marker(shards_dir)):
        os.unlink(_merged_marker(shards_dir))
    outputs = []
    for key in keys:
        out = output_prefix_for(output_prefix, key)
        merge_datasets([shard_prefix(shards_dir, key, i) for i in indices], out)
        outputs.append(out)
    _atomic_write_json(_merged_marker(shards_dir), {"outputs": outputs})
    if not keep_shards:
        for i in indices:
            for key in keys:
                remove_pair(shard_prefix(shards_dir, key, i))
    return outputs


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
    shards = plan_shards(files, shard_size, splittable_text=config.text_separator is not None)
    settings = _settings(config, tokenizer, dtype, keys, shard_size)
    _load_or_write_plan(config, settings, shards)
    mismatched = sampled = None
    if config.backend != "hf":
        mismatched, sampled = check_exactness(config, tokenizer.tokenizer_json, shards, keys)
    mine = [s for s in shards if s.index % config.task_count == config.task_index]
    merged = merged_outputs(config.shards_dir)  # a finished earlier run: nothing left to do
    todo = [] if merged else [s for s in mine if not shard_is_done(config.shards_dir, keys, s.index)]
    eod = tokenizer.eod if config.append_eod else None
    jobs = [Job(s, config.shards_dir, keys, dtype.name, eod, config.text_separator, config.strict,
                config.batch_size) for s in todo]
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
        raise ValueError(f"no documents found in {', '.join(config.inputs)} (every record was empty "
                         f"or malformed: {total.malformed} malformed, {total.empty} empty); check the "
                         "inputs and --json-keys")
    if total.malformed:
        log.warning("skipped %d malformed records (--strict makes them fatal), e.g.:\n  %s",
                    total.malformed, "\n  ".join(total.examples))
    outputs: list[str] = merged or []
    # Only a single-task run merges by itself: concurrent array tasks would race on the outputs.
    if config.merge and not merged and config.task_count == 1:
        outputs = merge_shards(config.shards_dir, keep_shards=config.keep_shards,
                               output_prefix=config.output_prefix)
    return Summary(documents=total.documents, tokens=total.tokens, bytes_out=total.bytes_out,
                   bytes_in=total.bytes_in, seconds=time.perf_counter() - start,
                   shards_total=len(shards), shards_run=len(todo), shards_skipped=len(mine) - len(todo),
                   malformed=total.malformed, empty=total.empty, fallbacks=total.fallbacks, dtype=dtype.name,
                   backend=config.backend, mismatched=mismatched, sampled=sampled, outputs=outputs)
