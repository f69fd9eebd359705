"""The preprocessing a checkpoint records, applied: how an image or volume file becomes the
tensor its model was trained on.

Training (image and volume folders) and inference (``predict``) both read files through these
functions, so a prediction sees exactly what training saw. It lives with the weights because it
is part of what a checkpoint means, and below both training and deployment, which may not
import each other.

Images: 8-bit files are read as they are (converted to the model's channel count); wider
grayscale files (16-bit PNG, 32-bit TIFF) are scaled by their type's range to [0, 1], never
clipped to 8 bits. Volumes (``.npy``, ``.nii``, ``.nii.gz``): intensities windowed or z-scored
per volume, then resampled (trilinear) to the recorded size.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------- images

MODES = {1: "L", 3: "RGB", 4: "RGBA"}

# Grayscale modes wider than 8 bits, and the value that means white in each. PIL's convert()
# to "L" or "RGB" clips these at 255 (a 16-bit image turns almost white), so they are scaled.
HIGH_BIT_DEPTH = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": None,
                  "F": None}
# Modes whose files hold one channel: a folder of only these trains a one-channel model.
ONE_CHANNEL = frozenset({"1", "L", *HIGH_BIT_DEPTH})

# What the preprocessing record says about wide grayscale files (``high_bit_depth``).
TYPE_RANGE = "scaled by the type's range to 0..1"


def open_image(path: str | os.PathLike, in_channels: int, notes: list[str] | None = None):
    """A PIL image in the mode the model takes; ValueError saying why a file is unusable.

    High-bit-depth grayscale comes back as a mode "F" image with values in [0, 1] (see
    :func:`unit_float`; :func:`match_channels` makes its tensor the model's channel count);
    ``notes`` (when given) receives a line for each conversion made.
    """
    from PIL import Image, ImageOps

    if in_channels not in MODES:
        raise ValueError(f"cannot make {in_channels}-channel inputs from image files (only 1, "
                         "3 or 4 channels)")
    notes = notes if notes is not None else []
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)  # photos are often stored rotated
            if img.mode in HIGH_BIT_DEPTH:
                return unit_float(img, notes)
            if img.mode != MODES[in_channels]:
                notes.append(f"converted {img.mode} to {MODES[in_channels]}")
            return img.convert(MODES[in_channels])
    except FileNotFoundError:
        raise ValueError("no such file") from None
    except IsADirectoryError:
        raise ValueError("is a directory") from None
    except Exception as e:  # PIL raises many types for truncated or foreign files
        raise ValueError(f"not a readable image ({type(e).__name__}: {e})") from None


def unit_float(img, notes: list[str]):
    """A high-bit-depth grayscale image as mode "F" in [0, 1], scaled by its type's range."""
    from PIL import Image

    a = np.asarray(img, dtype=np.float64)
    white = HIGH_BIT_DEPTH[img.mode]
    if white is None:  # 32-bit "I" (older Pillow reads 16-bit PNGs so) and "F": the values
        # carry no range of their own, so take the smallest usual one that holds them all.
        top = float(a.max(initial=0.0))
        ranges = (1.0, 255.0, 65535.0) if img.mode == "F" else (255.0, 65535.0)
        white = next((r for r in ranges if top <= r), top)
    if white != 1:
        notes.append(f"{img.mode} grayscale scaled from 0..{white:g} to 0..1")
    return Image.fromarray(np.clip(a / white, 0, 1).astype(np.float32), mode="F")


def match_channels(x: torch.Tensor, channels: int, notes: list[str] | None = None
                   ) -> torch.Tensor:
    """A (1, H, W) grayscale tensor repeated for a colour model (a 4th channel is opaque
    alpha); any other tensor as it is. Only wide grayscale files reach a colour model with one
    channel: PIL converts 8-bit files to the model's mode when they are opened."""
    if x.shape[0] != 1 or channels == 1:
        return x
    if notes is not None:
        notes.append(f"grayscale repeated to {min(channels, 3)} channels")
    return torch.cat([x.expand(min(channels, 3), -1, -1),
                      torch.ones_like(x).expand(channels - 3, -1, -1)])


def channel_stats(values: Sequence[float], channels: int) -> list[float]:
    """Per-channel statistics for ``channels``: as given when they fit, one value repeated, or
    the mean of the colour channels' for a one-channel model (the gray of those colours)."""
    values = [float(v) for v in values]
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1:
        return [sum(values) / len(values)]
    raise ValueError(f"{len(values)} mean/std values cannot normalise {channels}-channel "
                     f"images; give {channels} (or one)")


# ---------------------------------------------------------------------------- volumes

VOLUME_SUFFIXES = (".npy", ".nii", ".nii.gz")


def is_volume_file(name: str) -> bool:
    """Whether ``name`` is a volume format :func:`read_volume` reads."""
    return name.lower().endswith(VOLUME_SUFFIXES)


def _nibabel():
    try:
        import nibabel
    except ImportError:
        raise ValueError("reading NIfTI files needs nibabel: pip install 'densenets[medical]' "
                         "(or pip install nibabel)") from None
    return nibabel


def read_volume(path: str | os.PathLike) -> torch.Tensor:
    """The (D, H, W) float32 voxels of a ``.npy``, ``.nii`` or ``.nii.gz`` file, axes in the
    file's array order (NIfTI: its scaled values, e.g. Hounsfield units; no reorientation).

    A trailing (NIfTI) or leading (``.npy``) axis of length 1 is one channel and is dropped.
    ValueError saying why for a file that is not one finite 3D volume.
    """
    name = str(path).lower()
    if not is_volume_file(name):
        raise ValueError(f"not a volume file (expected {', '.join(VOLUME_SUFFIXES)})")
    nib = None if name.endswith(".npy") else _nibabel()
    try:
        if nib is None:
            a = np.load(path, allow_pickle=False)  # pickles could run code: never
            a = a[0] if a.ndim == 4 and a.shape[0] == 1 else a
        else:
            a = nib.load(str(path)).get_fdata(dtype=np.float32)
            a = a[..., 0] if a.ndim == 4 and a.shape[-1] == 1 else a
    except FileNotFoundError:
        raise ValueError("no such file") from None
    except Exception as e:  # numpy, gzip and nibabel raise many types for damaged files
        raise ValueError(f"not a readable volume ({type(e).__name__}: {e})") from None
    if a.ndim != 3:
        raise ValueError(f"a 3D volume was expected, this one has shape {tuple(a.shape)}")
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_) \
            or np.iscomplexobj(a):
        raise ValueError(f"voxels of type {a.dtype} are not intensities")
    x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    if not torch.isfinite(x).all():
        raise ValueError("the volume holds NaN or infinite values")
    return x


