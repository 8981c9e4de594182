"""slurm/preprocess_data.sbatch on a real one-node Slurm: the array and its dependent merge equal a local run."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from slurm_cluster import job_history, wait_for_job
from slurm_runs import REPO

sys.path.insert(0, os.path.join(REPO, "tests", "data"))
from data_helpers import make_documents, write_jsonl  # noqa: E402

SCRIPT = os.path.join(REPO, "slurm", "preprocess_data.sbatch")


@pytest.fixture
def corpus(tmp_path):
    from ssa_megatron.data.tokenizer import train_bpe_tokenizer

    docs = make_documents(300)
    train_bpe_tokenizer(docs, str(tmp_path / "tok"), vocab_size=600)
    return write_jsonl(tmp_path / "docs.jsonl", docs), str(tmp_path / "tok")


def test_array_and_dependent_merge_on_slurm_equal_a_local_run(slurm_cluster, corpus, tmp_path):
    jsonl, tokenizer = corpus
    env = {**os.environ, **slurm_cluster.env, "INPUT": jsonl, "TOKENIZER": tokenizer,
           "OUTPUT_PREFIX": str(tmp_path / "corpus"), "TASKS": "3", "EXTRA_ARGS": "--shard-size 8K",
           "SBATCH_ARGS": "--cpus-per-task=1", "LOG_DIR": str(tmp_path / "logs"), "OMP_NUM_THREADS": "1"}
    env.pop("SLURM_JOB_ID", None)
    proc = subprocess.run(["bash", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    array, merge = re.search(r"array (\d+) \(3 tasks\) and merge (\d+)", proc.stdout).groups()
    wait_for_job(slurm_cluster, merge, 400)

    logs = "".join(p.read_text() for p in sorted((tmp_path / "logs").iterdir()))
    assert job_history(slurm_cluster, array, 3) == [("COMPLETED", "0:0")] * 3, logs
    assert job_history(slurm_cluster, merge, 1) == [("COMPLETED", "0:0")], logs
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == sorted(
        [f"ssa-preprocess-{array}_{i}.out" for i in range(3)] + [f"ssa-preprocess-merge-{merge}.out"])
    subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", jsonl, "--tokenizer", tokenizer,
                    "--output-prefix", str(tmp_path / "single"), "--no-progress"], cwd=REPO, check=True,
                   capture_output=True)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"corpus_text_document{ext}").read_bytes() == \
               (tmp_path / f"single_text_document{ext}").read_bytes()
