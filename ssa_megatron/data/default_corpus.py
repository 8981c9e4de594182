"""The embedded default corpus: text every machine has, through the same tools as real data.

The Python standard library's own ``.py`` sources (found via ``sysconfig``; tests and
site-packages excluded, sorted paths, the first ``MAX_BYTES``) -> a byte-level BPE of
``VOCAB_SIZE`` -> Megatron indexed data, built with ``train_tokenizer_from_files`` and
``run_preprocess`` exactly as the CLIs do. No download, a few seconds on 2 cores.

The build lands in ``<cache_dir>/default_corpus/<content hash>/`` by one directory rename, so
it is either complete or absent. Concurrent callers are safe: a file lock makes ranks on one
node wait for the first builder; ranks on other nodes sharing ``cache_dir`` may build too, and
the first rename wins (the builds are deterministic, so any copy is the same).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import sysconfig
import tempfile

from ssa_megatron.data.indexed_format import read_header
from ssa_megatron.data.preprocess import PreprocessConfig, run_preprocess
from ssa_megatron.data.shards import output_prefix_for
from ssa_megatron.data.tokenizer import TOKENIZER_JSON, train_tokenizer_from_files

log = logging.getLogger(__name__)

VOCAB_SIZE = 4096
MAX_BYTES = 8 << 20
BUILD_VERSION = 1  # bump when the recipe changes, to rebuild caches
# Tests, installed packages and generated data tables (codecs, pydoc topics) are not the code
# we want the model to see, and their long non-ASCII runs tokenise slowly.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
              "encodings", "pydoc_data"}


def stdlib_sources(max_bytes: int = MAX_BYTES) -> list[str]:
    """UTF-8 ``.py`` files of the standard library, sorted by relative path, up to ``max_bytes``."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in _SKIP_DIRS]
        found.extend(os.path.relpath(os.path.join(d, f), root) for f in files if f.endswith(".py"))
    picked, total = [], 0
    for rel in sorted(found):
        path = os.path.join(root, rel)
        try:
            with open(path, encoding="utf-8") as f:
                size = len(f.read())
        except (OSError, UnicodeDecodeError):
            continue
        if size == 0:
            continue
        picked.append(path)
        total += size
        if total >= max_bytes:
            break
    if not picked:
        raise FileNotFoundError(f"no readable .py files under the standard library at {root}; "
                                "set data.data_path to your own data instead")
    return picked


def _fingerprint(files: list[str]) -> str:
    h = hashlib.sha256(f"v{BUILD_VERSION} vocab{VOCAB_SIZE}".encode())
    for path in files:
        with open(path, "rb") as f:
            h.update(os.path.basename(path).encode() + b"\0" + f.read())
    return h.hexdigest()[:16]


def _paths(build_dir: str) -> tuple[str, str]:
    return os.path.join(build_dir, "tokenizer"), output_prefix_for(os.path.join(build_dir, "stdlib"), "text")


def _complete(build_dir: str) -> bool:
    tokenizer_dir, prefix = _paths(build_dir)
    try:
        read_header(prefix)
    except (OSError, ValueError):
        return False
    return os.path.isfile(os.path.join(tokenizer_dir, TOKENIZER_JSON))


def _build(files: list[str], tmp: str) -> None:
    tokenizer_dir, _ = _paths(tmp)
    train_tokenizer_from_files(files, tokenizer_dir, vocab_size=VOCAB_SIZE, input_format="text")
    out = os.path.join(tmp, "stdlib")
    run_preprocess(PreprocessConfig(inputs=tuple(files), output_prefix=out, tokenizer=tokenizer_dir,
                                    input_format="text", workers=1, progress=False))
    shutil.rmtree(out + ".shards")  # restart bookkeeping, not needed once complete


def prepare_default_corpus(cache_dir: str) -> tuple[str, str]:
    """(tokenizer_dir, data_prefix) of the default corpus, built once and then cached."""
    files = stdlib_sources()
    root = os.path.join(os.path.abspath(cache_dir), "default_corpus")
    final = os.path.join(root, _fingerprint(files))
    if not _complete(final):
        os.makedirs(root, exist_ok=True)
        with open(final + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # other local ranks wait here for the first builder
            if not _complete(final):
                log.info("building the default corpus from %d standard-library files into %s",
                         len(files), final)
                tmp = tempfile.mkdtemp(prefix=".build-", dir=root)
                try:
                    _build(files, tmp)
                    if os.path.isdir(final) and not _complete(final):  # a crashed build's leftover
                        shutil.rmtree(final)
                    try:
                        os.replace(tmp, final)
                    except OSError:
                        if not _complete(final):  # another node's builder won the rename
                            raise
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
    return _paths(final)
