"""Submit a training run through submitit: preempted or timed out, it saves, is requeued and resumes.

    ssa-submit --config configs/llama1b_ssa_h100.yaml --nodes 4 --gpus-per-node 8 --timeout-min 2880 \\
        --partition gpu -- --save-interval 1000
    ssa-submit --local --config configs/tiny_cpu.yaml -- --train-iters 40 --save-interval 10   # a laptop

Each node runs one submitit task, which starts the node's ``torchrun`` (the same command as
``slurm/train.sbatch``: :mod:`ssa_megatron.launch.node`) with ``--save``/``--load`` set to the run's
checkpoint directory and ``--exit-signal-handler``.

Signal path. submitit asks Slurm for ``--signal=<SIG>@<delay>``, a *step* signal: every process of the
step gets it. With submitit's default USR2 that includes torchrun (no handler: it would die; it
ignores USR1/USR2 here) and the helper processes of the ranks (on the real Slurm, Megatron's
checkpoint-writer manager died of it and the save crashed). So this launcher makes submitit's
preemption signal SIGURG (``SUBMITIT_PREEMPT_SIGNAL=URG`` unless set): its default action is to do
nothing, so only submitit's own handler acts on it. On rank 0 that handler calls
:meth:`TrainingJob.checkpoint`, which sends USR2 to the trainer's ranks on its node (one rank is enough:
the ranks all-reduce their stop flags every step), waits for them to save and exit 3, and returns the
job itself for submitit to requeue (``scontrol requeue``); the rerun resumes from the checkpoint.
submitit's local executor sends the same signal to its task at its timeout: the same path. A trainer that stops by
itself with exit 3 (``--exit-duration-in-mins``, ``--exit-interval``) takes that path too; a crash is
not requeued (the job's result raises).

The result of a finished job is the trainer's ``exit_status.json``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import time
from pathlib import Path

from ssa_megatron.launch import node, status

WAIT_FOR_REQUEUE_S = 600  # a non-master node waits this long for Slurm to requeue the job
STATUS_WAIT_S = 120  # ... and this long for node 0 to write exit_status.json

# Before submitit reads it (at import, in the submitting process and again in each job).
PREEMPT_SIGNAL = os.environ.setdefault("SUBMITIT_PREEMPT_SIGNAL", "URG")
EXIT_SIGNAL = signal.SIGUSR2  # what checkpoint() sends the ranks (one of train.exit_signals)

try:
    import submitit
except ImportError as exc:  # the `slurm` extra
    raise ImportError("ssa-submit needs submitit: pip install -e '.[slurm]'") from exc
# submitit imported before this module read the variable already; keep one signal on both ends.
submitit.JobEnvironment.USR_SIG = PREEMPT_SIGNAL


def _exited(pid: int) -> bool:
    """The process is gone or a zombie (never reaps it: Popen's own wait would then misreport it)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


class TrainingJob(submitit.helpers.Checkpointable):
    """``ssa-pretrain ARGS --save DIR --load DIR --exit-signal-handler`` on every node of a submitit job."""

    def __init__(self, train_args: list[str], save_dir: str, *, save_timeout_s: float = 600.0):
        self.train_args = list(train_args)
        self.save_dir = str(save_dir)
        self.save_timeout_s = save_timeout_s
        self._proc: subprocess.Popen | None = None

    def __getstate__(self):  # pickled for each (re)submission: the running torchrun stays behind
        return {k: v for k, v in self.__dict__.items() if k != "_proc"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._proc = None

    def command(self, env) -> tuple[list[str], dict]:
        args = [*self.train_args, "--save", self.save_dir, "--load", self.save_dir, "--exit-signal-handler"]
        job_id = str(env.job_id).split("_")[0]
        return node.node_launch(args, dict(os.environ), nnodes=env.num_nodes, master_addr=env.hostnames[0],
                                job_id=job_id if job_id.isdigit() else str(os.getpid()))

    def __call__(self) -> dict:
        env = submitit.JobEnvironment()
        cmd, additions = self.command(env)
        if env.global_rank == 0:
            status.clear_exit_status(self.save_dir)
        print(f"ssa-submit: node {env.node}/{env.num_nodes}: {' '.join(cmd)}", flush=True)
        self._proc = subprocess.Popen(cmd, env={**os.environ, **additions}, preexec_fn=node.ignore_launcher_signals)
        try:
            # poll, not Popen.wait(): submitit's signal handler (checkpoint) runs on top of this frame and
            # must not meet a held wait lock
            while not _exited(self._proc.pid):
                time.sleep(1.0)
            returncode = self._proc.wait()
        finally:
            if not _exited(self._proc.pid):
                self._proc.terminate()
        result = status.read_exit_status(self.save_dir)
        deadline = time.monotonic() + STATUS_WAIT_S
        while result is None and env.global_rank != 0 and time.monotonic() < deadline:
            time.sleep(1.0)  # rank 0 (another node) writes it after its own ranks have exited
            result = status.read_exit_status(self.save_dir)
        outcome = status.step_outcome(result)
        if outcome == "finished":
            return result
        if outcome == "saved":
            # Stopped by itself (exit duration/interval): take submitit's preemption path, which calls
            # checkpoint() and requeues on rank 0; other ranks wait for the requeue to end them.
            os.kill(os.getpid(), submitit.JobEnvironment._usr_sig())
            time.sleep(WAIT_FOR_REQUEUE_S)
            raise RuntimeError(f"saved ({status.describe(result)}) but the job was not requeued")
        raise RuntimeError(f"training failed: torchrun exited {returncode}, {status.describe(result)}")

    def checkpoint(self, *args, **kwargs):
        """Called by submitit (rank 0) on its preemption signal: let the trainer save, then resubmit."""
        proc = self._proc
        if proc is None:  # signalled before the trainer started: the rerun starts it
            return super().checkpoint(*args, **kwargs)
        sent = node.signal_ranks(proc.pid, EXIT_SIGNAL)
        print(f"ssa-submit: SIG{PREEMPT_SIGNAL}: {EXIT_SIGNAL.name} sent to the ranks {sent}", flush=True)
        deadline = time.monotonic() + self.save_timeout_s
        while not _exited(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        result = status.read_exit_status(self.save_dir)
        outcome = status.step_outcome(result)
        print(f"ssa-submit: preempted; trainer: {status.describe(result)}", flush=True)
        if outcome == "crashed" and _exited(proc.pid):
            return None  # submitit: "not requeued", the job's result raises
        return super().checkpoint(*args, **kwargs)  # saved, finished just now, or still saving: rerun resumes


def build_executor(args: argparse.Namespace, folder: Path):
    if args.local:
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=args.timeout_min, signal_delay_s=args.signal_delay_s)
        return executor
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=args.max_num_timeout)
    extra = {"requeue": True}
    if args.gpus_per_node:
        extra["gpus_per_node"] = args.gpus_per_node
    executor.update_parameters(
        job_name=args.name, nodes=args.nodes, ntasks_per_node=1, cpus_per_task=args.cpus_per_task, time=args.timeout_min,
        signal_delay_s=args.signal_delay_s, additional_parameters=extra,
        **({"partition": args.partition} if args.partition else {}),
        **({"account": args.account} if args.account else {}),
    )
    return executor


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ssa-submit", description=__doc__.splitlines()[0],
                                     epilog="Flags after -- go to ssa-pretrain (except --save/--load: the run directory "
                                            "holds the checkpoints).")
    parser.add_argument("--config", required=True, help="YAML run file")
    parser.add_argument("--name", help="job and run name (default: the run file's name); runs/<name>/ holds "
                        "checkpoints/ and submitit/ logs")
    parser.add_argument("--run-dir", help="default runs/<name>")
    parser.add_argument("--local", action="store_true", help="submitit's local executor instead of Slurm")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8, help="0 for CPU nodes")
    parser.add_argument("--cpus-per-task", type=int, default=64, help="CPUs per node (one task per node)")
    parser.add_argument("--timeout-min", type=int, default=48 * 60)
    parser.add_argument("--signal-delay-s", type=int, default=300, help="USR2 this long before the time limit")
    parser.add_argument("--max-num-timeout", type=int, default=50, help="requeues after a time limit")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--wait", action="store_true", help="wait for the run to finish and print its exit status")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then ssa-pretrain flags")
    args = parser.parse_args(argv)
    if args.train_args[:1] == ["--"]:
        args.train_args = args.train_args[1:]
    for arg in args.train_args:
        if arg.split("=")[0] in ("--save", "--load", "--config"):
            parser.error(f"{arg}: the run directory holds the checkpoints (--run-dir); the run file is --config")
    args.name = args.name or Path(args.config).stem
    args.run_dir = Path(args.run_dir or Path("runs") / args.name)
    return args


def submit(args: argparse.Namespace):
    """Submit the run; the submitit job."""
    folder = args.run_dir / "submitit"
    executor = build_executor(args, folder)
    job = executor.submit(TrainingJob(["--config", args.config, *args.train_args], str(args.run_dir / "checkpoints")))
    return job


def main(argv=None) -> None:
    args = parse_args(argv)
    job = submit(args)
    print(f"ssa-submit: job {job.job_id} | checkpoints {args.run_dir / 'checkpoints'} | "
          f"logs {job.paths.stdout} {job.paths.stderr}", flush=True)
    if args.wait:
        result = job.result()
        print(f"ssa-submit: job {job.job_id} finished: {result}", flush=True)

