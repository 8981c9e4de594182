"""Attention analysis per layer and head: AttnSparsity, dropped mass, entropy, sink mass, alignment gap.

    ssa-eval attention --model hf --data pg19.jsonl --seq-len 8192 --num-sequences 4 \
        --settings sparse:rf=256 sparse:rf=1024 --inference full sparse --out runs/x/eval/attention.json

Definitions (per query token t, query head h; q/k after RoPE; p = the full causal softmax row of t):
- **AttnSparsity** (the paper's Definition 1): the mass of p inside the blocks the sparse selection
  picks for t at a budget (block_size, top_k), own block included; **dropped mass** = 1 - AttnSparsity.
- **entropy**: ``-sum_j p_j ln p_j`` in **nats** (natural log) of the full row; ``sparse_entropy`` the
  same of the sparse row (p renormalised over the selected tokens: ``-(1/m) sum_sel p ln p + ln m``).
- **sink mass**: mass of p on the first ``sink_tokens`` tokens (``sparse_sink_mass``: of the sparse row).
- **attn gap** (per layer): ``||o_full - o_sparse||_2`` per token over the gated per-head outputs
  ``[heads * head_dim]`` of the same layer input (what the alignment loss compares), averaged over
  tokens; ``attn_gap_rel`` divides by the mean ``||o_full||``; ``alignment_loss`` is training's L_align.
- **hidden gap** (per layer): ``||h_full - h_sparse||_2`` per token of the residual stream after each
  layer, between a full-mode and a sparse-mode forward of the same sequence, averaged over tokens.

Values are means over every query token of every sequence (per head; "mean" averages heads and
layers). The selection is ``ssa_megatron.ops.select_blocks`` (exact, the training rule; the Triton
kernels on CUDA, the torch reference elsewhere), as are the attention streams of the gaps.
Full rows are computed for a chunk of queries at a time (``[chunk, heads, seq]``), so ``[seq, seq]``
is never built. "Inference full" hooks a full-mode forward; "inference sparse" a sparse-mode forward
at each budget (the layer inputs, so q and k, then come from the sparse model).

q/k/v are re-computed from each HF attention module's input (a forward pre-hook) with its own
projections and RoPE, so the model code needs no change.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ssa_megatron.eval.models import EvalModel, Setting
from ssa_megatron import ops

ENTROPY_UNIT = "nats (natural log)"
_CHUNK_ELEMENTS = 1 << 26  # bound on b * chunk * hq * seq float32 entries of one chunk


@torch.no_grad()
def attention_stats(
    q: torch.Tensor, k: torch.Tensor, budgets: list[tuple[int, int]], sink_tokens: int = 4, chunk: int | None = None
) -> dict:
    """Summed statistics over queries of q ``[b, s, hq, d]``, k ``[b, s, hkv, d]`` (post-RoPE).

    Returns ``{"count": b * s, "entropy": [hq], "sink_mass": [hq], "budgets": {(bs, k): {"attn_sparsity",
    "sparse_entropy", "sparse_sink_mass": [hq]}}}``: float64 sums over queries (divide by count).
    """
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d)
    if chunk is None:
        chunk = max(1, min(s, _CHUNK_ELEMENTS // max(1, b * hq * s)))
    selections = {bk: ops.select_blocks(q, k, *bk) for bk in budgets}
    sums = {"entropy": torch.zeros(hq, dtype=torch.float64, device=q.device)}
    sums["sink_mass"] = torch.zeros_like(sums["entropy"])
    per_budget = {bk: {n: torch.zeros_like(sums["entropy"]) for n in ("attn_sparsity", "sparse_entropy", "sparse_sink_mass")} for bk in budgets}
    kf = k.float()
    for start in range(0, s, chunk):
        stop = min(start + chunk, s)
        c, length = stop - start, stop
        qc = q[:, start:stop].float().reshape(b, c, hkv, g, d)
        # [b, c, hkv, g, length]: full causal rows of the chunk's queries over keys 0..stop-1
        scores = torch.einsum("bchgd,blhd->bchgl", qc, kf[:, :length]) * scale
        positions = torch.arange(start, stop, device=q.device)
        future = torch.arange(length, device=q.device)[None, :] > positions[:, None]  # [c, length]
        scores = scores.masked_fill(future[None, :, None, None, :], float("-inf"))
        logp = scores.log_softmax(dim=-1)
        p = logp.exp()
        plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))
        sink = p[..., :sink_tokens]
        sums["entropy"] += (-plogp.sum(-1)).double().sum(dim=(0, 1)).reshape(hq)
        sums["sink_mass"] += sink.sum(-1).double().sum(dim=(0, 1)).reshape(hq)
        for (bs, top_k), sel in selections.items():
            nb = -(-length // bs)
            pad = nb * bs - length
            # per-block sums over keys: [b, c, hkv, g, nb]
            block_p = F.pad(p, (0, pad)).view(b, c, hkv, g, nb, bs).sum(-1)
            block_plogp = F.pad(plogp, (0, pad)).view(b, c, hkv, g, nb, bs).sum(-1)
            block_sink = F.pad(sink, (0, nb * bs - sink.shape[-1])).view(b, c, hkv, g, nb, bs).sum(-1)
            idx = sel[:, start:stop]  # [b, c, hkv, top_k], -1 = unused slot
            gather = idx.clamp(min=0)[:, :, :, None, :].expand(b, c, hkv, g, top_k)
            used = (idx >= 0)[:, :, :, None, :]
            m = (block_p.gather(-1, gather) * used).sum(-1)  # [b, c, hkv, g]
            sel_plogp = (block_plogp.gather(-1, gather) * used).sum(-1)
            sel_sink = (block_sink.gather(-1, gather) * used).sum(-1)
            out = per_budget[(bs, top_k)]
            out["attn_sparsity"] += m.double().sum(dim=(0, 1)).reshape(hq)
            out["sparse_entropy"] += (-sel_plogp / m + m.log()).double().sum(dim=(0, 1)).reshape(hq)
            out["sparse_sink_mass"] += (sel_sink / m).double().sum(dim=(0, 1)).reshape(hq)
    return {"count": b * s, **sums, "budgets": per_budget}


@torch.no_grad()
def attention_gap(q, k, v, gate, block_size: int, top_k: int) -> dict:
    """Sums over tokens of ``||o_full - o_sparse||``, ``||o_full||`` (gated, ``[hq * d]`` per token), and L_align."""
    b, s, hq, d = q.shape
    o_full = ops.full_attention(q, k, v).float() * gate[..., None]
    idx = ops.select_blocks(q, k, block_size, top_k)
    o_sparse = ops.sparse_attention(q, k, v, idx, block_size).float() * gate[..., None]
    diff = (o_full - o_sparse).reshape(b, s, hq * d).norm(dim=-1)
    return {
        "count": b * s,
        "gap": float(diff.double().sum()),
        "norm": float(o_full.reshape(b, s, hq * d).norm(dim=-1).double().sum()),
        "alignment_loss": float(ops.alignment_loss(o_full, o_sparse)) * b * s,
    }


def layer_qkv(attn: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q ``[b, s, hq, d]``, k/v ``[b, s, hkv, d]`` (post-RoPE) and gate ``[b, s, hq]`` of an HF SSA attention
    module for its input ``x`` — the module's own projections and its modeling file's ``apply_rotary``."""
    apply_rotary = sys.modules[type(attn).__module__].apply_rotary
    b, s, _ = x.shape
    q = apply_rotary(attn.q_proj(x).view(b, s, attn.num_heads, attn.head_dim), cos, sin)
    k = apply_rotary(attn.k_proj(x).view(b, s, attn.num_kv_heads, attn.head_dim), cos, sin)
    v = attn.v_proj(x).view(b, s, attn.num_kv_heads, attn.head_dim)
    gate = torch.sigmoid(attn.g_proj(x).float())
    return q, k, v, gate


