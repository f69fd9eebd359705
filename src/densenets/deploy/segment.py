"""Image files in, segmentation masks out: a mask PNG of class indices and a coloured overlay.

A segmentation model (an FC-DenseNet, or weights a segmentation run saved) scores every pixel.
Each image is read whole (no resize, no crop), scaled to [0, 1] and normalised with the
preprocessing its weights carry, padded right and bottom to a multiple of the network's
downsampling factor, and the padding is cut off the scores again: the mask has exactly the
image's size. ``NAME_mask.png`` holds the class index of every pixel (8-bit for up to 256
classes, else 16-bit); ``NAME_overlay.png`` the image with each class's colour laid over it at
half strength (the colours of :func:`palette`). Unreadable files are named and skipped.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..device import resolve_device
from ..models.registry import family_of
from .predict import open_image, weights_meta

OVERLAY_ALPHA = 0.5


def is_segmentation_model(model: nn.Module) -> bool:
    """Whether ``model`` scores pixels: an FC-DenseNet, or weights saved by a segmentation
    run (their preprocessing says so)."""
    family = family_of(model)
    pre = (getattr(model, "weights_meta", None) or {}).get("preprocessing") or {}
    return (family is not None and family.name == "fcdensenet") or \
        pre.get("task") == "segmentation"


def palette(num_classes: int) -> torch.Tensor:
    """(K, 3) uint8 colours, distinct per class: PASCAL VOC's bit-interleaved palette (class 0
    black, 1 dark red, 2 dark green, ...), which every VOC-style mask viewer shows alike."""
    colours = torch.zeros(num_classes, 3, dtype=torch.uint8)
    for c in range(num_classes):
        r = g = b = 0
        v = c
        for shift in range(7, -1, -1):
            r |= ((v >> 0) & 1) << shift
            g |= ((v >> 1) & 1) << shift
            b |= ((v >> 2) & 1) << shift
            v >>= 3
        colours[c] = torch.tensor([r, g, b])
    return colours


def _multiple(model: nn.Module, preprocessing: dict[str, Any]) -> int:
    return int(preprocessing.get("size_multiple") or getattr(model, "min_input_size", 1) or 1)


def segment(model: nn.Module, x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Class indices (H, W) of one normalised image (C, H, W), padded to ``multiple`` for the
    forward pass and cropped back."""
    h, w = x.shape[-2:]
    ph, pw = -(-h // multiple) * multiple - h, -(-w // multiple) * multiple - w
    with torch.inference_mode():
        scores = model(F.pad(x[None], (0, pw, 0, ph)))
    return scores[0, :, :h, :w].argmax(0)


def _to_tensor(img) -> torch.Tensor:
    from torchvision.transforms import functional as TF

    x = TF.pil_to_tensor(img)
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def write_outputs(img, mask: torch.Tensor, out: Path, stem: str,
                  colours: torch.Tensor) -> tuple[Path, Path]:
    """``stem_mask.png`` (class indices) and ``stem_overlay.png`` (colours over the image)."""
    import numpy as np
    from PIL import Image

    k = len(colours)
    mask_path, overlay_path = out / f"{stem}_mask.png", out / f"{stem}_overlay.png"
    indices = mask.cpu().numpy()
    if k <= 256:
        Image.fromarray(indices.astype(np.uint8)).save(mask_path)
    else:
        Image.fromarray(indices.astype(np.uint16)).save(mask_path)
    base = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32))
    coloured = colours[mask.cpu()].float()
    blend = (1 - OVERLAY_ALPHA) * base + OVERLAY_ALPHA * coloured
    Image.fromarray(blend.round().clamp(0, 255).byte().numpy()).save(overlay_path)
    return mask_path, overlay_path


def predict_masks(model: nn.Module, paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                  device: str | torch.device = "cpu") -> dict[str, Any]:
    """Write the mask and overlay of each readable image in ``paths`` into ``out_dir``.

    Returns ``{"masks": [{"file", "mask", "overlay", "size", "classes"}], "skipped":
    [{"file", "error"}]}``, ``classes`` being each predicted class's share of the pixels (%).
    """
    meta = weights_meta(model)
    pre = meta["preprocessing"]
    k = model.config.num_classes
    names = meta["class_names"] or [str(i) for i in range(k)]
    colours, multiple = palette(k), _multiple(model, pre)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device)
    model = model.to(device).eval()
    mean = torch.tensor(pre["mean"], dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(pre["std"], dtype=torch.float32).view(-1, 1, 1)
    report: dict[str, Any] = {"masks": [], "skipped": []}
    for path in paths:
        try:
            img = open_image(path, model.config.in_channels)
        except ValueError as e:
            report["skipped"].append({"file": str(path), "error": str(e)})
            continue
        x = (_to_tensor(img) - mean) / std
        mask = segment(model, x.to(device), multiple)
        stem = Path(path).stem
        mask_path, overlay_path = write_outputs(img, mask, out, stem, colours)
        counts = torch.bincount(mask.flatten().cpu(), minlength=k)
        report["masks"].append({
            "file": str(path), "mask": str(mask_path), "overlay": str(overlay_path),
            "size": [int(mask.shape[1]), int(mask.shape[0])],
            "classes": {names[c]: round(100 * int(n) / mask.numel(), 4)
                        for c, n in enumerate(counts.tolist()) if n}})
    return report
