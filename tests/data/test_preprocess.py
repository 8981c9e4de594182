"""Preprocessing: round trip through Megatron's reader, shards/workers/merge equivalence,
restart after a crash, input formats, and every bad input's error."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from data_helpers import REPO, make_documents, run_tool, write_jsonl
from ssa_megatron.data import exactness, preprocess
from ssa_megatron.data.preprocess import PreprocessConfig, run_preprocess
from ssa_megatron.data.tokenizer import load_tokenizer


def _config(inputs, out, tokenizer_dir, **kw) -> PreprocessConfig:
    return PreprocessConfig(inputs=tuple(map(str, inputs)), output_prefix=str(out), tokenizer=tokenizer_dir,
                            progress=False, **kw)


def _bytes(prefix: str) -> tuple[bytes, bytes]:
    with open(prefix + ".bin", "rb") as b, open(prefix + ".idx", "rb") as i:
        return b.read(), i.read()


def _megatron_documents(prefix: str) -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [np.array(ds[i]) for i in range(len(ds))]


def test_round_trip_through_megatron_indexed_dataset_gives_the_original_documents(
        tmp_path, corpus_jsonl, documents, tokenizer_dir):
    summary = run_preprocess(_config([corpus_jsonl], tmp_path / "out", tokenizer_dir))
    prefix = str(tmp_path / "out_text_document")
    assert summary.outputs == [prefix] and summary.documents == len(documents)
    tok = load_tokenizer(tokenizer_dir)
    docs = _megatron_documents(prefix)
    assert len(docs) == len(documents)
    assert all(d[-1] == tok.eod and tok.eod not in d[:-1] for d in docs)
    assert [tok.decode(d[:-1]) for d in docs] == documents
    assert summary.tokens == sum(len(d) for d in docs) and summary.bytes_out == 2 * summary.tokens
    assert docs[0].dtype == np.uint16


def test_shards_from_two_workers_merged_equal_a_single_process_run_byte_for_byte(
        tmp_path, corpus_jsonl, tokenizer_dir):
    run_preprocess(_config([corpus_jsonl], tmp_path / "single", tokenizer_dir, shard_size=1 << 30))
    summary = run_preprocess(_config([corpus_jsonl], tmp_path / "sharded", tokenizer_dir,
                                     shard_size=8 << 10, workers=2, batch_size=2000))
    assert summary.shards_total >= 5
    assert _bytes(str(tmp_path / "single_text_document")) == _bytes(str(tmp_path / "sharded_text_document"))


def test_text_parquet_gzip_and_zstd_inputs_give_the_same_tokens(tmp_path, documents, tokenizer_dir):
    pa = pytest.importorskip("pyarrow")  # the [data] extra
    pq = pytest.importorskip("pyarrow.parquet")
    zstandard = pytest.importorskip("zstandard")

    docs = documents[:40]
    plain = write_jsonl(tmp_path / "a.jsonl", docs)
    with open(plain, "rb") as f:
        raw = f.read()
    with gzip.open(tmp_path / "b.jsonl.gz", "wb") as f:
        f.write(raw)
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    pq.write_table(pa.table({"text": docs}), tmp_path / "d.parquet", row_group_size=7)
    (tmp_path / "e.txt").write_text("\f".join(docs), encoding="utf-8")
    expected = None
    for name, kw in [("a.jsonl", {}), ("b.jsonl.gz", {}), ("c.jsonl.zst", {}), ("d.parquet", {"shard_size": 1}),
                     ("e.txt", {"text_separator": "\f", "shard_size": 2000})]:
        out = tmp_path / name.replace(".", "_")
        run_preprocess(_config([tmp_path / name], out, tokenizer_dir, **kw))
        got = [d.tolist() for d in _megatron_documents(f"{out}_text_document")]
        expected = expected or got
        assert got == expected, name


def test_directory_and_glob_inputs_are_sorted_and_deduplicated(tmp_path, documents, tokenizer_dir):
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "2.jsonl", documents[10:20])
    write_jsonl(tmp_path / "in" / "1.jsonl", documents[:10])
    (tmp_path / "in" / "notes.bin").write_bytes(b"\x00 ignored: not a known input suffix")
    summary = run_preprocess(_config([tmp_path / "in", str(tmp_path / "in" / "*.jsonl")], tmp_path / "o",
                                     tokenizer_dir))
    assert summary.documents == 20
    tok = load_tokenizer(tokenizer_dir)
    assert [tok.decode(d[:-1]) for d in _megatron_documents(summary.outputs[0])] == documents[:20]


def test_multiple_json_keys_write_one_dataset_each(tmp_path, documents, tokenizer_dir):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"q": a, "a": b}) + "\n" for a, b in zip(documents[:5], documents[5:10])))
    summary = run_preprocess(_config([path], tmp_path / "qa", tokenizer_dir, json_keys=("q", "a")))
    assert summary.outputs == [str(tmp_path / "qa_q_document"), str(tmp_path / "qa_a_document")]
    tok = load_tokenizer(tokenizer_dir)
    assert [tok.decode(d[:-1]) for d in _megatron_documents(summary.outputs[1])] == documents[5:10]


def test_resume_skips_finished_shards_and_cleans_up_after_a_failure(tmp_path, corpus_jsonl, tokenizer_dir,
                                                                     monkeypatch):
    cfg = _config([corpus_jsonl], tmp_path / "r", tokenizer_dir, shard_size=8 << 10, merge=False)
    real = preprocess.process_shard

    def fail_on_shard_3(job, encoder, report):
        if job.shard.index == 3:
            raise RuntimeError("simulated crash")
        return real(job, encoder, report)

    monkeypatch.setattr(preprocess, "process_shard", fail_on_shard_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_preprocess(cfg)
    shards_dir = tmp_path / "r.shards"
    assert sorted(p.name for p in shards_dir.iterdir() if ".tmp" in p.name) == []  # nothing half-written
    assert not (shards_dir / "text-00003.idx").exists()
    monkeypatch.setattr(preprocess, "process_shard", real)
    summary = run_preprocess(cfg)
    assert summary.shards_skipped == 3 and summary.shards_run == summary.shards_total - 3


def test_resume_after_a_killed_run_completes_correctly(tmp_path, tokenizer_dir):
    docs = make_documents(2500, seed=1)
    corpus = write_jsonl(tmp_path / "big.jsonl", docs)
    reference = tmp_path / "ref"
    run_preprocess(_config([corpus], reference, tokenizer_dir))
    args = ["--input", corpus, "--tokenizer", tokenizer_dir, "--output-prefix", tmp_path / "k",
            "--shard-size", "16K", "--no-progress"]
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), *map(str, args)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    shards_dir = tmp_path / "k.shards"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(shards_dir.glob("*.done.json"))) < 2 and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list(shards_dir.glob("*.done.json")))
    assert finished >= 2 and not (tmp_path / "k_text_document.idx").exists()
    result = run_tool("preprocess_data", *args)
    assert f"{finished} already done" in result.stdout
    assert _bytes(f"{reference}_text_document") == _bytes(str(tmp_path / "k_text_document"))
    assert not [p for p in shards_dir.iterdir() if ".tmp" in p.name]


def test_rerun_after_completion_does_no_work(tmp_path, corpus_jsonl, tokenizer_dir):
    cfg = _config([corpus_jsonl], tmp_path / "d", tokenizer_dir, shard_size=16 << 10)
    first = run_preprocess(cfg)
    again = run_preprocess(cfg)
    assert again.shards_run == 0 and again.outputs == first.outputs and again.documents == first.documents


def test_changed_settings_refuse_to_mix_with_existing_shards(tmp_path, corpus_jsonl, tokenizer_dir):
    run_preprocess(_config([corpus_jsonl], tmp_path / "m", tokenizer_dir, merge=False))
    with pytest.raises(ValueError, match="append_eod changed.*delete that directory"):
        run_preprocess(_config([corpus_jsonl], tmp_path / "m", tokenizer_dir, append_eod=False))


def test_malformed_json_lines_are_counted_and_skipped_or_fail_with_strict(tmp_path, documents, tokenizer_dir):
    path = write_jsonl(tmp_path / "bad.jsonl", documents[:20],
                       extra_lines=["{not json", "[1, 2]", '{"text": null}', "", documents[0][:5],
                                    '{"text": "lone surrogate \\ud800 here"}'])
    summary = run_preprocess(_config([path], tmp_path / "lenient", tokenizer_dir))
    assert summary.documents == 20 and summary.malformed == 5
    with pytest.raises(ValueError, match=r"bad\.jsonl:line 21: not valid JSON.*drop --strict"):
        run_preprocess(_config([path], tmp_path / "strict", tokenizer_dir, strict=True))
    assert not os.path.exists(tmp_path / "strict_text_document.idx")
    assert not [p for p in (tmp_path / "strict.shards").iterdir() if ".tmp" in p.name]


def test_missing_text_key_names_the_file_line_and_keys_present(tmp_path, tokenizer_dir):
    path = tmp_path / "k.jsonl"
    path.write_text('{"text": "ok"}\n{"content": "no text key", "id": 1}\n')
    with pytest.raises(ValueError, match=r"k\.jsonl:line 2: no key 'text'.*'content', 'id'.*--json-keys"):
        run_preprocess(_config([path], tmp_path / "k", tokenizer_dir))


def test_missing_inputs_and_empty_inputs_give_clear_errors_and_write_nothing(tmp_path, tokenizer_dir):
    with pytest.raises(FileNotFoundError, match=r"--input '.*nope\.jsonl': no such file"):
        run_preprocess(_config([tmp_path / "nope.jsonl"], tmp_path / "a", tokenizer_dir))
    with pytest.raises(FileNotFoundError, match=r"no input files there"):
        run_preprocess(_config([str(tmp_path / "*.parquet")], tmp_path / "a", tokenizer_dir))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="every input file is empty"):
        run_preprocess(_config([tmp_path / "empty.jsonl"], tmp_path / "b", tokenizer_dir))
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n\n')
    with pytest.raises(ValueError, match="no documents found"):
        run_preprocess(_config([tmp_path / "blank.jsonl"], tmp_path / "c", tokenizer_dir))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.jsonl", "empty.jsonl"]


def test_tokenizer_too_large_for_the_requested_dtype_is_refused(tmp_path, corpus_jsonl, tokenizer_dir):
    from ssa_megatron.data.indexed_format import token_dtype

    assert token_dtype(128256).name == "int32" and token_dtype(32000).name == "uint16"
    with pytest.raises(ValueError, match="--dtype=uint16.*128256 ids.*use --dtype int32"):
        token_dtype(128256, "uint16")
    summary = run_preprocess(_config([corpus_jsonl], tmp_path / "i32", tokenizer_dir, dtype="int32"))
    assert summary.dtype == "int32" and _megatron_documents(summary.outputs[0])[0].dtype == np.int32


def test_gigatoken_backend_checks_itself_against_hf_and_writes_identical_tokens(tmp_path, corpus_jsonl,
                                                                                tokenizer_dir):
    pytest.importorskip("gigatoken")
    hf = run_preprocess(_config([corpus_jsonl], tmp_path / "hf", tokenizer_dir))
    fast = run_preprocess(_config([corpus_jsonl], tmp_path / "gt", tokenizer_dir, backend="gigatoken",
                                  workers=2, shard_size=8 << 10))
    assert fast.mismatched == 0 and fast.sampled > 100 and "gigatoken vs hf: 0/" in fast.line()
    assert _bytes(hf.outputs[0]) == _bytes(fast.outputs[0])


def test_fast_backend_leaves_documents_with_unassigned_code_points_to_hf(tmp_path, documents, tokenizer_dir):
    pytest.importorskip("gigatoken")
    docs = documents[:30] + ['x = ["\ua7cf", None]  # U+A7CF: unassigned in Unicode 14, a letter later']
    path = write_jsonl(tmp_path / "new_unicode.jsonl", docs)
    hf = run_preprocess(_config([path], tmp_path / "hf", tokenizer_dir))
    fast = run_preprocess(_config([path], tmp_path / "gt", tokenizer_dir, backend="gigatoken"))
    assert fast.fallbacks == 1 and fast.mismatched == 0 and hf.fallbacks == 0
    assert _bytes(hf.outputs[0]) == _bytes(fast.outputs[0])


def test_inexact_fast_backend_is_refused_unless_allowed(tmp_path, corpus_jsonl, tokenizer_dir, monkeypatch):
    real = preprocess.make_encoder

    class OffByOne:
        fallbacks = 0

        def __init__(self, inner):
            self.inner = inner

        def encode(self, texts):
            tokens, lengths = self.inner.encode(texts)
            if len(tokens):
                tokens = tokens.copy()
                tokens[0] = (tokens[0] + 1) % 500  # the first document of every call differs
            return tokens, lengths

    fake = lambda b, path: OffByOne(real("hf", path)) if b == "gigatoken" else real(b, path)  # noqa: E731
    monkeypatch.setattr(exactness, "make_encoder", fake)  # the check before the run
    monkeypatch.setattr(preprocess, "make_encoder", fake)  # the run (in-process: one worker)
    with pytest.raises(ValueError, match=r"tokenised [1-9]\d* of \d+ sampled documents differently.*allow-inexact"):
        run_preprocess(_config([corpus_jsonl], tmp_path / "x", tokenizer_dir, backend="gigatoken"))
    summary = run_preprocess(_config([corpus_jsonl], tmp_path / "y", tokenizer_dir, backend="gigatoken",
                                     allow_inexact=True))
    assert summary.mismatched > 0 and f"gigatoken vs hf: {summary.mismatched}/" in summary.line()


def test_cli_prints_summary_and_never_imports_torch_or_megatron(tmp_path, corpus_jsonl, tokenizer_dir):
    code = ("import runpy, sys; sys.argv = sys.argv[1:]\n"
            "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print('heavy modules:', sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron')))")
    proc = subprocess.run([sys.executable, "-c", code, os.path.join(REPO, "tools", "preprocess_data.py"),
                           "--input", corpus_jsonl, "--tokenizer", tokenizer_dir, "--output-prefix",
                           str(tmp_path / "cli"), "--workers", "2", "--shard-size", "16K"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "heavy modules: []" in proc.stdout
    assert "preprocess: 300 documents" in proc.stdout and "tokens/s" in proc.stdout and "MB written" in proc.stdout
    assert "tok/s" in proc.stderr  # the progress bar
    bad = run_tool("preprocess_data", "--input", tmp_path / "missing.jsonl", "--tokenizer", tokenizer_dir,
                   "--output-prefix", tmp_path / "z", check=False)
    assert bad.returncode == 2 and "error: --input" in bad.stderr and "Traceback" not in bad.stderr
