"""lm-evaluation-harness on an SSA model in both attention modes, the paper's tasks and shots, one command.

    pip install -e ".[eval]"
    ssa-eval lm-eval --model runs/ssa/hf --settings full sparse --out runs/ssa/eval/lm_eval
    # the tasks come from the Hugging Face hub on first use (set HF_HOME on a cluster with a shared cache);
    # a machine without a network needs them cached: HF_DATASETS_OFFLINE=1 then reads the cache

The paper's suite (``PAPER_TASKS``): PIQA 3-shot, HellaSwag 10-shot, ARC-Easy 25-shot, ARC-Challenge
5-shot (normalised accuracy, ``acc_norm``), WikiText (word perplexity, 0-shot). ``--tasks name:shots``
replaces it, ``--include-path`` adds local task YAMLs (the tests run a local task that way).

The model goes through the harness's own HF wrapper (``lm_eval.models.huggingface.HFLM``): an HF export
is loaded by it (``trust_remote_code``, with ``attention_mode``/``block_size``/``top_k`` passed to
``from_pretrained``); a Megatron checkpoint is converted in memory and handed to it as a model object.
Writes ``lm_eval_<setting>.json`` (lm-eval's result dicts, one per setting, tasks merged) and
``lm_eval.md`` (one row per task, one column per setting, plus the average of the accuracy tasks).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ssa_megatron.eval.models import DTYPES, Setting

logger = logging.getLogger("ssa_megatron.eval")

# (task, shots, metric) as in the paper's Table 2
PAPER_TASKS = [("piqa", 3), ("hellaswag", 10), ("arc_easy", 25), ("arc_challenge", 5), ("wikitext", 0)]
PREFERRED_METRICS = ("acc_norm", "acc", "word_perplexity", "perplexity", "exact_match")


def parse_tasks(texts: list[str]) -> list[tuple[str, int]]:
    out = []
    for t in texts:
        name, _, shots = t.partition(":")
        if not name or (shots and not shots.isdigit()):
            raise ValueError(f"--tasks {t!r}: expected NAME or NAME:SHOTS (e.g. piqa:3)")
        out.append((name, int(shots or 0)))
    return out


def _harness_model(setting: Setting, *, model_dir=None, model_obj=None, tokenizer=None, device="cpu", dtype="fp32", batch_size=1):
    from lm_eval.models.huggingface import HFLM

    if model_obj is not None:
        model_obj.config.attention_mode = setting.mode
        if setting.mode == "sparse":
            model_obj.config.block_size, model_obj.config.top_k = setting.block_size, setting.top_k
        return HFLM(pretrained=model_obj, tokenizer=tokenizer, batch_size=batch_size)
    kwargs = setting.forward_kwargs()
    return HFLM(pretrained=str(model_dir), trust_remote_code=True, device=device, dtype=DTYPES[dtype],
                batch_size=batch_size, **kwargs)


def run_lm_eval(
    settings: list[Setting],
    tasks: list[tuple[str, int]],
    out_dir: str | Path,
    *,
    model_dir: str | Path | None = None,
    model_obj=None,
    tokenizer=None,
    name: str = "model",
    include_path: str | None = None,
    limit: int | float | None = None,
    device: str = "cpu",
    dtype: str = "fp32",
    batch_size: int = 1,
) -> dict:
    """Evaluate every setting on every task (each at its own shots). Returns ``{setting label: results}``."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    if (model_dir is None) == (model_obj is None):
        raise ValueError("give exactly one of model_dir (an HF export) and model_obj (an in-memory model)")
    manager = TaskManager(include_path=include_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged: dict[str, dict] = {}
    for setting in settings:
        lm = _harness_model(setting, model_dir=model_dir, model_obj=model_obj, tokenizer=tokenizer, device=device,
                            dtype=dtype, batch_size=batch_size)
        total: dict = {"model": name, "setting": setting.as_dict(), "results": {}, "n-shot": {}, "configs": {},
                       "versions": {}, "higher_is_better": {}, "n-samples": {}}
        for task, shots in tasks:
            logger.info("lm-eval: %s %s, %d-shot", setting.label, task, shots)
            res = simple_evaluate(model=lm, tasks=[task], num_fewshot=shots, task_manager=manager, limit=limit,
                                  log_samples=False, bootstrap_iters=0)
            for key in ("results", "n-shot", "configs", "versions", "higher_is_better", "n-samples"):
                total[key].update(res.get(key, {}))
        path = out / f"lm_eval_{setting.label.replace('(', '_').replace(')', '').replace(',', '_').replace('=', '')}.json"
        path.write_text(json.dumps(total, indent=2, default=handle_non_serializable) + "\n")
        merged[setting.label] = total
    (out / "lm_eval.md").write_text(markdown(merged, tasks))
    return merged


def _metric(task_results: dict) -> tuple[str, float] | None:
    for m in PREFERRED_METRICS:
        if f"{m},none" in task_results:
            return m, float(task_results[f"{m},none"])
    return None


def markdown(merged: dict, tasks: list[tuple[str, int]]) -> str:
    labels = list(merged)
    lines = ["| task | shots | metric | " + " | ".join(labels) + " |", "|---|---|---|" + "---|" * len(labels)]
    acc: dict[str, list[float]] = {label: [] for label in labels}
    for task, shots in tasks:
        first = merged[labels[0]]["results"].get(task, {})
        found = _metric(first)
        if found is None:
            continue
        metric = found[0]
        cells = []
        for label in labels:
            value = merged[label]["results"].get(task, {}).get(f"{metric},none")
            cells.append("-" if value is None else (f"{100 * value:.2f}" if metric.startswith("acc") else f"{value:.3f}"))
            if value is not None and metric.startswith("acc"):
                acc[label].append(100 * value)
        lines.append(f"| {task} | {shots} | {metric} | " + " | ".join(cells) + " |")
    if any(acc.values()):
        cells = [f"{sum(v) / len(v):.2f}" if v else "-" for v in acc.values()]
        lines.append("| average (accuracy tasks) | | | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
