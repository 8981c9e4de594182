"""Data for ssa_megatron: tokenizers, preprocessing to Megatron indexed data, training readers.

The trainer's interface is re-exported here. Only ``DataConfig`` (and the blend/split parsers)
load eagerly: everything else is imported on first use, so reading a run config needs neither
``tokenizers`` nor torch, and the preprocessing tools never import torch or megatron-core.
"""

from __future__ import annotations

import importlib

from ssa_megatron.data.config import DataConfig, parse_blend, parse_split

_LAZY = {
    "Tokenizer": "ssa_megatron.data.tokenizer",
    "load_tokenizer": "ssa_megatron.data.tokenizer",
    "prepare_default_corpus": "ssa_megatron.data.default_corpus",
    "build_datasets": "ssa_megatron.data.datasets",
    "build_data_iterator": "ssa_megatron.data.loader",
    "build_webdataset_iterator": "ssa_megatron.data.webdataset_loader",
}

__all__ = ["DataConfig", "parse_blend", "parse_split", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
