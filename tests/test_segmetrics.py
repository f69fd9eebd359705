"""Segmentation metrics: the confusion matrix, pixel accuracy, per-class and mean IoU, and the
pixel-wise loss, against hand computations and scikit-learn."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import jaccard_score

from densenets.training.segmetrics import (
    PixelObjective,
    confusion_matrix,
    mean_iou,
    per_class_iou,
    pixel_accuracy,
    summarize,
)

# Five labelled pixels and one void (255): (true, predicted) = (0,0) (0,1) (1,1) (1,1) (2,1).
TARGET = torch.tensor([[0, 0, 1], [1, 2, 255]])
PRED = torch.tensor([[0, 1, 1], [1, 1, 0]])


def test_confusion_matrix_by_hand():
    cm = confusion_matrix(PRED, TARGET, 3, ignore_index=255)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [0, 1, 0]]


def test_metrics_by_hand():
    cm = confusion_matrix(PRED, TARGET, 3, ignore_index=255)
    assert pixel_accuracy(cm) == pytest.approx(3 / 5)
    # IoU = TP / (row + column - TP): class 0: 1 / (2 + 1 - 1), class 1: 2 / (2 + 4 - 2),
    # class 2: 0 / (1 + 0 - 0)
    assert per_class_iou(cm) == pytest.approx([1 / 2, 2 / 4, 0.0])
    assert mean_iou(cm) == pytest.approx((1 / 2 + 2 / 4 + 0) / 3)


def test_a_class_in_neither_targets_nor_predictions_has_no_iou():
    cm = confusion_matrix(PRED, TARGET, 4, ignore_index=255)
    iou = per_class_iou(cm)
    assert math.isnan(iou[3])
    assert mean_iou(cm) == pytest.approx(1 / 3)  # left out of the mean, not counted as 0 or 1
    s = summarize(cm)
    assert s["iou"][3] is None and s["miou"] == pytest.approx(100 / 3)
    assert s["pixels"] == 5 and s["pixel_acc"] == pytest.approx(60.0)


def test_void_pixels_count_nowhere():
    with_void = confusion_matrix(PRED, TARGET, 3, ignore_index=255)
    without = confusion_matrix(PRED.flatten()[:5], TARGET.flatten()[:5], 3, ignore_index=None)
    assert torch.equal(with_void, without)


def test_a_target_value_that_is_no_class_is_refused():
    with pytest.raises(ValueError, match="target value 7 is not a class"):
        confusion_matrix(torch.zeros(4), torch.tensor([0, 1, 7, 255]), 3, 255)


def test_against_scikit_learn():
    g = torch.Generator().manual_seed(0)
    k = 5
    target = torch.randint(0, k, (4, 17, 23), generator=g)
    target[:, :3] = 255
    pred = torch.randint(0, k, (4, 17, 23), generator=g)
    cm = confusion_matrix(pred, target, k, 255)
    keep = target != 255
    t, p = target[keep].numpy(), pred[keep].numpy()
    assert cm.numpy().tolist() == sk_confusion(t, p, labels=list(range(k))).tolist()
    assert per_class_iou(cm) == pytest.approx(jaccard_score(t, p, average=None).tolist())
    assert mean_iou(cm) == pytest.approx(jaccard_score(t, p, average="macro"))
    assert pixel_accuracy(cm) == pytest.approx(float((t == p).mean()))


def test_pixel_loss_is_cross_entropy_over_non_void_pixels():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 4, 5), generator=g)
    target[0, 0] = 255
    weights = (1.0, 2.0, 0.5)
    obj = PixelObjective(num_classes=3, class_weights=weights)
    keep = target != 255
    flat = logits.permute(0, 2, 3, 1)[keep]
    w = torch.tensor(weights, dtype=torch.float64)[target[keep]]
    nll = -flat.log_softmax(1).gather(1, target[keep][:, None])[:, 0]
    assert obj.loss(logits, target).item() == pytest.approx((w * nll).sum().item() / w.sum().item())
    plain = PixelObjective(num_classes=3)
    assert plain.loss(logits, target).item() == pytest.approx(nll.mean().item())
    assert plain.loss(logits, target).item() == pytest.approx(
        F.cross_entropy(logits, target, ignore_index=255).item())


def test_evaluate_sums_over_batches_as_one_confusion_matrix():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, 8, 8, generator=g)
    y = torch.randint(0, 3, (5, 8, 8), generator=g)
    y[:, 0] = 255
    model = torch.nn.Conv2d(3, 3, 1)
    obj = PixelObjective(num_classes=3)
    m = obj.evaluate(model, [(x[:2], y[:2]), (x[2:], y[2:])], torch.device("cpu"),
                     autocast=lambda: torch.autocast("cpu", enabled=False))
    with torch.no_grad():
        logits = model(x)
    cm = confusion_matrix(logits.argmax(1), y, 3, 255)
    assert m["miou"] == pytest.approx(100 * mean_iou(cm))
    assert m["pixel_acc"] == pytest.approx(100 * pixel_accuracy(cm))
    assert m["loss"] == pytest.approx(F.cross_entropy(logits, y, ignore_index=255).item())
    assert m["n"] == 5 and m["pixels"] == 5 * 7 * 8


def test_class_weights_must_match_the_classes():
    with pytest.raises(ValueError, match="2 values for 3 classes"):
        PixelObjective(num_classes=3, class_weights=(1.0, 2.0))
