"""Attention analysis against a brute-force [seq, seq] computation: AttnSparsity, dropped mass, full and
sparse entropy, sink mass (several block sizes and budgets, GQA), the per-layer gaps, and AttnSparsity = 1
when the budget covers every block. The brute force below shares no code with ssa_megatron.eval."""

from __future__ import annotations

import math

import pytest
import torch
from eval.helpers import tiny_model

from ssa_megatron.eval.attention import analyse, attention_stats
from ssa_megatron.eval.models import EvalModel, Setting


def brute_selection(q, k, bs, top_k):
    """Per token and KV head, the set of selected block ids, token by token from the spec's words."""
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    out = {}
    for bi in range(b):
        for t in range(s):
            own = t // bs
            complete = (t + 1) // bs
            for h in range(hkv):
                chosen = {own}
                if own > 0 and top_k > 1:
                    means = [k[bi, j * bs : (j + 1) * bs, h].double().mean(0) for j in range(complete)]
                    imp = [0.0] * own
                    for qh in range(h * g, (h + 1) * g):
                        scores = [float(q[bi, t, qh].double() @ m) / math.sqrt(d) for m in means]
                        lse = math.log(sum(math.exp(x) for x in scores))
                        for j in range(own):
                            imp[j] += math.exp(scores[j] - lse)
                    chosen |= set(sorted(range(own), key=lambda j: -imp[j])[: top_k - 1])
                out[bi, t, h] = chosen
    return out


