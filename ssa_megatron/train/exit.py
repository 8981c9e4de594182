"""When a run stops before ``train_iters``: signals, wall-time and iteration limits, agreed by every rank.

Each rank records the first exit signal it receives (the handler only sets a flag, so a second
signal during the save interrupts nothing); at every step boundary the ranks all-reduce their flags,
so they stop at the same iteration, save together and exit with :data:`EXIT_CODE_SAVED`.

Under ``torchrun``: it forwards SIGTERM/SIGINT/SIGHUP to the workers and kills them 30 s later (a
save must fit); it has no handler for SIGUSR1/SIGUSR2 unless started with ``--signals-to-handle`` and
dies of them, orphaning the workers. ``slurm/train.sbatch`` therefore traps the time-limit signal in
the batch shell and forwards it to the ranks alone. Signalling every process of a job (Slurm's
default, submitit) also works when torchrun ignores USR1/USR2 (``trap '' USR1 USR2`` before ``exec
torchrun``; ignored dispositions survive exec, the trainer installs its own handlers): Megatron's
checkpoint-writer helper is started with the exit signals ignored so it survives them
(``checkpoint.start_writer_helper``). torchrun reports any worker exit code other than 0 as 1:
``exit_status.json`` in the save directory tells a launcher what happened (``write_exit_status``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ssa_megatron.train import checkpoint

logger = logging.getLogger("ssa_megatron.train")

EXIT_CODE_FINISHED = 0
EXIT_CODE_SAVED = 3  # saved (when checkpoint.save is set) and stopped before train_iters: requeue me
EXIT_STATUS_FILE = "exit_status.json"


class ExitConditions:
    """Signals, ``exit_duration_in_mins`` and ``exit_interval`` of ``train``; ``check`` is collective."""

    def __init__(self, train_cfg, device: torch.device, *, saving: bool):
        """``saving``: the run has a save directory, so Ctrl-C (SIGINT) saves and stops like the exit
        signals; a second Ctrl-C aborts at once (the previous checkpoint stays the latest)."""
        self.cfg = train_cfg
        self.device = device
        self.start = time.monotonic()
        self.received: str | None = None
        self._previous = {}
        names = list(train_cfg.exit_signals) if train_cfg.exit_signal_handler else []
        if saving and "SIGINT" not in names:
            names.append("SIGINT")
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only (e.g. a run inside a test worker)
        if saving:
            checkpoint.start_writer_helper(names)  # before our handlers: it must ignore these signals
        for name in names:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.received == "SIGINT":
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if name == "SIGINT" and self.received is None:
            self.received = name
            logger.warning("Ctrl-C: saving and exiting at the end of this step (Ctrl-C again to abort now)")
        elif self.received is None:
            self.received = name
            logger.warning("received %s: saving and exiting at the end of this step", name)
        else:
            logger.warning("received %s while already stopping on %s: ignored", name, self.received)

    def check(self, iteration: int) -> str | None:
        """The reason to stop after ``iteration`` (the same on every rank), or None."""
        out_of_time = (
            self.cfg.exit_duration_in_mins is not None and time.monotonic() - self.start > 60 * self.cfg.exit_duration_in_mins
        )
        # [signal received, out of time] on any rank (each rank reads its own clock)
        flags = torch.tensor([float(self.received is not None), float(out_of_time)], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signalled, timed_out = flags.tolist()
        if signalled:
            return f"signal {self.received or '(received by another rank)'}"
        if timed_out:
            return "exit_duration"
        if self.cfg.exit_interval and iteration % self.cfg.exit_interval == 0 and iteration < self.cfg.train_iters:
            return "exit_interval"
        return None

    def restore_handlers(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


def write_exit_status(save_dir: str, *, exit_code: int, reason: str, iteration: int, train_iters: int) -> None:
    """``SAVE/exit_status.json``, written atomically by one rank on a clean exit."""
    path = Path(save_dir) / EXIT_STATUS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    status = {"exit_code": exit_code, "reason": reason, "iteration": iteration, "train_iters": train_iters,
              "time": time.time()}
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(status, indent=1) + "\n")
    os.replace(tmp, path)
