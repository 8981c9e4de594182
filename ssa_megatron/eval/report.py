"""One markdown page from the evaluation outputs of several runs.

    ssa-eval report runs/ssa/eval runs/full/eval runs/moba/eval --out report.md

Each RUN_DIR is searched (recursively) for what the other subcommands write: ``perplexity.json``,
``attention.json``, ``sweep.json`` (+ ``sweep.png``), ``lm_eval.md`` (+ ``lm_eval_*.json``),
``niah.json`` (+ ``niah.png``). Tables of the same kind are merged across runs; figures are linked
relative to the report.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ssa_megatron.eval import attention, niah, sweep


def _find(run_dirs: list[Path], name: str) -> list[tuple[Path, Path]]:
    return [(d, p) for d in run_dirs for p in sorted(d.rglob(name))]


def _image(path: Path, out: Path, title: str) -> str:
    return f"![{title}]({os.path.relpath(path, out.parent)})"


def build_report(run_dirs: list[str | Path], out: str | Path, title: str = "SSA evaluation") -> Path:
    dirs = [Path(d) for d in run_dirs]
    for d in dirs:
        if not d.is_dir():
            raise ValueError(f"{d}: not a directory (pass the --out directories of ssa-eval runs)")
    out = Path(out)
    parts = [f"# {title}", "", "Runs: " + ", ".join(f"`{d}`" for d in dirs), ""]

    ppl = _find(dirs, "perplexity.json")
    if ppl:
        parts += ["## Perplexity", "", "| run | model | window / stride | setting | token ppl | word ppl | bits/byte |", "|---|---|---|---|---|---|---|"]
        for d, p in ppl:
            r = json.loads(p.read_text())
            for x in r["results"]:
                fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
                parts.append(f"| {d.name} | {r['model']} | {r['window']} / {r['stride']} | {x['label']} | {fmt(x['token_perplexity'], '.3f')} | "
                             f"{fmt(x['word_perplexity'], '.3f')} | {fmt(x['bits_per_byte'], '.4f')} |")
        parts.append("")
    att = _find(dirs, "attention.json")
    if att:
        parts += ["## Attention analysis", ""]
        for _, p in att:
            parts += [attention.markdown(json.loads(p.read_text())), ""]
    sw = _find(dirs, "sweep.json")
    if sw:
        parts += ["## Budget sweep", ""]
        for _, p in sw:
            parts += [sweep.markdown(json.loads(p.read_text())), ""]
            if p.with_suffix(".png").is_file():
                parts += [_image(p.with_suffix(".png"), out, "budget sweep"), ""]
    lm = _find(dirs, "lm_eval.md")
    if lm:
        parts += ["## lm-evaluation-harness", ""]
        for d, p in lm:
            parts += [f"`{d.name}`:", "", p.read_text(), ""]
    nh = _find(dirs, "niah.json")
    if nh:
        parts += ["## Needle in a haystack", ""]
        for _, p in nh:
            parts += [niah.markdown(json.loads(p.read_text())), ""]
            if p.with_suffix(".png").is_file():
                parts += [_image(p.with_suffix(".png"), out, "NIAH heatmap"), ""]
    found = len(ppl) + len(att) + len(sw) + len(lm) + len(nh)
    if not found:
        raise ValueError(f"no evaluation outputs (perplexity.json, attention.json, sweep.json, lm_eval.md, niah.json) under {dirs}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts).rstrip() + "\n")
    return out

