"""Where a training step's time goes: device time per model part, from marks recorded by module hooks.

A mark is a CUDA event on the current stream (a clock read on CPU, where ops are synchronous).
Forward: a mark before and after each part's forward. Backward: a mark when the gradient reaches
the part's outputs and one when it leaves its inputs (PyTorch's full backward hooks), so the
autograd work between them (the part's backward) is timed on the same stream. The output layer +
loss is the span between the decoder's end and the model's end (forward), and between the
gradient reaching the model's output and the decoder's output (backward). Parts nest (attention
holds core attention): the report subtracts the inner part. Recomputed forwards count as forward.

Benchmarks only: hooks cost a little host time per module, not device time.
"""

from __future__ import annotations

import collections
import contextlib
import time
from typing import Iterator

import torch

# part -> the suffix of the module names it times (self_attention's span includes core_attention's)
PARTS = {
    "core attention": (".core_attention",),
    "attention projections + RoPE + gate": (".self_attention",),
    "MLP": (".mlp",),
    "norms": ("input_layernorm", "pre_mlp_layernorm", "final_layernorm"),
}
OUTPUT_PART = "output layer + loss"  # the decoder's end to the model's end: no module of its own
INNER = {"attention projections + RoPE + gate": "core attention"}  # outer part -> part inside it


class _Clock:
    """Device-ordered time marks: CUDA events on a GPU, ``perf_counter`` reads on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed_ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3


class StepProfile:
    """Accumulates forward and backward device time per part over the steps run inside ``recording()``."""

    def __init__(self, model_chunks: list[torch.nn.Module], device: torch.device):
        self.clock = _Clock(device)
        self._spans: list[tuple[str, str, object, object]] = []  # (part, fwd|bwd, start mark, end mark)
        self._open: dict[tuple[int, str, str], list] = collections.defaultdict(list)  # (owner, part, phase) -> marks
        self._handles = []
        self.active = False
        self.steps = 0
        for chunk in model_chunks:
            top = chunk
            while hasattr(top, "module"):  # DDP / Float16Module wrappers
                top = top.module
            for name, module in top.named_modules():
                part = _part_of(name)
                if part is not None:
                    self._hook(module, part)
                elif name == "decoder" and top.post_process:
                    # forward: the decoder's end opens "output layer + loss"; backward: it closes it
                    out = (id(top), OUTPUT_PART)
                    self._handles.append(module.register_forward_hook(self._on((*out, "fwd"), open_=True)))
                    self._handles.append(module.register_full_backward_pre_hook(self._on((*out, "bwd"), open_=False)))
                    self._handles.append(top.register_forward_hook(self._on((*out, "fwd"), open_=False)))
                    self._handles.append(top.register_full_backward_pre_hook(self._on((*out, "bwd"), open_=True)))

    def _hook(self, module, part: str) -> None:
        k = (id(module), part)
        self._handles += [
            module.register_forward_pre_hook(self._on((*k, "fwd"), open_=True)),
            module.register_forward_hook(self._on((*k, "fwd"), open_=False)),
            module.register_full_backward_pre_hook(self._on((*k, "bwd"), open_=True)),
            module.register_full_backward_hook(self._on((*k, "bwd"), open_=False)),
        ]

    def _on(self, key, *, open_: bool):
        def hook(*_args):
            if not self.active:
                return None
            mark = self.clock.mark()
            if open_:
                self._open[key].append(mark)
            elif self._open[key]:
                _, part, phase = key
                self._spans.append((part, phase, self._open[key].pop(), mark))
            return None

        return hook

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Record the steps run inside; call ``step_done()`` after each."""
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def step_done(self) -> None:
        self.steps += 1

    def report(self) -> dict[str, dict[str, float]]:
        """``{part: {"fwd_ms", "bwd_ms"}}`` per step (mean over the recorded steps); synchronises."""
        if self.clock.cuda:
            torch.cuda.synchronize()
        totals: dict[str, dict[str, float]] = collections.defaultdict(lambda: {"fwd_ms": 0.0, "bwd_ms": 0.0})
        for part, phase, start, end in self._spans:
            totals[part][f"{phase}_ms"] += self.clock.elapsed_ms(start, end)
        for outer, inner in INNER.items():
            if outer in totals and inner in totals:
                for phase in ("fwd_ms", "bwd_ms"):
                    totals[outer][phase] -= totals[inner][phase]
        steps = max(self.steps, 1)
        return {part: {phase: ms / steps for phase, ms in t.items()} for part, t in totals.items()}

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _part_of(module_name: str) -> str | None:
    for part, suffixes in PARTS.items():
        if module_name.endswith(suffixes):
            return part
    return None
