"""Budget sweep: perplexity and AttnSparsity vs the sparse receptive field, one line per model.

    ssa-eval sweep --model runs/ssa/hf runs/full/hf runs/moba/hf --data pg19.jsonl --window 8192 --stride 256 \
        --budgets 256 512 1024 2048 4096 --out runs/compare/sweep

For each model and each budget B (receptive field in tokens; ``top_k = B // block_size`` at each
``--block-size``, the model's own by default): sliding-window perplexity in sparse mode, and the
AttnSparsity of that budget's selection measured on full-mode inference (the paper's Definition 1) over
``--num-sequences`` sequences of ``--seq-len`` tokens; plus full-mode perplexity as a reference line.
Writes ``sweep.json`` and ``sweep.png`` (perplexity and sparsity vs budget, log2 budget axis).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ssa_megatron.eval import attention, perplexity
from ssa_megatron.eval.data import Document
from ssa_megatron.eval.models import EvalModel, Setting, write_json


def budget_settings(budgets: list[int], block_sizes: list[int]) -> list[Setting]:
    out = []
    for bs in block_sizes:
        for rf in budgets:
            if rf % bs or rf < bs:
                raise ValueError(f"--budgets {rf}: not a positive multiple of block size {bs}")
            out.append(Setting("sparse", bs, rf // bs))
    return out


def sweep_model(
    model: EvalModel,
    docs: list[Document],
    analysis_ids: torch.Tensor,
    budgets: list[int],
    *,
    block_sizes: list[int] | None = None,
    window: int,
    stride: int,
    batch_size: int = 1,
    prefix_token: int | None = None,
    sink_tokens: int = 4,
    progress: bool = True,
) -> dict:
    """One model's sweep: ``{"model", "full_perplexity", "points": [{setting..., perplexity, attn_sparsity}]}``."""
    settings = budget_settings(budgets, block_sizes or [model.config.block_size])
    ppl = perplexity.perplexity(
        model, docs, [Setting("full"), *settings], window=window, stride=stride, batch_size=batch_size,
        prefix_token=prefix_token, progress=progress,
    )
    attn = attention.analyse(model, analysis_ids, settings, inference=("full",), sink_tokens=sink_tokens, progress=progress)
    sparsity = attn["runs"][0]["mean"]["budgets"]
    points = []
    for setting, r in zip(settings, ppl["results"][1:]):
        s = sparsity[setting.label]
        points.append({
            **setting.as_dict(), "token_perplexity": r["token_perplexity"], "word_perplexity": r["word_perplexity"],
            "attn_sparsity": s["attn_sparsity"], "dropped_mass": s["dropped_mass"], "attn_gap_rel": s["attn_gap_rel"],
        })
    return {
        "model": model.name, "source": model.source,
        "full_perplexity": ppl["results"][0]["token_perplexity"],
        "full_word_perplexity": ppl["results"][0]["word_perplexity"],
        "full_entropy": attn["runs"][0]["mean"]["entropy"],
        "points": points,
    }


def plot(result: dict, path: str | Path) -> Path:
    """Two panels: token perplexity vs budget (dashed: full attention) and AttnSparsity vs budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ppl, ax_sp) = plt.subplots(1, 2, figsize=(9, 3.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, m in enumerate(result["models"]):
        color = colors[i % len(colors)]
        for bs in sorted({p["block_size"] for p in m["points"]}):
            pts = [p for p in m["points"] if p["block_size"] == bs]
            label = m["model"] if len({p["block_size"] for p in m["points"]}) == 1 else f"{m['model']} bs={bs}"
            x = [p["receptive_field"] for p in pts]
            ax_ppl.plot(x, [p["token_perplexity"] for p in pts], "o-", color=color, label=label)
            ax_sp.plot(x, [p["attn_sparsity"] for p in pts], "o-", color=color, label=label)
        ax_ppl.axhline(m["full_perplexity"], color=color, ls="--", lw=1)
    for ax, ylabel in ((ax_ppl, "perplexity (sparse; dashed: full)"), (ax_sp, "AttnSparsity (full inference)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("receptive field (block_size x top_k tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax_sp.legend(fontsize=8)
    fig.suptitle(f"Budget sweep (window {result['window']}, stride {result['stride']})", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write(result: dict, out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    return write_json(out / "sweep.json", result), plot(result, out / "sweep.png")


def markdown(result: dict) -> str:
    lines = [
        f"Budget sweep (window {result['window']}, stride {result['stride']}; sparsity on full inference)",
        "",
        "| model | receptive field | block size | top_k | ppl (sparse) | ppl (full) | AttnSparsity | attn gap (rel) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in result["models"]:
        for p in m["points"]:
            lines.append(
                f"| {m['model']} | {p['receptive_field']} | {p['block_size']} | {p['top_k']} | {p['token_perplexity']:.3f} | "
                f"{m['full_perplexity']:.3f} | {p['attn_sparsity']:.4f} | {p['attn_gap_rel']:.4f} |"
            )
    return "\n".join(lines) + "\n"
