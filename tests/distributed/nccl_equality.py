"""The layout-equality check on GPUs with NCCL in bf16: TP=2 and PP=2 vs one GPU. Not a pytest file.

    python tests/distributed/nccl_equality.py --out docs/benchmarks/parallel_equality_gpu

Runs ``run_layout.py`` under torchrun for one GPU, TP=2 and PP=2 from the same initial weights and
data (a 8-layer SSA model, seq 1024, Triton kernels), and writes the max differences of the logged
LM/alignment losses and of the final weights as JSON and a markdown table. The 4-GPU run of
issue 12 (``gpu_layouts.py``) uses ``compare`` and ``versions`` from here.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/
from distributed.launch import launch_layout  # noqa: E402

MODEL = {"num_layers": 8, "hidden_size": 512, "ffn_hidden_size": 1536, "num_attention_heads": 8,
         "num_query_groups": 2, "seq_length": 1024}
SSA = {"block_size": 16, "top_k": 8}
TRAIN = {"dtype": "bf16", "device": "cuda", "micro_batch_size": 2, "global_batch_size": 8, "lr": 1e-3}
LAYOUTS = {"tp2": {"tensor_model_parallel_size": 2}, "pp2": {"pipeline_model_parallel_size": 2}}


def launch(nproc, layout, init, out, steps):
    return launch_layout(nproc, init, out, steps=steps, layout=layout, model=MODEL, ssa=SSA, train=TRAIN)


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def compare(single: dict, result: dict, initial: dict) -> dict:
    """One layout's ``run_layout.py`` result against the one-process run from the same ``initial`` weights."""
    ref = single["ranks"][0]["records"]
    got = result["ranks"][-1]["records"]  # the last rank is on the last pipeline stage
    weights = [(result["weights"][k] - v).abs().max().item() for k, v in single["weights"].items()]
    updates = [(v - initial[k]).abs().max().item() for k, v in single["weights"].items()]
    diff_sq = sum(((result["weights"][k] - v) ** 2).sum().item() for k, v in single["weights"].items())
    update_sq = sum(((v - initial[k]) ** 2).sum().item() for k, v in single["weights"].items())
    return {
        "lm_loss_max_rel_diff": max(rel(g["lm"], r["lm"]) for g, r in zip(got, ref)),
        "alignment_loss_max_rel_diff": max(rel(g["align"], r["align"]) for g, r in zip(got, ref)),
        "per_layer_alignment_max_rel_diff": max(rel(a, b) for g, r in zip(got, ref) for a, b in zip(g["layers"], r["layers"])),
        "weights_max_abs_diff": max(weights),
        "weights_max_abs_update": max(updates),
        # ||W_layout - W_single|| / ||W_single - W_init||: the difference relative to what training moved
        "weights_rel_l2_diff_vs_update": (diff_sq / update_sq) ** 0.5,
        "lm_loss_first_last": [ref[0]["lm"], ref[-1]["lm"]],
        # draws are keyed by the micro-batch's global position: all ranks together draw what one process does
        "modes_match": {tuple(m) for r in result["ranks"] for m in r["modes"]} == set(map(tuple, single["ranks"][0]["modes"])),
    }


def versions() -> dict:
    """What the report's header names: the device (or "cpu"), how many, the date and the versions."""
    cuda = torch.cuda.is_available()
    return {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "gpus": torch.cuda.device_count() if cuda else 0,
            "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "megatron_core": __import__("megatron.core").core.__version__}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="path prefix for .json and .md")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                        help="fp32 runs the torch reference ops (separates layout bugs from bf16 rounding)")
    args = parser.parse_args()
    TRAIN["dtype"] = args.dtype
    if args.dtype == "fp32":
        SSA["backend"] = "torch"
    work = Path(tempfile.mkdtemp())
    init = work / "init.pt"
    single = launch(1, {}, init, work / "single.pt", args.steps)
    initial = torch.load(init)
    rows = []
    for name, layout in LAYOUTS.items():
        result = launch(2, layout, init, work / f"{name}.pt", args.steps)
        rows.append({"layout": name, **compare(single, result, initial)})
        print(json.dumps(rows[-1]), flush=True)
    meta = {**versions(), "model": MODEL, "ssa": SSA, "train": TRAIN, "steps": args.steps}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# Layout equality on GPU (NCCL, {args.dtype})\n", f"{meta['device']} x {meta['gpus']}, {meta['date']}, torch {meta['torch']}, "
             f"megatron-core {meta['megatron_core']}; model {MODEL}, {SSA}, {args.steps} steps, both vs one GPU.\n",
             "| layout | LM loss max rel diff | alignment loss max rel diff | per-layer alignment max rel diff | weights max abs diff | max abs update | weight diff / update (L2) | modes match |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['lm_loss_max_rel_diff']:.2e} | {r['alignment_loss_max_rel_diff']:.2e} | "
                     f"{r['per_layer_alignment_max_rel_diff']:.2e} | {r['weights_max_abs_diff']:.2e} | {r['weights_max_abs_update']:.2e} | "
                     f"{r['weights_rel_l2_diff_vs_update']:.2e} | {r['modes_match']} |")
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
