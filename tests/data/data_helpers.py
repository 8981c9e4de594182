"""Helpers shared by the data tests (a uniquely named module: conftest is not importable)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import sysconfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SNIPPETS = ["naïve café — ünïcödé", "日本語のテキスト", "emoji 🚀🔥 and tabs\tend", "  leading spaces",
            "trailing newline\n", "line1\r\nline2", 'quotes "x" and \\ backslash', "ß∑∆ maths √2 ≈ 1.41"]


def make_documents(n: int, seed: int = 0) -> list[str]:
    """``n`` non-empty documents: stdlib code chunks mixed with unicode and whitespace oddities."""
    root = sysconfig.get_paths()["stdlib"]
    sources = []
    for name in ("textwrap.py", "shlex.py", "fnmatch.py", "bisect.py", "heapq.py"):
        with open(os.path.join(root, name), encoding="utf-8") as f:
            sources.append(f.read())
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        src = rng.choice(sources)
        start = rng.randrange(len(src) - 400)
        docs.append(src[start:start + rng.randrange(20, 400)] + rng.choice(SNIPPETS))
    return docs


def write_jsonl(path, docs, key="text", extra_lines=()) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({key: doc, "id": i}, ensure_ascii=i % 2 == 0) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return str(path)


def run_tool(tool: str, *args, check=True, env=None) -> subprocess.CompletedProcess:
    """Run ``python tools/<tool>.py args`` from the repo root, as users do."""
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", f"{tool}.py"), *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{tool} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc
