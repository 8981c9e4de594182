"""slurm/preprocess_data.sbatch: submission (array + dependent merge), array tasks, merge."""

from __future__ import annotations

import os
import stat
import subprocess

from data_helpers import REPO

SCRIPT = os.path.join(REPO, "slurm", "preprocess_data.sbatch")


def _run(env: dict, cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", SCRIPT], env={**os.environ, **env}, cwd=cwd, capture_output=True, text=True)


def test_submission_queues_the_array_and_a_merge_that_depends_on_it(tmp_path):
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text('#!/bin/bash\necho "$@" >> "$SBATCH_LOG"\necho $((1000 + $(wc -l < "$SBATCH_LOG")))\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {"PATH": f"{fake.parent}:{os.environ['PATH']}", "SBATCH_LOG": str(tmp_path / "log"), "INPUT": "x",
           "TOKENIZER": "t", "OUTPUT_PREFIX": "o", "TASKS": "4", "SBATCH_ARGS": "--partition=cpu"}
    env.pop("SLURM_JOB_ID", None)
    proc = _run(env, str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    array, merge = (tmp_path / "log").read_text().splitlines()
    assert array.startswith("--parsable --array=0-3 --partition=cpu") and array.endswith(SCRIPT)
    assert "--dependency=afterok:1001" in merge and "--partition=cpu" in merge
    assert "array 1001 (4 tasks) and merge 1002" in proc.stdout


def _task(base: dict, i: int) -> subprocess.Popen:
    return subprocess.Popen(["bash", SCRIPT], env={**os.environ, **base, "SLURM_ARRAY_TASK_ID": str(i)},
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(tasks: list[subprocess.Popen]) -> None:
    for t in tasks:
        out, err = t.communicate(timeout=120)
        assert t.returncode == 0, err
        assert "preprocess:" in out


def test_array_tasks_then_merge_equal_a_single_run_and_a_missing_task_blocks_the_merge(
        tmp_path, corpus_jsonl, tokenizer_dir):
    base = {"SLURM_JOB_ID": "7", "SLURM_SUBMIT_DIR": REPO, "INPUT": corpus_jsonl, "TOKENIZER": tokenizer_dir,
            "OUTPUT_PREFIX": str(tmp_path / "corpus"), "TASKS": "3", "EXTRA_ARGS": "--shard-size 8K"}
    _wait([_task(base, 0), _task(base, 1)])  # concurrently, as an array runs; task 2 "failed"
    early = _run(base, REPO)  # the merge job
    assert early.returncode == 2 and "shards are not finished" in early.stderr and "task i % task_count" in early.stderr
    _wait([_task(base, 2)])  # resubmitted
    merged = _run(base, REPO)
    assert merged.returncode == 0, merged.stderr
    subprocess.run(["python", "tools/preprocess_data.py", "--input", corpus_jsonl, "--tokenizer", tokenizer_dir,
                    "--output-prefix", str(tmp_path / "single"), "--no-progress"], cwd=REPO, check=True,
                   capture_output=True)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"corpus_text_document{ext}").read_bytes() == \
               (tmp_path / f"single_text_document{ext}").read_bytes()
