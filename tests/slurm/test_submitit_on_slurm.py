"""ssa-submit (submitit) on a real one-node Slurm: interrupted by submitit's signal, requeued, resumed, finished."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from slurm_runs import REPO, TRAIN_ARGS, TRAIN_ITERS, final_lm_loss
from slurm_cluster import job_history, wait_for_file

submitit_job = pytest.importorskip("ssa_megatron.launch.submitit_job", reason="submitit is not installed (the slurm extra)")


def test_submitit_job_signalled_once_is_requeued_resumes_and_ends_with_the_straight_run_loss(
        slurm_cluster, straight_run_loss, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    args = submitit_job.parse_args(["--config", "configs/tiny_cpu.yaml", "--name", "submitit-tiny", "--run-dir",
                                    str(tmp_path / "run"), "--gpus-per-node", "0", "--cpus-per-task", "2",
                                    "--timeout-min", "10", "--", *TRAIN_ARGS])
    job = submitit_job.submit(args)
    wait_for_file(tmp_path / "run" / "checkpoints" / "latest_checkpointed_iteration.txt", 400, job.job_id, slurm_cluster)
    job._interrupt(timeout=True)  # scancel --signal=URG: what Slurm sends signal_delay_s before the time limit
    result = job.result()

    log = job.stdout() + job.stderr()
    assert result["reason"] == "finished" and result["iteration"] == TRAIN_ITERS
    assert job_history(slurm_cluster, job.job_id, 2) == [("REQUEUED", "0:0"), ("COMPLETED", "0:0")], log[-4000:]
    assert "Caught signal SIGURG" in log and re.search(r"SIGURG: SIGUSR2 sent to the ranks \[\d+\]", log)
    stopped = int(re.search(r"stopping at iteration (\d+) \(signal SIGUSR2\)", log).group(1))
    assert 4 <= stopped < TRAIN_ITERS
    assert re.search(rf"resumed from .* at iteration {stopped}\b", log), log[-4000:]
    assert final_lm_loss(log) == straight_run_loss


def test_ssa_submit_refuses_save_and_load_flags():
    proc = subprocess.run([sys.executable, "tools/submit.py", "--config", "x.yaml", "--",
                           "--save", "d"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "--run-dir" in proc.stderr


def test_local_executor_runs_the_training_to_the_end(tmp_path, monkeypatch):
    # submitit's local executor (ssa-submit --local): no Slurm, the same TrainingJob and torchrun command.
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = submitit_job.parse_args(["--local", "--config", "configs/tiny_cpu.yaml", "--run-dir", str(tmp_path / "run"),
                                    "--timeout-min", "10", "--", "--train-iters", "2", "--log-interval", "1",
                                    "--eval-interval", "0"])
    job = submitit_job.submit(args)
    assert job.result() == {**job.result(), "exit_code": 0, "reason": "finished", "iteration": 2}
    assert (tmp_path / "run" / "checkpoints" / "iter_0000002").is_dir()  # saved at the end, resumable
