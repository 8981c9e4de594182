"""docs/reproduction.md from the runs' outputs: the setup, the paper's table with ours beside it, each of the
paper's orderings with whether it reproduced, the alpha sweep, the training curves and the budget sweep.

Reads what the other phases left (layout.py): the trainer's TensorBoard scalars and ``exit_status.json``,
the ``ssa-eval`` JSONs, and prepare_data.py's ``manifest.json``. Figures (PNG) go to ``--figures``; the
budget sweep is drawn by ``ssa_megatron.eval.sweep.plot`` from the three models' sweeps. Missing runs or
evaluations show as ``-`` and are listed, so the document can be written after every device call.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from layout import LENGTH_FACTORS, MANIFEST, REPO, Run

from ssa_megatron.config import load_config
from ssa_megatron.eval import sweep
from ssa_megatron.launch.status import read_exit_status

# The paper's 1B models (100B tokens at 8k; ../shared/SSA_SPEC.md): AttnSparsity at receptive field 256,
# and WikiText perplexity (full inference; sparse inference at 256 tokens).
PAPER_SPARSITY = {"full": {"SSA": 0.705, "FullAttn": 0.641, "MoBA": 0.527},
                  "sparse": {"SSA": 0.677, "FullAttn": 0.610, "MoBA": 0.546}}
PAPER_PERPLEXITY = {"full": {"SSA": 15.28, "FullAttn": 15.13, "MoBA": 16.68},
                    "sparse": {"SSA": 15.96, "FullAttn": 17.05, "MoBA": 16.54}}
MODES = ("full", "sparse")
LABELS = ("SSA", "FullAttn", "MoBA")


def fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def scalars(tb_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar the trainer logged, ``{tag: {step: value}}`` (the last write of a step wins: resumes)."""
    if not tb_dir.is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.ERROR)  # "No path found after ...": the end of a file
    events = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def load_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


class RunResults:
    """One run's training record and evaluations, with the numbers the tables need."""

    def __init__(self, run: Run, out: Path, budget_label: str):
        self.run = run
        self.status = read_exit_status(run.checkpoints(out))
        self.scalars = scalars(run.tensorboard(out))
        self.perplexity = {f: load_json(run.eval_dir(out, f"perplexity_{f}x") / "perplexity.json") for f in LENGTH_FACTORS}
        self.attention = load_json(run.eval_dir(out, "attention") / "attention.json")
        self.sweep = load_json(run.eval_dir(out, "sweep") / "sweep.json")
        self.niah_png = run.eval_dir(out, "niah") / "niah.png"
        self.budget = budget_label  # the training budget's setting label, e.g. sparse(bs=16,k=16)

    @property
    def steps(self) -> int | None:
        return self.status["iteration"] if self.status else None

    def ppl(self, mode: str, factor: int = 1) -> float | None:
        result = self.perplexity[factor]
        label = "full" if mode == "full" else self.budget
        return next((r["token_perplexity"] for r in result["results"] if r["label"] == label), None) if result else None

    def attention_mean(self, inference: str) -> dict | None:
        """Mean statistics of the full-inference or (at the training budget) sparse-inference forward."""
        if not self.attention:
            return None
        name = "full" if inference == "full" else self.budget
        return next((r["mean"] for r in self.attention["runs"] if r["inference"] == name), None)

    def sparsity(self, inference: str) -> float | None:
        mean = self.attention_mean(inference)
        return mean["budgets"][self.budget]["attn_sparsity"] if mean else None

    def entropy(self, inference: str) -> float | None:
        mean = self.attention_mean(inference)
        return mean["entropy"] if mean else None

    def series(self, tag: str) -> list[tuple[int, float]]:
        return sorted(self.scalars.get(tag, {}).items())

    def last(self, tag: str, points: int = 5) -> float | None:
        values = [v for _, v in self.series(tag)[-points:]]
        return sum(values) / len(values) if values else None


# ---- verdicts on the paper's orderings ---------------------------------------------------------------------


def ordered(values: dict[str, float | None]) -> tuple[str, str]:
    """(verdict, evidence) for 'SSA > FullAttn > MoBA'."""
    if any(values[k] is None for k in LABELS):
        return "not measured", "-"
    evidence = " > ".join(f"{k} {values[k]:.4f}" for k in sorted(LABELS, key=lambda k: -values[k]))
    return ("yes" if values["SSA"] > values["FullAttn"] > values["MoBA"] else "no"), evidence


