"""Shared fixtures for the data tests: a tiny trained tokenizer and a varied document set."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # conftest's own dir is not on the path
from data_helpers import make_documents, write_jsonl  # noqa: E402

from ssa_megatron.data.tokenizer import train_bpe_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def documents() -> list[str]:
    return make_documents(300)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, documents) -> str:
    """A 600-token byte-level BPE trained on the test documents (under a second)."""
    out = tmp_path_factory.mktemp("tok") / "bpe600"
    train_bpe_tokenizer(documents, str(out), vocab_size=600)
    return str(out)


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory, documents) -> str:
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "docs.jsonl", documents)
