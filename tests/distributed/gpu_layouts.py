"""Issue 12 on one 4-GPU node in one command: layout equality, resharded resume, throughput. Not a pytest file.

    python tests/distributed/gpu_layouts.py --out $OUT/parallel_4gpu          # 4 GPUs, NCCL, bf16 (~8 min)
    python tests/distributed/gpu_layouts.py --device cpu --out /tmp/p4        # the same plumbing: 4 gloo ranks, fp32

equality    each model (the tiny one of configs/tiny_cpu.yaml; the 300M one of configs/ssa300m_ablation_h100.yaml
            with 2 KV groups, as TP=2 needs, at a shorter sequence) trains ``--steps`` steps at every
            ``EQUALITY_LAYOUTS`` layout and on one GPU from the same full initial weights on the same data
            (``run_layout.py``); per layout: the largest relative difference of the per-step LM loss and
            model-wide alignment loss (``nccl_equality.compare``) against ``TOLERANCE``, and whether every rank
            logged the same LM and alignment loss, bit for bit.
checkpoint  the tiny model with the distributed optimizer (``run_training.py``) saves at TP2 x PP2 and at DP4
            after ``SPLIT`` of ``STEPS`` steps; TP2 x PP2's checkpoint resumes at one GPU and at DP4, DP4's at
            TP2 x PP2. Every continuation's LM loss against one GPU trained straight through (same seed: the
            initialisation does not depend on the layout).
throughput  ``tools/benchmark_training.py`` under torchrun at each ``--throughput-layouts`` layout: the 1B run
            file at 8k, SSA training, Llama-3's vocabulary (on CPU: configs/tiny_cpu.yaml).

One-GPU runs start together, one per GPU; the others run one after another. ``OUT.json`` and ``OUT.md`` are
written after every part, so a run cut short keeps what finished; a launch that would start past
``--time-budget`` is skipped and reported as such. Exit code 1 when a check failed or a launch did not finish.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/
from distributed.launch import QUIET, launch_layout, launch_training, torchrun_command  # noqa: E402
from distributed.nccl_equality import compare, rel, versions  # noqa: E402

from ssa_megatron.config import read_run_file  # noqa: E402

ROOT = Path(__file__).parents[2]
BENCHMARK = ROOT / "tools" / "benchmark_training.py"

# name: (processes, parallel section). DP is what the world size leaves over TP x PP.
LAYOUTS = {
    "one": (1, {}),
    "tp2_pp2": (4, {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2}),
    "tp2_pp2_vpp2": (4, {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2,
                         "virtual_pipeline_model_parallel_size": 2}),
    "dp2_tp2_distopt": (4, {"tensor_model_parallel_size": 2, "use_distributed_optimizer": True}),
    "dp4": (4, {}),
}
EQUALITY_LAYOUTS = ["tp2_pp2", "tp2_pp2_vpp2", "dp2_tp2_distopt"]
# checkpoint runs (source -> targets); all with the distributed optimizer (fully_reshardable: any TP/PP/DP)
RESUMES = {"tp2_pp2": ["one", "dp4"], "dp4": ["tp2_pp2"]}
THROUGHPUT_LAYOUTS = ["tp2_pp2", "tp2_pp2_vpp2", "dp2_tp2_distopt", "dp4"]

# Largest relative difference, over all steps, of a layout's logged value vs one device's.
# bf16: measured on 2x H200 over 5 steps (docs/benchmarks/parallel_equality_gpu_bf16.md): LM loss 6e-4,
# alignment loss 2e-2 (a small difference of two streams, so its relative rounding is large); 50 steps
# let those grow, a layout bug (a missing 1/TP, a wrong micro-batch scale, a stage's layers not
# counted) moves them by tens of percent. fp32 on CPU: the gloo tests' tolerance.
TOLERANCE = {
    "bf16": {"lm_loss": 1e-2, "alignment_loss": 1e-1},
    "fp32": {"lm_loss": 1e-5, "alignment_loss": 1e-5},
}
SHAPE = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "seq_length",
         "rotary_base")


def model_from(run_file: str, **changes) -> dict:
    """The model shape and SSA block settings of a run file, with ``changes``."""
    values = read_run_file(ROOT / "configs" / run_file)
    model = {k: values["model"][k] for k in SHAPE if k in values["model"]}
    return {"run_file": run_file, "model": {**model, **changes},
            "ssa": {k: values["ssa"][k] for k in ("block_size", "top_k")}}


def setup(device: str) -> dict:
    """Models, training settings and sizes of one mode: ``cuda`` (the issue's run) or ``cpu`` (plumbing)."""
    if device == "cuda":
        return {
            "models": {"tiny": model_from("tiny_cpu.yaml"),
                       # 1 KV head in the run file allows TP=1 only; 2048 tokens keep 50 steps x 4 launches short
                       "300m": model_from("ssa300m_ablation_h100.yaml", num_query_groups=2, seq_length=2048)},
            "train": {"dtype": "bf16", "device": "cuda", "micro_batch_size": 2, "global_batch_size": 8, "lr": 1e-3},
            "steps": 50, "checkpoint_steps": (20, 10),
            "benchmark": ["--config", "configs/llama1b_ssa_h100.yaml", "--vocab-size", "128256", "--cases", "ssa",
                          "--steps", "8", "--warmup", "3", "--micro-batch-size", "1", "--global-batch-size", "8"],
        }
    return {  # tests/tiny_config.py's model
        "models": {"tiny": {"run_file": "tests/tiny_config.py", "model": {}, "ssa": {}}},
        "train": {"dtype": "fp32", "device": "cpu", "micro_batch_size": 2, "global_batch_size": 8},
        "steps": 2, "checkpoint_steps": (4, 2),
        "benchmark": ["--config", "configs/tiny_cpu.yaml", "--cases", "ssa", "--steps", "2", "--warmup", "1",
                      "--micro-batch-size", "1", "--global-batch-size", "8"],
    }


class Runner:
    """Launches with a time budget: what would start too late is skipped, and every launch is timed."""

    def __init__(self, budget_s: float, device: str):
        self.start, self.budget_s, self.device = time.monotonic(), budget_s, device
        self.launches: list[dict] = []

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def __call__(self, name: str, fn, /, *args, **kwargs):
        """``fn(*args, timeout=..., **kwargs)``, or None when skipped, failed or timed out (recorded)."""
        if self.left() < 20:
            self.launches.append({"launch": name, "status": "skipped: time budget spent"})
            print(f"[{self.elapsed()}] {name}: skipped (time budget spent)", flush=True)
            return None
        began = time.monotonic()
        try:
            result, status = fn(*args, timeout=self.left(), **kwargs), "ok"
        except subprocess.TimeoutExpired:
            result, status = None, "timed out"
        except RuntimeError as err:  # a launch's own failure: its output tail goes to the log
            print(str(err)[-4000:], flush=True)
            result, status = None, f"failed: {str(err).splitlines()[0][:200]}"
        self.launches.append({"launch": name, "status": status, "seconds": round(time.monotonic() - began, 1)})
        print(f"[{self.elapsed()}] {name}: {status} in {time.monotonic() - began:.0f} s", flush=True)
        return result

    def elapsed(self) -> str:
        return f"{time.monotonic() - self.start:6.0f} s"

    def one_gpu_together(self, jobs: dict) -> dict:
        """Run one-process ``jobs`` ({name: (fn, kwargs)}) at once, job i on GPU i (on CPU: all at once)."""
        def run(i, name, fn, kwargs):
            env = {"CUDA_VISIBLE_DEVICES": str(i % max(torch.cuda.device_count(), 1))} if self.device == "cuda" else {}
            return self(name, fn, env=env, **kwargs)

        with concurrent.futures.ThreadPoolExecutor(max(len(jobs), 1)) as pool:
            futures = {name: pool.submit(run, i, name, fn, kw) for i, (name, (fn, kw)) in enumerate(jobs.items())}
            return {name: f.result() for name, f in futures.items()}


# -- parts ----------------------------------------------------------------------------------------


def equality(run: Runner, s: dict, work: Path, singles: dict) -> list[dict]:
    tolerance = TOLERANCE[s["train"]["dtype"]]
    rows = []
    for model_name in s["equality_models"]:
        spec = s["models"][model_name]
        single = singles.get(f"equality {model_name} one")
        if single is None:
            continue
        initial = torch.load(work / f"init_{model_name}.pt")
        for name in s["equality_layouts"]:
            nproc, layout = LAYOUTS[name]
            result = run(f"equality {model_name} {name}", launch_layout, nproc, work / f"init_{model_name}.pt",
                         work / f"{model_name}_{name}.pt", steps=s["steps"], layout=layout, model=spec["model"],
                         ssa=spec["ssa"], train=s["train"])
            if result is None:
                continue
            row = {"model": model_name, "layout": name, **compare(single, result, initial)}
            # model-wide values are reduced over every group: each rank must log the very same numbers
            row["ranks_log_identical"] = all(
                len({(r["records"][step]["lm"], r["records"][step]["align"]) for r in result["ranks"]}) == 1
                for step in range(s["steps"]))
            row["lm_loss_step1_rel_diff"] = rel(result["ranks"][-1]["records"][0]["lm"], single["ranks"][0]["records"][0]["lm"])
            row["passed"] = (row["lm_loss_max_rel_diff"] <= tolerance["lm_loss"]
                             and row["alignment_loss_max_rel_diff"] <= tolerance["alignment_loss"]
                             and row["ranks_log_identical"] and row["modes_match"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def checkpoint_launcher(s: dict, work: Path):
    """``launch(name, layout, stop=..., load=...)``: one checkpoint run of the tiny model, its last rank's records."""
    steps, split = s["checkpoint_steps"]
    spec = s["models"]["tiny"]

    def launch(name: str, layout: str, *, stop: bool = False, load: str | None = None, timeout=None, env=None):
        nproc, parallel = LAYOUTS[layout]
        checkpoint = {"save": str(work / f"ckpt_{name}")}
        if stop:
            checkpoint["load"] = checkpoint["save"]
        if load:
            checkpoint["load"] = load
        train = {**s["train"], "train_iters": steps, **({"exit_interval": split} if stop else {})}
        results = launch_training(nproc, work / name, expect_exit=3 if stop else 0, in_process=False, env=env,
                                  timeout=timeout, model=spec["model"], ssa=spec["ssa"], train=train,
                                  parallel={**parallel, "use_distributed_optimizer": True}, checkpoint=checkpoint)
        return results[-1]["records"]

    return launch


def checkpoint(run: Runner, s: dict, work: Path, straight: list[dict] | None) -> list[dict]:
    if straight is None:
        return []
    _, split = s["checkpoint_steps"]
    launch = checkpoint_launcher(s, work)
    tolerance = TOLERANCE[s["train"]["dtype"]]["lm_loss"]
    rows = []
    for source, targets in s["resumes"].items():
        first = run(f"checkpoint save at {source}", launch, f"split_{source}", source, stop=True)
        if first is None:
            continue
        for target in targets:
            continued = run(f"checkpoint {source} -> {target}", launch, f"resume_{source}_{target}", target,
                            load=str(work / f"ckpt_split_{source}"))
            if continued is None:
                continue
            reference = straight[split:]
            row = {
                "saved_at": source, "resumed_at": target, "split": split,
                "iterations_continue": [r["iteration"] for r in continued] == [r["iteration"] for r in reference],
                "before_save_lm_max_rel_diff": max(rel(g["lm"], w["lm"]) for g, w in zip(first, straight[:split])),
                "lm_loss_max_rel_diff": max(rel(g["lm"], w["lm"]) for g, w in zip(continued, reference)),
                "grad_norm_max_rel_diff": max(rel(g["grad_norm"], w["grad_norm"]) for g, w in zip(continued, reference)),
            }
            row["passed"] = row["iterations_continue"] and max(row["before_save_lm_max_rel_diff"],
                                                              row["lm_loss_max_rel_diff"]) <= tolerance
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def benchmark(name: str, args: list[str], out: Path, *, timeout=None, env=None) -> list[dict]:
    nproc, parallel = LAYOUTS[name]
    flags = {"tensor_model_parallel_size": "--tensor-model-parallel-size",
             "pipeline_model_parallel_size": "--pipeline-model-parallel-size",
             "virtual_pipeline_model_parallel_size": "--virtual-pipeline-model-parallel-size"}
    layout_args = [a for k, v in parallel.items() if k in flags for a in (flags[k], str(v))]
    command = torchrun_command(nproc, BENCHMARK, *args, "--profile-steps", "0", *layout_args, "--out", str(out))
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **QUIET, **(env or {})},
                            timeout=timeout)
    if result.returncode != 0 or not Path(f"{out}.json").exists():
        raise RuntimeError(f"benchmark at {name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return [{"layout_name": name, **r} for r in json.loads(Path(f"{out}.json").read_text())["rows"]]


def throughput(run: Runner, s: dict, work: Path, layouts: list[str]) -> list[dict]:
    rows = []
    for name in layouts:
        # the distributed optimizer is the run file's (on in the 1B file)
        got = run(f"throughput {name}", benchmark, name, s["benchmark"], work / f"bench_{name}")
        for r in got or []:
            rows.append(r)
            print(json.dumps(r), flush=True)
    return rows


# -- report ---------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    m = report["meta"]
    lines = ["# Parallel layouts on 4 devices (issue 12)\n",
             f"{m['device']}" + (f" x {m['gpus']}" if m["gpus"] else " (4 gloo ranks)") + f", {m['date']}, torch {m['torch']}, megatron-core {m['megatron_core']}, "
             f"{m['dtype']}; written by `{m['command']}` in {m['seconds']:.0f} s.\n"]
    tol = m["tolerance"]
    if report.get("equality"):
        lines += [f"## Layout equality vs one device, {m['steps']} steps\n",
                  f"Same full initial weights and data; tolerance: LM loss {tol['lm_loss']:.0e}, alignment loss "
                  f"{tol['alignment_loss']:.0e} (largest relative difference over the steps); every rank must log the "
                  "same LM and alignment loss, bit for bit. Models: " + "; ".join(
                      f"{k}: {v['run_file']} {v['model']} {v['ssa']}" for k, v in m["models"].items()) + ".\n",
                  "| model | layout | LM loss max rel diff | step 1 | alignment loss max rel diff | per-layer alignment | "
                  "weight diff / update (L2) | ranks identical | modes match | passed |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['layout']} | {r['lm_loss_max_rel_diff']:.2e} | {r['lm_loss_step1_rel_diff']:.2e} | "
                  f"{r['alignment_loss_max_rel_diff']:.2e} | {r['per_layer_alignment_max_rel_diff']:.2e} | "
                  f"{r['weights_rel_l2_diff_vs_update']:.2e} | {r['ranks_log_identical']} | {r['modes_match']} | "
                  f"{r['passed']} |" for r in report["equality"]]
    if report.get("checkpoint"):
        steps, split = m["checkpoint_steps"]
        lines += [f"\n## Save at one layout, resume at another (tiny model, distributed optimizer, {steps} steps, "
                  f"saved after {split})\n",
                  "Against one device trained straight through from the same seed; tolerance: LM loss "
                  f"{tol['lm_loss']:.0e}.\n",
                  "| saved at | resumed at | LM before save max rel diff | LM after resume max rel diff | "
                  "grad norm max rel diff | iterations continue | passed |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['saved_at']} | {r['resumed_at']} | {r['before_save_lm_max_rel_diff']:.2e} | "
                  f"{r['lm_loss_max_rel_diff']:.2e} | {r['grad_norm_max_rel_diff']:.2e} | {r['iterations_continue']} | "
                  f"{r['passed']} |" for r in report["checkpoint"]]
    if report.get("throughput"):
        pct = lambda v: f"{v:.1f}" if v is not None else "-"
        lines += ["\n## Throughput per layout\n",
                  f"`tools/benchmark_training.py {' '.join(m['benchmark'])}` under torchrun (no per-part profile); "
                  "step time is the slowest rank's median; MFU against the device's dense bf16 peak.\n",
                  "| layout | GPUs | mode | seq | step ms | tokens/s/GPU | model TFLOP/s/GPU | MFU % | MFU % one stream | "
                  "peak GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['layout_name']} | {r['gpus']} | {r['mode']} | {r['seq_length']} | {r['step_ms']:.0f} | "
                  f"{r['tokens_per_s_per_gpu']:.0f} | {r['model_tflops_per_gpu']:.0f} | {pct(r['mfu_percent'])} | "
                  f"{pct(r['mfu_one_stream_percent'])} | {r['peak_memory_gib']:.1f} |" for r in report["throughput"]]
    lines += ["\n## Launches\n", "| launch | status | seconds |", "|---|---|---|"]
    lines += [f"| {x['launch']} | {x['status']} | {x.get('seconds', '-')} |" for x in report["launches"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="path prefix for .json and .md")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: 4 gloo ranks, fp32, the tests' tiny model, 2-4 steps (checks the plumbing)")
    parser.add_argument("--parts", nargs="+", choices=("equality", "checkpoint", "throughput"),
                        default=["equality", "checkpoint", "throughput"])
    parser.add_argument("--models", nargs="+", choices=("tiny", "300m"), default=None,
                        help="equality models (default: both on GPUs; on CPU the tests' tiny one only)")
    parser.add_argument("--steps", type=int, default=None, help="equality steps (default 50 on GPUs, 2 on CPU)")
    parser.add_argument("--equality-layouts", nargs="+", choices=EQUALITY_LAYOUTS, default=EQUALITY_LAYOUTS)
    parser.add_argument("--resumes", nargs="+", default=[f"{a}:{b}" for a, bs in RESUMES.items() for b in bs],
                        help="checkpoint runs SAVED_AT:RESUMED_AT (layouts: " + ", ".join(LAYOUTS) + ")")
    parser.add_argument("--throughput-layouts", nargs="+", choices=list(LAYOUTS), default=THROUGHPUT_LAYOUTS)
    parser.add_argument("--quick", action="store_true",
                        help="tiny model only, 20 equality steps, throughput at tp2_pp2 and dp4 only")
    parser.add_argument("--time-budget", type=float, default=560, help="seconds; later launches are skipped")
    args = parser.parse_args()

    s = setup(args.device)
    s["equality_models"] = [m for m in (args.models or s["models"]) if m in s["models"]]
    s["equality_layouts"], s["resumes"] = args.equality_layouts, {}
    for pair in args.resumes:
        source, _, target = pair.partition(":")
        if source not in LAYOUTS or target not in LAYOUTS:
            parser.error(f"--resumes {pair}: expected SAVED_AT:RESUMED_AT, each one of {', '.join(LAYOUTS)}")
        s["resumes"].setdefault(source, []).append(target)
    if args.quick:
        s["equality_models"] = ["tiny"]
        s["steps"] = min(s["steps"], 20)
        args.throughput_layouts = [x for x in args.throughput_layouts if x in ("tp2_pp2", "dp4")]
    if args.steps:
        s["steps"] = args.steps
    run = Runner(args.time_budget, args.device)
    work = Path(tempfile.mkdtemp(prefix="gpu_layouts_"))
    report = {"meta": {**versions(), "dtype": s["train"]["dtype"], "command": " ".join(sys.argv), "steps": s["steps"],
                       "models": {k: s["models"][k] for k in s["equality_models"]}, "train": s["train"], "checkpoint_steps": s["checkpoint_steps"],
                       "tolerance": TOLERANCE[s["train"]["dtype"]], "benchmark": s["benchmark"], "seconds": 0.0},
              "launches": run.launches}

    def write() -> None:
        report["meta"]["seconds"] = time.monotonic() - run.start
        report["passed"] = (all(r["passed"] for part in ("equality", "checkpoint") for r in report.get(part, []))
                            and all(x["status"] == "ok" for x in run.launches))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.json").write_text(json.dumps(report, indent=2))
        Path(f"{args.out}.md").write_text(markdown(report))

    # the one-device references first, together (one GPU each)
    jobs = {}
    if "equality" in args.parts:
        for name in s["equality_models"]:
            spec = s["models"][name]
            jobs[f"equality {name} one"] = (launch_layout, dict(
                nproc=1, init=work / f"init_{name}.pt", out=work / f"{name}_one.pt", steps=s["steps"],
                layout={}, model=spec["model"], ssa=spec["ssa"], train=s["train"]))
    if "checkpoint" in args.parts:
        jobs["checkpoint straight at one"] = (checkpoint_launcher(s, work), dict(name="straight_one", layout="one"))
    singles = run.one_gpu_together(jobs)
    if "equality" in args.parts:
        report["equality"] = equality(run, s, work, singles)
        write()
    if "checkpoint" in args.parts:
        report["checkpoint"] = checkpoint(run, s, work, singles.get("checkpoint straight at one"))
        write()
    if "throughput" in args.parts:
        report["throughput"] = throughput(run, s, work, args.throughput_layouts)
    write()
    print(f"[{run.elapsed()}] {'all checks passed' if report['passed'] else 'NOT PASSED'}; wrote {args.out}.json and .md",
          flush=True)
    sys.exit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
