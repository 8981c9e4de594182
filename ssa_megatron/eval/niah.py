"""Needle in a haystack (RULER's single needle, "niah_single"): generator, scorer, runner, heatmap.

    ssa-eval niah --model runs/ssa/hf --lengths 4096 8192 16384 32768 --depths 0 0.25 0.5 0.75 1 \
        --samples 4 --settings full sparse --out runs/ssa/eval/niah

A haystack of filler sentences (RULER's repeated noise by default, or ``--haystack FILE``) is cut to the
context length in tokens; the needle ``One of the special magic numbers for {key} is: {value}.`` is
inserted at a sentence boundary at ``depth`` (0 = start, 1 = end) of the haystack; the question asks for
the key's number and the model continues greedily. Keys are random words, values random 7-digit numbers
(seeded per sample, so every setting sees the same prompts).

Scores of one answer (``score``): ``exact`` 1 when the first number in the prediction is the value,
``contains`` 1 when the value appears anywhere (RULER's string_match_all for one needle), ``partial``
the fraction of the value's digits that the first predicted number has right, position by position.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ssa_megatron.eval.models import EvalModel, Setting

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUESTION = "\nWhat is the special magic number for {key} mentioned in the provided text? The special magic number for {key} mentioned in the provided text is"
KEYS = ("apple", "river", "violet", "harbor", "lantern", "meadow", "copper", "falcon", "quartz", "willow", "ember", "glacier")


@dataclass
class Sample:
    prompt_ids: list[int]
    key: str
    value: str
    length: int
    depth: float


def _split_sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


def make_sample(tokenizer, length: int, depth: float, seed: int | str, haystack: str = NOISE) -> Sample:
    """A prompt of ``length`` tokens (within one sentence) with one needle at ``depth`` of its haystack."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth}: must be in [0, 1]")
    rng = random.Random(seed)
    key, value = rng.choice(KEYS), str(rng.randint(1_000_000, 9_999_999))
    encode = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    tail = encode(QUESTION.format(key=key))
    needle = encode(" " + NEEDLE.format(key=key, value=value))
    sentences = _split_sentences(haystack)
    sentence_ids = [encode(" " + s) for s in sentences]
    budget = length - len(tail) - len(needle)
    if budget < 0:
        raise ValueError(f"length {length}: shorter than the needle and question ({len(tail) + len(needle)} tokens)")
    hay: list[list[int]] = []
    total, i = 0, 0
    while total + len(sentence_ids[i % len(sentence_ids)]) <= budget:
        hay.append(sentence_ids[i % len(sentence_ids)])
        total += len(hay[-1])
        i += 1
    at = round(depth * len(hay))
    ids = [t for s in hay[:at] for t in s] + needle + [t for s in hay[at:] for t in s] + tail
    return Sample(ids, key, value, length, depth)


def score(prediction: str, value: str) -> dict:
    """``exact`` / ``contains`` / ``partial`` of one prediction (see module doc)."""
    numbers = re.findall(r"\d+", prediction)
    first = numbers[0] if numbers else ""
    right = sum(a == b for a, b in zip(first, value))
    return {
        "exact": float(first == value),
        "contains": float(re.search(rf"(?<!\d){re.escape(value)}(?!\d)", prediction) is not None),
        "partial": right / max(len(value), len(first)) if first else 0.0,
    }


@torch.no_grad()
def run_niah(
    model: EvalModel,
    settings: list[Setting],
    lengths: list[int],
    depths: list[float],
    *,
    samples: int = 2,
    max_new_tokens: int = 12,
    haystack: str = NOISE,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Greedy answers for every (setting, length, depth, sample); mean scores per cell."""
    if model.tokenizer is None:
        raise ValueError("NIAH needs a tokenizer: the model directory has none, pass --tokenizer DIR")
    tok = model.tokenizer
    grid = [(length, depth, s) for length in lengths for depth in depths for s in range(samples)]
    prompts = {cell: make_sample(tok, cell[0], cell[1], f"{seed}:{cell[0]}:{cell[1]}:{cell[2]}", haystack) for cell in grid}
    bar = tqdm(total=len(grid) * len(settings), desc="niah", unit="prompt", disable=not progress)
    runs = []
    for setting in settings:
        cells: dict[tuple[int, float], list[dict]] = {}
        for cell in grid:
            sample = prompts[cell]
            ids = torch.tensor([sample.prompt_ids], device=model.device)
            extra = {"attention_mode": setting.mode}
            if setting.mode == "sparse":
                extra.update(block_size=setting.block_size, sparse_top_k=setting.top_k)
            out = model.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                       do_sample=False, pad_token_id=tok.eos_token_id, **extra)
            prediction = tok.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
            cells.setdefault(cell[:2], []).append({"prediction": prediction, "value": sample.value, **score(prediction, sample.value)})
            bar.update(1)
        runs.append({
            **setting.as_dict(),
            "cells": [
                {"length": length, "depth": depth, **{m: sum(r[m] for r in rs) / len(rs) for m in ("exact", "contains", "partial")},
                 "answers": rs}
                for (length, depth), rs in cells.items()
            ],
        })
    bar.close()
    return {"kind": "niah", "model": model.name, "source": model.source, "lengths": lengths, "depths": depths,
            "samples": samples, "runs": runs}


def heatmap(result: dict, path: str | Path, metric: str = "contains") -> Path:
    """One panel per setting: rows = context length, columns = depth, colour = mean score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, lengths, depths = result["runs"], result["lengths"], result["depths"]
    fig, axes = plt.subplots(1, len(runs), figsize=(3.6 * len(runs), 0.5 * len(lengths) + 1.8), squeeze=False)
    for ax, run in zip(axes[0], runs):
        grid = [[next(c[metric] for c in run["cells"] if c["length"] == n and c["depth"] == d) for d in depths] for n in lengths]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_xlabel("needle depth")
        ax.set_ylabel("context (tokens)")
        ax.set_title(run["label"], fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label=metric)
    fig.suptitle(f"NIAH ({result['model']})", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def markdown(result: dict) -> str:
    lines = [f"NIAH of {result['model']} ({result['samples']} samples per cell; exact / contains / partial, mean over depths)", "",
             "| setting | " + " | ".join(str(n) for n in result["lengths"]) + " |", "|---|" + "---|" * len(result["lengths"])]
    for run in result["runs"]:
        cells = []
        for n in result["lengths"]:
            cs = [c for c in run["cells"] if c["length"] == n]
            cells.append(" / ".join(f"{sum(c[m] for c in cs) / len(cs):.2f}" for m in ("exact", "contains", "partial")))
        lines.append(f"| {run['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