def orderings(main: dict[str, RunResults]) -> list[tuple[str, str, str]]:
    rows = []
    for inference in MODES:
        verdict, evidence = ordered({k: r.sparsity(inference) for k, r in main.items()})
        rows.append((f"AttnSparsity, {inference} inference: SSA > FullAttn > MoBA", evidence, verdict))
    gaps = {k: (r.ppl("sparse") / r.ppl("full") - 1) if r.ppl("full") and r.ppl("sparse") else None for k, r in main.items()}
    if any(g is None for g in gaps.values()):
        rows.append(("SSA's sparse-inference perplexity is the closest to its full-inference one", "-", "not measured"))
    else:
        closest = min(gaps, key=lambda k: abs(gaps[k]))
        rows.append(("SSA's sparse-inference perplexity is the closest to its full-inference one",
                     ", ".join(f"{k} {100 * g:+.2f}%" for k, g in gaps.items()), "yes" if closest == "SSA" else "no"))
    points = main["SSA"].sweep["models"][0]["points"] if main["SSA"].sweep else None
    if points:
        points = sorted(points, key=lambda p: p["receptive_field"])
        ppl = [p["token_perplexity"] for p in points]
        rows.append((f"SSA: perplexity improves monotonically with the budget ({points[0]['receptive_field']} -> "
                     f"{points[-1]['receptive_field']} tokens)",
                     " -> ".join(f"{x:.3f}" for x in ppl), "yes" if all(b <= a for a, b in zip(ppl, ppl[1:])) else "no"))
    else:
        rows.append(("SSA: perplexity improves monotonically with the budget", "-", "not measured"))
    for factor in LENGTH_FACTORS[1:]:
        for mode in MODES:
            values = {k: r.ppl(mode, factor) for k, r in main.items()}
            if any(v is None for v in values.values()):
                rows.append((f"Length extrapolation {factor}x, {mode} inference: SSA has the lowest perplexity", "-", "not measured"))
                continue
            best = min(values, key=values.get)
            rows.append((f"Length extrapolation {factor}x, {mode} inference: SSA has the lowest perplexity",
                         ", ".join(f"{k} {v:.2f}" for k, v in values.items()), "yes" if best == "SSA" else "no"))
    return rows


# ---- figures --------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(results: list[RunResults], tokens_per_step: int, path: Path) -> Path:
    plt = _pyplot()
    fig, (train_ax, valid_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in results:
        points = r.series("train/lm loss")
        if points:
            train_ax.plot([s * tokens_per_step / 1e6 for s, _ in points], [v for _, v in points], label=r.run.label, lw=1)
        for mode, style in (("full", "o-"), ("sparse", "s--")):
            points = r.series(f"valid/lm loss ({mode} attention)")
            if points:
                valid_ax.plot([s * tokens_per_step / 1e6 for s, _ in points], [v for _, v in points], style,
                              label=f"{r.run.label} ({mode})", ms=3, lw=1)
    train_ax.set_title("training LM loss", fontsize=10)
    valid_ax.set_title("validation LM loss by attention mode", fontsize=10)
    for ax in (train_ax, valid_ax):
        ax.set_xlabel("tokens (M)")
        ax.grid(alpha=0.3)
    return _save(fig, plt, path)


def plot_alignment(results: list[RunResults], path: Path) -> Path:
    """The alignment term's share of the gradient norm and its unweighted gradient norm over training, and the
    main SSA run's per-layer alignment losses."""
    plt = _pyplot()
    fig, (share_ax, norm_ax, layer_ax) = plt.subplots(1, 3, figsize=(13, 3.6))
    ssa_runs = [r for r in results if r.run.training_mode == "ssa"]
    for r in ssa_runs:
        for ax, tag in ((share_ax, "alignment/share of grad norm"), (norm_ax, "alignment/grad norm (alignment loss, unweighted)")):
            points = r.series(tag)
            if points:
                ax.plot([s for s, _ in points], [v for _, v in points], "o-", ms=2, lw=1, label=r.run.label)
        points = r.series("alignment/grad norm (lm loss)")
        if points and r.run.main:
            norm_ax.plot([s for s, _ in points], [v for _, v in points], "k:", lw=1, label="LM loss (SSA)")
    main = next((r for r in ssa_runs if r.run.main), None)
    layers = sorted(t for t in (main.scalars if main else {}) if t.startswith("alignment/layer_"))
    for tag in layers:
        points = main.series(tag)
        layer_ax.plot([s for s, _ in points], [v for _, v in points], lw=1, label=tag.rsplit("_", 1)[1])
    share_ax.set_title("alignment term's share of the gradient norm", fontsize=10)
    norm_ax.set_title("gradient norms (alignment: unweighted)", fontsize=10)
    norm_ax.set_yscale("log")
    layer_ax.set_title("per-layer alignment loss (SSA)", fontsize=10)
    layer_ax.set_yscale("log")
    for ax in (share_ax, norm_ax, layer_ax):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return _save(fig, plt, path)


def plot_alpha_sweep(points: list[tuple[float, RunResults]], path: Path) -> Path:
    plt = _pyplot()
    fig, (sp_ax, gap_ax) = plt.subplots(1, 2, figsize=(9, 3.6))
    alphas = [a for a, _ in points]
    for inference, style in (("full", "o-"), ("sparse", "s--")):
        sp_ax.plot(alphas, [r.sparsity(inference) for _, r in points], style, label=f"{inference} inference")
    gaps = [(r.ppl("sparse") / r.ppl("full") - 1) * 100 if r.ppl("full") and r.ppl("sparse") else None for _, r in points]
    gap_ax.plot(alphas, gaps, "o-")
    sp_ax.set_ylabel("AttnSparsity at the training budget")
    gap_ax.set_ylabel("sparse vs full perplexity (%)")
    for ax in (sp_ax, gap_ax):
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel("alpha")
        ax.grid(alpha=0.3)
    return _save(fig, plt, path)


def _save(fig, plt, path: Path) -> Path:
    for ax in fig.axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=2 if len(ax.get_legend_handles_labels()[0]) > 5 else 1)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ---- the document -----------------------------------------------------------------------------------------


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows), ""]