def _add(total: dict, part: dict) -> dict:
    if not total:
        return part
    for key, value in part.items():
        total[key] = _add(total[key], value) if isinstance(value, dict) else total[key] + value
    return total


@torch.no_grad()
def _hooked_forward(model, ids, setting: Setting, budgets, sink_tokens, chunk, gaps: bool):
    """One forward of ``ids`` in ``setting`` with every layer's statistics summed; returns (stats, hidden)."""
    layers = model.model.layers
    stats: list[dict] = [{} for _ in layers]

    def hook(i):
        def pre(module, args):
            x, cos, sin = args[:3]
            q, k, v, gate = layer_qkv(module, x, cos, sin)
            part = attention_stats(q, k, budgets, sink_tokens, chunk)
            if gaps:
                part["gaps"] = {bk: attention_gap(q, k, v, gate, *bk) for bk in budgets}
            stats[i] = _add(stats[i], part)

        return pre

    handles = [layer.self_attn.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        out = model(input_ids=ids, use_cache=False, output_hidden_states=True, **setting.forward_kwargs())
    finally:
        for h in handles:
            h.remove()
    return stats, out.hidden_states[1:]


def _summarise(stats: list[dict], budgets: dict[tuple[int, int], Setting]) -> dict:
    layers = []
    for i, st in enumerate(stats):
        n = st["count"]
        row = {"layer": i, "entropy": (st["entropy"] / n).tolist(), "sink_mass": (st["sink_mass"] / n).tolist(), "budgets": {}}
        for bk, sums in st["budgets"].items():
            sparsity = sums["attn_sparsity"] / n
            entry = {
                "attn_sparsity": sparsity.tolist(),
                "dropped_mass": (1 - sparsity).tolist(),
                "sparse_entropy": (sums["sparse_entropy"] / n).tolist(),
                "sparse_sink_mass": (sums["sparse_sink_mass"] / n).tolist(),
            }
            if "gaps" in st:
                gap = st["gaps"][bk]
                entry.update(attn_gap=gap["gap"] / n, attn_gap_rel=gap["gap"] / gap["norm"], alignment_loss=gap["alignment_loss"] / n)
            row["budgets"][budgets[bk].label] = entry
        layers.append(row)
    mean = lambda key: sum(sum(r[key]) / len(r[key]) for r in layers) / len(layers)  # noqa: E731
    means = {"entropy": mean("entropy"), "sink_mass": mean("sink_mass"), "budgets": {}}
    for label in layers[0]["budgets"]:
        values = {}
        for key in layers[0]["budgets"][label]:
            per_layer = [r["budgets"][label][key] for r in layers]  # per head (list) or per layer (float)
            values[key] = sum(sum(x) / len(x) if isinstance(x, list) else x for x in per_layer) / len(per_layer)
        means["budgets"][label] = values
    return {"layers": layers, "mean": means}


def analyse(
    model: EvalModel,
    ids: torch.Tensor,
    budgets: list[Setting],
    *,
    inference: tuple[str, ...] = ("full",),
    sink_tokens: int = 4,
    chunk: int | None = None,
    progress: bool = True,
) -> dict:
    """Attention analysis of sequences ``ids [n, s]`` (run one at a time) at sparse ``budgets``.

    ``inference``: ``full`` hooks one full-mode forward and measures every budget's selection on it;
    ``sparse`` hooks a sparse-mode forward per budget. Hidden gaps compare each sparse forward with the
    full one. Returns the JSON-ready result (see module doc).
    """
    if not budgets or any(b.mode != "sparse" for b in budgets):
        raise ValueError("attention analysis needs one or more sparse settings (budgets), e.g. sparse:rf=256")
    if set(inference) - {"full", "sparse"}:
        raise ValueError(f"inference={inference}: each must be 'full' or 'sparse'")
    keyed = {(b.block_size, b.top_k): b for b in budgets}
    runs = [("full", Setting("full"), list(keyed))] if "full" in inference else []
    if "sparse" in inference:
        runs += [(s.label, s, [bk]) for bk, s in keyed.items()]
    device = model.device
    totals = {name: [{} for _ in model.model.model.layers] for name, _, _ in runs}
    hidden_gap: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(ids) * len(runs), desc="attention", unit="seq", disable=not progress)
    for seq in ids:
        seq = seq[None].to(device)
        hidden = {}
        for name, setting, bks in runs:
            stats, hidden[name] = _hooked_forward(model.model, seq, setting, bks, sink_tokens, chunk, gaps=name == "full")
            totals[name] = [_add(t, s) for t, s in zip(totals[name], stats)]
            bar.update(1)
        if "full" not in hidden:
            hidden["full"] = model.model(input_ids=seq, use_cache=False, output_hidden_states=True, attention_mode="full").hidden_states[1:]
        for bk, s in keyed.items():
            if s.label not in hidden:
                hidden[s.label] = model.model(input_ids=seq, use_cache=False, output_hidden_states=True, **s.forward_kwargs()).hidden_states[1:]
            gap = torch.stack([(hf - hs).float().norm(dim=-1).double().sum() for hf, hs in zip(hidden["full"], hidden[s.label])])
            hidden_gap[s.label] = hidden_gap.get(s.label, 0) + gap
    bar.close()
    n_tokens = ids.numel()
    result = {
        "kind": "attention",
        "model": model.name,
        "source": model.source,
        "sequences": int(ids.shape[0]),
        "seq_len": int(ids.shape[1]),
        "sink_tokens": sink_tokens,
        "entropy_unit": ENTROPY_UNIT,
        "budgets": [b.as_dict() for b in keyed.values()],
        "runs": [],
        # per layer i, the residual stream after layer i (the last one after the final norm, as HF returns it)
        "hidden_gap": {label: (g / n_tokens).tolist() for label, g in hidden_gap.items()},
    }
    for name, _, bks in runs:
        result["runs"].append({"inference": name, **_summarise(totals[name], {bk: keyed[bk] for bk in bks})})
    return result


def markdown(result: dict) -> str:
    lines = [
        f"Attention analysis of {result['model']} ({result['sequences']} x {result['seq_len']} tokens; "
        f"entropy in {result['entropy_unit']}; sink = first {result['sink_tokens']} tokens)",
        "",
        "| inference | budget | AttnSparsity | dropped mass | entropy (full) | entropy (sparse) | sink (full) | attn gap (rel) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        m = run["mean"]
        for label, b in m["budgets"].items():
            rel = b.get("attn_gap_rel")
            lines.append(
                f"| {run['inference']} | {label} | {b['attn_sparsity']:.4f} | {b['dropped_mass']:.4f} | {m['entropy']:.3f} | "
                f"{b['sparse_entropy']:.3f} | {m['sink_mass']:.4f} | {'-' if rel is None else f'{rel:.4f}'} |"
            )
    return "\n".join(lines) + "\n"
