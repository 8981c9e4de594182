"""A real signal sent to a running ``torchrun`` job: every rank saves at the same step, exits with code 3,
and a restart with ``--load`` finishes with the losses of a straight run.

Two paths a cluster takes (see ``ssa_megatron/train/exit.py``): SIGUSR1 to every process of the job
(as Slurm signals a job step), with torchrun started where USR1/USR2 are ignored so it survives; and
SIGTERM to torchrun alone, which forwards it to its workers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import psutil
import pytest
from distributed.launch import QUIET, RUN_TRAINING, launch_training, read_training_result, torchrun_command

from ssa_megatron.train.checkpoint import read_tracker

STEPS = 40
TRAIN = {"train_iters": STEPS, "micro_batch_size": 2, "global_batch_size": 8, "exit_signal_handler": True}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("signals") / "straight"
    return launch_training(2, out, train=TRAIN)[0]["records"]


def _wait_for(log, text: str, proc, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, f"the job ended before {text!r}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} within {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


@pytest.mark.parametrize("signum, target", [(signal.SIGUSR1, "every process"), (signal.SIGTERM, "torchrun")])
def test_a_signalled_torchrun_job_saves_exits_3_and_resumes_with_the_same_losses(signum, target, straight, tmp_path):
    save = str(tmp_path / "run")
    # save_interval: a save before the signal starts Megatron's writer helper process, which must survive it
    sections = {"train": TRAIN, "checkpoint": {"save": save, "load": save, "save_interval": 2}}
    command = torchrun_command(2, RUN_TRAINING, "--config", json.dumps(sections), "--out", str(tmp_path / "first"))
    log = tmp_path / "first.log"
    with open(log, "w") as sink:
        # USR1/USR2 ignored in the shell that execs torchrun (torchrun has no handler for them)
        proc = subprocess.Popen(["bash", "-c", 'trap "" USR1 USR2; exec "$@"', "bash", *command], stdout=sink,
                                stderr=subprocess.STDOUT, env={**os.environ, **QUIET}, start_new_session=True)
        try:
            _wait_for(log, "saved checkpoint at iteration 2", proc)
            if target == "every process":  # as Slurm does: torchrun and all its descendants
                for process in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
                    process.send_signal(signum)
            else:
                proc.send_signal(signum)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    first = read_training_result(tmp_path / "first", 2)
    assert [r["exit_code"] for r in first] == [3, 3], log.read_text()[-3000:]
    assert {r["reason"] for r in first} <= {f"signal {signal.Signals(signum).name}", "signal (received by another rank)"}
    stopped = read_tracker(save)
    assert 2 < stopped < STEPS and [r["iteration"] for r in first[0]["records"]][-1] == stopped
    status = json.loads((tmp_path / "run" / "exit_status.json").read_text())
    assert status["exit_code"] == 3 and status["iteration"] == stopped

    second = launch_training(2, tmp_path / "second", **sections)[0]["records"]
    assert second[0]["iteration"] == stopped + 1  # resumed from its checkpoint, not from iteration 1
    combined = first[0]["records"] + second
    assert [r["iteration"] for r in combined] == list(range(1, STEPS + 1))
    for key in ("lm", "align", "grad_norm"):
        assert [r[key] for r in combined] == [r[key] for r in straight], key
