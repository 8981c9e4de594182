"""Prefill and decoding of the exported HF SSA model on one GPU: full vs sparse attention.

    python tools/benchmark_hf_decode.py --out docs/benchmarks/hf_decode            # 8k, 32k, 128k
    python tools/benchmark_hf_decode.py --contexts 8192 --decode-tokens 32 --out /tmp/quick

Builds the paper's 1B shape (hidden 2048, 16 layers, 32 query / 2 KV heads, head dim 64, vocab 128256,
tied) with random weights in bf16, exports nothing (the model class is the one every export ships),
then for each context length and attention setting (full; sparse block 16 with top-16 and top-64):

1. checks, at a short context, that cached decoding gives the uncached forward's logits and that the
   Triton prefill (``ssa_kernels``) agrees with the torch path (bf16 tolerances, printed);
2. times the prefill of ``context`` tokens (ms) and ``--decode-tokens`` greedy decoding steps with the
   cache (ms/token, CUDA events, after warm-up), and reports the KV-cache memory (keys, values and,
   for sparse, the mean-pooled block keys) and the peak GPU memory.

Writes ``<out>.json`` (with GPU/torch/triton/transformers versions) and ``<out>.md`` (the table).
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch

from ssa_megatron.convert.hf_model import modeling_ssa as hf
from ssa_megatron.convert.hf_model.configuration_ssa import SSAConfig

ONE_B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=2, head_dim=64, rope_theta=500000.0, max_position_embeddings=131072,
             tie_word_embeddings=True, block_size=16, top_k=16)
SETTINGS = [("full", 16, 16), ("sparse", 16, 16), ("sparse", 16, 64)]


def build(dtype: torch.dtype) -> hf.SSAForCausalLM:
    torch.manual_seed(0)
    model = hf.SSAForCausalLM(SSAConfig(**ONE_B)).to(device="cuda", dtype=dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    return model


@torch.no_grad()
def check(model, context: int = 2048, steps: int = 8) -> dict:
    """Max |logit| differences: cached vs uncached decoding per setting; Triton vs torch sparse prefill."""
    ids = torch.randint(0, ONE_B["vocab_size"], (1, context + steps), device="cuda")
    out = {}
    for mode, bs, k in SETTINGS:
        call = dict(attention_mode=mode, block_size=bs, top_k=k)
        reference = model(ids, **call).logits.float()
        step = model(ids[:, :context], use_cache=True, **call)
        cache, worst = step.cache, (step.logits.float() - reference[:, :context]).abs().max().item()
        for t in range(context, context + steps):
            step = model(ids[:, t : t + 1], cache=cache, use_cache=True, **call)
            worst = max(worst, (step.logits[:, 0].float() - reference[:, t]).abs().max().item())
        out[f"{mode}_top{k}_cached_vs_uncached"] = worst
    model.config.sparse_backend = "torch"
    torch_path = model(ids, attention_mode="sparse").logits.float()
    model.config.sparse_backend = "auto"
    out["sparse_triton_vs_torch_prefill"] = (model(ids, attention_mode="sparse").logits.float() - torch_path).abs().max().item()
    out["triton_kernels_available"] = hf._triton_kernels() is not None
    return out


def timed(fn) -> tuple[float, object]:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    result = fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end), result


@torch.no_grad()
def measure(model, context: int, decode_tokens: int, mode: str, block_size: int, top_k: int) -> dict:
    call = dict(attention_mode=mode, block_size=block_size, top_k=top_k)
    ids = torch.randint(0, ONE_B["vocab_size"], (1, context), device="cuda")
    model(ids[:, :1024], use_cache=True, **call)  # warm-up (kernels, autotune)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    prefill_ms, out = timed(lambda: model(ids, use_cache=True, logits_to_keep=1, **call))
    cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    for _ in range(3):  # warm-up decoding steps
        token = model(token, cache=cache, use_cache=True, **call).logits[:, -1:].argmax(-1)

    def decode():
        nonlocal token
        for _ in range(decode_tokens):
            token = model(token, cache=cache, use_cache=True, **call).logits[:, -1:].argmax(-1)

    decode_ms, _ = timed(decode)
    layer = cache.layers[0]
    used = cache.seen * 2 * layer.k.shape[1] * layer.k.shape[3] * layer.k.element_size() * len(cache.layers)
    return {"context": context, "mode": mode, "block_size": block_size, "top_k": top_k if mode == "sparse" else None,
            "prefill_ms": prefill_ms, "decode_ms_per_token": decode_ms / decode_tokens,
            "kv_cache_used_mib": used / 2**20, "cache_allocated_mib": cache.memory_bytes() / 2**20,
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--out", required=True, help="path prefix for .json and .md")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    import transformers
    import triton

    model = build(torch.bfloat16)
    checks = check(model)
    print(json.dumps({"checks": checks}), flush=True)
    rows = []
    for context in args.contexts:
        for mode, bs, k in SETTINGS:
            rows.append(measure(model, context, args.decode_tokens, mode, bs, k))
            print(json.dumps(rows[-1]), flush=True)
    for row in rows:
        full = next(r for r in rows if r["context"] == row["context"] and r["mode"] == "full")
        row["decode_speedup_vs_full"] = full["decode_ms_per_token"] / row["decode_ms_per_token"]
        row["prefill_speedup_vs_full"] = full["prefill_ms"] / row["prefill_ms"]
    meta = {"device": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "triton": triton.__version__, "transformers": transformers.__version__, "model": ONE_B, "dtype": "bf16",
            "batch": 1, "decode_tokens": args.decode_tokens}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps({"meta": meta, "checks": checks, "rows": rows}, indent=2))
    lines = [
        "# HF export: prefill and decoding, full vs sparse attention\n",
        f"{meta['device']}, {meta['date']}, torch {meta['torch']}, triton {meta['triton']}, transformers "
        f"{meta['transformers']}; the 1B shape (random weights), bf16, batch 1, {args.decode_tokens} greedy tokens "
        f"after the prefill. Checks (max |logit| difference): {json.dumps(checks)}\n",
        "| context | attention | prefill ms | decode ms/token | decode vs full | KV cache MiB (used / allocated) | peak GPU MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = "full" if r["mode"] == "full" else f"sparse bs {r['block_size']} top-{r['top_k']}"
        lines.append(f"| {r['context']} | {name} | {r['prefill_ms']:.1f} | {r['decode_ms_per_token']:.2f} | "
                     f"{r['decode_speedup_vs_full']:.2f}x | {r['kv_cache_used_mib']:.0f} / {r['cache_allocated_mib']:.0f} | "
                     f"{r['peak_gpu_mib']:.0f} |")
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
