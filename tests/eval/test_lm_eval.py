"""lm-evaluation-harness end to end, offline, on local tasks (tests/eval/lm_eval_task/) through the harness's
own HF wrapper (trust_remote_code), in both attention modes; its accuracy and word perplexity checked
against a direct computation with the model at 0 shots; then the few-shot command writes JSON + markdown."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ssa_megatron.eval.cli import main
from ssa_megatron.eval.lm_eval_runner import run_lm_eval
from ssa_megatron.eval.models import Setting, load_model

TASK_DIR = Path(__file__).with_name("lm_eval_task")
SETTINGS = [Setting("full"), Setting("sparse", 8, 1)]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tasks")
    for template in TASK_DIR.glob("*.yaml.in"):
        (out / template.name[: -len(".in")]).write_text(template.read_text().replace("@DATA_DIR@", str(TASK_DIR.resolve())))
    return out


def loglik(model, tok, context: str, continuation: str, setting: Setting, prefix: int) -> float:
    """log p(continuation | context), tokenised as lm-eval documents it: the pair encoded together and split
    after the context's tokens; an empty context is the prefix token (BOS, else EOS) alone."""
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    if context:
        ctx, whole = encode(context), encode(context + continuation)
        cont = whole[len(ctx) :]
    else:
        ctx, cont = [prefix], encode(continuation)
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ctx + cont]), **setting.forward_kwargs()).logits[0].double().log_softmax(-1)
    return sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))


def test_lm_eval_runs_offline_on_local_tasks_in_both_modes_and_matches_direct_scores(export_dir, task_dir, tmp_path):
    merged = run_lm_eval(SETTINGS, [("ssa_local_mc", 0), ("ssa_local_text", 0)], tmp_path, model_dir=export_dir,
                         include_path=str(task_dir))
    model = load_model(export_dir, device="cpu")
    tok = model.tokenizer
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id  # lm-eval's prefix token
    docs = [json.loads(line) for line in (TASK_DIR / "mc.jsonl").read_text().splitlines()]
    texts = [json.loads(line)["text"] for line in (TASK_DIR / "text.jsonl").read_text().splitlines()]
    for setting in SETTINGS:
        acc = acc_norm = 0
        for d in docs:
            context = f"Question: {d['question']}\nAnswer:"
            scores = [loglik(model.model, tok, context, " " + c, setting, prefix) for c in d["choices"]]
            normed = [s / len(c) for s, c in zip(scores, d["choices"])]  # acc_norm: by characters of the choice
            acc += max(range(len(scores)), key=scores.__getitem__) == d["label"]
            acc_norm += max(range(len(normed)), key=normed.__getitem__) == d["label"]
        res = merged[setting.label]["results"]
        assert res["ssa_local_mc"]["acc,none"] == pytest.approx(acc / len(docs))
        assert res["ssa_local_mc"]["acc_norm,none"] == pytest.approx(acc_norm / len(docs))
        nll = -sum(loglik(model.model, tok, "", t, setting, prefix) for t in texts)
        words = sum(len(t.split()) for t in texts)
        assert res["ssa_local_text"]["word_perplexity,none"] == pytest.approx(math.exp(nll / words), rel=1e-4)
    # the modes really differ (top_k 1: only the own block)
    full, sparse = (merged[s.label]["results"]["ssa_local_text"]["word_perplexity,none"] for s in SETTINGS)
    assert abs(full - sparse) > 1e-3 * full
    assert (tmp_path / "lm_eval_full.json").is_file() and "| ssa_local_mc | 0 | acc_norm |" in (tmp_path / "lm_eval.md").read_text()


def test_lm_eval_command_writes_json_and_markdown_with_shots(export_dir, task_dir, tmp_path):
    rc = main(["lm-eval", "--model", str(export_dir), "--device", "cpu", "--settings", "full", "sparse:k=1",
               "--tasks", "ssa_local_mc:2", "ssa_local_text:0", "--include-path", str(task_dir), "--out", str(tmp_path)])
    assert rc == 0
    table = (tmp_path / "lm_eval.md").read_text()
    assert "| task | shots | metric | full | sparse(bs=8,k=1) |" in table and "| ssa_local_mc | 2 | acc_norm |" in table
    saved = json.loads((tmp_path / "lm_eval_sparse_bs8_k1.json").read_text())
    assert saved["n-shot"]["ssa_local_mc"] == 2 and saved["setting"]["top_k"] == 1
    assert 0.0 <= saved["results"]["ssa_local_mc"]["acc_norm,none"] <= 1.0