def brute_stats(q, k, bs, top_k, sink):
    """Per-head means over queries, from full [s, s] probability rows."""
    b, s, hq, d = q.shape
    g = hq // k.shape[2]
    sel = brute_selection(q, k, bs, top_k)
    acc = {n: torch.zeros(hq, dtype=torch.float64) for n in ("sparsity", "entropy", "sink", "sparse_entropy", "sparse_sink")}
    for bi in range(b):
        kk = k[bi].double().repeat_interleave(g, dim=1)  # [s, hq, d]
        scores = torch.einsum("thd,jhd->htj", q[bi].double(), kk) / math.sqrt(d)  # [hq, s, s]
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        p = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        for h in range(hq):
            for t in range(s):
                row = p[h, t, : t + 1]
                tokens = [j for j in range(t + 1) if j // bs in sel[bi, t, h // g]]
                acc["sparsity"][h] += row[tokens].sum()
                acc["entropy"][h] += -(row * row.log()).sum()
                acc["sink"][h] += row[:sink].sum()
                sparse_row = scores[h, t, tokens].softmax(-1)  # sparse attention's own row
                acc["sparse_entropy"][h] += -(sparse_row * sparse_row.log()).sum()
                acc["sparse_sink"][h] += sparse_row[[i for i, j in enumerate(tokens) if j < sink]].sum()
    return {n: v / (b * s) for n, v in acc.items()}


# (batch, seq, query heads, KV heads, head dim, [(block size, top_k)], sink tokens, query chunk)
CASES = [
    (1, 23, 4, 2, 8, [(4, 2), (4, 3)], 4, None),
    (2, 30, 6, 1, 8, [(5, 2), (3, 4)], 3, 7),
    (1, 33, 4, 4, 16, [(8, 1), (2, 6)], 1, 5),
    (2, 17, 8, 2, 4, [(4, 40)], 6, 4),  # budget covers every block
]


@pytest.mark.parametrize("b,s,hq,hkv,d,budgets,sink,chunk", CASES, ids=[str(c[:6]) for c in CASES])
def test_sparsity_entropy_and_sink_equal_brute_force(b, s, hq, hkv, d, budgets, sink, chunk):
    g = torch.Generator().manual_seed(s * hq)
    q = torch.randn(b, s, hq, d, generator=g) * 1.5
    k = torch.randn(b, s, hkv, d, generator=g) * 1.5
    got = attention_stats(q, k, budgets, sink_tokens=sink, chunk=chunk)
    n = got["count"]
    for bs, top_k in budgets:
        want = brute_stats(q, k, bs, top_k, sink)
        torch.testing.assert_close(got["entropy"] / n, want["entropy"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["sink_mass"] / n, want["sink"], rtol=1e-5, atol=1e-6)
        mine = got["budgets"][(bs, top_k)]
        torch.testing.assert_close(mine["attn_sparsity"] / n, want["sparsity"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mine["sparse_entropy"] / n, want["sparse_entropy"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine["sparse_sink_mass"] / n, want["sparse_sink"], rtol=1e-5, atol=1e-6)
        # at least one case drops mass (so the check is not vacuous), and none drop any at a full budget
        if top_k * bs >= s:
            torch.testing.assert_close(mine["attn_sparsity"] / n, torch.ones(hq, dtype=torch.float64))
    assert min(float((got["budgets"][bk]["attn_sparsity"] / n).min()) for bk in budgets) < 1 - 1e-3 or s <= budgets[0][0] * budgets[0][1]


def rope(x, theta=10000.0):
    """Llama's RoPE (non-interleaved halves), written out: x [s, h, d]."""
    s, _, d = x.shape
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(s, dtype=torch.float64)[:, None] * inv  # [s, d/2]
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    x1, x2 = x[..., : d // 2].double(), x[..., d // 2 :].double()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def test_model_analysis_equals_brute_force_on_hand_computed_qkv():
    """Hooks on a tiny HF model: per-layer statistics and attention gap equal the brute force on q/k/v computed
    by hand from each layer's weights and its input hidden state."""
    model = tiny_model(3, heads=4, kv_heads=2, block_size=4, top_k=2)
    ids = torch.randint(0, 300, (2, 26), generator=torch.Generator().manual_seed(0))
    budgets = [Setting("sparse", 4, 2), Setting("sparse", 2, 3)]
    result = analyse(EvalModel(model, None, "tiny", "memory"), ids, budgets, inference=("full", "sparse"), sink_tokens=2, progress=False)
    full = next(r for r in result["runs"] if r["inference"] == "full")
    hq, hkv, d = 4, 2, 8
    with torch.no_grad():
        for layer_idx, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            qs, ks, vs, gates = [], [], [], []
            for seq in ids:
                hidden = model(input_ids=seq[None], attention_mode="full", output_hidden_states=True).hidden_states[layer_idx][0]
                x = layer.input_layernorm(hidden)
                qs.append(rope((x @ attn.q_proj.weight.T).view(-1, hq, d)))
                ks.append(rope((x @ attn.k_proj.weight.T).view(-1, hkv, d)))
                vs.append((x @ attn.v_proj.weight.T).view(-1, hkv, d).double())
                gates.append(torch.sigmoid((x @ attn.g_proj.weight.T).double()))
            q, k, v, gate = (torch.stack(t) for t in (qs, ks, vs, gates))
            row = full["layers"][layer_idx]
            for setting in budgets:
                want = brute_stats(q, k, setting.block_size, setting.top_k, 2)
                got = row["budgets"][setting.label]
                torch.testing.assert_close(torch.tensor(got["attn_sparsity"], dtype=torch.float64), want["sparsity"], rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(torch.tensor(row["entropy"], dtype=torch.float64), want["entropy"], rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(torch.tensor(row["sink_mass"], dtype=torch.float64), want["sink"], rtol=1e-4, atol=1e-5)
                # attention gap: gated full vs gated sparse outputs, from [s, s] masks
                sel = brute_selection(q, k, setting.block_size, setting.top_k)
                gaps, norms = [], []
                for bi in range(ids.shape[0]):
                    scores = torch.einsum("thd,jhd->htj", q[bi], k[bi].repeat_interleave(2, dim=1)) / math.sqrt(d)
                    s = scores.shape[-1]
                    causal = torch.ones(s, s, dtype=torch.bool).tril()
                    allowed = torch.zeros(hq, s, s, dtype=torch.bool)
                    for t in range(s):
                        for h in range(hq):
                            for j in range(t + 1):
                                allowed[h, t, j] = j // setting.block_size in sel[bi, t, h // 2]
                    vv = v[bi].repeat_interleave(2, dim=1)  # [s, hq, d]
                    o_f = torch.einsum("htj,jhd->thd", scores.masked_fill(~causal, float("-inf")).softmax(-1), vv)
                    o_s = torch.einsum("htj,jhd->thd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), vv)
                    o_f, o_s = o_f * gate[bi][..., None], o_s * gate[bi][..., None]
                    gaps.append((o_f - o_s).reshape(s, -1).norm(dim=-1))
                    norms.append(o_f.reshape(s, -1).norm(dim=-1))
                gap, norm = torch.cat(gaps), torch.cat(norms)
                assert got["attn_gap"] == pytest.approx(float(gap.mean()), rel=1e-4, abs=1e-7)
                assert got["attn_gap_rel"] == pytest.approx(float(gap.sum() / norm.sum()), rel=1e-4, abs=1e-7)
    # hidden gap: the residual streams of a full and a sparse forward, raw
    with torch.no_grad():
        for setting in budgets:
            hf = model(input_ids=ids, attention_mode="full", output_hidden_states=True).hidden_states[1:]
            hs = model(input_ids=ids, output_hidden_states=True, **setting.forward_kwargs()).hidden_states[1:]
            want = [float((a - b).norm(dim=-1).mean()) for a, b in zip(hf, hs)]
            assert result["hidden_gap"][setting.label] == pytest.approx(want, rel=1e-4, abs=1e-6)
            assert max(want) > 1e-3  # the budget drops blocks: the streams differ
    sparse_run = next(r for r in result["runs"] if r["inference"] == budgets[0].label)
    assert set(sparse_run["mean"]["budgets"]) == {budgets[0].label}


def test_attn_sparsity_is_one_and_gaps_vanish_when_the_budget_covers_every_block():
    model = tiny_model(4, heads=8, kv_heads=2, block_size=4, top_k=2)
    ids = torch.randint(0, 300, (1, 30), generator=torch.Generator().manual_seed(1))
    cover = Setting("sparse", 4, 8)  # 8 blocks = 32 >= 30 tokens
    small = Setting("sparse", 4, 2)
    result = analyse(EvalModel(model, None, "tiny", "memory"), ids, [cover, small], progress=False)
    mean = result["runs"][0]["mean"]["budgets"]
    assert mean[cover.label]["attn_sparsity"] == pytest.approx(1.0, abs=1e-6)
    assert mean[cover.label]["dropped_mass"] == pytest.approx(0.0, abs=1e-6)
    assert mean[cover.label]["attn_gap"] == pytest.approx(0.0, abs=1e-5)
    assert max(result["hidden_gap"][cover.label]) == pytest.approx(0.0, abs=1e-4)
    assert mean[small.label]["attn_sparsity"] < 0.99