def scale_intensity(x: torch.Tensor, window: Sequence[float] | None = None) -> torch.Tensor:
    """Window [LO, HI] mapped to [0, 1] (values outside clipped, as for CT), or without a
    window the volume z-scored by its own mean and standard deviation."""
    if window:
        lo, hi = float(window[0]), float(window[1])
        return (x.clamp(lo, hi) - lo) / (hi - lo)
    mean, std = x.double().mean(), x.double().std(correction=0)
    return ((x - mean) / std if std > 0 else x - mean).float()


def resample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """A (C, D, H, W) volume resampled to ``size`` (D, H, W) by trilinear interpolation."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[1:]) == size:
        return x
    return F.interpolate(x[None], size=size, mode="trilinear", align_corners=False)[0]


def check_window(window: Sequence[float] | None) -> None:
    """ValueError unless ``window`` is empty or two numbers LO < HI."""
    if window and (len(window) != 2 or not float(window[0]) < float(window[1])):
        raise ValueError(f"--intensity-window takes LO HI with LO < HI, got {list(window)}")


def check_volume_size(size: Sequence[int]) -> None:
    """ValueError unless ``size`` is empty (no volumes) or three positive sides (D, H, W)."""
    if size and (len(size) != 3 or min(int(s) for s in size) < 1):
        raise ValueError(f"--volume-size takes three positive sides D H W, got {list(size)}")


def volume_preprocessing(size: Sequence[int], window: Sequence[float] | None
                         ) -> dict[str, Any]:
    """What a volume checkpoint records: its size, intensity scaling and (identity) mean/std."""
    return {"volume_size": [int(s) for s in size],
            "intensity_window": [float(w) for w in window] if window else None,
            "interpolation": "trilinear", "channels": 1, "mean": [0.0], "std": [1.0]}


def is_volume_preprocessing(preprocessing: dict[str, Any]) -> bool:
    """Whether a checkpoint's preprocessing is for volumes (else images)."""
    return bool(preprocessing.get("volume_size"))


def volume_input(x: torch.Tensor, preprocessing: dict[str, Any],
                 notes: list[str] | None = None) -> torch.Tensor:
    """A (D, H, W) volume as the (1, D, H, W) model input ``preprocessing`` records: the
    intensity scaling of the whole volume, then the resampling (what evaluation does)."""
    notes = notes if notes is not None else []
    window = preprocessing.get("intensity_window")
    size = preprocessing["volume_size"]
    notes.append(f"windowed to [{window[0]:g}, {window[1]:g}] -> [0, 1]" if window
                 else "z-scored by the volume's mean and standard deviation")
    if list(x.shape) != list(size):
        notes.append(f"resampled {'x'.join(map(str, x.shape))} to "
                     f"{'x'.join(map(str, size))} (trilinear)")
    x = resample(scale_intensity(x, window)[None], size)
    mean = torch.tensor(preprocessing.get("mean", [0.0])).view(-1, 1, 1, 1)
    std = torch.tensor(preprocessing.get("std", [1.0])).view(-1, 1, 1, 1)
    return (x - mean) / std
