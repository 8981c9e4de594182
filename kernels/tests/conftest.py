"""Kernel tests run compiled on a CUDA machine and through the Triton interpreter on CPU.

How the interpreter is switched on, and why it stays scoped to this directory (triton 3.9, checked
in its source, ``triton/runtime/jit.py`` and ``triton/knobs.py``, and by experiment):

* ``TRITON_INTERPRET`` is read when an ``@triton.jit`` decorator runs. That covers triton's *own*
  jit functions too (``tl.sum``, ``tl.max``, ``tl.cdiv`` live in ``triton/language/standard.py``):
  if triton was imported without the variable, an interpreted kernel that calls them fails with
  "Cannot call @triton.jit'd outside of the scope of a kernel". Setting the variable before the
  first ``@triton.jit`` *launch* is not enough; it must be set before ``import triton``.
* ``megatron.core`` imports triton, and ``pytest tests kernels`` collects ``tests/`` first. But
  pytest loads the conftests of its arguments' ``test*`` subdirectories at startup, before any test
  module is imported, so in ``pytest tests kernels`` (checked: 243 passed, kernel tests in-process)
  and ``pytest kernels`` this conftest imports triton and ``ssa_kernels`` first, with the variable
  set. Where something imported triton earlier still (``python -c "import triton; pytest.main()"``,
  a plugin), the kernel tests here are skipped and ``test_kernel_interpreter_process.py`` re-runs
  this directory in a fresh process with ``TRITON_INTERPRET=1``, failing if that run fails.
* Importing triton under the variable makes triton's own jit functions interpreted for the whole
  session; on CPU nothing else can launch a compiled triton kernel anyway, and on a CUDA machine
  this conftest leaves the variable alone.
* The variable is set only around that import and, per kernel test, by an autouse fixture
  (monkeypatch restores it), so tests outside ``kernels/`` never see it.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest

# pytest runs with --import-mode=importlib and pythonpath=["tests"]: make this directory's helper
# module (kernel_cases) importable for the kernel test modules.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from kernel_cases import ON_GPU, interpreter_usable  # noqa: E402

_MODULES = (
    "ssa_kernels._utils",
    "ssa_kernels.select",
    "ssa_kernels.inverse",
    "ssa_kernels.sparse",
    "ssa_kernels.align",
    "ssa_kernels.cross_entropy",
    "ssa_kernels",
)
SUBPROCESS_TEST = "test_kernel_interpreter_process.py"


def _import_interpreted() -> bool:
    """Import triton and ssa_kernels in interpreter mode; False if triton came first without it."""
    if "triton" in sys.modules and not interpreter_usable():
        return False
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import ssa_kernels

        if not ssa_kernels.INTERPRET:  # imported before in compiled mode: rebuild its jit functions
            for name in _MODULES:
                importlib.reload(sys.modules[name])
        return sys.modules["ssa_kernels"].INTERPRET and interpreter_usable()
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


IN_PROCESS = ON_GPU or _import_interpreted()


def pytest_collection_modifyitems(config, items):
    if IN_PROCESS:
        return
    skip = pytest.mark.skip(reason=f"triton was imported without TRITON_INTERPRET: run by {SUBPROCESS_TEST}")
    for item in items:
        path = str(item.path)
        if path.startswith(HERE + os.sep) and not path.endswith(SUBPROCESS_TEST):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _triton_mode(monkeypatch):
    """Interpreter on CPU for each kernel test (ssa_megatron.ops checks the variable at call time)."""
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield
