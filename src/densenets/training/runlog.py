"""What a training run shows and writes besides checkpoints: progress, metrics.csv,
curves.png and JSON files. Every file is replaced atomically so a reader never sees half."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json(obj: Any, path: str | os.PathLike) -> None:
    atomic_write_bytes((json.dumps(obj, indent=2) + "\n").encode(), path)


def metric_columns(history: list[dict[str, Any]]) -> list[str]:
    cols: list[str] = []
    for row in history:
        cols += [k for k in row if k not in cols]
    return cols


def write_metrics(history: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """One row per epoch: lr, train loss and error, each eval split's loss, top-1, top-5 (%)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=metric_columns(history), lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_bytes(buf.getvalue().encode(), path)


def write_curves(history: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Loss and top-1 error against epoch for the training and every evaluation split."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    epochs = [r["epoch"] for r in history]
    columns = metric_columns(history)
    splits = [k[: -len("_loss")] for k in columns if k.endswith("_loss")]
    # a segmentation run has mean IoU where a classifier has top-1 error
    second = ("top1_err", "top-1 error (%)") if any(k.endswith("_top1_err") for k in columns) \
        else ("miou", "mean IoU (%)")
    for ax, metric, title in ((fig.add_subplot(1, 2, 1), "loss", "cross-entropy loss"),
                              (fig.add_subplot(1, 2, 2), *second)):
        for split in splits:
            ys = [r.get(f"{split}_{metric}") for r in history]
            if all(y is None for y in ys):
                continue  # the training split has no mean IoU
            ax.plot(epochs, ys, marker="o" if len(epochs) < 30 else None, ms=3, label=split)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        if metric == "loss":
            ax.set_yscale("log")
    # Fixed margins: tight_layout measured every label each epoch, half the drawing time.
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.9, wspace=0.22)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(buf.getvalue(), path)


class EpochProgress:
    """A progress bar per epoch on a terminal (loss, error, images/s, ETA); silent otherwise,
    where the trainer prints one line per epoch instead."""

    def __init__(self, live: bool) -> None:
        self.live = live
        self._bar = None
        self._task = None

    def start(self, epoch: int, epochs: int, total: int, done: int) -> None:
        if not self.live:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(TextColumn("epoch {task.description}"), BarColumn(),
                             MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                             TextColumn("ETA"), TimeRemainingColumn(), transient=True)
        self._task = self._bar.add_task(f"{epoch + 1}/{epochs}", total=total, completed=done,
                                        stats="")
        self._bar.start()

    def update(self, done: int, loss: float, err: float, images_per_s: float) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=done,
                             stats=f"loss {loss:.4f} err {err:5.2f}% {images_per_s:,.0f} img/s")

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    @staticmethod
    def epoch_line(row: dict[str, Any], epochs: int) -> str:
        """``epoch 3/15 lr 0.1 train loss .. err ..% | test loss .. err ..% top-5 ..% | ..``"""
        parts = [f"epoch {row['epoch']:>{len(str(epochs))}}/{epochs}", f"lr {row['lr']:.4g}"]
        if "train_pixel_acc" in row:  # segmentation
            parts.append(f"train loss {row['train_loss']:.4f} pixel acc "
                         f"{row['train_pixel_acc']:.2f}%")
        else:
            parts.append(f"train loss {row['train_loss']:.4f} err {row['train_top1_err']:.2f}%")
        for key in row:
            if key.endswith("_loss") and key != "train_loss":
                s = key[: -len("_loss")]
                if f"{s}_miou" in row:
                    parts.append(f"{s} loss {row[key]:.4f} pixel acc {row[f'{s}_pixel_acc']:.2f}% "
                                 f"mIoU {row[f'{s}_miou']:.2f}%")
                    continue
                parts.append(f"{s} loss {row[key]:.4f} err {row[f'{s}_top1_err']:.2f}% "
                             f"top-5 {row[f'{s}_top5_err']:.2f}%")
        parts.append(f"{row['seconds']:.1f}s {row['images_per_s']:,.0f} img/s")
        return " | ".join(parts)
