"""Issue 16's table, the data side: stale resumes, records without the key, malformed lines located,
a vocabulary smaller than asked, garbage tokenizer files, and the zero-document split (never a hang)."""

from __future__ import annotations

import gzip
import json
import logging
import os

import pytest
from data_helpers import write_jsonl

from ssa_megatron.data.preprocess import PreprocessConfig, run_preprocess
from ssa_megatron.data.tokenizer import load_tokenizer


def _config(inputs, out, tokenizer_dir, **kw) -> PreprocessConfig:
    return PreprocessConfig(inputs=tuple(map(str, inputs)), output_prefix=str(out), tokenizer=tokenizer_dir,
                            progress=False, **kw)


def _preprocess_tool(capsys, *argv) -> tuple[int, str, str]:
    from tools.preprocess_data import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---- preprocessing resume checks the inputs' identity ----------------------------------------------------


def test_rerun_after_an_input_was_edited_in_place_is_refused(tmp_path, documents, tokenizer_dir, capsys):
    path = write_jsonl(tmp_path / "in.jsonl", documents[:50])
    argv = ("--input", path, "--tokenizer", tokenizer_dir, "--output-prefix", tmp_path / "out", "--no-progress")
    assert _preprocess_tool(capsys, *argv)[0] == 0
    data = bytearray(open(path, "rb").read())
    data[10:13] = b"XYZ" if data[10:13] != b"XYZ" else b"ABC"  # same size
    with open(path, "wb") as f:
        f.write(data)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    code, out, err = _preprocess_tool(capsys, *argv)
    assert code == 2 and out == ""
    assert err == (f"error: {tmp_path}/out.shards holds shards of a different run (input {path} changed since that "
                   "run (modification time, content)); its outputs would be stale: delete that directory to start "
                   "over, or use another --output-prefix\n")


def test_an_edit_that_keeps_size_and_mtime_is_caught_by_the_fingerprint(tmp_path, documents, tokenizer_dir):
    path = write_jsonl(tmp_path / "in.jsonl", documents[:50])
    run_preprocess(_config([path], tmp_path / "out", tokenizer_dir))
    st = os.stat(path)
    data = bytearray(open(path, "rb").read())
    data[-5:-2] = b"XYZ" if data[-5:-2] != b"XYZ" else b"ABC"
    with open(path, "wb") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ValueError, match=r"input .*in\.jsonl changed since that run \(content\)"):
        run_preprocess(_config([path], tmp_path / "out", tokenizer_dir))


def test_a_grown_or_added_input_is_named(tmp_path, documents, tokenizer_dir):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    path = write_jsonl(inputs / "in.jsonl", documents[:50])
    run_preprocess(_config([inputs], tmp_path / "out", tokenizer_dir))
    with open(path, "a") as f:
        f.write(json.dumps({"text": "one more"}) + "\n")
    with pytest.raises(ValueError, match=r"\(input .*in\.jsonl changed since that run \(size \d+ -> \d+ bytes, "
                                         r"modification time, content\)\); its outputs"):
        run_preprocess(_config([inputs], tmp_path / "out", tokenizer_dir))
    write_jsonl(inputs / "new.jsonl", documents[:5])
    with pytest.raises(ValueError, match=r"\(input .*in\.jsonl changed since that run \(.*\); input .*new\.jsonl added\)"):
        run_preprocess(_config([inputs], tmp_path / "out", tokenizer_dir))


def test_an_untouched_rerun_is_still_already_done(tmp_path, documents, tokenizer_dir):
    path = write_jsonl(tmp_path / "in.jsonl", documents[:50])
    run_preprocess(_config([path], tmp_path / "out", tokenizer_dir))
    again = run_preprocess(_config([path], tmp_path / "out", tokenizer_dir))
    assert again.shards_run == 0 and again.shards_skipped == 1


# ---- records without the key ---------------------------------------------------------------------------


def test_records_without_the_key_fail_naming_the_flag_or_are_skipped_and_counted(tmp_path, documents, tokenizer_dir,
                                                                                  capsys):
    path = write_jsonl(tmp_path / "k.jsonl", documents[:30], extra_lines=['{"content": "no text", "id": 1}'] * 3)
    with pytest.raises(ValueError) as err:
        run_preprocess(_config([path], tmp_path / "strict", tokenizer_dir))
    assert str(err.value) == (f"{path}:line 31: no key 'text' in the JSON object (its keys: 'content', 'id'); pass "
                              "--json-keys with the key that holds the text, or --skip-missing-keys to skip and "
                              "count such records")
    code, out, _ = _preprocess_tool(capsys, "--input", path, "--tokenizer", tokenizer_dir, "--output-prefix",
                                    tmp_path / "lenient", "--no-progress", "--skip-missing-keys")
    assert code == 0
    assert "30 documents" in out and ", 3 records without the key skipped (--skip-missing-keys)" in out


