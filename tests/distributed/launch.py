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


def launch_layout(nproc: int, init: Path, out: Path, *, steps: int, env: dict | None = None, **sections: dict) -> dict:
    """Run ``nproc`` ranks; ``sections`` are run_layout's JSON flags (layout, model, ssa, train)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(RUN_LAYOUT),
        "--steps", str(steps), "--init", str(init), "--out", str(out),
    ]
    for name, values in sections.items():
        command += [f"--{name}", json.dumps(values)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise RuntimeError(f"{nproc} ranks with {sections} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return torch.load(out)