@dataclass
class Document:
    """What every section reads: the arguments, the config and data manifest, and each run's results."""

    args: object
    cfg: object
    manifest: dict
    results: list[RunResults]

    @property
    def main(self) -> dict[str, RunResults]:
        return {r.run.label: r for r in self.results if r.run.main}

    @property
    def rf(self) -> int:
        return self.cfg.ssa.block_size * self.cfg.ssa.top_k

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.global_batch_size * self.cfg.model.seq_length

    def alpha(self, run: Run) -> float:
        return self.cfg.ssa.alpha if run.alpha is None else run.alpha

    def link(self, path: Path) -> str:
        return os.path.relpath(path, self.args.doc.parent)

    def figure(self, name: str) -> Path:
        return self.args.figures / f"{name}.png"


def setup(d: Document, params: int) -> list[str]:
    m, s, t, data = d.cfg.model, d.cfg.ssa, d.cfg.train, d.manifest
    iters = max((r.status["train_iters"] for r in d.results if r.status), default=t.train_iters)
    tokens = iters * d.tokens_per_step
    lines = [
        "## Setup", "",
        f"- **Data**: {data['train']['documents']} public-domain English novels, {data['train']['tokens']:,} tokens "
        f"({data['train']['characters']:,} characters), from [{data['source']}]({data['source']}) (commit "
        f"`{data['source_commit'] or 'not recorded'}`); licence: {data['licence']}. Held out for evaluation: "
        f"{data['heldout']['documents']} other novels ({', '.join(data['heldout']['novels'])}), one excerpt each, "
        f"{data['heldout']['tokens']:,} tokens. Prepared by `experiments/reproduction/prepare_data.py`.",
        f"- **Tokenizer**: {data['tokenizer']['kind']}, {data['tokenizer']['vocab_size']:,} tokens, trained on the "
        "training novels only.",
        f"- **Model**: {m.num_layers} layers, hidden {m.hidden_size}, FFN {m.ffn_hidden_size} (SwiGLU), "
        f"{m.num_attention_heads} query heads / {m.num_query_groups} KV head(s), head dim {m.head_dim}, head-wise output "
        f"gate, RoPE base {m.rotary_base}; {params / 1e6:.1f}M parameters. Context {m.seq_length}; block {s.block_size}, "
        f"top-k {s.top_k}: receptive field {d.rf} tokens = 1/{m.seq_length // d.rf} of the context.",
        f"- **Training** (`{os.path.relpath(d.args.config, REPO)}`): {iters} steps of {t.global_batch_size} x {m.seq_length} "
        f"tokens = {tokens / 1e6:.1f}M tokens ({tokens / params:.2f} tokens per parameter, "
        f"{tokens / data['train']['tokens']:.1f} epochs), AdamW, peak LR {t.lr:g} ({t.lr_warmup_fraction:.0%} warmup, "
        f"{t.lr_decay_style} to {t.min_lr:g}), {t.dtype}, seed {t.seed}. The paper: 1B parameters, 100B tokens at 8k.", "",
    ]
    rows = []
    for r in d.results:
        speed = [v for _, v in r.series("train/tokens per second per GPU")]
        rows.append([r.run.label, r.run.training_mode, fmt(d.alpha(r.run), "g") if r.run.training_mode == "ssa" else "-",
                     f"{r.steps}/{r.status['train_iters']}" if r.status else "not trained",
                     fmt(statistics.median(speed) if speed else None, ",.0f"), fmt(r.last("train/lm loss")),
                     fmt(r.last("valid/lm loss (full attention)", 1)), fmt(r.last("valid/lm loss (sparse attention)", 1))])
    return lines + table(["run", "training mode", "alpha", "steps", "tokens/s (median)", "LM loss (end)", "valid full",
                          "valid sparse"], rows)


