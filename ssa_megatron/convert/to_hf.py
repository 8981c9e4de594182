"""Megatron checkpoint -> Hugging Face directory (config, safetensors, the self-contained model code).

    ssa-convert to-hf --load-dir CKPT --save-dir HF [--ckpt-step N] [--tokenizer DIR] [--dtype bf16|fp32]

Writes ``config.json`` (Llama's keys + ``attention_mode``/``block_size``/``top_k`` + ``auto_map``),
``generation_config.json``, the weights (safetensors, sharded by size with an index),
``configuration_ssa.py`` and ``modeling_ssa.py`` (torch + transformers only), the tokenizer files,
and Megatron's vocabulary padding rows in a side file that makes the way back exact.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from ssa_megatron.config import RunConfig
from ssa_megatron.convert import hf_io
from ssa_megatron.convert.keys import Shape, megatron_to_hf, vocab_padding

logger = logging.getLogger("ssa_megatron.convert")

HF_MODEL_DIR = Path(__file__).with_name("hf_model")
MODEL_FILES = ("configuration_ssa.py", "modeling_ssa.py")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def shape_of(cfg: RunConfig) -> Shape:
    m = cfg.model
    if m.vocab_size is None:
        raise ValueError("the run config has no model.vocab_size (the tokenizer's size): set it")
    return Shape(
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
        num_heads=m.num_attention_heads, num_kv_heads=m.num_query_groups, head_dim=m.head_dim,
        vocab_size=m.vocab_size, tie_embeddings=m.tie_embeddings,
    )


def hf_config(cfg: RunConfig, dtype: torch.dtype, special: dict) -> dict:
    m, s = cfg.model, cfg.ssa
    return {
        "architectures": ["SSAForCausalLM"],
        "model_type": "ssa_llama",
        "auto_map": {"AutoConfig": "configuration_ssa.SSAConfig", "AutoModelForCausalLM": "modeling_ssa.SSAForCausalLM"},
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": m.norm_epsilon,
        "rope_theta": float(m.rotary_base),
        "tie_word_embeddings": m.tie_embeddings,
        "max_position_embeddings": m.seq_length,
        "initializer_range": m.init_method_std,
        "attention_mode": s.attention_mode,
        "block_size": s.block_size,
        "top_k": s.top_k,
        "use_cache": True,
        "torch_dtype": DTYPE_NAMES[dtype],
        **special,
    }


def _special_tokens(tokenizer_dir: Path | None, vocab_size: int) -> dict:
    """bos/eos/pad ids of the tokenizer, after checking its vocabulary matches the embedding."""
    if tokenizer_dir is None:
        return {}
    from ssa_megatron.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    if tok.vocab_size != vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer_dir} has {tok.vocab_size} tokens but the model's vocabulary (model.vocab_size) is "
            f"{vocab_size}: pass the tokenizer the run was trained with (--tokenizer)"
        )
    try:
        pad = tok.pad
    except AttributeError:  # no pad token: generation pads with EOS
        pad = tok.eod
    return {"bos_token_id": tok.bos, "eos_token_id": tok.eod, "pad_token_id": pad}


def export_hf(
    cfg: RunConfig,
    full: dict[str, torch.Tensor],
    save_dir: str | Path,
    *,
    tokenizer: str | Path | None = None,
    dtype: str = "bf16",
    max_shard_size: str | int = "5GB",
) -> Path:
    """Write the HF directory for a run config and its full Megatron state (no Megatron needed)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: must be one of {sorted(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    shape = shape_of(cfg)
    tokenizer_dir = Path(tokenizer) if tokenizer is not None else None
    if tokenizer_dir is not None and not tokenizer_dir.is_dir():
        raise ValueError(f"--tokenizer {tokenizer_dir}: not a directory")
    special = _special_tokens(tokenizer_dir, shape.vocab_size)
    state = {k: v.to(torch_dtype) for k, v in megatron_to_hf(full, shape).items()}
    padding = {k: v.to(torch_dtype) for k, v in vocab_padding(full, shape).items()}

    save = Path(save_dir)
    save.mkdir(parents=True, exist_ok=True)
    written = hf_io.save_sharded(state, save, hf_io.parse_size(max_shard_size))
    if padding:
        from safetensors.torch import save_file

        save_file(padding, str(save / hf_io.PADDING_FILE), metadata={"format": "pt"})
    (save / "config.json").write_text(json.dumps(hf_config(cfg, torch_dtype, special), indent=2) + "\n")
    generation = {"do_sample": False, **{k: v for k, v in special.items() if v is not None}}
    (save / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    for name in MODEL_FILES:
        shutil.copy2(HF_MODEL_DIR / name, save / name)
    copied = hf_io.copy_tokenizer(tokenizer_dir, save) if tokenizer_dir is not None else []
    logger.info("wrote %s: %d tensors in %s, tokenizer files %s", save, len(state), written, copied or "none")
    return save


def convert_to_hf(
    load_dir: str | Path,
    save_dir: str | Path,
    *,
    ckpt_step: int | None = None,
    tokenizer: str | Path | None = None,
    dtype: str = "bf16",
    max_shard_size: str | int = "5GB",
) -> Path:
    """A checkpoint saved at any layout -> HF directory, in one CPU process."""
    from ssa_megatron.train.checkpoint import load_full_state_dict

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: must be one of {sorted(DTYPES)}")
    cfg, full = load_full_state_dict(load_dir, ckpt_step)
    if tokenizer is None and cfg.data.tokenizer and Path(cfg.data.tokenizer).is_dir():
        tokenizer = cfg.data.tokenizer
    if tokenizer is None:
        logger.warning("no tokenizer (--tokenizer, or the run's data.tokenizer directory): none copied")
    return export_hf(cfg, full, save_dir, tokenizer=tokenizer, dtype=dtype, max_shard_size=max_shard_size)
