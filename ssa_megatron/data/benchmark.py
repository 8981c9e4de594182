"""Preprocessing benchmark: our exact and fast paths beside HF encode-only and Megatron's anchors.

``run_benchmark`` builds a code-heavy JSONL corpus from text already on the machine (the
standard library and site-packages ``.py``/``.txt``/``.md``/``.rst`` files, shuffled and
repeated deterministically up to the target size), trains a 32k byte-level BPE on a sample of
it, then times, each in a fresh process with its peak RSS (whole process tree) sampled:

* HF ``tokenizers`` ``encode_batch`` and ``encode_batch_fast`` on 2 threads, encode calls only;
* ``tools/preprocess_data.py --workers 2`` exact (``--backend hf``) and fast (``gigatoken``),
  the whole process from launch to exit (imports, reading, writing, merge);
* the fast path on a quarter of the corpus, to show its memory does not grow with the corpus.

Megatron-LM's tools are not installed here; their figures are the issue's anchors, quoted.
"""

from __future__ import annotations

import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from ssa_megatron.data.tokenizer import train_tokenizer_from_files

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUFFIXES = (".py", ".txt", ".md", ".rst")
# Measured by the author on a 2-core machine, 200 MB code-heavy JSONL, 32k BPE.
ANCHORS = [
    ("HF tokenizers encode_batch, 2 threads (encode only)", 0.99e6),
    ("HF encode_batch_fast, 2 threads (encode only)", 1.28e6),
    ("Megatron-LM tools/preprocess_data.py, 2 workers (whole process)", 0.74e6),
    ("Megatron-LM tools/preprocess_data_fast.py --use-gigatoken (whole process)", 5.1e6),
]
TARGET_EXACT = 1.2 * 0.74e6
TARGET_FAST = 5.1e6


def machine_text_files() -> list[str]:
    """Text files of the Python installation, sorted (stdlib first, then site-packages)."""
    paths = sysconfig.get_paths()
    roots = [paths["stdlib"], paths["purelib"]]
    found = []
    for i, root in enumerate(roots):
        for d, dirs, files in os.walk(root):
            dirs[:] = sorted(x for x in dirs if x != "__pycache__" and (i > 0 or x != "site-packages"))
            found.extend(os.path.join(d, f) for f in sorted(files) if f.endswith(SUFFIXES))
    return found


def build_corpus(path: str, target_bytes: int, seed: int = 0) -> dict:
    """Write a JSONL of ``target_bytes`` (reused if already built with the same recipe)."""
    meta_path = path + ".meta.json"
    recipe = {"target_bytes": target_bytes, "seed": seed, "python": platform.python_version()}
    if os.path.exists(path) and os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta["recipe"] == recipe:
            return meta
    texts = []
    for file in machine_text_files():
        try:
            with open(file, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError):
            continue
        if 0 < len(text) <= 1 << 20:  # skip generated giants (data tables)
            texts.append(text)
    rng = random.Random(seed)
    written = docs = passes = 0
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        while written < target_bytes:
            passes += 1
            rng.shuffle(texts)
            for text in texts:
                line = json.dumps({"text": text}) + "\n"
                out.write(line)
                written += len(line)
                docs += 1
                if written >= target_bytes:
                    break
    os.replace(tmp, path)
    meta = {"recipe": recipe, "bytes": os.path.getsize(path), "documents": docs,
            "unique_documents": len(texts), "passes": passes}  # unique_documents: source files read
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    return meta


@dataclass
class Measurement:
    name: str
    tokens_per_second: float  # tokens / median wall seconds
    seconds: list[float]  # wall time of each run
    cpu_seconds: list[float]  # user + system time of each run's process tree
    tokens: int
    peak_rss_mib: float  # largest over runs, summed over the process tree
    note: str = ""

    @property
    def tokens_per_cpu_second(self) -> float:
        return self.tokens / statistics.median(self.cpu_seconds)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(cmd: list[str], env: dict | None = None) -> tuple[float, float, float, str]:
    """(wall seconds, CPU seconds, peak tree RSS MiB, stdout) of a command; RSS sampled every
    100 ms (sampling costs ~1% of a core); CPU time of every process it waited for (the pool
    workers included)."""
    import psutil

    cpu_before = _children_cpu()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
        except psutil.Error:
            rss = 0
        peak = max(peak, rss)
        time.sleep(0.1)
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return seconds, _children_cpu() - cpu_before, peak / 2**20, out


_ENCODE_ONLY = r"""
import json, sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
with open(sys.argv[2]) as f:
    texts = [json.loads(line)["text"] for line in f]
method = getattr(tok, sys.argv[3])
tokens, seconds = 0, 0.0
for i in range(0, len(texts), 1000):
    t = time.perf_counter()
    encodings = method(texts[i:i + 1000], add_special_tokens=False)
    seconds += time.perf_counter() - t
    tokens += sum(len(e.ids) for e in encodings)
print(json.dumps({"tokens": tokens, "seconds": seconds}))
"""


