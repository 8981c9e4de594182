"""Evaluation text: documents from text/JSONL files or a Megatron indexed dataset, as token ids.

- ``*.jsonl`` / ``*.json`` (one JSON object per line, the text under ``json_key``): one document a line;
- any other file: the whole file is one document (WikiText, a PG19 book);
- a Megatron indexed dataset prefix (``PREFIX.bin`` + ``PREFIX.idx``): its documents' tokens as stored.

Text documents keep their text so word- and byte-level perplexity can be reported; indexed documents
are decoded with the tokenizer for that when one is given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Document:
    ids: list[int]
    text: str | None  # None: counts of words/bytes unknown

    @property
    def words(self) -> int | None:
        return None if self.text is None else len(self.text.split())

    @property
    def bytes(self) -> int | None:
        return None if self.text is None else len(self.text.encode("utf-8"))


def _encode(tokenizer, text: str) -> list[int]:
    if tokenizer is None:
        raise ValueError("text input needs a tokenizer: the model directory has none, pass --tokenizer DIR")
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _texts(path: Path, json_key: str) -> list[str]:
    if path.suffix in (".jsonl", ".json"):
        texts = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if json_key not in record:
                raise ValueError(f"{path}:{n}: no key {json_key!r} (pass --json-key)")
            texts.append(record[json_key])
        return texts
    return [path.read_text(encoding="utf-8")]


def read_documents(
    paths: list[str], tokenizer=None, *, json_key: str = "text", max_documents: int | None = None
) -> list[Document]:
    """Documents of every input, in order (at most ``max_documents``)."""
    from ssa_megatron.data.indexed_format import bin_path, idx_path, read_index, read_sequence

    docs: list[Document] = []
    for name in paths:
        path = Path(name)
        if Path(idx_path(name)).is_file() and Path(bin_path(name)).is_file():
            index = read_index(name)
            for i in range(len(index.sequence_lengths)):
                ids = read_sequence(name, index, i).astype("int64").tolist()
                text = tokenizer.decode(ids) if tokenizer is not None else None
                docs.append(Document(ids, text))
        elif path.is_file():
            docs.extend(Document(_encode(tokenizer, t), t) for t in _texts(path, json_key) if t)
        else:
            raise ValueError(f"{name}: neither a file nor a Megatron indexed dataset prefix (PREFIX.bin/.idx)")
        if max_documents is not None and len(docs) >= max_documents:
            return docs[:max_documents]
    if not docs:
        raise ValueError(f"no documents in {paths}")
    return docs


def concatenate(docs: list[Document], separator: int | None) -> Document:
    """One document: every document's tokens, ``separator`` between them (None: nothing)."""
    ids: list[int] = []
    for i, doc in enumerate(docs):
        if i and separator is not None:
            ids.append(separator)
        ids.extend(doc.ids)
    texts = [d.text for d in docs]
    return Document(ids, None if any(t is None for t in texts) else "\n\n".join(texts))


def sequences(docs: list[Document], seq_len: int, count: int, separator: int | None = None) -> torch.Tensor:
    """``[count', seq_len]`` int64: consecutive slices of the concatenated documents (count' <= count)."""
    stream = concatenate(docs, separator).ids
    n = min(count, len(stream) // seq_len)
    if n == 0:
        raise ValueError(f"the data holds {len(stream)} tokens, fewer than one sequence of {seq_len}")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)
