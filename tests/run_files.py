"""Run files for the error tests: configs/tiny_cpu.yaml with some keys replaced."""

from __future__ import annotations

from pathlib import Path

TINY = (Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml").read_text()


def with_values(**sections: str) -> str:
    """tiny_cpu.yaml with the keys of each section replaced or added: with_values(ssa="  top_k: 99")."""
    lines = TINY.splitlines()
    for section, extra in sections.items():
        if f"{section}:" not in lines:
            lines += [f"{section}:", *extra.splitlines()]
            continue
        at = lines.index(f"{section}:")
        keys = {line.split(":")[0].strip() for line in extra.splitlines()}
        end = at + 1
        while end < len(lines) and (lines[end].startswith(" ") or not lines[end].strip()):
            end += 1
        kept = [line for line in lines[at + 1:end] if line.split(":")[0].strip() not in keys]
        lines[at + 1:end] = kept + extra.splitlines()
    return "\n".join(lines) + "\n"
