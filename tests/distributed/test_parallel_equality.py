"""TP, PP (1F1B and interleaved), TPxPP and DP (plain and distributed optimizer) train exactly what one process does.

Each layout runs as gloo CPU processes under torchrun (``run_layout.py``) from the same full
initial weights on the same data; per-step LM loss, logged model-wide alignment loss, per-layer
alignment losses and the final weights must match the one-process run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from distributed.launch import launch_layout

STEPS = 3
TRAIN = {"micro_batch_size": 2, "global_batch_size": 8}  # 4 micro-batches per step on one process
# Float32 on CPU: reduction order differs between layouts (TP all-reduce, DP averaging), and Adam
# turns those ~1e-7 gradient differences into parameter differences of the same order.
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 2e-5


def launch(nproc: int, layout: dict, init: Path, out: Path) -> dict:
    env = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return launch_layout(nproc, init, out, steps=STEPS, env=env, layout=layout, train=TRAIN)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("layouts")
    init = folder / "init.pt"
    return init, launch(1, {}, init, folder / "single.pt")


LAYOUTS = {
    "tp2": (2, {"tensor_model_parallel_size": 2}),
    "pp2_1f1b": (2, {"pipeline_model_parallel_size": 2}),
    "pp2_interleaved_vpp2": (2, {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2}),
    "tp2_pp2": (4, {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2}),
    "dp2": (2, {}),
    "dp2_distributed_optimizer": (2, {"use_distributed_optimizer": True}),
}


@pytest.fixture(scope="module")
def layout_results(baseline, tmp_path_factory):
    """Each layout is launched once and shared by the tests below (a launch costs ~10-40 s)."""
    init, _ = baseline
    folder = tmp_path_factory.mktemp("layout_results")
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            nproc, layout = LAYOUTS[name]
            cache[name] = launch(nproc, layout, init, folder / f"{name}.pt")
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_trains_the_same_as_one_process(name, baseline, layout_results):
    init, single = baseline
    result = layout_results(name)

    reference = single["ranks"][0]["records"]
    for rank in result["ranks"]:  # every rank logs the same model-wide numbers
        for step, (got, want) in enumerate(zip(rank["records"], reference)):
            assert got["lm"] == pytest.approx(want["lm"], rel=LOSS_RTOL), (name, step, "lm loss")
            assert got["align"] == pytest.approx(want["align"], rel=LOSS_RTOL), (name, step, "alignment loss")
            assert got["layers"] == pytest.approx(want["layers"], rel=LOSS_RTOL), (name, step, "per-layer alignment")
            assert got["align"] == pytest.approx(sum(got["layers"]) / len(got["layers"]), rel=1e-6)
            assert all(v > 0 for v in got["layers"]), "every layer, whichever stage holds it, is reported"

    assert set(result["weights"]) == set(single["weights"])
    max_diff = max((result["weights"][k] - v).abs().max().item() for k, v in single["weights"].items())
    print(f"{name}: max |weight difference| after {STEPS} steps = {max_diff:.2e}")
    assert max_diff < WEIGHT_ATOL
    initial = torch.load(init)
    moved = max((v - initial[k]).abs().max().item() for k, v in single["weights"].items())
    assert moved > 100 * WEIGHT_ATOL  # training really changed the weights


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_mode_draw_identical_across_ranks_of_a_replica(name, baseline, layout_results):
    _, single = baseline
    result = layout_results(name)
    by_replica: dict[int, list] = {}
    for rank in result["ranks"]:
        by_replica.setdefault(rank["dp_rank"], []).append(sorted(set(map(tuple, rank["modes"]))))
    reference = {(it, mb): mode for it, mb, mode in single["ranks"][0]["modes"]}
    assert set(reference.values()) == {"full", "sparse"}, "the test run must draw both modes"
    for draws in by_replica.values():
        assert all(d == draws[0] for d in draws), "ranks of one replica disagree on a micro-batch's mode"
        for it, mb, mode in draws[0]:
            assert reference[(it, mb)] == mode  # the same data gets the same mode as in one process
