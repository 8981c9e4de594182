"""Issue 15's experiment end to end at a toy size on CPU: prepare_data.py on generated "novels", then
run.py all (train SSA, FullAttn, MoBA and one alpha-sweep run, evaluate, report) fills the document."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "experiments" / "reproduction"
WORDS = ("the a of and to in he she it was had his her said with for on at as but not they be by this from which "
         "house river morning letter garden evening father mother friend window road night heart little great old "
         "young walked looked thought knew came went saw took gave found").split()
TOY = """
model: {num_layers: 2, hidden_size: 32, ffn_hidden_size: 64, num_attention_heads: 4, num_query_groups: 1,
        kv_channels: 8, seq_length: 64, rotary_base: 10000}
ssa: {block_size: 4, top_k: 2}
train: {micro_batch_size: 2, global_batch_size: 4, train_iters: 3, lr: 1.0e-2, lr_warmup_fraction: 0.0, dtype: fp32,
        device: cpu, log_interval: 1, alignment_grad_interval: 1}
data: {split: "100,0,0"}
"""


def write_novels(folder: Path, count: int, chars: int) -> None:
    """AUTHOR_TITLE_YEAR.txt files of random sentences (one a year from 1925: the last ones are too recent)."""
    rng = random.Random(0)
    folder.mkdir()
    for i in range(count):
        text = []
        while sum(map(len, text)) < chars:
            sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))).capitalize()
            text.append(sentence + rng.choice(".!?") + ("\n" if rng.random() < 0.3 else " "))
        (folder / f"Author{i}_Novel{i}_{1925 + i}.txt").write_text("".join(text))


def run(script: str, *args: str, cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1",
           "HF_MODULES_CACHE": str(cwd / "hf_modules")}
    done = subprocess.run([sys.executable, str(SCRIPTS / script), *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.timeout(180)  # ~35 s on an idle 2-core machine
def test_driver_trains_evaluates_and_fills_the_paper_table(tmp_path):
    write_novels(tmp_path / "corpus", count=7, chars=20_000)
    run("prepare_data.py", "--source", "corpus", "--out", "data", "--heldout", "2", "--excerpt-chars", "1000",
        "--vocab-size", "320", "--workers", "1", cwd=tmp_path)
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["train"]["documents"] == 3 and manifest["heldout"]["documents"] == 2  # 1930 and 1931 left out
    assert not set(manifest["train"]["novels"]) & set(manifest["heldout"]["novels"])

    (tmp_path / "toy.yaml").write_text(TOY)
    out = run("run.py", "all", "--config", "toy.yaml", "--data-dir", "data", "--out", "runs", "--alphas", "100",
              "--budgets", "8", "64", "--eval-sequences", "1", "--dtype", "fp32", "--doc", "doc/reproduction.md",
              "--figures", "doc/figures", cwd=tmp_path)
    assert "$ ssa-pretrain --config" in out and "--training-mode sparse" in out and "--alpha 100.0" in out

    doc = (tmp_path / "doc" / "reproduction.md").read_text()
    number = r"\d+\.\d{3}"
    for mode, paper in (("full", "0.705 | 0.641 | 0.527"), ("sparse", "0.677 | 0.610 | 0.546")):
        assert re.search(rf"^\| {mode} \| {number} \| {number} \| {number} \| {paper} \|$", doc, re.M), doc
    verdicts = re.findall(r"^\| [^|]+ \| [^|]+ \| (yes|no|not measured) \|$", doc, re.M)
    assert len(verdicts) == 8 and "not measured" not in verdicts, verdicts
    shares = {alpha: float(share) for alpha, share in re.findall(r"^\| (10|100) \| [^|]+ \| [^|]+ \| (\d\.\d{4}) \|", doc, re.M)}
    assert 0 < shares["10"] < shares["100"] < 1, shares  # the alignment term's share of the gradient grows with alpha
    for figure in ("budget_sweep", "alpha_sweep", "loss_curves", "alignment"):
        assert f"](figures/{figure}.png)" in doc and (tmp_path / "doc" / "figures" / f"{figure}.png").stat().st_size > 0

    # A budget covering the whole context is full attention: the sweep must say so for every model.
    for name in ("ssa", "full", "sparse"):
        model = json.loads((tmp_path / "runs" / name / "eval" / "sweep" / "sweep.json").read_text())["models"][0]
        covering = next(p for p in model["points"] if p["receptive_field"] == 64)
        assert covering["attn_sparsity"] == pytest.approx(1.0)
        assert covering["token_perplexity"] == pytest.approx(model["full_perplexity"], rel=1e-5)