# ---- malformed lines: file and line, the first few, then a count ------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_malformed_lines_are_located_by_file_and_line_then_counted(tmp_path, documents, tokenizer_dir, caplog,
                                                                  compress):
    lines = []
    for i, doc in enumerate(documents[:40]):
        lines.append(json.dumps({"text": doc}))
        if i % 5 == 4:
            lines.append("{broken")
    text = "\n".join(lines) + "\n"
    path = tmp_path / ("m.jsonl.gz" if compress else "m.jsonl")
    if compress:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    with caplog.at_level(logging.WARNING, logger="ssa_megatron.data.preprocess"):
        summary = run_preprocess(_config([path], tmp_path / "out", tokenizer_dir))
    assert summary.malformed == 8 and summary.documents == 40
    warning = caplog.records[-1].getMessage().splitlines()
    assert warning[0] == "skipped 8 malformed records (--strict makes them fatal); the first 5:"
    assert warning[1].startswith(f"  {path}:line 6: not valid JSON")
    assert warning[5].startswith(f"  {path}:line 30: not valid JSON")
    assert warning[6] == "  ... and 3 more"


# ---- tokenizers --------------------------------------------------------------------------------------------


def test_train_tokenizer_warns_when_the_vocabulary_is_smaller_than_asked(tmp_path, capsys):
    from tools.train_tokenizer import main

    (tmp_path / "small.txt").write_text("tiny corpus, tiny vocabulary " * 20)
    assert main(["--input", str(tmp_path / "small.txt"), "--vocab-size", "70000", "--output-dir",
                 str(tmp_path / "tok")]) == 0
    vocab = load_tokenizer(str(tmp_path / "tok")).vocab_size
    err = capsys.readouterr().err
    assert err == (f"warning: the vocabulary has {vocab} tokens, fewer than --vocab-size 70000: the corpus has no "
                   "more merges to learn; train on more text (--max-bytes, more --input) or ask for a smaller "
                   "--vocab-size\n")


def test_garbage_tokenizer_files_are_named(tmp_path, tokenizer_dir):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text('{"version": "1.0", "model": 42}')
    with pytest.raises(ValueError, match=rf"^tokenizer '{bad}': {bad}/tokenizer.json is not a Hugging Face "
                                         r"tokenizer file \(.*\); pass a tokenizer directory"):
        load_tokenizer(str(bad))
    config_broken = tmp_path / "config_broken"
    config_broken.mkdir()
    (config_broken / "tokenizer.json").write_bytes(open(os.path.join(tokenizer_dir, "tokenizer.json"), "rb").read())
    (config_broken / "tokenizer_config.json").write_text("{'eos_token': 1")
    with pytest.raises(ValueError, match=rf"^tokenizer '{config_broken}': {config_broken}/tokenizer_config.json is "
                                         r"not valid JSON \(.*\); fix or delete it"):
        load_tokenizer(str(config_broken))


# ---- the zero-document split: an error before Megatron's builder, never a hang --------------------------------


@pytest.mark.timeout(60)
def test_a_split_without_documents_fails_before_megatron_instead_of_hanging(tmp_path, documents, tokenizer_dir):
    from ssa_megatron.data import DataConfig
    from ssa_megatron.data.datasets import build_datasets

    (tmp_path / "one.txt").write_text("\n\n".join(documents[:20]))  # one file, one document
    run_preprocess(_config([tmp_path / "one.txt"], tmp_path / "one", tokenizer_dir))
    prefix = str(tmp_path / "one_text_document")
    config = DataConfig(data_path=[prefix], tokenizer=tokenizer_dir, split="95,5,0", cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError) as err:
        build_datasets(config, seq_length=16, seed=1, num_samples=(4, 0, 0), tokenizer=load_tokenizer(tokenizer_dir))
    assert str(err.value) == (
        f"data.split='95,5,0': the validation split gets 0 of the 1 document(s) of {prefix} (Megatron splits each "
        "dataset by document): preprocess more documents (e.g. --text-separator cuts a text file into documents) or "
        "give it no weight (e.g. data.split: '100,0,0' with train.eval_interval: 0)")
    train, valid, _ = build_datasets(DataConfig(data_path=[prefix], tokenizer=tokenizer_dir, split="100,0,0",
                                                cache_dir=str(tmp_path / "c")),
                                     seq_length=16, seed=1, num_samples=(4, 0, 0), tokenizer=load_tokenizer(tokenizer_dir))
    assert len(train) >= 4 and valid is None
