"""When triton was imported before TRITON_INTERPRET=1 (``pytest tests kernels``), the kernel tests
cannot interpret in this process (see conftest.py): run them in a fresh one and require success."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from kernel_cases import ON_GPU, interpreter_usable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


@pytest.mark.skipif(ON_GPU or interpreter_usable(), reason="the kernel tests run in this process")
def test_kernel_suite_passes_in_a_fresh_interpreter_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", HERE, "-q", "-p", "no:cacheprovider"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    print(run.stdout[-3000:])
    assert run.returncode == 0, f"kernel tests failed under the interpreter:\n{run.stdout[-8000:]}\n{run.stderr[-4000:]}"
    assert " passed" in run.stdout
