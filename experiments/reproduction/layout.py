"""What the reproduction trains and where its files live (shared by prepare_data.py, run.py and report.py).

    DATA/tokenizer/ train_text_document.{bin,idx} heldout.jsonl manifest.json    (prepare_data.py)
    OUT/<run>/checkpoints/    ssa-pretrain --save/--load (+ exit_status.json: finished or stopped early)
    OUT/<run>/tensorboard/    the trainer's scalars (losses, per-layer alignment loss, gradient split)
    OUT/<run>/hf/             the final checkpoint as an HF export (ssa-convert to-hf), what ssa-eval loads
    OUT/<run>/eval/<kind>/    ssa-eval outputs: perplexity_{1,2,4}x, attention, sweep (+ niah)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOKENIZER, TRAIN_DATA, HELDOUT, MANIFEST = "tokenizer", "train_text_document", "heldout.jsonl", "manifest.json"
LENGTH_FACTORS = (1, 2, 4)  # perplexity windows: the training context, 2x and 4x beyond it


@dataclass(frozen=True)
class Run:
    name: str  # directory under OUT
    label: str  # the paper's column name
    training_mode: str  # ssa | full | sparse
    alpha: float | None = None  # None: the config's ssa.alpha
    main: bool = False  # one of the paper's three columns (these also get the budget sweep)

    def checkpoints(self, out: Path) -> Path:
        return out / self.name / "checkpoints"

    def tensorboard(self, out: Path) -> Path:
        return out / self.name / "tensorboard"

    def export_dir(self, out: Path) -> Path:
        return out / self.name / "hf"

    def eval_dir(self, out: Path, kind: str) -> Path:
        return out / self.name / "eval" / kind


def all_runs(alphas: list[float]) -> list[Run]:
    """The paper's three models, then the alpha sweep's SSA runs (the config's alpha is the main SSA run)."""
    return [
        Run("ssa", "SSA", "ssa", main=True),
        Run("full", "FullAttn", "full", main=True),
        Run("sparse", "MoBA", "sparse", main=True),
        *(Run(f"ssa_alpha{a:g}", f"SSA alpha={a:g}", "ssa", alpha=a) for a in alphas),
    ]


def select(runs: list[Run], names: list[str] | None) -> list[Run]:
    """The runs named (all when None), in the canonical order; unknown names are an error."""
    if names is None:
        return runs
    known = {r.name for r in runs}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--runs {' '.join(unknown)}: unknown; the runs are {', '.join(sorted(known))} "
                         "(alpha-sweep runs follow --alphas)")
    return [r for r in runs if r.name in names]
