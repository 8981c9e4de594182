"""Sliding-window perplexity against a direct computation (disjoint windows, overlapping windows, one
forward per scored token), word perplexity from raw counts, and the budget sweep's JSON/PNG."""

from __future__ import annotations

import json
import math

import pytest
import torch
from eval.helpers import sample_text, tiny_model

from ssa_megatron.eval import sweep
from ssa_megatron.eval.data import Document, read_documents, sequences
from ssa_megatron.eval.models import EvalModel, Setting
from ssa_megatron.eval.perplexity import perplexity, sliding_windows


def token_nll(model, context: list[int], target: int, setting: Setting) -> float:
    """-log p(target | context), one forward over the context alone."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context]), **setting.forward_kwargs()).logits[0, -1].double()
    return float(torch.logsumexp(logits, 0) - logits[target])


SETTINGS = [Setting("full"), Setting("sparse", 4, 2)]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.label)
def test_disjoint_windows_equal_chunkwise_nll(setting):
    model = tiny_model(5, block_size=4, top_k=2)
    ids = torch.randint(0, 300, (53,), generator=torch.Generator().manual_seed(2)).tolist()
    window = 16
    got = perplexity(EvalModel(model, None, "tiny", "memory"), [Document(ids, None)], [setting], window=window, stride=window, batch_size=2, progress=False)
    nll, count = 0.0, 0
    for start in range(0, len(ids), window):  # each chunk alone; its first token has no context
        chunk = ids[start : start + window]
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([chunk]), **setting.forward_kwargs()).logits[0].double().log_softmax(-1)
        for t in range(1, len(chunk)):
            nll -= float(logp[t - 1, chunk[t]])
            count += 1
    r = got["results"][0]
    assert r["tokens"] == count == len(ids) - math.ceil(len(ids) / window)
    assert r["nll"] == pytest.approx(nll, rel=1e-5)
    assert r["token_perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.label)
@pytest.mark.parametrize("window,stride", [(16, 5), (12, 1), (20, 8)])
def test_overlapping_windows_equal_one_forward_per_token(setting, window, stride):
    model = tiny_model(6, block_size=4, top_k=2)
    ids = torch.randint(0, 300, (41,), generator=torch.Generator().manual_seed(window)).tolist()
    got = perplexity(EvalModel(model, None, "tiny", "memory"), [Document(ids, None)], [setting], window=window, stride=stride, batch_size=3, progress=False)
    nll = 0.0
    for i in range(1, len(ids)):
        # token i is scored by the first window (start k * stride) that reaches past it
        k = max(0, (i - window) // stride + 1)
        assert i - k * stride >= min(i, window - stride)  # at least window - stride tokens of context
        nll += token_nll(model, ids[k * stride : i], ids[i], setting)
    r = got["results"][0]
    assert r["tokens"] == len(ids) - 1
    assert r["nll"] == pytest.approx(nll, rel=1e-5)


def test_windows_score_every_token_once():
    for n, window, stride in [(1, 8, 8), (2, 8, 3), (100, 16, 16), (100, 16, 7), (7, 16, 4)]:
        scored = [t for w in sliding_windows(n, window, stride) for t in range(w.score_from, w.end)]
        expected = [t for t in range(1, n) if stride < window or t % window]
        assert scored == expected
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(10, 8, 9)


def test_word_perplexity_and_bits_per_byte_from_raw_counts(tokenizer_dir, hf_tokenizer, tmp_path):
    texts = [sample_text(40, 11), sample_text(25, 12)]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    docs = read_documents([str(data)], hf_tokenizer)
    assert [d.ids for d in docs] == [hf_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    model = tiny_model(7, vocab=len(hf_tokenizer))
    eos = hf_tokenizer.eos_token_id
    got = perplexity(EvalModel(model, hf_tokenizer, "tiny", "memory"), docs, [Setting("full")], window=32, stride=8, prefix_token=eos, progress=False)
    r = got["results"][0]
    words = sum(len(t.split()) for t in texts)
    n_bytes = sum(len(t.encode()) for t in texts)
    assert r["words"] == words and r["tokens"] == sum(len(d.ids) for d in docs)  # the prefix makes every token scored
    assert r["word_perplexity"] == pytest.approx(math.exp(r["nll"] / words))
    assert r["bits_per_byte"] == pytest.approx(r["nll"] / n_bytes / math.log(2))


def test_budget_sweep_writes_json_and_png_and_sparse_approaches_full(tmp_path):
    models = [EvalModel(tiny_model(seed, block_size=4, top_k=2), None, f"m{seed}", "memory") for seed in (8, 9)]
    ids = torch.randint(0, 300, (130,), generator=torch.Generator().manual_seed(3)).tolist()
    docs = [Document(ids, None)]
    analysis = sequences(docs, 32, 2)
    budgets = [4, 8, 16, 32]  # 32 tokens = every block of a 32-token window
    result = {"kind": "sweep", "window": 32, "stride": 8, "budgets": budgets, "models": [
        sweep.sweep_model(m, docs, analysis, budgets, window=32, stride=8, progress=False) for m in models]}
    json_path, png_path = sweep.write(result, tmp_path / "sweep")
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png_path.stat().st_size > 5000
    saved = json.loads(json_path.read_text())
    for m in saved["models"]:
        pts = m["points"]
        assert [p["receptive_field"] for p in pts] == budgets
        gaps = [abs(p["token_perplexity"] - m["full_perplexity"]) for p in pts]
        assert gaps[-1] == pytest.approx(0.0, abs=1e-4 * m["full_perplexity"])  # covers every block: equal
        assert gaps[0] > 10 * gaps[-1] + 1e-3  # the smallest budget is measurably off
        assert pts[-1]["attn_sparsity"] == pytest.approx(1.0, abs=1e-6)
        assert pts[0]["attn_sparsity"] < pts[-1]["attn_sparsity"]
    assert "| m8 | 4 |" in sweep.markdown(saved)
