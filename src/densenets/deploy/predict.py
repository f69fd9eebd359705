"""Image files in, top-k classes out, with the preprocessing and class names the weights carry.

A file that cannot be read as an image is reported by name and skipped; the others are still
predicted.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..weights.pretrained import complete_meta

_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


@dataclass
class Prediction:
    """The top classes of one image, most probable first."""

    file: str
    topk: list[dict[str, Any]]  # {"index", "label", "probability"}


@dataclass
class PredictionReport:
    predictions: list[Prediction] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"file", "error"}

    def to_dict(self) -> dict[str, Any]:
        return {"predictions": [{"file": p.file, "topk": p.topk} for p in self.predictions],
                "skipped": self.skipped}


def weights_meta(model: nn.Module) -> dict[str, Any]:
    """The model's class names and preprocessing, with defaults where the weights had none."""
    return complete_meta(model.config.to_dict(), getattr(model, "weights_meta", None))


def open_image(path: str | os.PathLike, in_channels: int):
    """A PIL image in the mode the model takes; ValueError saying why a file is unusable."""
    from PIL import Image, ImageOps

    if in_channels not in _MODES:
        raise ValueError(f"cannot make {in_channels}-channel inputs from image files (only 1, "
                         "3 or 4 channels)")
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)  # photos are often stored rotated
            return img.convert(_MODES[in_channels])
    except FileNotFoundError:
        raise ValueError("no such file") from None
    except IsADirectoryError:
        raise ValueError("is a directory") from None
    except Exception as e:  # PIL raises many types for truncated or foreign files
        raise ValueError(f"not a readable image ({type(e).__name__}: {e})") from None


def preprocess(img, preprocessing: dict[str, Any]) -> torch.Tensor:
    """Resize the shorter side, centre-crop, scale to [0, 1], normalise: a (C, H, W) tensor."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    mode = InterpolationMode(preprocessing.get("interpolation", "bilinear"))
    if preprocessing.get("resize"):
        img = F.resize(img, [int(preprocessing["resize"])], interpolation=mode, antialias=True)
    img = F.center_crop(img, [int(preprocessing["crop"])])
    x = F.pil_to_tensor(img).float().div_(255)
    return F.normalize(x, preprocessing["mean"], preprocessing["std"])


def predict_files(model: nn.Module, paths: Sequence[str | os.PathLike], topk: int = 5,
                  batch_size: int = 16, device: str | torch.device = "cpu") -> PredictionReport:
    """Top-``topk`` classes for each readable image in ``paths``; unreadable files are skipped."""
    if topk < 1:
        raise ValueError(f"--topk must be >= 1, got {topk}")
    meta = weights_meta(model)
    num_classes = model.config.num_classes
    names = meta["class_names"] or [f"class {i}" for i in range(num_classes)]
    k = min(topk, num_classes)
    model = model.to(device).eval()
    report = PredictionReport()
    batch: list[tuple[str, torch.Tensor]] = []

    def flush() -> None:
        if not batch:
            return
        x = torch.stack([t for _, t in batch]).to(device)
        with torch.inference_mode():
            probs = torch.softmax(model(x).float(), dim=1)
        top = probs.topk(k, dim=1)
        for (f, _), p, i in zip(batch, top.values.tolist(), top.indices.tolist(), strict=True):
            report.predictions.append(Prediction(f, [
                {"index": c, "label": names[c], "probability": q} for c, q in zip(i, p,
                                                                                  strict=True)]))
        batch.clear()

    for path in paths:
        try:
            img = open_image(path, model.config.in_channels)
        except ValueError as e:
            report.skipped.append({"file": str(path), "error": str(e)})
            continue
        batch.append((str(path), preprocess(img, meta["preprocessing"])))
        if len(batch) == batch_size:
            flush()
    flush()
    return report
