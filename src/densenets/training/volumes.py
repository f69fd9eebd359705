"""Volume datasets for 3D models: folders of ``.npy``/``.nii``/``.nii.gz`` files
(``root/{train,val,test}/<class>/<volume>``) and the in-memory digits demo.

Each volume is read and scaled as ``predict`` reads it (:mod:`densenets.weights.preprocessing`):
intensities windowed (``--intensity-window LO HI``, as for CT) or z-scored per volume, then
resampled (trilinear) to ``--volume-size D H W``. Training augments with a random crop of each
axis (at least :data:`MIN_CROP` of its length, resampled back to the size) and a random flip of
each axis. Folders stream through the image-folder loader: unreadable files are named and
skipped, augmentation is seeded per volume, and a distributed job shards every batch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ..weights.preprocessing import (
    VOLUME_SUFFIXES,
    check_volume_size,
    check_window,
    is_volume_file,
    read_volume,
    resample,
    scale_intensity,
    volume_input,
    volume_preprocessing,
)
from .batches import DataBundle, ShardedBatches, epoch_generator, epoch_order, rank_slice
from .imagefolder import FolderLoader, SafeImageFolder, folder_root

LAYOUT = "root/train/<class>/*.nii.gz (or .nii, .npy) and root/val/<class>/* (optionally test/)"
VOLUME_DATASETS = ("volumes", "digits3d")
MIN_CROP = 0.8  # the random crop keeps at least this share of each axis


class VolumeTransform:
    """A (D, H, W) volume as a (1, D, H, W) model input: evaluation does exactly what
    :func:`~densenets.weights.preprocessing.volume_input` does for ``predict``; training crops
    each axis at random (after scaling the whole volume's intensities), resamples the crop to
    the size, and flips each axis with probability 1/2. Draws come from torch's CPU generator,
    which the loader seeds per volume."""

    def __init__(self, size: Sequence[int], window: Sequence[float] | None,
                 augment: bool = False) -> None:
        self.preprocessing = volume_preprocessing(size, window)
        self.augment = augment

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.augment:
            return volume_input(x, self.preprocessing)
        x = scale_intensity(x, self.preprocessing["intensity_window"])
        box = []
        for n in x.shape:
            keep = int(torch.randint(math.ceil(MIN_CROP * n), n + 1, ()))
            start = int(torch.randint(0, n - keep + 1, ()))
            box.append(slice(start, start + keep))
        x = resample(x[tuple(box)][None], self.preprocessing["volume_size"])
        flips = [axis for axis in (1, 2, 3) if float(torch.rand(())) < 0.5]
        return x.flip(flips) if flips else x


class VolumeFolder(SafeImageFolder):
    """Class folders of volume files; unreadable ones come back as ``BadSample`` markers."""

    noun = "volume"
    layout = LAYOUT

    @staticmethod
    def accepts(name: str) -> bool:
        return is_volume_file(name)

    def read(self, path: str) -> torch.Tensor:
        return read_volume(path)

    @staticmethod
    def probe(path: str) -> str | None:
        """"volume" when the file's header describes a 3D array, else None (headers only)."""
        try:
            if path.lower().endswith(".npy"):
                shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
            else:
                import nibabel

                shape = nibabel.load(path).shape
        except Exception:  # numpy, gzip and nibabel raise many types for damaged files
            return None
        dims = [s for s in shape if s != 1] if len(shape) == 4 else shape
        return "volume" if len(dims) == 3 else None


class VolumeTensorLoader(ShardedBatches):
    """Batches of volumes held in memory (already scaled and resampled), flipped at random
    along each axis when ``augment``; the flips of an epoch are drawn up front from its
    generator, so a resumed or sharded epoch sees the same ones."""

    def __init__(self, volumes: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                 shuffle: bool = False, augment: bool = False, seed: int = 0,
                 device: str | torch.device = "cpu") -> None:
        self.volumes, self.labels = volumes.to(device), labels.to(device)
        self.num_samples, self.batch_size = len(labels), batch_size
        self.shuffle, self.augment, self.seed = shuffle, augment, seed
        self.rank, self.world_size, self.keep_tail = 0, 1, True

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = epoch_generator(self.seed, epoch)
        order = epoch_order(self.num_samples, self.seed, epoch, self.shuffle, g)
        flips = torch.rand(self.num_samples, 3, generator=g) < 0.5 if self.augment else None
        for b in range(start, len(self)):
            mine = rank_slice(self.global_size(b), self.rank, self.world_size)
            sel = order[b * self.batch_size + mine.start:b * self.batch_size + mine.stop]
            x = self.volumes[sel.to(self.volumes.device)]
            if flips is not None:
                x = torch.stack([v.flip([a + 1 for a in range(3) if f[a]]) if f.any() else v
                                 for v, f in zip(x, flips[sel], strict=True)])
            yield x, self.labels[sel.to(self.labels.device)]


def check_volume_settings(cfg: Any) -> tuple[list[int], list[float] | None]:
    """The run's volume size and intensity window, checked; ValueError naming the flag."""
    size, window = list(cfg.volume_size or []), list(cfg.intensity_window or []) or None
    if not size:
        raise ValueError(f"recipe {cfg.recipe} needs --volume-size D H W")
    check_volume_size(size)
    check_window(window)
    given = (cfg.model_overrides or {}).get("in_channels")
    if given not in (None, 1):
        raise ValueError(f"volumes have one channel, not --in-channels {given}; drop it")
    return size, window


def build_volume_data(cfg: Any, device: str | torch.device,
                      splits: Sequence[str] = ("train", "val", "test"),
                      ten_crop: bool = False) -> DataBundle:
    """Loaders for ``splits`` of a volume recipe (``volumes``: ``cfg.data_dir``'s folders;
    ``digits3d``: the demo, built in memory)."""
    if ten_crop:
        raise ValueError("--ten-crop is the ImageNet evaluation; volumes are evaluated whole")
    size, window = check_volume_settings(cfg)
    pre = volume_preprocessing(size, window)
    augment = cfg.augmentation != "none"
    if cfg.dataset == "digits3d":
        from .digits3d import digit_volumes_split

        parts, names = digit_volumes_split(), [str(i) for i in range(10)]
        loaders: dict[str, Any] = {}
        for split in splits:
            if split in parts:
                raw, labels = parts[split]
                x = torch.stack([volume_input(v, pre) for v in raw])
                training = split == "train"
                loaders[split] = VolumeTensorLoader(
                    x, labels, cfg.batch_size if training else max(cfg.batch_size, 500),
                    shuffle=training, augment=training and augment, seed=cfg.seed, device=device)
        return DataBundle(loaders, names, 1, pre)
    return _folder_loaders(cfg, device, splits, size, window, augment, pre)


def _folder_loaders(cfg: Any, device: str | torch.device, splits: Sequence[str],
                    size: list[int], window: list[float] | None, augment: bool,
                    pre: dict[str, Any]) -> DataBundle:
    root = folder_root(cfg, splits, LAYOUT)
    pin = torch.device(device).type == "cuda"
    loaders, classes = {}, None
    for split in ("train", "val", "test"):
        if split not in splits or not (root / split).is_dir():
            continue
        training = split == "train"
        tf = VolumeTransform(size, window, augment=training and augment)
        ds = VolumeFolder(root / split, tf, classes, cfg.strict, channels=1)
        classes = classes or ds.classes
        loaders[split] = FolderLoader(ds, cfg.batch_size, shuffle=training, seed=cfg.seed,
                                      workers=cfg.workers, strict=cfg.strict, pin_memory=pin)
    return DataBundle(loaders, classes or [], 1, pre)


def save_volume(path: str | os.PathLike, volume: np.ndarray) -> None:
    """Write ``volume`` as ``.npy`` or NIfTI (identity affine) by the file's suffix."""
    name = str(path).lower()
    if not name.endswith(VOLUME_SUFFIXES):
        raise ValueError(f"{path}: volume files end in {', '.join(VOLUME_SUFFIXES)}")
    if name.endswith(".npy"):
        np.save(path, volume)
        return
    import nibabel

    nibabel.save(nibabel.Nifti1Image(np.asarray(volume), np.eye(4)), str(path))
