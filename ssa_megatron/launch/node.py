"""One node of a Slurm training job: ``torchrun`` with the job's rendezvous, sized from the allocation.

    srun --ntasks-per-node=1 python -m ssa_megatron.launch.node --config RUN.yaml --save DIR ...
    python -m ssa_megatron.launch.node --signal-ranks USR2 PID_FILE     # from the batch shell's trap

(every argument goes to ``ssa-pretrain``). It prints the command, then becomes
``python -m torch.distributed.run ... -m ssa_megatron.train ARGS``:

- rendezvous: ``c10d`` on the first host of ``scontrol show hostnames $SLURM_JOB_NODELIST``, port
  ``MASTER_PORT`` (default ``20000 + job id % 20000``, so two jobs sharing a node do not meet), the job
  id as rendezvous id (a requeued job keeps its id), ``--max-restarts 0`` (Slurm requeues, not torchrun);
- processes per node: ``NPROC_PER_NODE``, else the node's GPUs (``SLURM_GPUS_ON_NODE``), else 1: a
  CPU node runs one process on gloo, whatever the run file was written for;
- threads: ``OMP_NUM_THREADS`` = the CPUs Slurm gave this task (``SLURM_CPUS_PER_TASK``, else
  ``SLURM_CPUS_ON_NODE``) / processes, at least 1; ``SSA_OMP_NUM_THREADS`` sets it explicitly (an
  ``OMP_NUM_THREADS`` exported from the submitting shell is replaced: it does not know the allocation);
- environment for large jobs, each only where unset (:data:`CLUSTER_ENV_DEFAULTS`);
- signals: the trainer's exit signal must reach the trainer's ranks and nothing else. A Slurm *step*
  signal (``#SBATCH --signal=USR1@N``, ``scancel --signal=USR1``) reaches every process of the step:
  torchrun, which has no USR1/USR2 handler and dies of them (orphaning the ranks), and helper
  processes the ranks started, e.g. Megatron's checkpoint-writer results queue (a ``spawn``-started
  ``multiprocessing`` manager): measured on a real Slurm, it died of the USR1 and the save crashed.
  So the signal goes to the batch shell (``--signal=B:USR2@N``), which forwards it to this node's
  ranks only: ``python -m ssa_megatron.launch.node --signal-ranks USR2 PID_FILE`` (the ranks are
  torchrun's children; this launcher writes torchrun's pid to ``$SSA_TORCHRUN_PID_FILE`` on node 0,
  the batch host). One rank is enough: the ranks all-reduce their stop flags at every step.
  SIGUSR1/SIGUSR2 are still ignored by torchrun (an ignored disposition survives ``exec``; the
  trainer installs its own handlers), so a stray step signal does not kill it. SIGTERM keeps
  torchrun's handler: it forwards it to the ranks and kills them 30 s later (``--shutdown-timeout``
  in ``TORCHRUN_ARGS`` on recent torch).

Extra torchrun flags: ``TORCHRUN_ARGS`` (split like a shell would).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys

# Set for the trainer where not already set (export your own value to override).
CLUSTER_ENV_DEFAULTS = {
    # Megatron's TP/SP communication overlap relies on kernels being queued in issue order.
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    # A failed or timed-out NCCL collective tears the process down (the job fails) instead of hanging.
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    # InfiniBand retry timeout 4.096 us * 2^19 ~ 2 s (Megatron-LM's cluster examples): fewer spurious
    # failures on large fabrics.
    "NCCL_IB_TIMEOUT": "19",
    # Tokenizer threads inside data-loader workers oversubscribe the CPUs.
    "TOKENIZERS_PARALLELISM": "false",
}

IGNORED_BY_TORCHRUN = (signal.SIGUSR1, signal.SIGUSR2)


def _int(env: dict, name: str) -> int | None:
    value = env.get(name, "")
    head = value.split("(")[0].split(",")[0]  # SLURM_CPUS_ON_NODE / *_PER_NODE may read "2(x3)"
    return int(head) if head.isdigit() else None


def processes_per_node(env: dict) -> int:
    explicit = _int(env, "NPROC_PER_NODE")
    if explicit:
        return explicit
    gpus = _int(env, "SLURM_GPUS_ON_NODE")
    return gpus if gpus else 1


def threads_per_process(env: dict, nproc: int) -> int:
    explicit = _int(env, "SSA_OMP_NUM_THREADS")
    if explicit:
        return explicit
    cpus = _int(env, "SLURM_CPUS_PER_TASK") or _int(env, "SLURM_CPUS_ON_NODE") or os.cpu_count() or 1
    return max(1, cpus // nproc)


def rendezvous_port(env: dict, job_id: str) -> int:
    explicit = _int(env, "MASTER_PORT")
    if explicit:
        return explicit
    return 20000 + int(job_id) % 20000 if job_id.isdigit() else 29500


def first_host(nodelist: str) -> str:
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def torchrun_command(train_args: list[str], *, nnodes: int, nproc_per_node: int, master_addr: str, master_port: int,
                     rdzv_id: str, python: str = sys.executable, extra: list[str] | None = None) -> list[str]:
    return [
        python, "-m", "torch.distributed.run",
        "--nnodes", str(nnodes), "--nproc-per-node", str(nproc_per_node),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{master_addr}:{master_port}", "--rdzv-id", rdzv_id,
        "--max-restarts", "0", *(extra or []),
        "-m", "ssa_megatron.train", *train_args,
    ]


def node_launch(train_args: list[str], env: dict, *, nnodes: int, master_addr: str, job_id: str) -> tuple[list[str], dict]:
    """(torchrun argv, environment additions) for this node."""
    nproc = processes_per_node(env)
    additions = {k: v for k, v in CLUSTER_ENV_DEFAULTS.items() if k not in env}
    additions["OMP_NUM_THREADS"] = str(threads_per_process(env, nproc))
    cmd = torchrun_command(train_args, nnodes=nnodes, nproc_per_node=nproc, master_addr=master_addr,
                           master_port=rendezvous_port(env, job_id), rdzv_id=job_id,
                           extra=shlex.split(env.get("TORCHRUN_ARGS", "")))
    return cmd, additions


def ignore_launcher_signals() -> None:
    """Ignore SIGUSR1/SIGUSR2 in this process and what it execs/forks (the trainer re-arms them)."""
    for sig in IGNORED_BY_TORCHRUN:
        signal.signal(sig, signal.SIG_IGN)


def rank_pids(launcher_pid: int) -> list[int]:
    """The trainer's ranks: torchrun's child processes (its workers)."""
    import psutil

    try:
        return [p.pid for p in psutil.Process(launcher_pid).children()]
    except psutil.NoSuchProcess:
        return []


def signal_ranks(launcher_pid: int, sig: signal.Signals) -> list[int]:
    """Send ``sig`` to each rank of the torchrun ``launcher_pid``; the pids signalled."""
    sent = []
    for pid in rank_pids(launcher_pid):
        try:
            os.kill(pid, sig)
            sent.append(pid)
        except ProcessLookupError:
            pass
    return sent


def _signal_ranks_main(sig_name: str, pid_file: str) -> None:
    sig = signal.Signals[sig_name if sig_name.startswith("SIG") else f"SIG{sig_name}"]
    try:
        launcher = int(open(pid_file).read().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        print(f"ssa-slurm: {sig.name}: no torchrun pid in {pid_file} (not started yet?): not forwarded", flush=True)
        return
    sent = signal_ranks(launcher, sig)
    print(f"ssa-slurm: {sig.name} forwarded to the ranks {sent} of torchrun {launcher}", flush=True)


def main(argv=None) -> None:
    train_args = list(sys.argv[1:] if argv is None else argv)
    if train_args[:1] == ["--signal-ranks"]:
        _signal_ranks_main(*train_args[1:3])
        return
    env = dict(os.environ)
    job_id = env.get("SLURM_JOB_ID")
    if not job_id:
        sys.exit("ssa_megatron.launch.node: not inside a Slurm job (SLURM_JOB_ID is unset); run ssa-pretrain or torchrun")
    nnodes = _int(env, "SLURM_JOB_NUM_NODES") or _int(env, "SLURM_NNODES") or 1
    cmd, additions = node_launch(train_args, env, nnodes=nnodes, master_addr=first_host(env["SLURM_JOB_NODELIST"]),
                                 job_id=job_id)
    node = env.get("SLURM_NODEID", "0")
    print(f"ssa-slurm: node {node}/{nnodes} ({os.uname().nodename}): "
          f"{' '.join(f'{k}={v}' for k, v in additions.items())} {shlex.join(cmd)}", flush=True)
    pid_file = env.get("SSA_TORCHRUN_PID_FILE")
    if pid_file and node == "0":
        with open(pid_file, "w") as fh:  # exec keeps the pid: it is torchrun's
            fh.write(f"{os.getpid()}\n")
    ignore_launcher_signals()
    os.execvpe(cmd[0], cmd, {**env, **additions})


if __name__ == "__main__":
    main()
