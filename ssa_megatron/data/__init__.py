"""Data for ssa_megatron: tokenizers, preprocessing to Megatron indexed data, training readers.

The trainer's interface is re-exported here. The functions that need torch and megatron-core
(``build_datasets``, ``build_data_iterator``, ``build_webdataset_iterator``) are imported on
first use, so the preprocessing tools start without importing either.
"""

from __future__ import annotations

import importlib

from ssa_megatron.data.config import DataConfig, parse_blend, parse_split
from ssa_megatron.data.default_corpus import prepare_default_corpus
from ssa_megatron.data.tokenizer import Tokenizer, load_tokenizer

_LAZY = {
    "build_datasets": "ssa_megatron.data.datasets",
    "build_data_iterator": "ssa_megatron.data.loader",
    "build_webdataset_iterator": "ssa_megatron.data.webdataset_loader",
}

__all__ = ["DataConfig", "Tokenizer", "build_data_iterator", "build_datasets",
           "build_webdataset_iterator", "load_tokenizer", "parse_blend", "parse_split",
           "prepare_default_corpus"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