def paper_tables(d: Document) -> list[str]:
    main, seq = d.main, d.cfg.model.seq_length
    ours = lambda value: [fmt(value(main[k])) if k in main else "-" for k in LABELS]  # noqa: E731
    sequences = next((r.attention["sequences"] for r in d.results if r.attention), "-")
    lines = ["## The paper's table, ours beside it", "",
             f"AttnSparsity (the share of each query's full-attention mass inside the blocks the selection picks, at "
             f"receptive field {d.rf}) on the held-out novels, {sequences} sequences of {seq} tokens; the paper's at "
             "receptive field 256 of 8k on its own data. Only the orderings are comparable.", ""]
    header = ["inference", *(f"{k} ours" for k in LABELS), *(f"{k} paper" for k in LABELS)]
    lines += table(header, [[mode, *ours(lambda r: r.sparsity(mode)), *(f"{PAPER_SPARSITY[mode][k]:.3f}" for k in LABELS)]
                            for mode in MODES])
    lines += [f"Token perplexity of the held-out excerpts (windows of {seq}, stride {seq // 4}; sparse at receptive "
              f"field {d.rf}) and the paper's WikiText perplexity (1B, sparse at 256):", ""]
    lines += table(header, [[mode, *ours(lambda r: r.ppl(mode)), *(f"{PAPER_PERPLEXITY[mode][k]:.2f}" for k in LABELS)]
                            for mode in MODES])
    lines += ["Attention entropy (nats, full-attention rows, mean over layers and heads) in each forward:", ""]
    return lines + table(["inference", *LABELS], [[mode, *ours(lambda r: r.entropy(mode))] for mode in MODES])


def orderings_section(d: Document) -> list[str]:
    rows = [list(row) for row in orderings(d.main)] if len(d.main) == len(LABELS) else \
        [["(the three models are not all in this report)", "-", "not measured"]]
    return ["## The paper's orderings", "", *table(["the paper's claim", "ours", "reproduced"], rows)]


def extrapolation(d: Document) -> list[str]:
    seq = d.cfg.model.seq_length
    return ["## Perplexity beyond the training length", "",
            f"Windows of 1x, 2x and 4x the training context ({', '.join(str(f * seq) for f in LENGTH_FACTORS)} tokens, "
            "stride a quarter window); RoPE as trained, no scaling.", "",
            *table(["model", *(f"{f}x {mode}" for f in LENGTH_FACTORS for mode in MODES)],
                   [[r.run.label, *(fmt(r.ppl(mode, f)) for f in LENGTH_FACTORS for mode in MODES)] for r in d.main.values()])]


def budget_sweep(d: Document) -> list[str]:
    sweeps = [r.sweep for r in d.main.values() if r.sweep]
    if not sweeps:
        return []
    merged = {**sweeps[0], "models": [x["models"][0] for x in sweeps]}  # one line per model, ssa-eval's own plot
    return ["## Budget sweep", "", f"![budget sweep]({d.link(sweep.plot(merged, d.figure('budget_sweep')))})", "",
            sweep.markdown(merged)]


def alpha_sweep(d: Document) -> list[str]:
    points = sorted(((d.alpha(r.run), r) for r in d.results if r.run.training_mode == "ssa"), key=lambda p: p[0])
    rows = [[f"{a:g}", fmt(r.last("train/lm loss")), fmt(r.last("train/alignment loss"), ".3e"),
             fmt(r.last("alignment/share of grad norm", 1), ".4f"), fmt(r.sparsity("full")), fmt(r.sparsity("sparse")),
             fmt(r.ppl("full")), fmt(r.ppl("sparse"))] for a, r in points]
    return ["## Alpha sweep", "",
            f"SSA at alpha {', '.join(f'{a:g}' for a, _ in points)} (alpha {d.cfg.ssa.alpha:g} is the main SSA run). The "
            "share is the alignment term's part of the gradient norm, `alpha |g_align| / (alpha |g_align| + |g_LM|)`, "
            f"measured every {d.cfg.train.alignment_grad_interval} steps by an extra backward of the alignment loss alone "
            "(`train.alignment_grad_interval`); the value at the end of training.", "",
            *table(["alpha", "LM loss (end)", "alignment loss (end)", "grad share (end)", "AttnSparsity full",
                    "AttnSparsity sparse", "ppl full", "ppl sparse"], rows),
            f"![alpha sweep]({d.link(plot_alpha_sweep(points, d.figure('alpha_sweep')))})", ""]


