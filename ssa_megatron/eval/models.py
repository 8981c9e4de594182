"""Models to evaluate, and the attention settings they are evaluated at.

A model is an HF export directory (``from_pretrained(..., trust_remote_code=True)``) or a Megatron
checkpoint directory converted in memory with ``ssa_megatron.convert`` (no files written). A setting
is one attention configuration of the same weights, spelled on the command line as

    full                     causal softmax attention
    sparse                   block-sparse at the model's own block_size/top_k
    sparse:k=64              ... at top_k 64 (receptive field block_size * 64)
    sparse:bs=32,k=16        ... at block_size 32, top_k 16
    sparse:rf=1024           ... top_k = 1024 // block_size (receptive field in tokens)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger("ssa_megatron.eval")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Setting:
    """One attention configuration: ``mode`` full|sparse; block_size/top_k None = the model's own."""

    mode: str
    block_size: int | None = None
    top_k: int | None = None

    def __post_init__(self):
        if self.mode not in ("full", "sparse"):
            raise ValueError(f"setting mode={self.mode!r}: must be 'full' or 'sparse'")
        for name in ("block_size", "top_k"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"setting {name}={value}: must be >= 1")

    def resolve(self, config) -> "Setting":
        """The same setting with the model config's block_size/top_k filled in (full keeps None)."""
        if self.mode == "full":
            return self
        return Setting("sparse", self.block_size or config.block_size, self.top_k or config.top_k)

    @property
    def label(self) -> str:
        if self.mode == "full":
            return "full"
        return f"sparse(bs={self.block_size},k={self.top_k})"

    @property
    def receptive_field(self) -> int | None:
        return None if self.mode == "full" else self.block_size * self.top_k

    def forward_kwargs(self) -> dict:
        """Per-call overrides of the HF model's forward."""
        out = {"attention_mode": self.mode}
        if self.mode == "sparse":
            out.update(block_size=self.block_size, top_k=self.top_k)
        return out

    def as_dict(self) -> dict:
        return {"label": self.label, "mode": self.mode, "block_size": self.block_size, "top_k": self.top_k,
                "receptive_field": self.receptive_field}


def parse_setting(text: str, default_block_size: int | None = None) -> Setting:
    """``full`` | ``sparse`` | ``sparse:k=64`` | ``sparse:bs=32,k=16`` | ``sparse:rf=1024`` (see module doc)."""
    mode, _, rest = text.partition(":")
    if mode not in ("full", "sparse") or (mode == "full" and rest):
        raise ValueError(f"setting {text!r}: expected full, sparse, sparse:k=K, sparse:bs=B,k=K or sparse:rf=TOKENS")
    values = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in ("bs", "k", "rf") or not value.isdigit():
            raise ValueError(f"setting {text!r}: {item!r} is not bs=INT, k=INT or rf=INT")
        values[key] = int(value)
    bs = values.get("bs", default_block_size)
    if "rf" in values:
        if "k" in values:
            raise ValueError(f"setting {text!r}: give k or rf, not both")
        if bs is None:
            raise ValueError(f"setting {text!r}: rf needs a block size (bs=, or the model's)")
        if values["rf"] % bs:
            raise ValueError(f"setting {text!r}: rf={values['rf']} is not a multiple of block_size {bs}")
        values["k"] = values["rf"] // bs
    return Setting(mode, values.get("bs"), values.get("k")) if mode == "sparse" else Setting("full")


@dataclass
class EvalModel:
    """An HF SSA model in eval mode, its tokenizer (None when none is known) and a display name."""

    model: torch.nn.Module
    tokenizer: object | None
    name: str
    source: str

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def settings(self, texts: list[str]) -> list[Setting]:
        return [parse_setting(t, self.config.block_size).resolve(self.config) for t in texts]


def _hf_tokenizer(path: Path | None):
    if path is None or not (path / "tokenizer.json").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)


def from_megatron(load_dir: str | Path, ckpt_step: int | None = None, tokenizer: str | Path | None = None):
    """(HF model in float32, tokenizer or None) from a Megatron checkpoint, converted in memory."""
    import transformers.generation  # noqa: F401  (before Megatron's CPU shim replaces torch.cuda.Stream)

    from ssa_megatron.convert.hf_model.configuration_ssa import SSAConfig
    from ssa_megatron.convert.hf_model.modeling_ssa import SSAForCausalLM
    from ssa_megatron.convert.keys import megatron_to_hf
    from ssa_megatron.convert.to_hf import _special_tokens, hf_config, shape_of
    from ssa_megatron.train.checkpoint import load_full_state_dict

    cfg, full = load_full_state_dict(load_dir, ckpt_step)
    if tokenizer is None and cfg.data.tokenizer and Path(cfg.data.tokenizer).is_dir():
        tokenizer = cfg.data.tokenizer
    tok_dir = Path(tokenizer) if tokenizer is not None else None
    special = _special_tokens(tok_dir, cfg.model.vocab_size) if tok_dir is not None else {}
    keys = hf_config(cfg, torch.float32, special)
    for drop in ("architectures", "model_type", "auto_map", "torch_dtype"):
        keys.pop(drop)
    model = SSAForCausalLM(SSAConfig(**keys))
    missing, unexpected = model.load_state_dict(megatron_to_hf(full, shape_of(cfg)), strict=False)
    tied = {"lm_head.weight"} if cfg.model.tie_embeddings else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"{load_dir}: weights do not fit the HF model (missing {missing}, unexpected {unexpected})")
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model, _hf_tokenizer(tok_dir)


def load_model(
    model: str | Path | None = None,
    *,
    load_dir: str | Path | None = None,
    ckpt_step: int | None = None,
    tokenizer: str | Path | None = None,
    dtype: str = "fp32",
    device: str | None = None,
    name: str | None = None,
) -> EvalModel:
    """Load an HF export (``model``) or a Megatron checkpoint (``load_dir``), eval mode, on ``device``
    (default: CUDA when available)."""
    if (model is None) == (load_dir is None):
        raise ValueError("give exactly one of --model (HF export directory) and --load-dir (Megatron checkpoint)")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: must be one of {sorted(DTYPES)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if model is not None:
        path = Path(model)
        if not (path / "config.json").is_file():
            raise ValueError(f"--model {path}: no config.json there; pass an HF export (ssa-convert to-hf) or use --load-dir")
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True, dtype=DTYPES[dtype])
        tok = _hf_tokenizer(Path(tokenizer) if tokenizer else path)
        source = str(path)
    else:
        hf, tok = from_megatron(load_dir, ckpt_step, tokenizer)
        hf = hf.to(DTYPES[dtype])
        source = f"{load_dir} (Megatron, step {ckpt_step if ckpt_step is not None else 'latest'})"
    hf = hf.to(device).eval()
    label = name or Path(model if model is not None else load_dir).resolve().name
    logger.info("loaded %s from %s on %s (%s)", label, source, device, dtype)
    return EvalModel(hf, tok, label, source)


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
