"""The trainer reads a weighted blend of indexed prefixes and WebDataset shards, not only the default corpus."""

from __future__ import annotations

import os

from tiny_config import tiny_config

from ssa_megatron.config import config_from_dict
from ssa_megatron.data import prepare_default_corpus
from ssa_megatron.data.webdataset_shards import write_webdataset
from ssa_megatron.train.trainer import train


def _config(data: dict):
    base = tiny_config(model={"seq_length": 64}, train={"train_iters": 2})
    values = {section: dict(vars(getattr(base, section))) for section in ("model", "ssa", "parallel", "train")}
    return config_from_dict({**values, "data": data})


def test_training_on_a_weighted_blend_of_prefixes():
    tokenizer, prefix = prepare_default_corpus(".cache/ssa_megatron")
    history = train(_config({"data_path": ["0.7", prefix, "0.3", prefix], "tokenizer": tokenizer, "split": "90,10,0"})).history
    assert len(history) == 2 and all(r.lm_loss > 0 for r in history)


def test_training_on_webdataset_shards(tmp_path):
    tokenizer, prefix = prepare_default_corpus(".cache/ssa_megatron")
    shards = tmp_path / "shards"
    write_webdataset(prefix, str(shards), seq_length=64, samples_per_shard=64, progress=False)
    index = os.path.join(shards, "index.json")
    history = train(_config({"webdataset": index, "tokenizer": tokenizer})).history
    assert len(history) == 2 and all(r.lm_loss > 0 for r in history)
