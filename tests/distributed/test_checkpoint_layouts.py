"""Checkpoints across layouts: exact resume, resharded resume, layout-independent init, exact recompute.

Every run trains the tiny model on the same in-memory data (``run_training.py``; one process runs
in the test process, more under torchrun on gloo). "Straight" runs go to ``STEPS``; "split" runs
stop at ``SPLIT`` through ``exit_interval`` (saving, exit code 3) and are resumed with ``--load``.
"""

from __future__ import annotations

import pytest
from distributed.launch import launch_training

from ssa_megatron.train.checkpoint import read_tracker

STEPS, SPLIT = 10, 4
TRAIN = {"train_iters": STEPS, "micro_batch_size": 2, "global_batch_size": 8}  # 4 micro-batches per step
LOSS_RTOL = 1e-5  # float32 on CPU: layouts reduce in different orders
LAYOUTS = {
    "one": (1, {}),
    "tp2": (2, {"tensor_model_parallel_size": 2}),
    "pp2": (2, {"pipeline_model_parallel_size": 2}),
    "dp2_distopt": (2, {"use_distributed_optimizer": True}),
    "tp2_distopt": (2, {"tensor_model_parallel_size": 2, "use_distributed_optimizer": True}),
    "tp2_pp2": (4, {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2}),
    "dp2_tp2_distopt": (4, {"tensor_model_parallel_size": 2, "use_distributed_optimizer": True}),
    "dp4": (4, {}),
}


def max_rel_diff(got: list[dict], want: list[dict], key: str) -> float:
    return max(abs(g[key] - w[key]) / abs(w[key]) for g, w in zip(got, want))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Launch each run once per module (a launch costs ~10-30 s); keyed by what it is."""
    folder = tmp_path_factory.mktemp("ckpt_layouts")
    cache: dict[tuple, list[dict]] = {}

    def straight(layout: str, **train) -> list[dict]:
        key = ("straight", layout, tuple(sorted(train.items())))
        if key not in cache:
            nproc, parallel = LAYOUTS[layout]
            out = folder / f"straight_{layout}_{len(cache)}"
            cache[key] = launch_training(nproc, out, parallel=parallel, train={**TRAIN, **train})[-1]["records"]
        return cache[key]

    def split(layout: str) -> tuple[list[dict], str]:
        key = ("split", layout)
        save = str(folder / f"ckpt_{layout}")
        if key not in cache:
            nproc, parallel = LAYOUTS[layout]
            results = launch_training(nproc, folder / f"split_{layout}", expect_exit=3, parallel=parallel,
                                      train={**TRAIN, "exit_interval": SPLIT}, checkpoint={"save": save, "load": save})
            assert {r["reason"] for r in results} == {"exit_interval"}
            cache[key] = results[-1]["records"]
        return cache[key], save

    def resume(source: str, layout: str) -> list[dict]:
        key = ("resume", source, layout)
        if key not in cache:
            _, load = split(source)
            nproc, parallel = LAYOUTS[layout]
            out = folder / f"resume_{source}_to_{layout}"
            cache[key] = launch_training(nproc, out, parallel=parallel, train=TRAIN,
                                         checkpoint={"load": load, "save": str(out) + "_ckpt"})[-1]["records"]
        return cache[key]

    return straight, split, resume


@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2_tp2_distopt"])
def test_same_seed_trains_the_same_model_at_any_layout(layout, runs):
    """Layout-independent init: from scratch, TP=2 and PP=2 log the losses of one process."""
    straight, _, _ = runs
    one, other = straight("one"), straight(layout)
    print(f"from scratch {layout} vs one process: max rel LM-loss diff {max_rel_diff(other, one, 'lm'):.1e}")
    assert [r["lm"] for r in other] == pytest.approx([r["lm"] for r in one], rel=LOSS_RTOL)
    assert [r["align"] for r in other] == pytest.approx([r["align"] for r in one], rel=LOSS_RTOL)


@pytest.mark.parametrize("layout", ["one", "tp2", "pp2"])
def test_stop_save_and_resume_is_bitwise_identical_to_a_straight_run(layout, runs):
    straight, split, resume = runs
    first, save = split(layout)
    assert read_tracker(save) == SPLIT and [r["iteration"] for r in first] == list(range(1, SPLIT + 1))
    second = resume(layout, layout)
    assert [r["iteration"] for r in second] == list(range(SPLIT + 1, STEPS + 1))  # not from iteration 1
    for key in ("lm", "align", "grad_norm"):
        assert [r[key] for r in first + second] == [r[key] for r in straight(layout)], key


@pytest.mark.parametrize("source, target", [
    ("one", "tp2"), ("one", "pp2"), ("tp2", "one"), ("pp2", "one"), ("dp2_distopt", "tp2_distopt"),
])
def test_a_checkpoint_resumes_at_another_layout_with_the_same_losses(source, target, runs):
    straight, _, resume = runs
    continued = resume(source, target)
    reference = straight(source)[SPLIT:]
    print(f"saved at {source}, resumed at {target}: max rel LM-loss diff {max_rel_diff(continued, reference, 'lm'):.1e}")
    assert [r["iteration"] for r in continued] == [r["iteration"] for r in reference]
    assert [r["lm"] for r in continued] == pytest.approx([r["lm"] for r in reference], rel=LOSS_RTOL)
    assert [r["grad_norm"] for r in continued] == pytest.approx([r["grad_norm"] for r in reference], rel=1e-4)


@pytest.mark.parametrize("target", ["one", "dp4"])
def test_a_tp2_pp2_checkpoint_resumes_at_one_process_and_at_dp4_as_one_process_trains(target, runs):
    """4 ranks (TP2 x PP2) save; one process, or 4 data-parallel ranks, load and continue like a
    one-process run from scratch (same seed, same model at any layout), to float rounding."""
    straight, _, resume = runs
    continued = resume("tp2_pp2", target)
    reference = straight("one")[SPLIT:]
    print(f"saved at tp2_pp2, resumed at {target} vs one from scratch: max rel LM-loss diff "
          f"{max_rel_diff(continued, reference, 'lm'):.1e}")
    assert [r["iteration"] for r in continued] == [r["iteration"] for r in reference]
    assert [r["lm"] for r in continued] == pytest.approx([r["lm"] for r in reference], rel=LOSS_RTOL)


def test_full_recompute_under_1f1b_trains_exactly_what_no_recompute_does(runs):
    """PP=2, 4 micro-batches, ssa mode: a recomputed layer must compute its own micro-batch's stream.

    1F1B runs forward of later micro-batches (new draws) before the backward that recomputes an
    earlier one; had the layer read the latest draw, gradients (so grad norms and later losses) differ.
    """
    straight, _, _ = runs
    plain = straight("pp2")
    recomputed = straight("pp2", recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    for key in ("lm", "align", "grad_norm"):
        assert [r[key] for r in recomputed] == pytest.approx([r[key] for r in plain], rel=1e-6), key
