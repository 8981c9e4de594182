"""What a training step's end means for its Slurm job: finished, saved (requeue me) or crashed.

``torchrun`` turns any worker exit code other than 0 into its own 1, so the trainer's exit code is
lost on the way to ``srun``; rank 0 writes ``SAVE/exit_status.json`` on every clean exit instead
(``ssa_megatron.train.exit.write_exit_status``). The launcher removes the file before it starts the
step, so a file present afterwards was written by this step.

    python -m ssa_megatron.launch.status SAVE_DIR --clear                  # before srun
    python -m ssa_megatron.launch.status SAVE_DIR --step-exit $? [--terminated] [--max-restarts N]

The second form prints one line saying what happened and what it does, runs ``scontrol requeue
$SLURM_JOB_ID`` when the trainer saved and asks to be requeued, and exits with the code the batch script
should end with (0 finished or requeued, the step's code on a crash, 3 when the restart cap is reached).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# Owned by ssa_megatron.train.exit (which imports torch; this module must not): a test checks they agree.
EXIT_STATUS_FILE = "exit_status.json"
EXIT_CODE_FINISHED = 0
EXIT_CODE_SAVED = 3

DEFAULT_MAX_RESTARTS = 50


def status_path(save_dir: str | os.PathLike) -> Path:
    return Path(save_dir) / EXIT_STATUS_FILE


def clear_exit_status(save_dir: str | os.PathLike) -> None:
    """Remove a previous step's status, so that what is there after the step is this step's."""
    status_path(save_dir).unlink(missing_ok=True)


def read_exit_status(save_dir: str | os.PathLike) -> dict | None:
    """The trainer's ``{"exit_code", "reason", "iteration", "train_iters"}``, or None when it left none."""
    try:
        return json.loads(status_path(save_dir).read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:  # written atomically: a torn file is not ours
        return None


def step_outcome(status: dict | None) -> str:
    """``finished``, ``saved`` (stopped early after a save: requeue and resume) or ``crashed``."""
    if status is None:
        return "crashed"
    if status.get("exit_code") == EXIT_CODE_FINISHED:
        return "finished"
    if status.get("exit_code") == EXIT_CODE_SAVED:
        return "saved"
    return "crashed"


def describe(status: dict | None) -> str:
    if status is None:
        return f"no {EXIT_STATUS_FILE}"
    return f"{status.get('reason')} at iteration {status.get('iteration')}/{status.get('train_iters')}"


def decide(status: dict | None, *, step_exit: int, terminated: bool, restart_count: int,
           max_restarts: int) -> tuple[str, int]:
    """(action, batch exit code): action is ``finish``, ``requeue``, ``leave`` (Slurm is ending the job) or ``fail``."""
    outcome = step_outcome(status)
    if outcome == "finished":
        return "finish", 0
    if outcome == "saved":
        if terminated:
            # SIGTERM reached the batch shell: scancel, preemption, requeue or the time limit. Slurm decides
            # what comes next (a preempted or requeued job is requeued by Slurm; a cancelled one stays so).
            return "leave", EXIT_CODE_SAVED
        if restart_count >= max_restarts:
            return "fail", EXIT_CODE_SAVED
        return "requeue", 0
    return "fail", step_exit if step_exit != 0 else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssa_megatron.launch.status", description=__doc__.splitlines()[0])
    parser.add_argument("save_dir")
    parser.add_argument("--clear", action="store_true", help="remove a previous status and exit")
    parser.add_argument("--step-exit", type=int, default=0, help="exit code of srun (torchrun's, not the trainer's)")
    parser.add_argument("--terminated", action="store_true", help="the batch shell received SIGTERM")
    parser.add_argument("--max-restarts", type=int, default=DEFAULT_MAX_RESTARTS,
                        help="do not requeue once SLURM_RESTART_COUNT reaches this")
    args = parser.parse_args(argv)
    if args.clear:
        clear_exit_status(args.save_dir)
        return 0
    status = read_exit_status(args.save_dir)
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    action, code = decide(status, step_exit=args.step_exit, terminated=args.terminated, restart_count=restarts,
                          max_restarts=args.max_restarts)
    what = describe(status)
    if action == "finish":
        print(f"ssa-slurm: training finished ({what})", flush=True)
    elif action == "leave":
        print(f"ssa-slurm: saved ({what}); the job was terminated by Slurm, which decides whether it is requeued",
              flush=True)
    elif action == "fail" and step_outcome(status) == "saved":
        print(f"ssa-slurm: saved ({what}) but not requeued: restart {restarts} reached the cap of {args.max_restarts} "
              f"(MAX_RESTARTS); resubmit to continue", flush=True)
    elif action == "fail":
        print(f"ssa-slurm: training failed (step exit {args.step_exit}, {what}); not requeued", flush=True)
    else:
        job = os.environ.get("SLURM_JOB_ID")
        if not job:
            print("ssa-slurm: saved, but SLURM_JOB_ID is unset: cannot requeue", file=sys.stderr, flush=True)
            return EXIT_CODE_SAVED
        print(f"ssa-slurm: saved ({what}); requeueing job {job} (restart {restarts + 1})", flush=True)
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"ssa-slurm: scontrol requeue {job} failed: {proc.stderr.strip()}", file=sys.stderr, flush=True)
            return EXIT_CODE_SAVED
    return code


if __name__ == "__main__":
    sys.exit(main())
