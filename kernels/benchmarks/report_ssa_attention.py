"""The kernel benchmark's report: markdown from the JSON that ``bench_ssa_attention.py`` measures.

Measuring and reporting are split: the benchmark writes ``kernels.json`` (figures only) and renders
it through :func:`markdown`; the same rendering runs on any machine, without a GPU, from JSON files:

    python kernels/benchmarks/bench_ssa_attention.py --report-only \
        --results docs/benchmarks/kernels.json --before /tmp/kernels_before.json

``before`` is an earlier run's JSON (the committed one: ``git show HEAD:docs/benchmarks/kernels.json``):
each timed table then carries a "before" column beside its headline figures, looked up under the same
keys in that run ('-' where it has no such row). This module imports neither torch nor triton.
"""

from __future__ import annotations

import json
import math

PREFILL_TARGET = {"seq_key": "131072x1", "cfg": "16-16", "speedup": 10.0}  # issue 10: >= 10x at 128k, block 16 top-16


def _get(d, *path):
    """``d[path[0]][path[1]]...`` or None where a key is missing (a row the other run does not have)."""
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _f(x, fmt: str = ".3f") -> str:
    """A figure, or '-' where there is none (missing, None, NaN: e.g. peak memory off CUDA)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, fmt) if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


class Table:
    """A markdown table whose columns marked ``paired`` get a "before" column beside them.

    Columns are ``(title, paired)``; a row gives a plain string per column, and a ``(now, before)``
    pair for a paired column. Without a before run the pairs collapse to their first element.
    """

    def __init__(self, columns: list[tuple[str, bool]], with_before: bool):
        self.columns, self.with_before = columns, with_before
        self.lines = []
        titles = [t for title, paired in columns for t in ((title, "before") if paired and with_before else (title,))]
        self.width = len(titles)
        self.lines += ["| " + " | ".join(titles) + " |", "|" + "---|" * self.width]

    def row(self, *cells):
        out = []
        for (_, paired), cell in zip(self.columns, cells):
            if paired:
                now, before = cell if isinstance(cell, tuple) else (cell, "")
                out += [now, before] if self.with_before else [now]
            else:
                out.append(cell)
        self.lines.append("| " + " | ".join(out + [""] * (self.width - len(out))) + " |")

    def note(self, *cells):
        """A row that carries a message (an error, a skip) instead of figures: padded to the width."""
        self.lines.append("| " + " | ".join(list(cells) + [""] * (self.width - len(cells))) + " |")


def _pair(r: dict, before, path: tuple, key: str, fmt: str = ".3f"):
    """(this run's ``r[key]``, the before run's figure at ``path + (key,)``), both formatted."""
    return _f(r.get(key), fmt), _f(_get(before, *path, key), fmt)


def _skip_msg(r: dict, n: int = 90) -> str:
    return ("ERROR " + r["error"] if "error" in r else r.get("skipped", "n/a"))[:n]


def markdown(res: dict, before: dict | None = None, before_source: str = "") -> str:
    """The whole report; ``before`` (an earlier run's results) adds the "before" columns."""
    env = res["env"]
    shape = env.get("shape", {})
    hq, hkv, d, tokens = shape.get("hq", "?"), shape.get("hkv", "?"), shape.get("d", "?"), shape.get("tokens", "?")
    wb = before is not None
    lines = [
        "# SSA kernel benchmark",
        "",
        f"{env['device']} | {env['date']} | torch {env['torch']} | triton {env['triton']} | CUDA {env.get('cuda')}",
        "",
    ]
    if wb:
        be = before.get("env", {})
        lines += [f"Before (the 'before' columns): {be.get('device', '?')} | {be.get('date', '?')} | torch {be.get('torch', '?')} "
                  f"| triton {be.get('triton', '?')}" + (f" (`{before_source}`)" if before_source else "")
                  + "; '-' where that run has no such row.", ""]
    if res.get("args"):
        a = res["args"]
        lines += [f"Sections: {a.get('sections')}" + (" (+ deterministic mode)" if a.get("deterministic") else "")
                  + (f"; wall time {res['wall_s']:.0f} s" if "wall_s" in res else ""), ""]
    lines += [
        f"Layer: {hq} query heads, {hkv} KV heads, head_dim {d}, bf16; batch = max(1, {tokens} // seq) "
        "(2 x 8k, 1 x 32k, 1 x 128k). Times are medians (ms) of `triton.testing.do_bench`; TF/s counts useful "
        "FLOPs only (fwd 4*d*heads*attended keys, bwd 2.5x fwd); peak = memory allocated above the inputs. "
        "select_blocks carries no gradient: 'fwd+bwd' columns are sparse_attention alone.",
    ]
    lines += _correctness(res)
    lines += _timings(res, before)
    lines += _breakdown(res, before)
    lines += _deterministic(res, before)
    lines += _select(res, before)
    lines += _layer(res, before)
    lines += _prefill(res, before)
    if res.get("notes"):
        lines += ["", "Notes"] + [f"- {n}" for n in res["notes"]]
    return "\n".join(lines) + "\n"


def _correctness(res: dict) -> list[str]:
    lines = []
    if res.get("check"):
        lines += ["", "## Correctness (bf16 kernels vs float32 oracle on the same inputs; outputs NaN-poisoned)", ""]
        t = Table([(c, False) for c in ("config", "pass", "same top-k set", "o", "dq", "dk", "dv", "bf16 floor (o)")], False)
        for key, r in res["check"].items():
            if "pass" not in r:
                t.note(key, _skip_msg(r, 80))
                continue
            t.row(key, str(r["pass"]), _f(r["select_same_set_frac"], ".5f"), *(_f(r[f"{n}_rel_err"], ".1e") for n in ("o", "dq", "dk", "dv")),
                  _f(r["o_ref_bf16_rounding_rel_err"], ".1e"))
        lines += t.lines
    if res.get("prefill_check"):
        lines += ["", "Prefill path (`ssa_megatron.ops`, backend triton, under `torch.no_grad`: select_blocks + sparse_attention) "
                  "vs the float32 oracle's selection and attention on the same inputs:", ""]
        t = Table([(c, False) for c in ("config", "pass", "same top-k set", "o", "bf16 floor (o)", "= training forward, bitwise")], False)
        for key, r in res["prefill_check"].items():
            if "pass" not in r:
                t.note(key, _skip_msg(r, 80))
                continue
            t.row(key, str(r["pass"]), _f(r["same_set_frac"], ".5f"), _f(r["o_rel_err"], ".1e"),
                  _f(r["o_ref_bf16_rounding_rel_err"], ".1e"), str(r["same_as_training_forward"]))
        lines += t.lines
    return lines


def _timings(res: dict, before) -> list[str]:
    if not res.get("time"):
        return []
    t = Table([("seq x batch", False), ("method", False), ("block", False), ("top-k", False), ("select ms", True),
               ("fwd ms", True), ("fwd TF/s", False), ("fwd+bwd ms", True), ("fwd+bwd TF/s", False),
               ("% of dense TF/s", False), ("select / sparse fwd+bwd", False), ("peak MiB", False)], before is not None)
    for seq_key, entry in res["time"].items():
        dense = entry.get("dense", {})
        path = ("time", seq_key, "dense")
        if "fwd_bwd_ms" in dense:
            t.row(seq_key, f"dense SDPA ({dense['best']})", "-", "-", ("-", "-"), _pair(dense, before, path, "fwd_ms"),
                  _f(dense["fwd_tflops"], ".0f"), _pair(dense, before, path, "fwd_bwd_ms"), _f(dense["fwd_bwd_tflops"], ".0f"),
                  "100", "-", _f(dense.get("fwd_bwd_peak_mib"), ".0f"))
        elif dense:
            t.note(seq_key, "dense SDPA", "-", "-", _skip_msg(dense))
        d_tf = dense.get("fwd_bwd_tflops")
        for cfg_key, r in entry.get("ours", {}).items():
            bs, k = cfg_key.split("-")
            if "fwd_bwd_ms" not in r:
                t.note(seq_key, "ours", bs, k, _skip_msg(r, 60))
                continue
            path = ("time", seq_key, "ours", cfg_key)
            t.row(seq_key, "ours", bs, k, _pair(r, before, path, "select_ms"), _pair(r, before, path, "fwd_ms"),
                  _f(r["fwd_tflops"], ".0f"), _pair(r, before, path, "fwd_bwd_ms"), _f(r["fwd_bwd_tflops"], ".0f"),
                  _f(100 * r["fwd_bwd_tflops"] / d_tf, ".0f") if d_tf else "-", f"{100 * r['select_ms'] / r['fwd_bwd_ms']:.0f}%",
                  _f(r.get("fwd_bwd_peak_mib"), ".0f"))
        for cfg_key, r in entry.get("flex", {}).items():
            bs, k = cfg_key.split("-")
            if "fwd_bwd_ms" not in r:
                t.note(seq_key, "FlexAttention", bs, k, _skip_msg(r))
                continue
            path = ("time", seq_key, "flex", cfg_key)
            t.row(seq_key, "FlexAttention", bs, k, (f"mask {r['mask_build_s']:.1f} s", "-"), _pair(r, before, path, "fwd_ms"),
                  _f(r["fwd_tflops"], ".0f"), _pair(r, before, path, "fwd_bwd_ms"), _f(r["fwd_bwd_tflops"], ".0f"),
                  _f(100 * r["fwd_bwd_tflops"] / d_tf, ".0f") if d_tf else "-", "-", _f(r.get("fwd_bwd_peak_mib"), ".0f"))
    return ["", "## Timings", ""] + t.lines


def _breakdown(res: dict, before) -> list[str]:
    bd = [(s, c, r) for s, e in res.get("time", {}).items() for c, r in e.get("ours", {}).items() if "bwd_dq_ms" in r]
    if not bd:
        return []
    t = Table([("seq x batch", False), ("block-top-k", False), ("select (2 dots)", True), ("select (1 dot)", False),
               ("select, top_k=2", False), ("fwd", False), ("bwd dq", True), ("bwd inverse index", True), ("bwd dk/dv", True),
               ("dk/dv, 256-token items", False), ("dk/dv, 64-token items", False), ("dk/dv, 2k-token ranges", False)],
              before is not None)
    for s, c, r in bd:
        path = ("time", s, "ours", c)
        t.row(s, c, _pair(r, before, path, "select_ms"), _f(r.get("select_single_dot_ms")), _f(r.get("select_topk2_ms")),
              _f(r["fwd_ms"]), _pair(r, before, path, "bwd_dq_ms"), _pair(r, before, path, "bwd_index_ms"),
              _pair(r, before, path, "bwd_dkdv_ms"), _f(r.get("bwd_dkdv_chunk256_ms")), _f(r.get("bwd_dkdv_chunk64_ms")),
              _f(r.get("bwd_dkdv_ranges2k_ms")))
    return ["", "### Breakdown of ours (ms)", ""] + t.lines


def _deterministic(res: dict, before) -> list[str]:
    lines = []
    det = [(s, c, r) for s, e in res.get("time", {}).items() for c, r in e.get("ours", {}).items() if "det_fwd_bwd_ms" in r]
    if det:
        t = Table([("seq x batch", False), ("block-top-k", False), ("fwd ms", False), ("det fwd ms", False), ("fwd+bwd ms", False),
                   ("det fwd+bwd ms", True), ("det / default", False), ("peak MiB default / det", False), ("same bits twice", False),
                   ("index default / stable ms", False), ("dk/dv default / det + reduce ms", False)], before is not None)
        for s, c, r in det:
            t.row(s, c, _f(r["fwd_ms"]), _f(r["det_fwd_ms"]), _f(r["fwd_bwd_ms"]), _pair(r, before, ("time", s, "ours", c), "det_fwd_bwd_ms"),
                  f"{r['det_fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f}x",
                  f"{_f(r.get('fwd_bwd_peak_mib'), '.0f')} / {_f(r.get('det_fwd_bwd_peak_mib'), '.0f')}", str(r["det_bitwise_repeat"]),
                  f"{_f(r.get('bwd_index_ms'))} / {_f(r.get('bwd_index_stable_ms'))}", f"{_f(r.get('bwd_dkdv_ms'))} / {_f(r.get('bwd_dkdv_det_ms'))}")
        lines += ["", "### Deterministic mode (`deterministic=True`, `ssa.deterministic`) vs the default path", ""] + t.lines
    det_checks = [(key, r) for key, r in res.get("check", {}).items() if "det_bitwise_repeat" in r]
    if det_checks:
        t = Table([(c, False) for c in ("config", "same bits twice", "o", "dq", "dk", "dv")], False)
        for key, r in det_checks:
            t.row(key, str(r["det_bitwise_repeat"]), *(_f(r[f"det_{n}_rel_err"], ".1e") for n in ("o", "dq", "dk", "dv")))
        lines += ["", "Deterministic mode, correctness (same inputs and oracle as above) and a bitwise repeat of fwd+bwd:", ""] + t.lines
    return lines


def _select(res: dict, before) -> list[str]:
    if not res.get("select"):
        return []
    lines = ["", "## select_blocks alone", ""]
    t = Table([("seq x batch", False), ("block", False), ("top-k", False), ("select ms", True), ("pooling ms", False),
               ("peak MiB", False), ("autotune picks (lse; select)", False)], before is not None)
    for seq_key, entry in res["select"].get("time", {}).items():
        for cfg_key, r in entry.items():
            bs, k = cfg_key.split("-")
            if "select_ms" not in r:
                t.note(seq_key, bs, k, _skip_msg(r, 80))
                continue
            t.row(seq_key, bs, k, _pair(r, before, ("select", "time", seq_key, cfg_key), "select_ms"), _f(r["pool_ms"]),
                  _f(r.get("select_peak_mib"), ".0f"), f"{r['lse_config']}; {r['select_config']}")
    lines += t.lines
    cands = [(sk, r) for sk, e in res["select"].get("time", {}).items() for c, r in e.items() if "select_candidates_ms" in r]
    if cands:
        lines += ["", "Block 16 / top-16: select_blocks with each autotune candidate of one kernel (the other autotuned), "
                  "with top_k = 2, and with a single-dot score (ms):", "", "| seq x batch | kernel | candidate | ms |", "|---|---|---|---|"]
        for sk, r in cands:
            for name in ("lse", "select"):
                lines += [f"| {sk} | {name} | {c} | {ms:.3f} |" for c, ms in r[f"{name}_candidates_ms"].items()]
            lines += [f"| {sk} | both | top_k = 2 | {_f(r.get('select_topk2_ms'))} |",
                      f"| {sk} | both | single dot (bf16 k_cmp) | {_f(r.get('select_single_dot_ms'))} |"]
    checks = res["select"].get("check", {})
    if checks:
        t = Table([(c, False) for c in ("config", "pass", "same top-k set", "max importance shortfall")], False)
        for key, r in checks.items():
            if "pass" not in r:
                t.note(key, _skip_msg(r, 80))
                continue
            t.row(key, str(r["pass"]), _f(r["same_set_frac"], ".5f"), _f(r["max_rel_importance_shortfall"], ".1e"))
        lines += ["", "Exact-set check (bf16 kernel vs float32 oracle, same inputs; outputs NaN-poisoned):", ""] + t.lines
    return lines


def _layer(res: dict, before) -> list[str]:
    if not res.get("layer"):
        return []
    t = Table([("block", False), ("top-k", False), ("SSA layer ms", True), ("dense SDPA ms", True), ("ratio", True),
               ("align triton / torch ms", False), ("peak MiB", False)], before is not None)
    for key, r in res["layer"].items():
        bs, k = key.split("-")
        if "ratio" not in r:
            t.note(bs, k, _skip_msg(r, 80))
            continue
        path = ("layer", key)
        t.row(bs, k, _pair(r, before, path, "ssa_layer_fwd_bwd_ms"), _pair(r, before, path, "dense_fwd_bwd_ms"),
              _pair(r, before, path, "ratio"), f"{_f(r['align_triton_fwd_bwd_ms'])} / {_f(r['align_torch_fwd_bwd_ms'])}",
              _f(r.get("ssa_layer_peak_mib"), ".0f"))
    return ["", "## One SSA training layer's attention at 8k (fwd+bwd)", ""] + t.lines


def prefill_target(res: dict) -> tuple[float | None, bool | None]:
    """(measured speedup, met?) of issue 10's prefill target; (None, None) where that row was not measured."""
    speedup = _get(res, "prefill", PREFILL_TARGET["seq_key"], "ours", PREFILL_TARGET["cfg"], "speedup")
    return speedup, (None if speedup is None else speedup >= PREFILL_TARGET["speedup"])


def _prefill(res: dict, before) -> list[str]:
    if not res.get("prefill"):
        return []
    t = Table([("seq x batch", False), ("block", False), ("top-k", False), ("select ms", False), ("sparse fwd ms", False),
               ("select + sparse fwd ms", True), ("dense SDPA fwd ms", True), ("speedup", True), ("speedup, sparse fwd alone", False),
               ("peak MiB ours / dense", False)], before is not None)
    for seq_key, entry in res["prefill"].items():
        dense = entry.get("dense", {})
        if "fwd_ms" not in dense:
            t.note(seq_key, "-", "-", "dense SDPA: " + _skip_msg(dense, 80))
        for cfg_key, r in entry.get("ours", {}).items():
            bs, k = cfg_key.split("-")
            if "prefill_ms" not in r:
                t.note(seq_key, bs, k, _skip_msg(r, 80))
                continue
            path = ("prefill", seq_key, "ours", cfg_key)
            dense_now = (f"{_f(dense.get('fwd_ms'))} ({dense.get('best', '-')})", _f(_get(before, "prefill", seq_key, "dense", "fwd_ms")))
            t.row(seq_key, bs, k, _f(r["select_ms"]), _f(r["sparse_fwd_ms"]), _pair(r, before, path, "prefill_ms"), dense_now,
                  _pair(r, before, path, "speedup", ".1f"), _f(r.get("sparse_only_speedup"), ".1f"),
                  f"{_f(r.get('prefill_peak_mib'), '.0f')} / {_f(dense.get('fwd_peak_mib'), '.0f')}")
    speedup, met = prefill_target(res)
    verdict = ("not measured" if met is None else f"**{'met' if met else 'not met'}** ({speedup:.1f}x)")
    return ["", "## Sparse prefill (forward only, selection included) vs dense SDPA forward", "",
            "`torch.no_grad()`, `ssa_megatron.ops` with backend triton: `select_blocks` then `sparse_attention`, timed "
            "together ('select + sparse fwd') and apart; dense: `ops.full_attention` (causal SDPA) on the same "
            "`[b, s, h, d]` tensors, every SDPA backend that takes the GQA problem, the fastest shown. "
            "speedup = dense fwd / (select + sparse fwd).", ""] + t.lines + [
            "", f"Target (issue 10): >= {PREFILL_TARGET['speedup']:.0f}x at {PREFILL_TARGET['seq_key']}, block / top-k "
            f"{PREFILL_TARGET['cfg'].replace('-', ' / ')}: {verdict}."]


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def same_run(res: dict, before: dict | None) -> bool:
    """True when ``before`` is this very run (e.g. the new JSON already copied over the committed one)."""
    return before is not None and _get(before, "env", "date") == _get(res, "env", "date") and \
        _get(before, "env", "device") == _get(res, "env", "device")


def write_report(results_path: str, md_path: str, before_path: str | None = None) -> str:
    """Render ``results_path`` (and ``before_path``, unless it is the same run) into ``md_path``."""
    res = load(results_path)
    before = load(before_path) if before_path else None
    if same_run(res, before):  # e.g. the new JSON already copied over the committed one
        print(f"--before {before_path} is the run of {results_path} itself: no before columns")
        before = None
    text = markdown(res, before, before_path or "")
    with open(md_path, "w") as f:
        f.write(text)
    return text
