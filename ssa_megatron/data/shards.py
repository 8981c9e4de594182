"""The shard directory of a preprocessing run: its layout, plan, completion tests and merge.

For ``--output-prefix out/corpus`` and ``--json-keys text``::

    out/corpus.shards/plan.json             inputs (identity) cut into shards + the settings (restart check)
    out/corpus.shards/text-00007.{bin,idx}  shard 7, written by one worker
    out/corpus.shards/00007.done.json       shard 7's counters, written after its files: "finished"
    out/corpus.shards/merged.json           written after a complete merge
    out/corpus_text_document.{bin,idx}      the merged result (Megatron-LM's naming)

Every file here is written under a temporary name and renamed, so what exists is complete.
"""

from __future__ import annotations

import json
import logging
import os

from ssa_megatron.data.indexed_format import read_header
from ssa_megatron.data.indexed_writer import remove_pair
from ssa_megatron.data.inputs import Shard
from ssa_megatron.data.merge import merge_datasets

log = logging.getLogger(__name__)
PLAN_VERSION = 2  # 2: the inputs' identity (size, mtime, content fingerprint) is part of the plan


def output_prefix_for(output_prefix: str, key: str) -> str:
    """Megatron-LM's name for a preprocessed key: ``<prefix>_<key>_document``."""
    return f"{output_prefix}_{key}_document"


def shard_prefix(shards_dir: str, key: str, index: int) -> str:
    return os.path.join(shards_dir, f"{key}-{index:05d}")


def done_marker(shards_dir: str, index: int) -> str:
    return os.path.join(shards_dir, f"{index:05d}.done.json")


def plan_path(shards_dir: str) -> str:
    return os.path.join(shards_dir, "plan.json")


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def shard_is_done(shards_dir: str, keys: tuple[str, ...], index: int) -> bool:
    """Finished = marker written (last) and every key's pair passes the header/size check."""
    if not os.path.isfile(done_marker(shards_dir, index)):
        return False
    try:
        for key in keys:
            read_header(shard_prefix(shards_dir, key, index))
    except (OSError, ValueError) as e:
        log.warning("shard %d will be redone: %s", index, e)
        return False
    return True


def read_plan(shards_dir: str) -> dict | None:
    if not os.path.isfile(plan_path(shards_dir)):
        return None
    with open(plan_path(shards_dir)) as f:
        return json.load(f)


def _input_changes(old: list[dict], new: list[dict]) -> str:
    """What changed between two lists of ``inputs.input_identity`` records, or "" if nothing."""
    before, after = {i["path"]: i for i in old}, {i["path"]: i for i in new}
    changes = [f"input {p} added" for p in after if p not in before]
    changes += [f"input {p} removed" for p in before if p not in after]
    for path in after.keys() & before.keys():
        a, b = before[path], after[path]
        reasons = ([f"size {a['size']} -> {b['size']} bytes"] if a["size"] != b["size"] else []) + \
                  (["modification time"] if a["mtime_ns"] != b["mtime_ns"] else []) + \
                  (["content"] if a["sha256"] != b["sha256"] else [])
        if reasons:
            changes.append(f"input {path} changed since that run ({', '.join(reasons)})")
    return "; ".join(sorted(changes))


def save_plan(shards_dir: str, settings: dict, shards: list[Shard], inputs: list[dict] | None = None) -> None:
    """Persist the plan; on restart refuse to mix shards of different inputs or settings.

    ``inputs`` (``inputs.input_identity`` per file) makes an edited input a refusal, even after a
    finished merge: the outputs would otherwise be kept as "already done" but stale.
    """
    os.makedirs(shards_dir, exist_ok=True)
    plan = {"settings": {"version": PLAN_VERSION, **settings}, "inputs": inputs or [],
            "shards": [s.to_json() for s in shards]}
    old = read_plan(shards_dir)
    if old is None:
        write_json_atomic(plan_path(shards_dir), plan)
    elif old != plan:
        changed = [k for k in plan["settings"] if old.get("settings", {}).get(k) != plan["settings"][k]]
        what = f"{', '.join(changed)} changed" if changed else (
            _input_changes(old.get("inputs", []), plan["inputs"]) or "input files changed")
        raise ValueError(
            f"{shards_dir} holds shards of a different run ({what}); its outputs would be stale: delete that "
            "directory to start over, or use another --output-prefix")


def _merged_marker(shards_dir: str) -> str:
    return os.path.join(shards_dir, "merged.json")


def merged_outputs(shards_dir: str) -> list[str] | None:
    """The outputs of an earlier complete merge of this shard directory, if they still check out."""
    try:
        with open(_merged_marker(shards_dir)) as f:
            outputs = json.load(f)["outputs"]
        for out in outputs:
            read_header(out)
    except (OSError, ValueError, KeyError):
        return None
    return outputs


def merge_shards(shards_dir: str, *, keep_shards: bool = False, output_prefix: str | None = None) -> list[str]:
    """Merge a finished shard directory into ``<output_prefix>_<key>_document`` per key.

    ``output_prefix`` defaults to the shard directory's name without ``.shards``.
    """
    plan = read_plan(shards_dir)
    if plan is None:
        raise FileNotFoundError(f"{plan_path(shards_dir)} not found; pass the .shards directory written by "
                                "tools/preprocess_data.py")
    keys, indices = tuple(plan["settings"]["keys"]), [s["index"] for s in plan["shards"]]
    missing = [i for i in indices if not shard_is_done(shards_dir, keys, i)]
    if missing:
        raise ValueError(
            f"{shards_dir}: {len(missing)} of {len(indices)} shards are not finished (e.g. {missing[:5]}); "
            "re-run the preprocessing tasks that own them (shard i belongs to task i % task_count)")
    output_prefix = output_prefix or shards_dir.removesuffix(".shards")
    if os.path.exists(_merged_marker(shards_dir)):
        os.unlink(_merged_marker(shards_dir))
    outputs = []
    for key in keys:
        out = output_prefix_for(output_prefix, key)
        merge_datasets([shard_prefix(shards_dir, key, i) for i in indices], out)
        outputs.append(out)
    write_json_atomic(_merged_marker(shards_dir), {"outputs": outputs})
    if not keep_shards:
        for i in indices:
            for key in keys:
                remove_pair(shard_prefix(shards_dir, key, i))
    return outputs
