"""Image files in, top-k classes out, with the preprocessing and class names the weights carry.

A file that cannot be read as an image is reported by name and skipped; the others are still
predicted. High-bit-depth grayscale files (16-bit PNG, TIFF) are scaled by their type's range,
not clipped to 8 bits, and every step that changed an image (bit depth, colour mode, size) is
listed in its :attr:`Prediction.preprocessed`. A volume model (its preprocessing records a
volume size) takes ``.npy``/``.nii``/``.nii.gz`` files instead. Files are read as training read
them (:mod:`densenets.weights.preprocessing`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..device import resolve_device
from ..weights.preprocessing import (
    is_volume_preprocessing,
    match_channels,
    open_image,
    read_volume,
    volume_input,
)
from ..weights.pretrained import complete_meta
from ..weights.xrv import op_norm


@dataclass
class Prediction:
    """The top classes of one image, most probable first."""

    file: str
    topk: list[dict[str, Any]]  # {"index", "label", "probability"}
    preprocessed: list[str] = field(default_factory=list)  # steps that changed the image


@dataclass
class PredictionReport:
    predictions: list[Prediction] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"file", "error"}
    probabilities: str = "softmax"  # how they were computed (see probabilities())

    def to_dict(self) -> dict[str, Any]:
        return {"predictions": [{"file": p.file, "topk": p.topk, "preprocessed": p.preprocessed}
                                for p in self.predictions],
                "skipped": self.skipped, "probabilities": self.probabilities}


def weights_meta(model: nn.Module) -> dict[str, Any]:
    """The model's class names and preprocessing, with defaults where the weights had none."""
    return complete_meta(model.config.to_dict(), getattr(model, "weights_meta", None))


def probabilities(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """``model``'s outputs ``logits`` [N, C] as probabilities, as its weights mean them.

    A softmax over the classes; for multi-label weights (``multi_label`` in the weights meta,
    as TorchXRayVision's) an independent sigmoid per output, rescaled by the weights' operating
    points (``op_threshs``) where they have them, so that TorchXRayVision's weights give what
    its own model returns.
    """
    return _probabilities(logits, weights_meta(model))


def probability_kind(meta: dict[str, Any]) -> str:
    """How :func:`probabilities` reads outputs with this weights meta, in words."""
    if not meta.get("multi_label"):
        return "softmax"
    return "sigmoid per output" + (", operating points at 0.5" if meta.get("op_threshs") else "")


def _probabilities(logits: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
    if not meta.get("multi_label"):
        return torch.softmax(logits, dim=1)
    p = torch.sigmoid(logits)
    return op_norm(p, meta["op_threshs"]) if meta.get("op_threshs") else p


def preprocess(img, preprocessing: dict[str, Any], notes: list[str] | None = None,
               in_channels: int | None = None) -> torch.Tensor:
    """Resize the shorter side, centre-crop, scale to [0, 1], normalise: a (C, H, W) tensor.

    Without a stored ``resize`` the shorter side is resized to the crop (as the folder
    evaluation does), so an image larger than the model's input is shrunk, not cut from its
    middle. ``notes`` receives a line for each step that changed the image.
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    notes = notes if notes is not None else []
    mode = InterpolationMode(preprocessing.get("interpolation", "bilinear"))
    crop = int(preprocessing["crop"])
    side = int(preprocessing.get("resize") or crop)
    w, h = img.size
    if min(w, h) != side:
        img = F.resize(img, [side], interpolation=mode, antialias=True)
        notes.append(f"resized {w}x{h} to {img.size[0]}x{img.size[1]} ({mode.value})")
    if img.size != (crop, crop):
        notes.append(f"centre-cropped {img.size[0]}x{img.size[1]} to {crop}x{crop}")
        img = F.center_crop(img, [crop])
    x = F.pil_to_tensor(img)
    x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
    x = match_channels(x, in_channels or len(preprocessing["mean"]), notes)
    return F.normalize(x, preprocessing["mean"], preprocessing["std"])


def model_input(path: str | os.PathLike, preprocessing: dict[str, Any], in_channels: int,
                notes: list[str] | None = None) -> torch.Tensor:
    """The tensor a model trained with ``preprocessing`` takes for the file at ``path``: an
    image (C, H, W), or a volume (1, D, H, W) when the preprocessing records a volume size.
    ValueError saying why a file is unusable."""
    if is_volume_preprocessing(preprocessing):
        return volume_input(read_volume(path), preprocessing, notes)
    return preprocess(open_image(path, in_channels, notes), preprocessing, notes, in_channels)


def predict_files(model: nn.Module, paths: Sequence[str | os.PathLike], topk: int = 5,
                  batch_size: int = 16, device: str | torch.device = "cpu") -> PredictionReport:
    """Top-``topk`` classes for each readable image in ``paths``, with :func:`probabilities`;
    unreadable files are skipped."""
    if topk < 1:
        raise ValueError(f"--topk must be >= 1, got {topk}")
    meta = weights_meta(model)
    num_classes = model.config.num_classes
    names = meta["class_names"] or [f"class {i}" for i in range(num_classes)]
    # outputs the weights were never trained for (TorchXRayVision's "") are not ranked
    ranked = [c for c in range(num_classes) if c not in set(meta.get("untrained") or ())]
    k = min(topk, len(ranked))
    device = resolve_device(device)
    model = model.to(device).eval()
    report = PredictionReport(probabilities=probability_kind(meta))
    batch: list[tuple[str, torch.Tensor, list[str]]] = []

    def flush() -> None:
        if not batch:
            return
        x = torch.stack([t for _, t, _ in batch]).to(device)
        with torch.inference_mode():
            probs = _probabilities(model(x).float(), meta)[:, ranked]
        top = probs.topk(k, dim=1)
        for (f, _, done), p, i in zip(batch, top.values.tolist(), top.indices.tolist(),
                                      strict=True):
            report.predictions.append(Prediction(f, [
                {"index": ranked[c], "label": names[ranked[c]], "probability": q}
                for c, q in zip(i, p, strict=True)], done))
        batch.clear()

    for path in paths:
        notes: list[str] = []
        try:
            x = model_input(path, meta["preprocessing"], model.config.in_channels, notes)
        except ValueError as e:
            report.skipped.append({"file": str(path), "error": str(e)})
            continue
        batch.append((str(path), x, notes))
        if len(batch) == batch_size:
            flush()
    flush()
    return report
