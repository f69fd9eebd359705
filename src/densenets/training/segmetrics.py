"""Segmentation metrics from one confusion matrix, and the pixel-wise objective of a run.

Every number is read off a K x K confusion matrix of pixel counts (rows: the true class,
columns: the predicted one) summed over a whole split, so it does not depend on how the split
was batched or sharded. Pixels whose target is ``ignore_index`` (void) are left out of the
matrix, and so out of every metric. The definitions are the ones the FC-DenseNet paper reports
(after Long et al.):

- pixel accuracy ("global accuracy"): ``trace(C) / sum(C)``;
- IoU of class c: ``C[c, c] / (sum of row c + sum of column c - C[c, c])``, i.e. true
  positives over true positives, false positives and false negatives;
- mean IoU: the mean of the per-class IoUs over the classes that occur in the targets or the
  predictions (a class absent from both has no IoU, NaN, and is left out of the mean rather
  than counted as 0 or 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..constants import LOW_PRECISION

IGNORE_INDEX = 255  # void pixels (``--ignore-index``): the value PNG masks commonly use


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int | None = IGNORE_INDEX) -> torch.Tensor:
    """(K, K) int64 pixel counts: ``[true, predicted]`` over every non-void pixel.

    ``pred`` and ``target`` hold class indices of the same shape; target values equal to
    ``ignore_index`` are skipped. A target value outside ``0..K-1`` that is not the ignore
    index is a ValueError (it would otherwise land in another class's cell).
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} "
                         "differ in shape")
    t, p = target.reshape(-1).long(), pred.reshape(-1).long()
    if ignore_index is not None:
        keep = t != ignore_index
        t, p = t[keep], p[keep]
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        bad = int(t[(t < 0) | (t >= num_classes)][0])
        raise ValueError(f"target value {bad} is not a class (0..{num_classes - 1}) nor the "
                         f"ignore index {ignore_index}")
    counts = torch.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes)


def pixel_accuracy(cm: torch.Tensor) -> float:
    """Correct pixels over all non-void pixels (NaN when there are none)."""
    total = float(cm.sum())
    return float(cm.diag().sum()) / total if total else math.nan


def per_class_iou(cm: torch.Tensor) -> list[float]:
    """Each class's intersection over union; NaN for a class in neither targets nor
    predictions."""
    cm = cm.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    return [float(i) / float(u) if u else math.nan for i, u in zip(tp, union, strict=True)]


def mean_iou(cm: torch.Tensor) -> float:
    """The mean of :func:`per_class_iou` over the classes that have one (NaN if none do)."""
    present = [v for v in per_class_iou(cm) if not math.isnan(v)]
    return sum(present) / len(present) if present else math.nan


def summarize(cm: torch.Tensor) -> dict[str, Any]:
    """Pixel accuracy and mean IoU in percent, per-class IoU as fractions (None: no IoU)."""
    return {"pixel_acc": 100 * pixel_accuracy(cm), "miou": 100 * mean_iou(cm),
            "iou": [None if math.isnan(v) else v for v in per_class_iou(cm)],
            "pixels": int(cm.sum())}


@dataclass(kw_only=True)
class PixelObjective:
    """What a segmentation run optimises and reports: pixel-wise cross-entropy (class
    weights optional, void pixels ignored), pixel accuracy and mean IoU.

    The trainer asks it for the loss of a batch, the batch's training accuracy, and the
    metrics of an evaluation split; ``select`` names the metric that picks best.pt (higher is
    better) and ``train_metric`` the training column.
    """

    num_classes: int
    ignore_index: int = IGNORE_INDEX
    class_weights: Sequence[float] = field(default_factory=tuple)
    select: str = "miou"
    higher_is_better: bool = True
    train_metric: str = "pixel_acc"

    def __post_init__(self) -> None:
        if self.class_weights and len(self.class_weights) != self.num_classes:
            raise ValueError(f"--class-weights has {len(self.class_weights)} values for "
                             f"{self.num_classes} classes: give one per class")
        if self.class_weights and min(self.class_weights) < 0:
            raise ValueError("--class-weights must be >= 0")

    def loss(self, logits: torch.Tensor, target: torch.Tensor,
             reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy over the non-void pixels (weighted per class when weights are set)."""
        w = torch.tensor(self.class_weights, dtype=logits.dtype, device=logits.device) \
            if self.class_weights else None
        return F.cross_entropy(logits, target, weight=w, ignore_index=self.ignore_index,
                               reduction=reduction)

    def train_score(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The batch's pixel accuracy times its image count, so that the epoch's sum over
        its image count is the image-weighted pixel accuracy (the loop sums per image)."""
        valid = target != self.ignore_index
        hits = ((logits.argmax(1) == target) & valid).sum().double()
        return hits / valid.sum().clamp(min=1) * len(target)

    def train_column(self, correct: float, n: float) -> dict[str, float]:
        return {"train_pixel_acc": 100 * correct / max(n, 1)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, device: torch.device, *,
                 autocast: Callable[[], Any],
                 channels_last: bool = False,
                 reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> dict[str, Any]:
        """Mean loss per non-void pixel, pixel accuracy and mean IoU (%) and per-class IoU of
        ``model`` over ``loader``; ``reduce`` sums the counts of all processes."""
        was_training = model.training
        model.eval()
        k = self.num_classes
        cm = torch.zeros(k, k, dtype=torch.int64, device=device)
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, weight, images
        batches = loader.batches(0) if hasattr(loader, "batches") else loader
        for x, y in batches:
            if len(y) == 0:
                continue
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                logits = model(x)
            if logits.dtype in LOW_PRECISION:
                logits = logits.float()
            cm += confusion_matrix(logits.argmax(1), y, k, self.ignore_index)
            weight = self._pixel_weight(y)
            sums += torch.stack([self.loss(logits, y, "sum").double(), weight,
                                 torch.tensor(float(len(y)), dtype=torch.float64,
                                              device=device)])
        model.train(was_training)
        cm, sums = reduce(cm), reduce(sums)
        loss_sum, weight, n = sums.tolist()
        return {"loss": loss_sum / weight if weight else math.nan, **summarize(cm.cpu()),
                "n": int(n)}

    def _pixel_weight(self, y: torch.Tensor) -> torch.Tensor:
        """What cross-entropy's mean divides by: the non-void pixels, each by its class's
        weight when weights are set."""
        valid = y[y != self.ignore_index]
        if not self.class_weights:
            return torch.tensor(float(valid.numel()), dtype=torch.float64, device=y.device)
        w = torch.tensor(self.class_weights, dtype=torch.float64, device=y.device)
        return w[valid].sum()

    def columns(self, split: str, m: dict[str, Any]) -> dict[str, float]:
        """The metrics.csv columns of one evaluation split."""
        return {f"{split}_loss": m["loss"], f"{split}_pixel_acc": m["pixel_acc"],
                f"{split}_miou": m["miou"]}
