"""Shared set-up of the evaluation tests: tiny random HF SSA models and a tokenizer, no Megatron.

transformers is imported at collection (before any Megatron model could install the trainer's CPU
shim, see tests/convert/conftest.py); remote code goes to a private modules cache.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="ssa_hf_modules_"))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import transformers.generation  # noqa: E402,F401
from eval.helpers import sample_text, tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE trained on the sample text, saved as an HF tokenizer directory (vocab <= 300)."""
    from ssa_megatron.data.tokenizer import train_bpe_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_bpe_tokenizer([sample_text(400, s) for s in range(5)], str(out), vocab_size=300)
    return out


@pytest.fixture(scope="session")
def hf_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory, tokenizer_dir, hf_tokenizer):
    """A tiny random SSA model saved as an HF export (config + weights + model code + tokenizer)."""
    import shutil

    from ssa_megatron.convert.to_hf import HF_MODEL_DIR, MODEL_FILES

    out = tmp_path_factory.mktemp("export")
    model = tiny_model(1, vocab=len(hf_tokenizer), block_size=8, top_k=2)
    model.config.eos_token_id = hf_tokenizer.eos_token_id
    model.config.auto_map = {"AutoConfig": "configuration_ssa.SSAConfig", "AutoModelForCausalLM": "modeling_ssa.SSAForCausalLM"}
    model.save_pretrained(str(out))
    for name in MODEL_FILES:
        shutil.copy2(HF_MODEL_DIR / name, out / name)
    hf_tokenizer.save_pretrained(str(out))
    return out
