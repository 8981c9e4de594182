"""A tiny SSA run configuration for CPU tests (fp32, gloo)."""

from __future__ import annotations

from ssa_megatron.config import config_from_dict


def tiny_config(model=None, ssa=None, parallel=None, train=None):
    return config_from_dict(
        {
            "model": {
                "num_layers": 4, "hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 4,
                "num_query_groups": 2, "seq_length": 40, "rotary_base": 10000, **(model or {}),
            },
            "ssa": {"block_size": 8, "top_k": 2, **(ssa or {})},
            "parallel": parallel or {},
            "train": {
                "micro_batch_size": 2, "global_batch_size": 4, "train_iters": 3, "dtype": "fp32",
                "device": "cpu", "lr": 1e-2, "lr_warmup_fraction": 0.0, "lr_decay_style": "constant", **(train or {}),
            },
        }
    )
