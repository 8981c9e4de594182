"""A real one-node Slurm cluster for the tests in this directory (started once per session, stopped by pid).

Skipped, with the reason printed in the session header, only where the cluster cannot run: not Linux,
not root, or the Debian packages are not installed (.ci/run installs them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # conftest's own dir is not on the path
from slurm_cluster import SlurmCluster, unavailable_reason  # noqa: E402
from slurm_runs import REPO, TRAIN_ARGS, final_lm_loss  # noqa: E402


def pytest_report_header(config):
    reason = unavailable_reason()
    what = f"SKIPPED: {reason}" if reason else "a real one-node Slurm cluster (munge, slurmdbd, slurmctld, slurmd)"
    return f"tests/slurm: {what}"


_running: list[SlurmCluster] = []


@pytest.fixture(scope="session")
def slurm_cluster():
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    root = tempfile.mkdtemp(prefix="ssa-slurm-")
    cluster = SlurmCluster(root)
    previous = os.environ.get("SLURM_CONF")
    _running.append(cluster)
    try:
        cluster.start()
        os.environ["SLURM_CONF"] = str(cluster.conf)  # submitit calls sbatch/sacct with this process's environment
        yield cluster
    finally:
        _stop(cluster)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous


def _stop(cluster: SlurmCluster) -> None:
    if cluster in _running:
        _running.remove(cluster)
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


def pytest_runtest_teardown(item, nextitem):
    # The daemons stop after the last test of this directory, not at the end of the whole suite.
    here = os.path.dirname(os.path.abspath(__file__))
    if _running and (nextitem is None or os.path.dirname(str(nextitem.path)) != here):
        for cluster in list(_running):
            _stop(cluster)


@pytest.fixture(scope="session")
def straight_run_loss(tmp_path_factory) -> float:
    """Final lm loss of the same tiny run without Slurm and without interruption."""
    save = tmp_path_factory.mktemp("straight") / "checkpoints"
    proc = subprocess.run(
        [sys.executable, "-m", "ssa_megatron.train", "--config", "configs/tiny_cpu.yaml", *TRAIN_ARGS,
         "--save", str(save), "--load", str(save)],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return final_lm_loss(proc.stdout + proc.stderr)
