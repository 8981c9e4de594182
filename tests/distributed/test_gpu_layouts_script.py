"""The 4-GPU script of issue 12 (``gpu_layouts.py``) runs every part on 4 gloo ranks and reports it.

The GPU run happens on a machine this suite never sees; this checks its plumbing on CPU (fp32, the
tests' tiny model, 2-4 steps): launches, layouts, checkpoint hand-over, the benchmark under
torchrun, and the JSON/markdown report the GPU run will commit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("gpu_layouts.py")


def run_script(tmp_path, *args: str) -> dict:
    out = tmp_path / "parallel_cpu"
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(out), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads(Path(f"{out}.json").read_text())
    assert report["passed"] and all(x["status"] == "ok" for x in report["launches"]), report["launches"]
    assert {"device", "date", "torch", "megatron_core", "tolerance", "steps", "seconds"} <= set(report["meta"])
    return {**report, "page": Path(f"{out}.md").read_text()}


def test_every_part_passes_on_four_cpu_ranks(tmp_path):
    """One 4-rank layout per part, in one invocation (the full CPU run, every layout, takes ~5 min on 2 cores)."""
    report = run_script(tmp_path, "--parts", "equality", "checkpoint", "throughput",
                        "--equality-layouts", "tp2_pp2_vpp2", "--resumes", "tp2_pp2:one",
                        "--throughput-layouts", "tp2_pp2_vpp2")  # the interleaved flags reach the benchmark too
    [row] = report["equality"]
    assert row["layout"] == "tp2_pp2_vpp2" and row["ranks_log_identical"] and row["modes_match"]
    assert row["lm_loss_max_rel_diff"] <= report["meta"]["tolerance"]["lm_loss"]
    assert row["alignment_loss_max_rel_diff"] <= report["meta"]["tolerance"]["alignment_loss"]
    [resume] = report["checkpoint"]
    assert (resume["saved_at"], resume["resumed_at"]) == ("tp2_pp2", "one")
    assert resume["iterations_continue"] and resume["passed"]
    [bench] = report["throughput"]
    assert bench["layout"] == {"tp": 2, "pp": 2, "vpp": 2, "dp": 1, "distributed_optimizer": False}
    assert bench["gpus"] == 4 and bench["tokens_per_s_per_gpu"] > 0
    for heading in ("Layout equality", "Save at one layout", "Throughput per layout", "Launches"):
        assert heading in report["page"]
