"""Hugging Face directory -> Megatron checkpoint that ``ssa-pretrain --load`` continues (fine-tune semantics).

    ssa-convert from-hf --load-dir HF --save-dir CKPT --tensor-model-parallel-size T --pipeline-model-parallel-size P

Three source layouts, told apart by ``config.json``:

- ``ssa``: our own export (``model_type: ssa_llama``); with its vocabulary-padding side file the round
  trip is exact;
- ``llama``: a plain Llama (``model_type: llama``). SSA's head gate starts **neutral**: ``g_proj = 0``
  gives sigmoid(0) = 1/2 on every head, and ``o_proj`` is doubled, so each layer computes exactly what
  the Llama layer did (power-of-two scaling: exact in any dtype) while the gate still gets gradient;
- ``authors``: the SSA authors' release (``model_type: llama-nsa``, e.g. zen-E/SSA-1B and its
  FullAttn/MoBA/NSA siblings): Llama weights plus ``g_proj`` with ``3 * num_heads`` outputs viewed
  ``[heads, 3]``, whose middle entry per head is the SSA gate (their ``g_cmp, g_slc, g_swa`` split;
  only ``g_slc`` gates the full and selected-block attention). ``block_counts`` is ``top_k``. The NSA
  sibling (``window_size > 0``) also uses the other two thirds (compressed and sliding-window
  branches), which SSA has no counterpart for: they are dropped, with a warning.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from ssa_megatron.config import RunConfig, config_from_dict
from ssa_megatron.convert import hf_io
from ssa_megatron.convert.keys import Shape, hf_to_megatron

logger = logging.getLogger("ssa_megatron.convert")

LAYOUTS = ("ssa", "llama", "authors")
TOKENIZER_SUBDIR = "tokenizer"


def detect_layout(config: dict, where: str) -> str:
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if model_type == "ssa_llama" or "SSAForCausalLM" in architectures:
        return "ssa"
    if model_type == "llama-nsa" or "LlamaNSAForCausalLM" in architectures:
        return "authors"
    if model_type == "llama" or "LlamaForCausalLM" in architectures:
        return "llama"
    raise ValueError(
        f"{where}: model_type={model_type!r}, architectures={architectures}: not an SSA export, a Llama or an "
        "SSA-authors' (llama-nsa) checkpoint; other architectures cannot be converted"
    )


def _rope_theta(config: dict, where: str) -> float:
    """RoPE base; refuses RoPE scaling (ssa_megatron trains plain RoPE)."""
    scaling = config.get("rope_scaling")
    params = config.get("rope_parameters") or {}
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type")) if scaling else params.get("rope_type", "default")
    if rope_type not in (None, "default"):
        raise ValueError(
            f"{where}: RoPE scaling {scaling or params} is not supported (ssa_megatron trains plain RoPE): "
            "convert a checkpoint without rope_scaling"
        )
    theta = config.get("rope_theta", params.get("rope_theta"))
    if theta is None:
        raise ValueError(f"{where}: config.json has no rope_theta")
    return float(theta)


def run_config_from_hf(config: dict, layout: str, *, tp: int, pp: int, where: str) -> RunConfig:
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if config.get(key, want) != want:
            raise ValueError(f"{where}: {key}={config[key]!r}; only {key}={want!r} Llama decoders convert")
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    theta = _rope_theta(config, where)
    if theta != int(theta):
        raise ValueError(f"{where}: rope_theta={theta} is not an integer (model.rotary_base is an int)")
    ssa = {}
    if layout == "ssa":
        ssa = {k: config[k] for k in ("attention_mode", "block_size", "top_k") if k in config}
    elif layout == "authors":
        ssa = {"block_size": config.get("block_size", 16), "top_k": config.get("block_counts", 16)}
        if config.get("window_size", 0):
            logger.warning(
                "WARNING: %s: window_size=%s: this is the NSA sibling; its compressed and sliding-window branches "
                "(the first and last thirds of g_proj) have no counterpart in SSA and are dropped", where, config["window_size"]
            )
    dtype = config.get("torch_dtype", config.get("dtype"))
    values = {
        "model": {
            "num_layers": config["num_hidden_layers"],
            "hidden_size": config["hidden_size"],
            "ffn_hidden_size": config["intermediate_size"],
            "num_attention_heads": heads,
            "num_query_groups": config.get("num_key_value_heads") or heads,
            "kv_channels": None if head_dim * heads == config["hidden_size"] else head_dim,
            "seq_length": config.get("max_position_embeddings", 8192),
            "vocab_size": config["vocab_size"],
            "rotary_base": int(theta),
            "norm_epsilon": config.get("rms_norm_eps", 1e-5),
            "tie_embeddings": bool(config.get("tie_word_embeddings", True)),
        },
        "ssa": ssa,
        "parallel": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp},
        "train": {"dtype": "fp32" if dtype in ("float32", "fp32") else "bf16"},
    }
    return config_from_dict(values)


def read_hf(load_dir: str | Path, *, tp: int = 1, pp: int = 1) -> tuple[RunConfig, dict[str, torch.Tensor], str]:
    """(run config, Megatron full state, source layout) of an HF directory; validates everything."""
    root = Path(load_dir)
    where = str(root)
    config = hf_io.read_config(root)
    layout = detect_layout(config, where)
    try:
        cfg = run_config_from_hf(config, layout, tp=tp, pp=pp, where=where)
    except KeyError as err:
        raise ValueError(f"{where}: config.json lacks {err}") from None
    m = cfg.model
    shape = Shape(
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
        num_heads=m.num_attention_heads, num_kv_heads=m.num_query_groups, head_dim=m.head_dim,
        vocab_size=m.vocab_size, tie_embeddings=m.tie_embeddings,
    )
    gate = {"ssa": "ssa", "llama": "neutral", "authors": "authors"}[layout]
    padding = hf_io.load_padding(root) if layout == "ssa" else {}
    full = hf_to_megatron(hf_io.load_weights(root), shape, gate=gate, padding=padding, where=where)
    _check_tokenizer(root, m.vocab_size)
    return cfg, full, layout


def _check_tokenizer(root: Path, vocab_size: int) -> None:
    if not (root / "tokenizer.json").is_file():
        return
    from ssa_megatron.data.tokenizer import load_tokenizer

    size = load_tokenizer(str(root)).vocab_size
    if size > vocab_size:
        raise ValueError(
            f"{root}: the tokenizer has {size} tokens but the embedding only {vocab_size} rows: "
            "the tokenizer does not belong to these weights"
        )


def convert_from_hf(load_dir: str | Path, save_dir: str | Path, *, tp: int = 1, pp: int = 1) -> Path:
    """Write a weights-only Megatron checkpoint (iteration 0) for the given TP/PP; returns its directory."""
    from ssa_megatron.train.checkpoint import save_model_checkpoint

    cfg, full, layout = read_hf(load_dir, tp=tp, pp=pp)
    save = Path(save_dir)
    save.mkdir(parents=True, exist_ok=True)
    if (Path(load_dir) / "tokenizer.json").is_file():
        tokenizer_dir = save / TOKENIZER_SUBDIR
        tokenizer_dir.mkdir(exist_ok=True)
        hf_io.copy_tokenizer(Path(load_dir), tokenizer_dir)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(tokenizer_dir.resolve())))
    path = save_model_checkpoint(cfg, full, save)
    logger.info("wrote %s from a %s checkpoint (%s)", path, layout, load_dir)
    return path


__all__ = ["LAYOUTS", "convert_from_hf", "detect_layout", "read_hf", "run_config_from_hf"]
