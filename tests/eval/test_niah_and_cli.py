"""NIAH scorer on planted answers and the generator's prompts; the ssa-eval commands end to end on an HF
export and on a Megatron checkpoint converted in memory (same logits as the export); the report."""

from __future__ import annotations

import json

import pytest
import torch

from ssa_megatron.eval import niah
from ssa_megatron.eval.cli import main
from ssa_megatron.eval.models import load_model


@pytest.mark.parametrize("prediction,exact,contains,partial", [
    (" 4827193.", 1.0, 1.0, 1.0),
    (" is 4827193 and more", 1.0, 1.0, 1.0),
    (" 4827100", 0.0, 0.0, 5 / 7),
    (" 12 then 4827193", 0.0, 1.0, 0.0),  # first number "12": no digit in place ("1" vs "4", "2" vs "8")
    (" 48271935", 0.0, 0.0, 7 / 8),  # longer: 7 of 8 positions right
    (" no number here", 0.0, 0.0, 0.0),
    ("", 0.0, 0.0, 0.0),
])
def test_niah_scorer_on_planted_answers(prediction, exact, contains, partial):
    got = niah.score(prediction, "4827193")
    assert got == {"exact": exact, "contains": contains, "partial": pytest.approx(partial)}


def test_niah_prompts_hold_one_needle_at_the_depth_and_fit_the_length(hf_tokenizer):
    for length in (300, 500):
        positions = []
        for depth in (0.0, 0.5, 1.0):
            s = niah.make_sample(hf_tokenizer, length, depth, seed=f"{length}:{depth}")
            text = hf_tokenizer.decode(s.prompt_ids)
            needle = niah.NEEDLE.format(key=s.key, value=s.value)
            assert text.count(needle) == 1 and text.count(s.value) == 1
            assert text.endswith(niah.QUESTION.format(key=s.key))
            assert length - 30 <= len(s.prompt_ids) <= length
            haystack_chars = text.index(niah.QUESTION.format(key=s.key)) - len(" " + needle)
            positions.append(text.index(needle) / haystack_chars)  # share of the haystack before the needle
        assert positions[0] < 0.02 and 0.4 < positions[1] < 0.6 and positions[2] > 0.98


def test_commands_run_end_to_end_on_an_export_and_the_report_gathers_them(export_dir, tmp_path, hf_tokenizer):
    from eval.helpers import sample_text

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": sample_text(60, s)}) + "\n" for s in range(3)))
    common = ["--model", str(export_dir), "--device", "cpu"]
    run = tmp_path / "run"
    assert main(["perplexity", *common, "--data", str(data), "--window", "64", "--stride", "16",
                 "--settings", "full", "sparse", "sparse:rf=32", "--out", str(run)]) == 0
    ppl = json.loads((run / "perplexity.json").read_text())
    assert [r["label"] for r in ppl["results"]] == ["full", "sparse(bs=8,k=2)", "sparse(bs=8,k=4)"]
    assert all(r["tokens"] > 0 and r["word_perplexity"] > 0 for r in ppl["results"])
    assert main(["attention", *common, "--data", str(data), "--seq-len", "48", "--num-sequences", "2",
                 "--settings", "sparse", "sparse:k=6", "--out", str(run)]) == 0
    att = json.loads((run / "attention.json").read_text())
    assert [r["inference"] for r in att["runs"]] == ["full", "sparse(bs=8,k=2)", "sparse(bs=8,k=6)"]
    assert att["runs"][0]["mean"]["budgets"]["sparse(bs=8,k=6)"]["attn_sparsity"] == pytest.approx(1.0)
    assert main(["sweep", *common, "--data", str(data), "--budgets", "8", "16", "64", "--window", "64", "--stride", "32",
                 "--seq-len", "64", "--num-sequences", "1", "--out", str(run)]) == 0
    assert (run / "sweep.png").stat().st_size > 5000
    assert main(["niah", *common, "--lengths", "256", "320", "--depths", "0", "1", "--samples", "1", "--max-new-tokens", "4",
                 "--out", str(run)]) == 0
    result = json.loads((run / "niah.json").read_text())
    assert [r["label"] for r in result["runs"]] == ["full", "sparse(bs=8,k=2)"] and len(result["runs"][0]["cells"]) == 4
    assert (run / "niah.png").read_bytes()[:4] == b"\x89PNG"
    report = tmp_path / "report.md"
    assert main(["report", str(run), "--out", str(report)]) == 0
    text = report.read_text()
    for heading in ("## Perplexity", "## Attention analysis", "## Budget sweep", "## Needle in a haystack"):
        assert heading in text
    assert "](run/sweep.png)" in text and "](run/niah.png)" in text
    assert main(["report", str(tmp_path / "data_missing"), "--out", str(report)]) == 2


def test_a_megatron_checkpoint_converts_in_memory_to_the_exports_model(export_dir, tmp_path):
    from ssa_megatron.convert.from_hf import convert_from_hf

    ckpt = tmp_path / "ckpt"
    convert_from_hf(export_dir, ckpt)
    from_ckpt = load_model(load_dir=ckpt, device="cpu")
    from_export = load_model(export_dir, device="cpu")
    assert from_ckpt.tokenizer is not None and len(from_ckpt.tokenizer) == len(from_export.tokenizer)
    ids = torch.randint(0, from_export.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for mode in ("full", "sparse"):
            torch.testing.assert_close(from_ckpt.model(ids, attention_mode=mode).logits,
                                       from_export.model(ids, attention_mode=mode).logits, rtol=0, atol=1e-5)
