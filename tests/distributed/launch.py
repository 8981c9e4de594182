"""Start ``run_layout.py`` under torchrun with one layout and read back its result. Test support."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

RUN_LAYOUT = Path(__file__).with_name("run_layout.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_layout(nproc: int, init: Path, out: Path, *, steps: int, env: dict | None = None, timeout: float | None = None,
                  **sections: dict) -> dict:
    """Run ``nproc`` ranks; ``sections`` are run_layout's JSON flags (layout, model, ssa, train).
    ``timeout`` (seconds) raises ``subprocess.TimeoutExpired`` instead of waiting on a hung group."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(RUN_LAYOUT),
        "--steps", str(steps), "--init", str(init), "--out", str(out),
    ]
    for name, values in sections.items():
        command += [f"--{name}", json.dumps(values)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{nproc} ranks with {sections} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return torch.load(out)


RUN_TRAINING = Path(__file__).with_name("run_training.py")
QUIET = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def torchrun_command(nproc: int, script: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), str(script), *args]


def read_training_result(out: Path, nproc: int) -> list[dict]:
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(nproc)]


def launch_training(nproc: int, out: Path, expect_exit: int = 0, *, in_process: bool = True, env: dict | None = None,
                    timeout: float | None = None, **sections: dict) -> list[dict]:
    """Run ``run_training.py`` on ``nproc`` ranks (in this process when 1 and ``in_process``); every rank's result.
    ``env`` adds to a child's environment; ``timeout`` (seconds) as in ``launch_layout``."""
    if nproc == 1 and in_process:
        from distributed.run_training import run

        code = run(sections, str(out))
    else:
        command = torchrun_command(nproc, RUN_TRAINING, "--config", json.dumps(sections), "--out", str(out))
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **QUIET, **(env or {})},
                                timeout=timeout)
        code = 0 if result.returncode == 0 else None
        if result.returncode != 0 and expect_exit == 0:
            raise RuntimeError(f"{nproc} ranks with {sections} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    results = read_training_result(out, nproc)
    assert all(r["exit_code"] == expect_exit for r in results), ([r["exit_code"] for r in results], code)
    return results
