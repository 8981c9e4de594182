"""slurm/train.sbatch on a real one-node Slurm: a CPU node, the signal path, requeue and resume, failures."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

from slurm_runs import REPO, TRAIN_ARGS, TRAIN_ITERS, final_lm_loss
from slurm_cluster import job_history, restart_count, wait_for_file, wait_for_job

SCRIPT = os.path.join(REPO, "slurm", "train.sbatch")
# The overrides a CPU node needs (the script asks for 8 GPUs and 64 CPUs): see ../shared/SLURM_NOTES.md.
CPU_NODE = ["--gpus-per-node=0", "--cpus-per-task=2"]


def sbatch(cluster, run_dir: Path, name: str, config: str, *args: str, env: dict | None = None) -> str:
    # Slurm's own file somewhere harmless (by default slurm-<id>.out in the submit directory); the
    # script's log goes to run_dir/logs/ all the same.
    out = subprocess.run(
        ["sbatch", "--parsable", *CPU_NODE, "-J", name, f"--output={run_dir.parent}/slurm-%j.out", SCRIPT, config, *args],
        cwd=REPO, capture_output=True, text=True, check=True,
        env={**os.environ, **cluster.env, "RUN_DIR": str(run_dir), **(env or {})})
    return out.stdout.strip().split(";")[0]


def test_job_signalled_once_saves_is_requeued_resumes_and_ends_with_the_straight_run_loss(
        slurm_cluster, straight_run_loss, tmp_path):
    run_dir = tmp_path / "run"
    job = sbatch(slurm_cluster, run_dir, "requeue-me", "configs/tiny_cpu.yaml", *TRAIN_ARGS)
    ckpt = run_dir / "checkpoints"
    # Interrupt once the first checkpoint exists (the trainer's handlers are armed by then), the way
    # --signal=B:USR2@300 does ahead of the time limit: to the batch shell, which forwards it to the ranks.
    wait_for_file(ckpt / "latest_checkpointed_iteration.txt", 400, job, slurm_cluster)
    slurm_cluster.run("scancel", "--batch", "--signal=USR2", job)
    wait_for_job(slurm_cluster, job, 600)

    log = (run_dir / "logs" / f"requeue-me-{job}.out").read_text()
    assert f"logging to {run_dir}/logs/requeue-me-{job}.out" in (tmp_path / f"slurm-{job}.out").read_text()
    assert job_history(slurm_cluster, job, 2) == [("REQUEUED", "0:0"), ("COMPLETED", "0:0")], log[-4000:]
    assert restart_count(slurm_cluster, job) == 1
    # A CPU node: one process, threads from --cpus-per-task, the rendezvous on the first host.
    assert "--nproc-per-node 1" in log and "OMP_NUM_THREADS=2" in log
    assert f"--rdzv-endpoint {slurm_cluster.hostname}:" in log and f"--rdzv-id {job}" in log
    # The signal reached the rank through the batch shell; torchrun survived and reported the exit.
    assert "batch shell got SIGUSR2" in log and re.search(r"SIGUSR2 forwarded to the ranks \[\d+\]", log)
    stopped = int(re.search(r"stopping at iteration (\d+) \(signal SIGUSR2\)", log).group(1))
    assert 4 <= stopped < TRAIN_ITERS
    assert f"requeueing job {job} (restart 1)" in log
    # The rerun resumed from that checkpoint, not from the start, and finished.
    assert "restart 1 |" in log
    assert re.search(rf"resumed from .* at iteration {stopped}\b", log), log[-4000:]
    assert not re.search(r"^iteration 1/", log.split("restart 1 |")[1], re.M)
    assert json.loads((ckpt / "exit_status.json").read_text())["reason"] == "finished"
    assert "training finished" in log
    assert final_lm_loss(log) == straight_run_loss
    assert (run_dir / "logs" / f"requeue-me-{job}.yaml").read_text() == (Path(REPO) / "configs/tiny_cpu.yaml").read_text()


def test_trainer_that_fails_on_its_config_fails_the_job_once_without_requeue(slurm_cluster, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text((Path(REPO) / "configs/tiny_cpu.yaml").read_text().replace("train:\n", "train:\n  no_such_key: 1\n"))
    job = sbatch(slurm_cluster, tmp_path / "run", "crash", str(config), *TRAIN_ARGS)
    wait_for_job(slurm_cluster, job, 300)
    log = (tmp_path / "run" / "logs" / f"crash-{job}.out").read_text()
    assert job_history(slurm_cluster, job, 1) == [("FAILED", "1:0")], log[-3000:]
    assert restart_count(slurm_cluster, job) == 0
    assert "ssa-pretrain: error:" in log and "no_such_key" in log
    assert "training failed (step exit 1, no exit_status.json); not requeued" in log


def test_saved_job_is_not_requeued_once_the_restart_cap_is_reached(slurm_cluster, tmp_path):
    # --exit-interval 2: the trainer saves and exits 3 by itself; MAX_RESTARTS=0 forbids the requeue.
    job = sbatch(slurm_cluster, tmp_path / "run", "capped", "configs/tiny_cpu.yaml", "--train-iters", "4",
                 "--exit-interval", "2", "--log-interval", "1", "--eval-interval", "0", env={"MAX_RESTARTS": "0"})
    wait_for_job(slurm_cluster, job, 400)
    log = (tmp_path / "run" / "logs" / f"capped-{job}.out").read_text()
    assert job_history(slurm_cluster, job, 1) == [("FAILED", "3:0")], log[-3000:]
    assert restart_count(slurm_cluster, job) == 0
    assert "reached the cap of 0" in log
    assert (tmp_path / "run" / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"


def test_save_and_load_flags_are_refused_before_anything_runs(tmp_path):
    proc = subprocess.run(["bash", SCRIPT, "configs/tiny_cpu.yaml", "--save", "x"], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "SLURM_JOB_ID": "1", "SLURM_JOB_NAME": "t"})
    assert proc.returncode == 2 and "set SAVE_DIR" in proc.stderr
