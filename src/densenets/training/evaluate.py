"""Top-1 / top-5 error and loss of a classifier over a loader, with the paper's 10-crop.

A batch of shape (N, 10, C, H, W) is a 10-crop batch: the ten crops go through the network
and their logits are averaged per image, as the authors' ImageNet evaluation does.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from ..constants import LOW_PRECISION

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str | None):
    """The autocast context for ``--amp bf16|fp16`` (a no-op without it)."""
    if not amp:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    """How many targets are among the top-k logits, for each k (k capped at the class count)."""
    kmax = min(max(ks), logits.shape[1])
    pred = logits.topk(kmax, dim=1).indices
    hit = pred == target[:, None]
    return [hit[:, : min(k, kmax)].any(1).sum() for k in ks]


def error_metrics(sums: torch.Tensor) -> dict[str, float]:
    """[loss sum, top-1 correct, top-5 correct, count] -> mean loss and errors in percent."""
    loss_sum, c1, c5, n = (float(v) for v in sums.tolist())
    n = max(n, 1.0)
    return {"loss": loss_sum / n, "top1_err": 100.0 * (1 - c1 / n),
            "top5_err": 100.0 * (1 - c5 / n), "n": int(n)}


def _input_rank(model: nn.Module) -> int:
    """The dimensions of a batch the model takes: (N, C) and its spatial ones."""
    return 2 + getattr(getattr(model, "config", None), "spatial_dims", 2)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: str | torch.device = "cpu", *,
             amp: str | None = None, channels_last: bool = False,
             reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> dict[str, float]:
    """Mean cross-entropy, top-1 and top-5 error (%) of ``model`` over ``loader``.

    ``loader`` yields (images, labels) from ``batches(epoch)`` or plain iteration.
    ``reduce`` sums the per-process totals in a distributed run (identity otherwise).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    batches = loader.batches(0) if hasattr(loader, "batches") else loader
    for x, y in batches:
        if len(y) == 0:
            continue
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        # Ten crops add a dimension to the model's input rank (a 3D model's batch is 5-D too).
        crops = x.shape[1] if x.dim() == _input_rank(model) + 1 else 0
        if crops:
            x = x.flatten(0, 1)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            logits = model(x)
        if logits.dtype in LOW_PRECISION:
            logits = logits.float()
        if crops:
            logits = logits.view(len(y), crops, -1).mean(1)
        c1, c5 = topk_correct(logits, y)
        sums += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(),
                             c1.double(), c5.double(), torch.tensor(len(y), device=device,
                                                                    dtype=torch.float64)])
    model.train(was_training)
    return error_metrics(reduce(sums))