def measure_encode_only(tokenizer_json: str, corpus: str, method: str, runs: int) -> Measurement:
    results, cpu, peak = [], [], 0.0
    for _ in range(runs):
        _, cpu_seconds, rss, out = _timed([sys.executable, "-c", _ENCODE_ONLY, tokenizer_json, corpus, method],
                                          env={"RAYON_NUM_THREADS": "2"})
        results.append(json.loads(out))
        cpu.append(cpu_seconds)  # includes reading the corpus: a lower bound of tokens per CPU second
        peak = max(peak, rss)
    seconds = [r["seconds"] for r in results]
    tokens = results[0]["tokens"]
    return Measurement(f"HF tokenizers {method}, 2 threads (encode only)", tokens / statistics.median(seconds),
                       seconds, cpu, tokens, peak, "the harness holds the whole corpus in memory")


def measure_preprocess(name: str, corpus: str, tokenizer_dir: str, workdir: str, backend: str,
                       runs: int) -> tuple[Measurement, str]:
    """The measurement and the output prefix of the first run (kept for comparison)."""
    seconds, cpu, peak, tokens = [], [], 0.0, 0
    kept = ""
    for i in range(runs):
        out_prefix = os.path.join(workdir, f"{backend}-{os.path.basename(corpus)}-{i}")
        shutil.rmtree(out_prefix + ".shards", ignore_errors=True)
        cmd = [sys.executable, "tools/preprocess_data.py", "--input", corpus, "--tokenizer", tokenizer_dir,
               "--output-prefix", out_prefix, "--workers", "2", "--backend", backend, "--no-progress"]
        wall, cpu_seconds, rss, out = _timed(cmd)
        summary = next(line for line in out.splitlines() if line.startswith("preprocess:"))
        tokens = int(summary.split(" documents, ")[1].split(" tokens")[0].replace(",", ""))
        seconds.append(wall)
        cpu.append(cpu_seconds)
        peak = max(peak, rss)
        shutil.rmtree(out_prefix + ".shards")
        if i == 0:
            kept = out_prefix + "_text_document"
        else:
            for ext in (".bin", ".idx"):
                os.unlink(out_prefix + "_text_document" + ext)
    note = summary.split("skipped, ")[-1] if backend != "hf" else "tokens identical to HF by construction"
    return Measurement(name, tokens / statistics.median(seconds), seconds, cpu, tokens, peak, note), kept


