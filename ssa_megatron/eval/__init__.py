"""The paper's evaluation suite, run on an HF export or a Megatron checkpoint (converted in memory).

- ``models``: load a model (+ tokenizer) and parse attention settings (``full``, ``sparse:bs=16,k=16``);
- ``perplexity``: sliding-window perplexity (token, word, byte) on text/JSONL or Megatron indexed data;
- ``attention``: AttnSparsity (Definition 1), dropped mass, entropy, sink mass, alignment gap,
  per layer and head, computed blockwise (never ``[seq, seq]``);
- ``sweep``: perplexity and sparsity vs the sparse budget, JSON + PNG, one line per model;
- ``lm_eval_runner``: lm-evaluation-harness in both attention modes, the paper's tasks and shots;
- ``niah``: RULER-style single needle in a haystack, generator, scorer, heatmap;
- ``report``: one markdown page gathering several run directories.

One CLI: ``ssa-eval {perplexity,attention,sweep,lm-eval,niah,report}`` (``ssa_megatron.eval.cli``).
"""
