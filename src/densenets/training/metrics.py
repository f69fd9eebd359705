"""The epoch metrics of a run: running sums of the epoch in progress, one row per finished
epoch, the best epoch, and the summary.

The sums of the epoch in progress (``partial``) travel in every checkpoint, so an epoch
interrupted and resumed reports the same training loss and error as an uninterrupted one. In a
distributed run they hold the sums of all processes, carried by rank 0 alone.
"""

from __future__ import annotations

import time
from typing import Any

import torch

_SUMS = ("loss_sum", "correct", "n")


def _empty() -> dict[str, float]:
    return {"loss_sum": 0.0, "correct": 0.0, "n": 0.0, "seconds": 0.0}


class EpochMetrics:
    """``history`` (one row per finished epoch), ``best`` (epoch, split, top-1 error of the
    best epoch on ``select_on``) and ``partial`` (the epoch in progress).

    ``objective`` (a segmentation run's :class:`~densenets.training.segmetrics.PixelObjective`)
    names the columns instead, and the metric that picks the best epoch (mean IoU, higher is
    better); None: the classifier's top-1/top-5 columns and top-1 error.
    """

    def __init__(self, select_on: str | None, objective: Any = None) -> None:
        self.select_on = select_on
        self.objective = objective
        self.partial = _empty()
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None

    def carried(self, is_main: bool, device: torch.device) -> torch.Tensor:
        """The sums an epoch resumes from (zeros on every process but the first)."""
        carried = [self.partial[k] for k in _SUMS]
        return torch.tensor(carried if is_main else [0.0] * 3, dtype=torch.float64,
                            device=device)

    def set_partial(self, sums: torch.Tensor, t0: float) -> None:
        """The reduced sums of the epoch so far, and the seconds spent since ``t0``."""
        s = sums.tolist()
        self.partial = {"loss_sum": s[0], "correct": s[1], "n": s[2],
                        "seconds": self.partial["seconds"] + time.perf_counter() - t0}

    def start_row(self, epoch: int, lr: float) -> dict[str, Any]:
        """The finished epoch's row with its training loss and error."""
        p = self.partial
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": p["loss_sum"] / max(p["n"], 1)}
        if self.objective is not None:
            return {**row, **self.objective.train_column(p["correct"], p["n"])}
        return {**row, "train_top1_err": 100 * (1 - p["correct"] / max(p["n"], 1))}

    def add_split(self, row: dict[str, Any], split: str, m: dict[str, float]) -> None:
        """``<split>_loss``, ``<split>_top1_err``, ``<split>_top5_err`` of one evaluation
        (segmentation: the objective's columns)."""
        if self.objective is not None:
            row.update(self.objective.columns(split, m))
            return
        row.update({f"{split}_loss": m["loss"], f"{split}_top1_err": m["top1_err"],
                    f"{split}_top5_err": m["top5_err"]})

    def finish(self, row: dict[str, Any], t0: float) -> bool:
        """Close the epoch: time it, keep the row, start the next; whether it is the best."""
        p = self.partial
        row["seconds"] = p["seconds"] + time.perf_counter() - t0
        row["images_per_s"] = p["n"] / max(p["seconds"], 1e-9)
        self.history.append(row)
        self.partial = _empty()
        metric, higher = "top1_err", False
        if self.objective is not None:
            metric, higher = self.objective.select, self.objective.higher_is_better
        key = f"{self.select_on}_{metric}"
        improved = key in row and (self.best is None or (
            row[key] > self.best[metric] if higher else row[key] < self.best[metric]))
        if improved:
            self.best = {"epoch": row["epoch"], "split": self.select_on, metric: row[key]}
        return improved

    def summary(self, **run: Any) -> dict[str, Any]:
        """``run`` (epochs, steps, ...) with the time, the last epoch's metrics and the best's."""
        h = self.history
        seconds = sum(r["seconds"] for r in h)
        at_best = next((r for r in h if self.best and r["epoch"] == self.best["epoch"]), None)
        return {**run, "seconds": seconds,
                "images_per_s": sum(r["images_per_s"] for r in h) / len(h) if h else None,
                "final": h[-1] if h else None, "best": self.best, "at_best": at_best}

    def state_dict(self) -> dict[str, Any]:
        return {"partial": dict(self.partial), "metrics": self.history, "best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.partial = dict(state.get("partial") or self.partial)
        self.history, self.best = list(state.get("metrics", [])), state.get("best")
