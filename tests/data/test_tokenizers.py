"""Tokenizers: training a byte-level BPE, loading HF tokenizer directories, their errors."""

from __future__ import annotations

import json
import shutil

import pytest
from data_helpers import SNIPPETS, run_tool

from ssa_megatron.data.tokenizer import SpecialTokens, load_tokenizer, train_bpe_tokenizer


def test_trained_tokenizer_round_trips_any_text_and_puts_special_tokens_first(tokenizer_dir, documents):
    tok = load_tokenizer(tokenizer_dir)
    assert (tok.vocab_size, tok.eod, tok.bos, tok.pad) == (600, 0, 1, 2)
    for text in documents[:50] + SNIPPETS + ["unseen bytes \x00\x7f and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", ""]:
        ids = tok.encode(text)
        assert tok.bos not in ids and tok.eod not in ids  # encode adds no special tokens
        assert tok.decode(ids) == text
    assert tok.decode([tok.eod]) == SpecialTokens.eos


def test_training_is_deterministic(tmp_path, documents):
    a = train_bpe_tokenizer(documents, str(tmp_path / "a"), vocab_size=500)
    b = train_bpe_tokenizer(documents, str(tmp_path / "b"), vocab_size=500)
    assert a.fingerprint == b.fingerprint


def test_llama_style_directory_with_dict_tokens_in_config_loads(tmp_path, tokenizer_dir):
    shutil.copy(f"{tokenizer_dir}/tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<|begin_of_text|>", "lstrip": False},
        "eos_token": {"content": "<|endoftext|>", "lstrip": False}}))
    tok = load_tokenizer(str(tmp_path))
    assert (tok.eod, tok.bos) == (0, 1)
    with pytest.raises(AttributeError):
        tok.pad  # no pad token configured: Megatron's datasets then use -1
    (tmp_path / "tokenizer_config.json").unlink()  # no config: the EOS is found by its known name
    assert load_tokenizer(str(tmp_path)).eod == 0


def test_tokenizer_errors_name_the_directory_and_the_fix(tmp_path, tokenizer_dir, documents):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json there.*train_tokenizer.py"):
        load_tokenizer(str(tmp_path))
    shutil.copy(f"{tokenizer_dir}/tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ValueError, match="eos_token '</s>'.*not in the vocabulary"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="--vocab-size=100: must exceed 259"):
        train_bpe_tokenizer(documents, str(tmp_path / "x"), vocab_size=100)
    with pytest.raises(FileExistsError, match="--overwrite"):
        train_bpe_tokenizer(documents, tokenizer_dir, vocab_size=600)
    with pytest.raises(ValueError, match="no text to train"):
        train_bpe_tokenizer([], str(tmp_path / "y"), vocab_size=300)
    assert not (tmp_path / "y").exists()


def test_train_tokenizer_cli_trains_on_jsonl_and_extra_special_tokens(tmp_path, corpus_jsonl):
    out = run_tool("train_tokenizer", "--input", corpus_jsonl, "--vocab-size", 400, "--output-dir",
                   tmp_path / "t", "--special-tokens", "<|fim|>", "--max-bytes", "20K")
    assert "vocab 400, eos/eod 0, bos 1, pad 2" in out.stdout
    tok = load_tokenizer(str(tmp_path / "t"))
    assert tok.encode("a<|fim|>b")[1] == 3