def _same_files(a: str, b: str) -> bool:
    return all(subprocess.run(["cmp", "-s", a + ext, b + ext]).returncode == 0 for ext in (".bin", ".idx"))


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("tokenizers", "gigatoken", "numpy", "megatron-core"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _cpu_model() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def run_benchmark(workdir: str, *, corpus_mb: int = 256, runs: int = 3, vocab_size: int = 32000,
                  train_mb: int = 32) -> dict:
    """Run everything; return the JSON-able results."""
    os.makedirs(workdir, exist_ok=True)
    corpus = os.path.join(workdir, f"corpus-{corpus_mb}mb.jsonl")
    meta = build_corpus(corpus, corpus_mb << 20)
    tokenizer_dir = os.path.join(workdir, f"bpe{vocab_size}")
    t = time.perf_counter()
    if not os.path.isdir(tokenizer_dir):
        train_tokenizer_from_files([corpus], tokenizer_dir, vocab_size=vocab_size, max_bytes=train_mb << 20)
    train_seconds = time.perf_counter() - t
    quarter = os.path.join(workdir, f"corpus-{corpus_mb // 4}mb.jsonl")
    build_corpus(quarter, (corpus_mb // 4) << 20)
    tokenizer_json = os.path.join(tokenizer_dir, "tokenizer.json")
    load_before = os.getloadavg()
    encode_batch = measure_encode_only(tokenizer_json, corpus, "encode_batch", runs)
    encode_batch_fast = measure_encode_only(tokenizer_json, corpus, "encode_batch_fast", runs)
    exact, exact_out = measure_preprocess("ours, exact (--backend hf), 2 workers (whole process)", corpus,
                                          tokenizer_dir, workdir, "hf", runs)
    fast, fast_out = measure_preprocess("ours, fast (--backend gigatoken), 2 workers (whole process)", corpus,
                                        tokenizer_dir, workdir, "gigatoken", runs)
    small, small_out = measure_preprocess(f"ours, fast, on a quarter of the corpus ({corpus_mb // 4} MB)",
                                          quarter, tokenizer_dir, workdir, "gigatoken", runs)
    identical = _same_files(exact_out, fast_out)
    for prefix in (exact_out, fast_out, small_out):
        for ext in (".bin", ".idx"):
            os.unlink(prefix + ext)
    measured = [encode_batch, encode_batch_fast, exact, fast, small]
    load_after = os.getloadavg()
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": {"cpu": _cpu_model(), "cores": len(os.sched_getaffinity(0)), "platform": platform.platform()},
        "versions": _versions(),
        "corpus": {**meta, "path": os.path.basename(corpus), "tokens": exact.tokens},
        "tokenizer": {"vocab_size": vocab_size, "trained_on_mb": train_mb, "train_seconds": round(train_seconds, 1)},
        "runs": runs,
        "load_average_1_5_15min": {"before": load_before, "after": load_after},
        "anchors_not_remeasured": [{"name": n, "tokens_per_second": v} for n, v in ANCHORS],
        "measured": [{**asdict(m), "tokens_per_cpu_second": m.tokens_per_cpu_second} for m in measured],
        "fast_output_identical_to_exact": identical,
        "targets": {
            "exact_vs_megatron_classic": {"target": TARGET_EXACT, "measured": exact.tokens_per_second,
                                          "met": exact.tokens_per_second >= TARGET_EXACT},
            "fast_vs_megatron_fast": {"target": TARGET_FAST, "measured": fast.tokens_per_second,
                                      "met": fast.tokens_per_second >= TARGET_FAST},
        },
    }


def runs_to_markdown(runs: dict[str, dict]) -> str:
    """One section per labelled run, anchors beside our figures in each."""
    head = ["# Preprocessing benchmark", "",
            "Written by `tools/benchmark_preprocess.py` (one section per `--label`). The Megatron-LM rows "
            "are the issue's anchors (2 cores, 200 MB code-heavy JSONL, 54.7M tokens, 32k byte-level BPE); "
            "Megatron-LM's tools are not installed here and were not re-measured.", ""]
    return "\n".join(head + [to_markdown(r, label) for label, r in runs.items()])


def to_markdown(r: dict, label: str) -> str:
    """The results table of one run (anchors beside our figures) and its setting."""
    v = r["versions"]
    lines = [
        f"## {label}",
        "",
        *([r["note"], ""] if r.get("note") else []),
        f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores ({r['machine']['platform']}); "
        f"date {r['date']}; Python {v['python']}, tokenizers {v['tokenizers']}, gigatoken {v['gigatoken']}, "
        f"numpy {v['numpy']}, megatron-core {v['megatron-core']}.",
        "",
        f"Corpus: {r['corpus']['bytes'] / 1e6:.0f} MB JSONL built by `tools/benchmark_preprocess.py` from the "
        f"machine's Python sources and docs ({r['corpus']['documents']:,} documents drawn from "
        f"{r['corpus']['unique_documents']:,} files, {r['corpus']['tokens'] / 1e6:.1f}M tokens); byte-level BPE of "
        f"{r['tokenizer']['vocab_size']:,} trained on its first {r['tokenizer']['trained_on_mb']} MB. "
        f"Medians of {r['runs']} runs. Tokens/s is over wall time; tokens per CPU-second (user + system "
        "time of the whole process tree) is less sensitive to other load on the machine. Peak RSS is the "
        "largest over runs, summed over the process tree. Load average (1/5/15 min) before: "
        f"{', '.join(f'{x:.1f}' for x in r['load_average_1_5_15min']['before'])}, after: "
        f"{', '.join(f'{x:.1f}' for x in r['load_average_1_5_15min']['after'])}.",
        "",
        "| method | tokens/s | tokens/CPU-s | peak RSS | source |",
        "|---|---:|---:|---:|---|",
    ]
    for a in r["anchors_not_remeasured"]:
        lines.append(f"| {a['name']} | {a['tokens_per_second'] / 1e6:.2f} M | | | issue anchor, not re-measured |")
    for m in r["measured"]:
        note = f" ({m['note']})" if m["note"] else ""
        lines.append(f"| {m['name']} | {m['tokens_per_second'] / 1e6:.2f} M | {m['tokens_per_cpu_second'] / 1e6:.2f} M "
                     f"| {m['peak_rss_mib']:,.0f} MiB | measured{note} |")
    t = r["targets"]
    lines += [
        "",
        "| target | needed | measured | met |",
        "|---|---:|---:|---|",
        f"| exact path >= 1.2x Megatron-LM classic (0.74 M) | {t['exact_vs_megatron_classic']['target'] / 1e6:.2f} M "
        f"| {t['exact_vs_megatron_classic']['measured'] / 1e6:.2f} M | "
        f"{'yes' if t['exact_vs_megatron_classic']['met'] else 'no'} |",
        f"| fast path >= Megatron-LM fast (5.1 M) | {t['fast_vs_megatron_fast']['target'] / 1e6:.2f} M "
        f"| {t['fast_vs_megatron_fast']['measured'] / 1e6:.2f} M | "
        f"{'yes' if t['fast_vs_megatron_fast']['met'] else 'no'} |",
        "",
        f"The fast path's `.bin`/`.idx` were {'byte-identical' if r['fast_output_identical_to_exact'] else 'NOT identical'} "
        "to the exact path's on this corpus.",
        "",
    ]
    return "\n".join(lines)
