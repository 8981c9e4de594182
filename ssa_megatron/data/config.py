"""The ``data:`` section of a run: which prefixes, blended how, split how, tokenised with what.

A blend is Megatron's ``--data-path`` list (``["0.7", "/p/A", "0.3", "/p/B"]`` or just
``["/p/A", "/p/B"]``, weights then follow the datasets' sizes) or, in YAML, a list of
``{weight: 0.7, prefix: /p/A}`` mappings. Unlike Megatron-LM, a weight that does not parse
is an error, never a silent switch to the unweighted form. Nothing here touches the filesystem:
``build_datasets`` checks the files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _is_number(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def parse_blend(data_path, *, field: str = "data.data_path") -> tuple[list[str], list[float] | None]:
    """(prefixes, weights or None) from either blend form; raises ValueError naming the fix."""
    example = "e.g. ['0.7', '/data/A_text_document', '0.3', '/data/B_text_document']"
    if isinstance(data_path, str) or not isinstance(data_path, (list, tuple)) or not data_path:
        raise ValueError(f"{field}={data_path!r}: must be a non-empty list of prefixes or "
                         f"weight/prefix pairs, {example}")
    if all(isinstance(item, dict) for item in data_path):
        pairs = []
        for i, item in enumerate(data_path):
            if set(item) != {"weight", "prefix"}:
                raise ValueError(f"{field}[{i}]={item!r}: each entry needs exactly the keys "
                                 "'weight' and 'prefix', e.g. {weight: 0.7, prefix: /data/A_text_document}")
            pairs.append((item["weight"], item["prefix"]))
    elif any(_is_number(item) for item in data_path):
        if len(data_path) % 2:
            raise ValueError(f"{field}={data_path!r}: weights and prefixes must alternate "
                             f"(an even number of entries), {example}")
        pairs = list(zip(data_path[::2], data_path[1::2]))
    else:
        pairs = [(None, item) for item in data_path]
    prefixes, weights = [], []
    for i, (weight, prefix) in enumerate(pairs):
        if weight is not None:
            if not _is_number(weight) or not math.isfinite(float(weight)) or float(weight) <= 0:
                raise ValueError(f"{field}: weight {weight!r} (before prefix {prefix!r}) is not a positive "
                                 f"number; write weight/prefix pairs, {example}")
            weights.append(float(weight))
        if not isinstance(prefix, str) or not prefix or _is_number(prefix):
            raise ValueError(f"{field}: entry {prefix!r} at pair {i} is not a dataset prefix; {example}")
        if prefix.endswith((".bin", ".idx")):
            raise ValueError(f"{field}: {prefix!r} names a file; give the prefix without .bin/.idx")
        prefixes.append(prefix)
    return prefixes, (weights or None)


def parse_split(split, *, field: str = "data.split") -> list[float]:
    """``"98,2,0"`` -> [98.0, 2.0, 0.0] (train, valid, test weights; Megatron normalises them)."""
    parts = split.split(",") if isinstance(split, str) else []
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        weights = []
    if len(weights) != 3 or any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise ValueError(f"{field}={split!r}: needs three comma-separated non-negative weights for "
                         "train,valid,test, e.g. '98,2,0'")
    return weights


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Training data of a run; the YAML loader builds it from the ``data:`` section."""

    data_path: list | None = None
    """Megatron-style blend ``["0.7", "/p/A", "0.3", "/p/B"]`` or ``["/p/A"]``, or a list of
    ``{weight, prefix}``; prefixes name ``.bin``/``.idx`` pairs. None: the embedded default corpus."""
    split: str = "98,2,0"
    """Train, valid, test weights over each dataset's documents."""
    tokenizer: str | None = None
    """Hugging Face tokenizer directory; required with ``data_path`` or ``webdataset``."""
    cache_dir: str = ".cache/ssa_megatron"
    """Megatron's index caches and the default corpus build; must be visible to all ranks."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0: load in the training process)."""
    webdataset: str | None = None
    """Instead of ``data_path``: the ``index.json`` of tar shards from tools/make_webdataset.py."""
    webdataset_url_template: str | None = None
    """How to fetch a shard, ``{name}`` replaced by its file name, e.g.
    ``pipe:aws s3 cp s3://bucket/ds/{name} -``; None: beside ``index.json``."""

    def __post_init__(self):
        if self.data_path is not None:
            parse_blend(self.data_path)
        if self.data_path is not None and self.webdataset is not None:
            raise ValueError("data.data_path and data.webdataset are alternatives: set one of them")
        parse_split(self.split)
        if (self.data_path is not None or self.webdataset is not None) and not self.tokenizer:
            raise ValueError("data.tokenizer is required when data.data_path or data.webdataset is set: "
                             "the Hugging Face tokenizer directory the data was preprocessed with")
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"data.num_workers={self.num_workers!r}: must be an integer >= 0")
        if not isinstance(self.cache_dir, str) or not self.cache_dir:
            raise ValueError(f"data.cache_dir={self.cache_dir!r}: must be a directory path")
        if self.webdataset_url_template is not None and "{name}" not in self.webdataset_url_template:
            raise ValueError(f"data.webdataset_url_template={self.webdataset_url_template!r}: must contain "
                             "'{name}' (replaced by each shard's file name)")
