"""The offline 3D demo: scikit-learn's handwritten digits placed in volumes.

No 3D medical dataset ships offline, so this builds a 3D task from real data that does. Each
of the 1,797 8x8 digits (pixel values 0..16, scaled to [0, 1]) becomes one volume of
:data:`DEPTH` x 8 x 8 voxels: the digit's image fills :data:`MIN_THICKNESS` to
:data:`MAX_THICKNESS` consecutive slices (a thickness drawn per volume) starting at a random
depth, every other slice is empty, and every voxel gets Gaussian noise of standard deviation
:data:`NOISE`. The label is the digit. The split is the 2D digits' (stratified 80/20, 1,437
training and 360 test volumes) and the draws come from a fixed seed, so every run sees the
same volumes whatever ``--seed`` is.
"""

from __future__ import annotations

import torch

DEPTH = 8
MIN_THICKNESS, MAX_THICKNESS = 1, 3
NOISE = 0.2
SEED = 0  # the volumes are data, not a run's randomness: fixed whatever --seed is


def digit_volumes(seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """(volumes (1797, DEPTH, 8, 8) float32, labels (1797,) int64) as the module says."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.tensor(d.images / 16.0, dtype=torch.float32)
    n = len(images)
    g = torch.Generator().manual_seed(seed)
    thick = torch.randint(MIN_THICKNESS, MAX_THICKNESS + 1, (n,), generator=g)
    start = (torch.rand(n, generator=g) * (DEPTH - thick + 1)).floor().long()
    z = torch.arange(DEPTH)
    inside = (z >= start[:, None]) & (z < (start + thick)[:, None])  # (n, DEPTH)
    volumes = inside[:, :, None, None].float() * images[:, None]
    volumes += NOISE * torch.randn(volumes.shape, generator=g)
    return volumes, torch.tensor(d.target, dtype=torch.int64)


def digit_volumes_split(seed: int = SEED) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The volumes of :func:`digit_volumes` by split, ``train`` and ``test`` (the held-out
    20%, stratified with the 2D digits recipe's seed)."""
    from sklearn.model_selection import train_test_split

    volumes, labels = digit_volumes(seed)
    train, test = train_test_split(range(len(labels)), test_size=0.2, stratify=labels.numpy(),
                                   random_state=0)
    train, test = torch.tensor(train), torch.tensor(test)
    return {"train": (volumes[train], labels[train]), "test": (volumes[test], labels[test])}
