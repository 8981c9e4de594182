"""Speed of the evaluation suite on one GPU: attention analysis at 32k and perplexity at 8k, full vs sparse.

    python tools/benchmark_eval.py --out docs/benchmarks/eval_1gpu

The 1B shape of the HF export (``benchmark_hf_decode.build``: random weights, bf16) on random tokens
(only time matters). Reports:
1. attention analysis (``ssa_megatron.eval.attention.analyse``) of one 32,768-token sequence with the
   paper's budget (block 16, top-16), full inference alone and full + sparse inference, as seconds
   per 1M analysed tokens (target: under a minute);
2. sliding-window perplexity at window 8192, stride 256 (the PG19 protocol) in full and sparse mode:
   scored tokens per second and the sparse/full time ratio (target: sparse within 1.5x of full).
Writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch
from benchmark_hf_decode import ONE_B, build  # the same model as the decoding benchmark

from ssa_megatron.eval.attention import analyse
from ssa_megatron.eval.models import EvalModel, Setting
from ssa_megatron.eval.perplexity import sliding_windows, window_nll

BUDGET = Setting("sparse", 16, 16)


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return result, time.perf_counter() - start


def attention_seconds_per_million(model: EvalModel, seq: int, inference: tuple[str, ...]) -> float:
    ids = torch.randint(0, ONE_B["vocab_size"], (1, seq))
    analyse(model, ids[:, :2048], [BUDGET], inference=inference, progress=False)  # warm-up (Triton, allocator)
    _, seconds = timed(lambda: analyse(model, ids, [BUDGET], inference=inference, progress=False))
    return seconds * 1e6 / seq


def perplexity_tokens_per_second(model: EvalModel, setting: Setting, window: int, stride: int, windows: int) -> float:
    ids = torch.randint(0, ONE_B["vocab_size"], (window + stride * windows,))
    chosen = [w for w in sliding_windows(len(ids), window, stride) if w.end - w.begin == window][1 : windows + 1]
    window_nll(model.model, ids, chosen[:1], setting)  # warm-up
    (_, scored), seconds = timed(lambda: sum_nll(model, ids, chosen, setting))
    return scored / seconds


def sum_nll(model: EvalModel, ids, windows, setting):
    total, count = 0.0, 0
    for w in windows:  # one window per forward: an 8k window of the 1B model fills the GPU
        nll, n = window_nll(model.model, ids, [w], setting)
        total, count = total + nll, count + n
    return total, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="path prefix for .json and .md")
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--windows", type=int, default=16)
    args = parser.parse_args()
    model = EvalModel(build(torch.bfloat16), None, "1B shape, random weights", "random")
    attention = {
        "full inference": attention_seconds_per_million(model, args.seq, ("full",)),
        "full + sparse inference": attention_seconds_per_million(model, args.seq, ("full", "sparse")),
    }
    print(json.dumps(attention), flush=True)
    ppl = {label: perplexity_tokens_per_second(model, setting, 8192, 256, args.windows)
           for label, setting in (("full", Setting("full")), ("sparse bs 16 top-16", BUDGET))}
    print(json.dumps(ppl), flush=True)
    meta = {"device": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "seq": args.seq, "windows": args.windows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps({"meta": meta, "attention_s_per_1M_tokens": attention,
                                                    "perplexity_scored_tokens_per_s": ppl}, indent=2))
    ratio = ppl["full"] / ppl["sparse bs 16 top-16"]
    lines = [
        "# Evaluation suite speed, one GPU\n",
        f"{meta['device']}, {meta['date']}, torch {meta['torch']}; the 1B shape in bf16 (random weights), random tokens.\n",
        f"Attention analysis of one {args.seq}-token sequence, budget block 16 top-16 (target: < 60 s per 1M tokens):\n",
        "| inference | seconds per 1M tokens |", "|---|---|",
        *[f"| {k} | {v:.1f} |" for k, v in attention.items()],
        f"\nSliding-window perplexity, window 8192, stride 256, {args.windows} windows (target: sparse within 1.5x of full):\n",
        "| attention | scored tokens/s |", "|---|---|",
        *[f"| {k} | {v:.0f} |" for k, v in ppl.items()],
        f"\nSparse takes {ratio:.2f}x the time of full.",
    ]
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
