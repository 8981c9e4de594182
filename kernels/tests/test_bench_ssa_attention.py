"""The kernel benchmark's CPU-runnable parts: argument parsing, the report (before/after columns, the
prefill target) rendered from JSON, and the prefill section end to end at a tiny size with the kernels
under the Triton interpreter (on a GPU: compiled, same code path)."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "kernels", "benchmarks", "bench_ssa_attention.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_ssa_attention", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(date: str, prefill_ms: float, dense_fwd_ms: float, device: str = "NVIDIA H200") -> dict:
    """A results dict in the benchmark's JSON layout, one row per timed table."""
    ours = {"fwd_flops": 1e12, "select_ms": 1.5, "fwd_ms": 0.7, "fwd_bwd_ms": 2.8, "fwd_tflops": 95.0, "fwd_bwd_tflops": 83.0,
            "select_peak_mib": 25.0, "fwd_bwd_peak_mib": 316.0}
    dense = {"best": "cudnn", "fwd_ms": 9.6, "fwd_bwd_ms": 34.9, "fwd_tflops": 457.0, "fwd_bwd_tflops": 441.0, "fwd_bwd_peak_mib": 792.0}
    return {
        "env": {"device": device, "date": date, "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0",
                "shape": {"hq": 32, "hkv": 2, "d": 64, "dtype": "torch.bfloat16", "tokens": 16384}},
        "time": {"32768x1": {"dense": dense, "ours": {"16-16": ours, "64-4": {"error": "RuntimeError: boom"}}, "flex": {}}},
        "layer": {"16-16": {"dense_fwd_bwd_ms": 4.7, "ssa_layer_fwd_bwd_ms": 7.0, "ratio": 1.49, "ssa_layer_peak_mib": 600.0,
                            "align_triton_fwd_bwd_ms": 0.3, "align_torch_fwd_bwd_ms": 1.1}},
        "prefill": {"131072x1": {"dense": {"best": "cudnn", "fwd_ms": dense_fwd_ms, "fwd_peak_mib": 3000.0},
                                 "ours": {"16-16": {"select_ms": prefill_ms - 3.0, "sparse_fwd_ms": 2.8, "prefill_ms": prefill_ms,
                                                    "prefill_peak_mib": 700.0, "speedup": dense_fwd_ms / prefill_ms,
                                                    "sparse_only_speedup": dense_fwd_ms / 2.8}}}},
    }


def test_report_puts_the_before_run_beside_each_timed_row_and_judges_the_prefill_target(bench):
    before = _run("2026-11-23T08:54:42", prefill_ms=48.0, dense_fwd_ms=157.6, device="NVIDIA H100 80GB HBM3")
    before["time"]["32768x1"]["ours"]["16-16"]["select_ms"] = 3.928
    now = _run("2026-12-01T10:00:00", prefill_ms=14.0, dense_fwd_ms=150.0)
    text = bench.report.markdown(now, before, "old.json")
    assert "Before (the 'before' columns): NVIDIA H100 80GB HBM3 | 2026-11-23T08:54:42" in text and "`old.json`" in text
    assert "| 32768x1 | ours | 16 | 16 | 1.500 | 3.928 | 0.700 | 0.700 |" in text  # select now | before, fwd now | before
    assert "| 131072x1 | 16 | 16 | 11.000 | 2.800 | 14.000 | 48.000 | 150.000 (cudnn) | 157.600 | 10.7 | 3.3 |" in text
    assert "| 16 | 16 | 7.000 | 7.000 | 4.700 | 4.700 | 1.490 | 1.490 |" in text  # the layer table
    assert "RuntimeError: boom" in text  # a failed row is reported, not dropped
    assert "Target (issue 10): >= 10x at 131072x1, block / top-k 16 / 16: **met** (10.7x)" in text
    assert "**not met** (3.3x)" in bench.report.markdown(before)


def test_report_without_a_before_run_has_no_before_columns(bench):
    text = bench.report.markdown(_run("2026-12-01T10:00:00", prefill_ms=20.0, dense_fwd_ms=150.0))
    assert "before" not in text.lower()
    assert "| 32768x1 | ours | 16 | 16 | 1.500 | 0.700 | 95 | 2.800 | 83 | 19 | 54% | 316 |" in text
    assert "**not met** (7.5x)" in text


def test_report_only_rerenders_markdown_from_json_and_skips_a_before_that_is_the_same_run(bench, tmp_path):
    new, old = tmp_path / "new.json", tmp_path / "old.json"
    new.write_text(json.dumps(_run("2026-12-01T10:00:00", prefill_ms=14.0, dense_fwd_ms=150.0)))
    old.write_text(json.dumps(_run("2026-11-23T08:54:42", prefill_ms=48.0, dense_fwd_ms=157.6)))
    bench.main(["--report-only", "--results", str(new), "--before", str(old), "--out", str(tmp_path)])
    assert "| 14.000 | 48.000 |" in (tmp_path / "kernels.md").read_text()
    bench.main(["--report-only", "--results", str(new), "--before", str(new), "--out", str(tmp_path)])
    assert "before" not in (tmp_path / "kernels.md").read_text().lower()


def test_arguments_refuse_an_unknown_section_and_take_none_as_no_before(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--sections", "check,prefil"])
    args = bench.parse_args(["--sections", "check,time,layer,prefill", "--deterministic", "--before", "none"])
    assert args.before is None and args.deterministic and args.prefill_seqs == "32768,131072"


def test_prefill_section_measures_and_writes_json_and_markdown(bench, tmp_path):
    """The prefill section through main() at one 32-token sequence: dense and both configs measured,
    the speedup stored, the before run's figure beside it, the target reported as not measured."""
    old = tmp_path / "old.json"
    before = _run("2026-11-23T08:54:42", prefill_ms=48.0, dense_fwd_ms=157.6)
    before["prefill"]["32x1"] = {"dense": {"fwd_ms": 0.123}, "ours": {"16-16": {"prefill_ms": 4.567, "speedup": 0.5}}}
    old.write_text(json.dumps(before))
    out = tmp_path / "out"
    bench.main(["--sections", "prefill", "--prefill-seqs", "32", "--prewarm", "0", "--out", str(out), "--before", str(old)])
    res = json.loads((out / "kernels.json").read_text())
    entry = res["prefill"]["32x1"]
    assert entry["dense"]["best"] in entry["dense"]["backends"] and entry["dense"]["fwd_ms"] > 0
    for cfg in ("16-16", "64-16"):
        r = entry["ours"][cfg]
        assert {"select_ms", "sparse_fwd_ms", "prefill_ms", "speedup", "sparse_only_speedup"} <= r.keys(), r
        assert r["speedup"] == pytest.approx(entry["dense"]["fwd_ms"] / r["prefill_ms"])
    assert res["args"]["sections"] == "prefill" and res["env"]["device"]
    md = (out / "kernels.md").read_text()
    assert "## Sparse prefill" in md and "| 4.567 |" in md and "| 0.123 |" in md
    assert "at 131072x1, block / top-k 16 / 16: not measured" in md


def test_prefill_check_matches_the_float32_oracle_and_the_training_forward(bench):
    r = bench.check_prefill(1, 48, 16, 2)
    assert r["pass"], r  # finite, same top-k sets, relative RMS error < 2e-2, and:
    assert r["same_as_training_forward"]
