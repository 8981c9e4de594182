"""The launcher's decisions without a cluster: exit status, requeue policy, processes/threads, signals."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ssa_megatron.launch import node, status


def test_exit_status_names_agree_with_the_trainer():
    from ssa_megatron.train import exit as trainer_exit

    assert status.EXIT_STATUS_FILE == trainer_exit.EXIT_STATUS_FILE
    assert status.EXIT_CODE_SAVED == trainer_exit.EXIT_CODE_SAVED
    assert status.EXIT_CODE_FINISHED == trainer_exit.EXIT_CODE_FINISHED


@pytest.mark.parametrize("exit_code, terminated, restarts, expected", [
    (0, False, 0, ("finish", 0)),
    (3, False, 0, ("requeue", 0)),
    (3, False, 5, ("fail", 3)),     # the cap (5) is reached
    (3, True, 0, ("leave", 3)),     # Slurm is ending the job: it decides
    (None, False, 0, ("fail", 1)),  # no status: a crash (torchrun's 1)
])
def test_requeue_decision(exit_code, terminated, restarts, expected):
    st = None if exit_code is None else {"exit_code": exit_code, "reason": "x", "iteration": 1, "train_iters": 2}
    assert status.decide(st, step_exit=1, terminated=terminated, restart_count=restarts, max_restarts=5) == expected


def test_clear_then_read_sees_only_this_steps_status(tmp_path):
    (tmp_path / status.EXIT_STATUS_FILE).write_text(json.dumps({"exit_code": 3}))
    status.clear_exit_status(tmp_path)
    assert status.read_exit_status(tmp_path) is None
    status.clear_exit_status(tmp_path / "missing")  # a fresh run has no directory yet


@pytest.mark.parametrize("env, nproc, threads", [
    ({"SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "64"}, 8, 8),
    ({"SLURM_CPUS_PER_TASK": "2"}, 1, 2),                       # a CPU node: one gloo process
    ({"SLURM_GPUS_ON_NODE": "0", "SLURM_CPUS_ON_NODE": "6"}, 1, 6),
    ({"SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "2"}, 4, 1),
    ({"NPROC_PER_NODE": "2", "SLURM_CPUS_PER_TASK": "8", "SSA_OMP_NUM_THREADS": "3"}, 2, 3),
])
def test_processes_and_threads_come_from_the_allocation(env, nproc, threads):
    cmd, added = node.node_launch(["--config", "c.yaml"], {"OMP_NUM_THREADS": "16", **env}, nnodes=2,
                                  master_addr="n1", job_id="123")
    assert cmd[cmd.index("--nproc-per-node") + 1] == str(nproc)
    assert added["OMP_NUM_THREADS"] == str(threads)  # an inherited OMP_NUM_THREADS does not know the allocation
    assert cmd[cmd.index("--rdzv-endpoint") + 1] == "n1:20123" and cmd[cmd.index("--rdzv-id") + 1] == "123"
    assert cmd[-4:] == ["-m", "ssa_megatron.train", "--config", "c.yaml"]


def test_cluster_env_defaults_never_override_the_users():
    _, added = node.node_launch([], {"CUDA_DEVICE_MAX_CONNECTIONS": "8"}, nnodes=1, master_addr="h", job_id="1")
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in added and added["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"


def test_ignored_usr_signals_survive_exec_and_can_be_rearmed():
    probe = ("import signal; print(signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN, "
             "signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN); "
             "signal.signal(signal.SIGUSR1, lambda *a: print('handled')); import os; os.kill(os.getpid(), signal.SIGUSR1)")
    out = subprocess.run([sys.executable, "-c", probe], preexec_fn=node.ignore_launcher_signals, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["True", "True", "handled"]


def test_signal_ranks_reaches_the_launchers_children_only(tmp_path):
    # a stand-in torchrun: ignores USR1 like the real one here, one child that records what it gets
    child = ("import signal, sys, time; signal.signal(signal.SIGUSR1, lambda *a: (print('rank got USR1', flush=True), "
             "sys.exit(3))); print('ready', flush=True); time.sleep(30)")
    launcher = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys; sys.exit(subprocess.call([sys.executable, '-c', {child!r}]))"],
        preexec_fn=node.ignore_launcher_signals, stdout=subprocess.PIPE, text=True)
    assert launcher.stdout.readline().strip() == "ready"
    pid_file = tmp_path / "torchrun.pid"
    pid_file.write_text(f"{launcher.pid}\n")
    out = subprocess.run([sys.executable, "-m", "ssa_megatron.launch.node", "--signal-ranks", "USR1", str(pid_file)],
                         capture_output=True, text=True, check=True).stdout
    assert "SIGUSR1 forwarded to the ranks [" in out
    assert launcher.wait(timeout=20) == 3 and "rank got USR1" in launcher.stdout.read()


def test_signal_ranks_without_a_pid_file_says_so(tmp_path):
    out = subprocess.run([sys.executable, "-m", "ssa_megatron.launch.node", "--signal-ranks", "USR2",
                          str(tmp_path / "none.pid")], capture_output=True, text=True, check=True).stdout
    assert "not forwarded" in out


def test_node_launcher_refuses_to_run_outside_slurm():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run([sys.executable, "-m", "ssa_megatron.launch.node", "--config", "c.yaml"], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "not inside a Slurm job" in proc.stderr
