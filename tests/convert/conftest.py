"""Shared set-up of the conversion tests.

transformers is imported here, at collection, before any test builds a Megatron model: the CPU
support shim of the trainer replaces ``torch.cuda.Stream`` with a function, after which
transformers' generation modules (``torch.cuda.Stream | None`` annotations) no longer import.
Remote code goes to a private modules cache, not the user's.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="ssa_hf_modules_"))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import transformers.generation  # noqa: E402,F401
import transformers.generation.continuous_batching  # noqa: E402,F401
from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: E402,F401