def curves(d: Document) -> list[str]:
    lines = ["## Training curves", "",
             f"![loss curves]({d.link(plot_losses(d.results, d.tokens_per_step, d.figure('loss_curves')))})", "",
             f"![alignment gradient and per-layer loss]({d.link(plot_alignment(d.results, d.figure('alignment')))})", ""]
    niah = [r for r in d.main.values() if r.niah_png.is_file()]
    if niah:
        lines += ["## Needle in a haystack", "", *(f"![{r.run.label} NIAH]({d.link(r.niah_png)})" for r in niah), ""]
    return lines


def reading(d: Document, params: int) -> list[str]:
    """Facts for the reading: tokens per parameter, whether the losses still fell; then the --notes, if any."""
    trained = max((r.steps or 0) for r in d.results) * d.tokens_per_step
    lines = ["## Reading", "", f"- Trained: {trained / 1e6:.1f}M tokens per run, {trained / params:.2f} tokens per "
             "parameter (the paper: 100B tokens for 1B parameters, 100 per parameter)."]
    for r in d.results:
        points = r.series("train/lm loss")
        if len(points) >= 8:
            quarter = [v for step, v in points if step >= 0.75 * points[-1][0]]
            lines.append(f"- {r.run.label}: LM loss {quarter[0]:.3f} -> {quarter[-1]:.3f} over the last quarter of training.")
    missing = [r.run.name for r in d.results if not (r.status and r.steps == r.status["train_iters"] and r.attention)]
    if missing:
        lines.append(f"- Not (fully) trained or evaluated yet: {', '.join(missing)}.")
    lines.append("")
    return lines + ([d.args.notes.read_text().rstrip(), ""] if d.args.notes else [])


def rerun(d: Document) -> list[str]:
    return ["## How to rerun", "", "```bash",
            "python experiments/reproduction/prepare_data.py --source <100_english_novels>/corpus --out .cache/reproduction",
            f"python experiments/reproduction/run.py all --config {os.path.relpath(d.args.config, REPO)}"
            "   # train, evaluate, report; resumable",
            "```", "",
            "A larger model or longer training is a config change (`configs/`); experiments/reproduction/README.md has "
            "the commands of the GPU runs.", ""]


def report_command(args) -> str:
    """The command that rebuilds this document from the same inputs (paths relative to the repo)."""
    rel = lambda path: os.path.relpath(path, REPO)
    notes = f" --notes {rel(args.notes)}" if args.notes else ""
    return f"python experiments/reproduction/run.py report --data-dir {rel(args.data_dir)} --out {rel(args.out)}{notes}"


def write(args, runs: list[Run]) -> Path:
    """Write ``args.doc`` and its figures from whatever the runs have produced so far."""
    from ssa_megatron.train.preflight import count_parameters

    cfg = load_config(args.config)
    manifest = json.loads((args.data_dir / MANIFEST).read_text())
    budget = f"sparse(bs={cfg.ssa.block_size},k={cfg.ssa.top_k})"
    d = Document(args, cfg, manifest, [RunResults(run, args.out, budget) for run in runs])
    params = count_parameters(cfg, manifest["tokenizer"]["vocab_size"])
    doc = ["# Reproducing the paper's orderings at small scale (issue 15)", "",
           f"Written by `{report_command(args)}` on {date.today()}. SSA, FullAttn and MoBA are the same model and recipe trained with "
           "`ssa.training_mode` = `ssa`, `full` and `sparse` (same seed, same data order); every number below comes from "
           "the repo's own tools: `ssa-pretrain`, then `ssa-convert to-hf` and the `ssa-eval` subcommands on each run's "
           "final checkpoint.", "",
           *setup(d, params), *paper_tables(d), *orderings_section(d), *extrapolation(d), *budget_sweep(d),
           *alpha_sweep(d), *curves(d), *reading(d, params), *rerun(d)]
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text("\n".join(doc))
    return args.doc
