"""The tiny training run the Slurm tests submit, and how to read its final loss."""

from __future__ import annotations

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The tiny run every training test uses: a checkpoint every 4 steps, every step logged.
TRAIN_ITERS = 24  # room for the signal to land before the end (it arrives some seconds after the first save)
TRAIN_ARGS = ["--train-iters", str(TRAIN_ITERS), "--save-interval", "4", "--log-interval", "1", "--eval-interval", "0"]


def final_lm_loss(log: str, train_iters: int = TRAIN_ITERS) -> float:
    """The lm loss logged at the last iteration."""
    found = re.findall(rf"^iteration {train_iters}/{train_iters} \|.*?\| lm loss: ([0-9.]+)", log, re.M)
    assert found, f"no iteration {train_iters}/{train_iters} line in the log:\n{log[-3000:]}"
    return float(found[-1])
