"""Sliding-window perplexity, in full mode and in sparse mode at several budgets, in one call.

    ssa-eval perplexity --model hf --data pg19_test.jsonl --window 8192 --stride 256 \
        --settings full sparse sparse:rf=1024 --out runs/x/eval/perplexity.json

Protocol (Hugging Face's "perplexity of fixed-length models", the PG19 protocol with stride 256):
windows of ``window`` tokens start every ``stride`` tokens; each window scores only the tokens the
previous windows did not, each with all earlier tokens of the window as context, so every token of a
document after its first is scored exactly once, with at least ``window - stride`` tokens of context
once the document is long enough. ``stride == window`` gives disjoint windows. Each document is
prefixed with the tokenizer's BOS (EOS when it has none) so that its first token is scored too
(``prefix_token=None`` turns this off).

Reported per setting: token perplexity ``exp(NLL / tokens)``, word perplexity ``exp(NLL / words)``
(whitespace-separated words of the text, lm-eval's definition) and bits per byte, NLL in nats.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ssa_megatron.eval.data import Document
from ssa_megatron.eval.models import EvalModel, Setting


@dataclass(frozen=True)
class Window:
    """Tokens ``[begin, end)`` go into the model; tokens ``[score_from, end)`` are scored."""

    begin: int
    end: int
    score_from: int


def sliding_windows(n: int, window: int, stride: int) -> list[Window]:
    """The windows covering a document of ``n`` tokens (tokens 1..n-1 scored once each)."""
    if window < 2 or not 1 <= stride <= window:
        raise ValueError(f"window={window}, stride={stride}: need window >= 2 and 1 <= stride <= window")
    out, prev_end = [], 0
    for begin in range(0, max(n - 1, 0), stride):
        end = min(begin + window, n)
        score_from = max(prev_end, begin + 1)
        if score_from < end:
            out.append(Window(begin, end, score_from))
        prev_end = end
        if end == n:
            break
    return out


@torch.no_grad()
def window_nll(model: torch.nn.Module, ids: torch.Tensor, windows: list[Window], setting: Setting) -> tuple[float, int]:
    """Summed NLL (nats, float64) and count of the scored tokens of ``windows`` over ``ids [n]``.

    Windows of equal length and scored span run as one batch; only the logits of scored positions
    are computed (``logits_to_keep``), so the ``[tokens, vocab]`` tensor stays small.
    """
    if not windows:
        return 0.0, 0
    keep = windows[0].end - windows[0].score_from + 1
    length = windows[0].end - windows[0].begin
    assert all(w.end - w.score_from + 1 == keep and w.end - w.begin == length for w in windows)
    inputs = torch.stack([ids[w.begin : w.end] for w in windows]).to(next(model.parameters()).device)
    logits = model(input_ids=inputs, use_cache=False, logits_to_keep=keep, **setting.forward_kwargs()).logits
    targets = inputs[:, length - keep + 1 :]  # [B, keep - 1]: the scored tokens
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    return float(nll.double()), targets.numel()


def _batches(windows: list[Window], batch_size: int) -> list[list[Window]]:
    out: list[list[Window]] = []
    for w in windows:
        shape = (w.end - w.begin, w.end - w.score_from)
        if out and len(out[-1]) < batch_size and (out[-1][0].end - out[-1][0].begin, out[-1][0].end - out[-1][0].score_from) == shape:
            out[-1].append(w)
        else:
            out.append([w])
    return out


def perplexity(
    model: EvalModel,
    docs: list[Document],
    settings: list[Setting],
    *,
    window: int,
    stride: int,
    batch_size: int = 1,
    prefix_token: int | None = None,
    progress: bool = True,
) -> dict:
    """Perplexity of ``docs`` under every setting. Returns the JSON-ready result (see module doc)."""
    encoded = [torch.tensor(([prefix_token] if prefix_token is not None else []) + d.ids, dtype=torch.long) for d in docs]
    plans = [_batches(sliding_windows(len(ids), window, stride), batch_size) for ids in encoded]
    words = None if any(d.words is None for d in docs) else sum(d.words for d in docs)
    n_bytes = None if any(d.bytes is None for d in docs) else sum(d.bytes for d in docs)
    total = sum(len(p) for p in plans) * len(settings)
    bar = tqdm(total=total, desc="perplexity", unit="batch", disable=not progress)
    results = []
    for setting in settings:
        nll, count, start = 0.0, 0, time.perf_counter()
        for ids, plan in zip(encoded, plans):
            for batch in plan:
                part, n = window_nll(model.model, ids, batch, setting)
                nll, count = nll + part, count + n
                bar.update(1)
                bar.set_postfix(setting=setting.label, ppl=f"{math.exp(nll / max(count, 1)):.3f}", refresh=False)
        seconds = time.perf_counter() - start
        results.append({
            **setting.as_dict(),
            "nll": nll,
            "tokens": count,
            "token_perplexity": math.exp(nll / count) if count else None,
            "words": words,
            "word_perplexity": math.exp(nll / words) if words else None,
            "bits_per_byte": nll / (n_bytes * math.log(2)) if n_bytes else None,
            "seconds": seconds,
            "tokens_per_second": count / seconds if seconds > 0 else None,
        })
    bar.close()
    return {
        "kind": "perplexity",
        "model": model.name,
        "source": model.source,
        "window": window,
        "stride": stride,
        "documents": len(docs),
        "prefix_token": prefix_token,
        "results": results,
    }


def default_prefix(tokenizer) -> int | None:
    """BOS, else EOS, of an HF tokenizer (None without a tokenizer)."""
    if tokenizer is None:
        return None
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def markdown(result: dict) -> str:
    lines = [
        f"Perplexity of {result['model']} (window {result['window']}, stride {result['stride']}, {result['documents']} documents)",
        "",
        "| setting | receptive field | tokens | token ppl | word ppl | bits/byte | tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        lines.append(
            f"| {r['label']} | {r['receptive_field'] or 'all'} | {r['tokens']} | {fmt(r['token_perplexity'], '.3f')} | "
            f"{fmt(r['word_perplexity'], '.3f')} | {fmt(r['bits_per_byte'], '.4f')} | {fmt(r['tokens_per_second'], '.0f')} |"
        )
    return "\n".join(lines) + "\n"
