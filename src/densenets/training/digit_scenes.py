"""Digit scenes: an offline segmentation set composed from real handwritten digits.

No segmentation set ships with the library's dependencies, but scikit-learn's 1,797 real 8x8
handwritten digits do. A scene is a 64x64 grayscale image, black background, holding two to
four of those digits, each scaled (bilinear) to a random square side of 16 to 32 pixels and
placed at a random position inside the image, without overlapping another digit's square. Each
pixel where a scaled digit's intensity is at least 0.5 (a stroke) is labelled with that digit's
class + 1; every other pixel is background, class 0: 11 classes. Image pixels are the scaled
intensities in [0, 1].

The training scenes use only the digits of the training part of the digits recipe's fixed
stratified 80/20 split, and the test scenes only those of its test part, so no handwritten
digit appears on both sides. The scenes are a pure function of :data:`SCENE_SEED` (not of
``--seed``): 2,000 training and 500 test scenes, the same on every machine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SIZE = 64  # scene side
DIGITS_PER_SCENE = (2, 4)  # inclusive
DIGIT_SIDE = (16, 32)  # inclusive
STROKE = 0.5  # intensity (of 1) from which a pixel is a stroke of its digit
SCENES = {"train": 2000, "test": 500}
SCENE_SEED = 0
SPLIT_SEED = 0  # the digits recipe's train/test split of the 1,797 digits
CLASS_NAMES = ["background", *(str(d) for d in range(10))]


def digit_splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The digits recipe's stratified 80/20 split: (images (N, 8, 8) in [0, 1], labels)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = torch.tensor(d.images / 16.0, dtype=torch.float32)
    labels = torch.tensor(d.target, dtype=torch.int64)
    train, test = train_test_split(range(len(labels)), test_size=0.2, stratify=d.target,
                                   random_state=SPLIT_SEED)
    return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}


def _boxes(g: torch.Generator, count: int) -> list[tuple[int, int, int]]:
    """Up to ``count`` non-overlapping squares (top, left, side) inside the scene."""
    boxes: list[tuple[int, int, int]] = []
    for _ in range(100 * count):  # rejection sampling; a crowded scene keeps fewer digits
        if len(boxes) == count:
            break
        side = int(torch.randint(DIGIT_SIDE[0], DIGIT_SIDE[1] + 1, (1,), generator=g))
        top, left = torch.randint(0, SIZE - side + 1, (2,), generator=g).tolist()
        if all(top + side <= t or t + s <= top or left + side <= lf or lf + s <= left
               for t, lf, s in boxes):
            boxes.append((top, left, side))
    return boxes


def compose(digits: torch.Tensor, labels: torch.Tensor, n: int,
            g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` scenes from ``digits`` (M, 8, 8) in [0, 1]: images (n, 1, 64, 64) in [0, 1]
    and masks (n, 64, 64) int64 (0 background, digit + 1 on its strokes)."""
    images = torch.zeros(n, 1, SIZE, SIZE)
    masks = torch.zeros(n, SIZE, SIZE, dtype=torch.int64)
    for i in range(n):
        count = int(torch.randint(DIGITS_PER_SCENE[0], DIGITS_PER_SCENE[1] + 1, (1,),
                                  generator=g))
        for top, left, side in _boxes(g, count):
            j = int(torch.randint(0, len(digits), (1,), generator=g))
            patch = F.interpolate(digits[j][None, None], size=(side, side), mode="bilinear",
                                  align_corners=False)[0, 0].clamp(0, 1)
            images[i, 0, top:top + side, left:left + side] = patch
            region = masks[i, top:top + side, left:left + side]
            region[patch >= STROKE] = int(labels[j]) + 1
    return images, masks


def digit_scenes() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The train and test scenes: split -> (images (N, 1, 64, 64), masks (N, 64, 64))."""
    g = torch.Generator().manual_seed(SCENE_SEED)
    return {split: compose(*digits, SCENES[split], g)
            for split, digits in digit_splits().items()}
