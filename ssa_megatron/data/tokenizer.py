"""Hugging Face tokenizer directories: load one (e.g. a local Llama-3) or train a byte-level BPE.

A tokenizer directory holds ``tokenizer.json`` (the HF ``tokenizers`` model) and
``tokenizer_config.json`` naming the special tokens (``bos_token``, ``eos_token``,
``pad_token``), the layout ``transformers.AutoTokenizer`` also reads. The end-of-document id
Megatron appends (``eod``) is the EOS token's id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from ssa_megatron.data.inputs import resolve_inputs
from ssa_megatron.data.readers import ReadStats, iter_texts

log = logging.getLogger(__name__)

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
# Used only when tokenizer_config.json names no eos_token; the choice is logged.
KNOWN_EOS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


def _token_content(value) -> str | None:
    """tokenizer_config.json stores a token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """An HF tokenizer plus the ids Megatron's datasets need.

    ``vocab_size`` counts added tokens (it is the embedding size before padding); ``eod`` is the
    EOS id; ``bos`` is None when the tokenizer has no BOS token; ``pad`` exists only when a pad
    token is defined (Megatron's datasets then mask it; otherwise they use -1).
    ``encode`` adds no special tokens, ``decode`` keeps them.
    """

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.tokenizer_json = os.path.join(self.path, TOKENIZER_JSON)
        if not os.path.isfile(self.tokenizer_json):
            raise FileNotFoundError(
                f"tokenizer {path!r}: no {TOKENIZER_JSON} there; pass a Hugging Face tokenizer "
                "directory (e.g. a local Llama-3 download) or train one with tools/train_tokenizer.py")
        with open(self.tokenizer_json, "rb") as f:
            raw = f.read()
        self.fingerprint = hashlib.sha256(raw).hexdigest()[:16]
        try:
            self._tok = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # the tokenizers library raises plain Exception with a serde message
            raise ValueError(f"tokenizer {path!r}: {self.tokenizer_json} is not a Hugging Face tokenizer file "
                             f"({' '.join(str(e).split())}); pass a tokenizer directory saved by HF "
                             "tokenizers/transformers or tools/train_tokenizer.py") from None
        config_path = os.path.join(self.path, TOKENIZER_CONFIG)
        config = {}
        if os.path.isfile(config_path):
            try:
                with open(config_path, encoding="utf-8") as f:
                    config = json.load(f)
            except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
                raise ValueError(f"tokenizer {path!r}: {config_path} is not valid JSON ({e}); fix or "
                                 "delete it (it names the special tokens)") from None
            if not isinstance(config, dict):
                raise ValueError(f"tokenizer {path!r}: {config_path} must hold a JSON object")
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eod = self._special_id(config, "eos_token", required=True)
        self.bos = self._special_id(config, "bos_token", required=False)
        self._pad = self._special_id(config, "pad_token", required=False)
        # Megatron hashes this into its dataset cache names: same tokenizer.json, same caches.
        self.unique_identifiers = {"class": "HFTokenizer", "tokenizer_json_sha256": self.fingerprint}

    def _special_id(self, config: dict, name: str, *, required: bool) -> int | None:
        token = _token_content(config.get(name))
        if token is None and required:
            token = next((t for t in KNOWN_EOS if self._tok.token_to_id(t) is not None), None)
            if token is None:
                raise ValueError(
                    f"tokenizer {self.path}: {TOKENIZER_CONFIG} names no {name} and none of "
                    f"{KNOWN_EOS} is in the vocabulary; add '\"{name}\": \"<your EOS token>\"' to "
                    f"{TOKENIZER_CONFIG}")
            log.info("tokenizer %s: no %s in %s, using %r", self.path, name, TOKENIZER_CONFIG, token)
        if token is None:
            return None
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer {self.path}: {name} {token!r} from {TOKENIZER_CONFIG} is "
                             f"not in the vocabulary; fix {TOKENIZER_CONFIG}")
        return token_id

    @property
    def pad(self) -> int:
        if self._pad is None:
            raise AttributeError("this tokenizer defines no pad token")
        return self._pad

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(map(int, ids)), skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, eod={self.eod})"


def load_tokenizer(path: str) -> Tokenizer:
    """Load an HF tokenizer directory (``tokenizer.json`` + optional ``tokenizer_config.json``)."""
    return Tokenizer(path)


@dataclass(frozen=True)
class SpecialTokens:
    """Special tokens of a trained tokenizer; they take the first ids, in this order."""

    eos: str = "<|endoftext|>"
    bos: str = "<|begin_of_text|>"
    pad: str = "<|pad|>"
    extra: tuple[str, ...] = ()

    def all(self) -> list[str]:
        tokens = [self.eos, self.bos, self.pad, *self.extra]
        if len(set(tokens)) != len(tokens) or not all(tokens):
            raise ValueError(f"special tokens must be distinct and non-empty, got {tokens}")
        return tokens


def train_bpe_tokenizer(texts: Iterable[str], output_dir: str, *, vocab_size: int,
                        special: SpecialTokens = SpecialTokens(), overwrite: bool = False) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style: every byte representable, lossless decode).

    Writes ``output_dir`` atomically (built in a sibling temp dir, then renamed).
    """
    specials = special.all()
    minimum = 256 + len(specials)
    if vocab_size <= minimum:
        raise ValueError(f"--vocab-size={vocab_size}: must exceed {minimum} "
                         f"(256 byte tokens + {len(specials)} special tokens)")
    if os.path.exists(output_dir) and not overwrite:
        raise FileExistsError(f"{output_dir} already exists; choose another --output-dir or pass --overwrite")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    seen = _CountingIterator(texts)
    tok.train_from_iterator(seen, trainer)
    if seen.count == 0:
        raise ValueError("no text to train the tokenizer on: the inputs hold no documents")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": special.eos,
              "bos_token": special.bos, "pad_token": special.pad, "add_bos_token": False,
              "model_max_length": 1 << 30}
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tokenizer-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is a normal directory
    try:
        tok.save(os.path.join(tmp, TOKENIZER_JSON))
        with open(os.path.join(tmp, TOKENIZER_CONFIG), "w") as f:
            json.dump(config, f, indent=2)
        with open(os.path.join(tmp, "special_tokens_map.json"), "w") as f:
            json.dump({k: config[k] for k in ("eos_token", "bos_token", "pad_token")}, f, indent=2)
        if os.path.exists(output_dir):
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return Tokenizer(output_dir)


def train_tokenizer_from_files(inputs: list[str], output_dir: str, *, vocab_size: int,
                               json_keys: tuple[str, ...] = ("text",), input_format: str = "auto",
                               text_separator: str | None = None, max_bytes: int | None = None,
                               special: SpecialTokens = SpecialTokens(),
                               overwrite: bool = False) -> tuple[Tokenizer, ReadStats]:
    """Train on the documents of JSONL/text/parquet inputs (the first ``max_bytes`` characters)."""
    files = resolve_inputs(inputs, input_format)
    keys = ("text",) if all(f.format == "text" for f in files) else json_keys
    stats = ReadStats()
    texts = iter_texts(files, keys, stats, text_separator=text_separator, max_bytes=max_bytes)
    return train_bpe_tokenizer(texts, output_dir, vocab_size=vocab_size, special=special,
                               overwrite=overwrite), stats


class _CountingIterator(Iterator[str]):
    """Counts what the trainer consumed, so an empty corpus fails loudly instead of yielding
    a bytes-only vocabulary."""

    def __init__(self, texts: Iterable[str]):
        self._it = iter(texts)
        self.count = 0

    def __next__(self) -> str:
        text = next(self._it)
        self.count += 1
        return text
