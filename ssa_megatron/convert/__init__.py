"""Hugging Face conversion both ways, and the self-contained HF model shipped with an export.

- ``to_hf.convert_to_hf`` / ``ssa-convert to-hf``: a Megatron checkpoint (any layout) -> HF directory;
- ``from_hf.convert_from_hf`` / ``ssa-convert from-hf``: our export, a plain Llama or the SSA
  authors' release -> a Megatron checkpoint that ``ssa-pretrain --load`` continues;
- ``keys``: the weight maps (fused QKV un-interleaving per KV group, SwiGLU fc1 split, vocab padding);
- ``hf_model/``: ``configuration_ssa.py`` and ``modeling_ssa.py``, copied into every export.
"""
