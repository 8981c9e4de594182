"""Hugging Face checkpoint files: sharded safetensors with an index, read back with clear errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
# Megatron's vocabulary padding rows, kept beside an export (not in the index: HF never loads it).
PADDING_FILE = "megatron_vocab_padding.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model")


def parse_size(text: str | int) -> int:
    """``"5GB"`` / ``"500MB"`` / ``123`` -> bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"max shard size {text!r}: expected e.g. 5GB, 500MB or a byte count")
    unit = (match.group(2) or "B").upper().replace("I", "")
    return int(float(match.group(1)) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[unit])


def save_sharded(state: dict[str, torch.Tensor], save_dir: Path, max_shard_bytes: int) -> list[str]:
    """Write ``state`` as safetensors shards of at most ``max_shard_bytes`` (a larger tensor gets its own)
    in key order, with ``model.safetensors.index.json`` when there is more than one. Returns the files."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(save_dir / SAFE_SINGLE), metadata=metadata)
        return [SAFE_SINGLE]
    files, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(save_dir / name), metadata=metadata)
        files.append(name)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (save_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return files + [SAFE_INDEX]


def _read_safetensors(path: Path, names: list[str] | None, where: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    if not path.is_file():
        raise ValueError(f"{where}: shard {path.name} is missing (named by the index); re-download or re-export it")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            wanted = keys if names is None else names
            missing = sorted(set(wanted) - set(keys))
            if missing:
                raise ValueError(f"{where}: {path.name} lacks {missing[:5]} that the index places there")
            return {k: f.get_tensor(k) for k in wanted}
    except ValueError:
        raise
    except Exception as err:  # safetensors' errors on a truncated or corrupt file
        raise ValueError(
            f"{where}: {path.name} cannot be read ({type(err).__name__}: {err}); the file is truncated or corrupt: "
            "re-download or re-export it"
        ) from None


def _read_bin(path: Path, where: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ValueError(f"{where}: shard {path.name} is missing (named by the index); re-download it")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{where}: {path.name} cannot be read ({type(err).__name__}); truncated or corrupt?") from None


def load_weights(load_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory (safetensors preferred, then pytorch_model.bin)."""
    where = str(load_dir)
    for index_name, reader in ((SAFE_INDEX, "safetensors"), (BIN_INDEX, "bin")):
        index_path = load_dir / index_name
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (ValueError, KeyError) as err:
                raise ValueError(f"{where}: {index_name} is not a valid index ({err})") from None
            by_file: dict[str, list[str]] = {}
            for name, file in weight_map.items():
                by_file.setdefault(file, []).append(name)
            state = {}
            for file, names in by_file.items():
                if reader == "safetensors":
                    state.update(_read_safetensors(load_dir / file, names, where))
                else:
                    part = _read_bin(load_dir / file, where)
                    missing = sorted(set(names) - set(part))
                    if missing:
                        raise ValueError(f"{where}: {file} lacks {missing[:5]} that the index places there")
                    state.update({k: part[k] for k in names})
            return state
    if (load_dir / SAFE_SINGLE).is_file():
        return _read_safetensors(load_dir / SAFE_SINGLE, None, where)
    if (load_dir / BIN_SINGLE).is_file():
        return _read_bin(load_dir / BIN_SINGLE, where)
    raise ValueError(f"{where}: no {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}: not an HF checkpoint directory")


def load_padding(load_dir: Path) -> dict[str, torch.Tensor]:
    path = load_dir / PADDING_FILE
    return _read_safetensors(path, None, str(load_dir)) if path.is_file() else {}


def read_config(load_dir: Path) -> dict:
    path = load_dir / "config.json"
    if not path.is_file():
        raise ValueError(f"{load_dir}: no config.json: not an HF checkpoint directory")
    try:
        config = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: must hold a JSON object")
    return config


def copy_tokenizer(source: Path, save_dir: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, save_dir / name)
            copied.append(name)
    return copied
