"""Image/mask folders for semantic segmentation, CamVid's layout, and their loaders.

Two layouts are read:

- ``masks`` (``--recipe segmentation``): ``root/train/images/NAME.png`` with
  ``root/train/masks/NAME.png``, ``val/`` likewise, ``test/`` optional. A mask is a
  single-channel PNG (8- or 16-bit, grayscale or palette) whose values are class indices;
  ``--ignore-index`` (default 255) marks void pixels. An optional ``root/classes.txt`` names the
  classes, one per line; without it (and without ``--num-classes``) the classes are 0..max,
  the largest value in the training masks.
- ``camvid``: SegNet's commonly distributed CamVid folders ``train/ trainannot/ val/ valannot/
  test/ testannot/``, 11 classes, and void stored as 11: void becomes the ignore index (255 by
  default), exactly and only that value.

Before training, every mask of a split is read once: a pair whose image or mask cannot be read
is named and skipped (``--strict`` makes it fatal), a mask whose size differs from its image's
and a mask value that is neither a class nor the ignore index are refused by name. Image and
mask go through the same torchvision transforms v2 (the mask as a ``tv_tensors.Mask``), so a
random crop or flip moves both alike; normalisation touches only the image. Batches are padded
to a multiple of :data:`SIZE_MULTIPLE` (image with the mean colour, mask with the ignore
index), so any image size goes through a five-pool FC-DenseNet and no padded pixel is scored.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from .batches import DataBundle, ShardedBatches, epoch_order, rank_slice
from .digit_scenes import CLASS_NAMES as SCENE_CLASSES
from .digit_scenes import SIZE as DIGIT_SCENE_SIZE
from .digit_scenes import digit_scenes
from .imagefolder import BadSample
from .segmetrics import IGNORE_INDEX, PixelObjective

# 2^5: the five 2x2 pools of FC-DenseNet56/67/103 need sides divisible by 32.
SIZE_MULTIPLE = 32
MASKS_LAYOUT = ("root/train/images/NAME.png with root/train/masks/NAME.png, val/ likewise "
                "(test/ optional)")
CAMVID_LAYOUT = "root/train, root/trainannot, root/val, root/valannot (root/test, root/testannot)"
# CamVid's 11 classes in the order of the commonly distributed annotations; 11 is void.
CAMVID_CLASSES = ("sky", "building", "pole", "road", "sidewalk", "tree", "sign", "fence", "car",
                  "pedestrian", "bicyclist")
CAMVID_VOID = 11
SEGMENTATION_DATASETS = ("masks", "camvid", "digit-scenes")


def is_segmentation(cfg: Any) -> bool:
    """Whether a run's dataset is one of masks (the one rule the run, eval and checks use)."""
    return getattr(cfg, "dataset", None) in SEGMENTATION_DATASETS


def objective_of(cfg: Any, num_classes: int) -> PixelObjective:
    """The pixel-wise objective of a segmentation configuration."""
    return PixelObjective(num_classes=num_classes, ignore_index=cfg.ignore_index,
                          class_weights=tuple(cfg.class_weights or ()))


def check_segmentation(cfg: Any) -> None:
    """Refuse the classification-only options a segmentation run cannot apply."""
    given = [flag for flag, on in (
        ("--mixup/--cutmix", cfg.mixup or cfg.cutmix), ("--label-smoothing", cfg.label_smoothing),
        ("--auto-augment", cfg.auto_augment), ("--color-jitter", cfg.color_jitter),
        ("--random-erasing", cfg.random_erasing), ("--cuda-graphs", cfg.cuda_graphs),
        ("--val-split", cfg.val_split)) if on]
    if given:
        raise ValueError(f"{', '.join(given)} apply to classification; a segmentation run "
                         f"({cfg.recipe}) takes crops and flips only: drop them")
    if cfg.augmentation not in ("none", "standard"):
        raise ValueError(f"--augment {cfg.augmentation} is for classification; segmentation "
                         "takes standard (random crop and flip) or none")


# ---------------------------------------------------------------------------- the files


@dataclass(frozen=True)
class Pair:
    image: str
    mask: str


def split_dirs(root: Path, split: str, dataset: str) -> tuple[Path, Path]:
    """The image and mask folders of ``split`` in the layout of ``dataset``."""
    if dataset == "camvid":
        return root / split, root / f"{split}annot"
    return root / split / "images", root / split / "masks"


def find_pairs(images: Path, masks: Path, layout: str) -> list[Pair]:
    """Each image with the mask of the same name (``NAME.png``); an image without one is
    refused by name."""
    for d in (images, masks):
        if not d.is_dir():
            raise FileNotFoundError(f"{d} does not exist; expected {layout}")
    files = sorted(f for f in os.listdir(images) if f.lower().endswith(IMG_EXTENSIONS)
                   and not f.startswith("."))
    if not files:
        raise FileNotFoundError(f"no images in {images}; expected {layout}")
    pairs = []
    for f in files:
        mask = masks / (Path(f).stem + ".png")
        if not mask.is_file():
            raise ValueError(f"{images / f} has no mask: expected {mask} ({layout})")
        pairs.append(Pair(str(images / f), str(mask)))
    return pairs


def read_mask(path: str) -> np.ndarray:
    """A mask file's class indices (H, W); ValueError for multi-channel images."""
    with Image.open(path) as m:
        if m.mode not in ("L", "P", "I", "I;16", "I;16L", "I;16B", "1"):
            raise ValueError(f"mask {path} is a {m.mode} image; masks are single-channel PNGs "
                             "of class indices (grayscale or palette)")
        return np.asarray(m, dtype=np.int64)


def remap_void(mask: np.ndarray, void: int | None, ignore_index: int) -> np.ndarray:
    """The layout's void value (CamVid: 11) replaced by the ignore index, nothing else."""
    if void is None or void == ignore_index:
        return mask
    return np.where(mask == void, ignore_index, mask)


def _checked(pair: Pair, void: int | None, ignore_index: int) -> tuple[int | None, str | None]:
    """(largest class index of the mask, None) or (None, why the pair is unreadable); a mask
    whose size is not its image's is refused."""
    try:
        with Image.open(pair.image) as img:
            size = img.size
        mask = remap_void(read_mask(pair.mask), void, ignore_index)
    except ValueError:
        raise
    except Exception as e:  # PIL raises many types for truncated or foreign files
        return None, f"{type(e).__name__}: {e}"
    if (mask.shape[1], mask.shape[0]) != size:
        raise ValueError(f"mask {pair.mask} is {mask.shape[1]}x{mask.shape[0]} but its image "
                         f"{pair.image} is {size[0]}x{size[1]}; a mask labels each pixel of "
                         "its image")
    labels = mask[mask != ignore_index]
    if labels.size and labels.min() < 0:
        raise ValueError(f"mask {pair.mask} holds negative values")
    return (int(labels.max()) if labels.size else -1), None


class MaskFolder(Dataset):
    """The readable image/mask pairs of one split; item ``(i, seed)`` is the transformed
    (image (C, H, W) float, mask (H, W) int64), or a :class:`BadSample` for a file that
    stopped reading since the scan."""

    def __init__(self, images: Path, masks: Path, transform, *, layout: str, channels: int = 3,
                 void: int | None = None, ignore_index: int = IGNORE_INDEX,
                 strict: bool = False) -> None:
        self.transform, self.channels, self.void = transform, channels, void
        self.ignore_index = ignore_index
        self.samples: list[Pair] = []
        self.skipped: list[BadSample] = []
        self.max_label = -1
        self.max_label_file = ""
        for pair in find_pairs(images, masks, layout):
            top, why = _checked(pair, void, ignore_index)
            if why is not None:
                if strict:
                    raise ValueError(f"unreadable pair {pair.image} / {pair.mask} ({why}); "
                                     "remove or replace it, or drop --strict to skip it")
                self.skipped.append(BadSample(pair.mask, why))
                print(f"densenets: skipped unreadable pair {pair.image} / {pair.mask} ({why})",
                      file=sys.stderr)
                continue
            self.samples.append(pair)
            if top is not None and top > self.max_label:
                self.max_label, self.max_label_file = top, pair.mask
        if not self.samples:
            raise FileNotFoundError(f"no readable image/mask pairs in {images}; expected "
                                    f"{layout}")

    def check_classes(self, num_classes: int) -> None:
        """Refuse a mask value that is neither a class index nor the ignore index."""
        if self.max_label >= num_classes:
            raise ValueError(f"mask {self.max_label_file} holds {self.max_label}, which is not "
                             f"a class (0..{num_classes - 1}) nor the ignore index "
                             f"{self.ignore_index}; fix the mask, or set --num-classes or "
                             "--ignore-index")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int | None]) -> Any:
        index, seed = key
        pair = self.samples[index]
        try:
            with Image.open(pair.image) as img:
                image = img.convert("L" if self.channels == 1 else "RGB")
            mask = remap_void(read_mask(pair.mask), self.void, self.ignore_index)
        except Exception as e:  # PIL raises many types for truncated or foreign files
            return BadSample(pair.image, f"{type(e).__name__}: {e}")
        pair_tensors = (tv_tensors.Image(torch.from_numpy(np.array(image)).reshape(
            image.size[1], image.size[0], -1).permute(2, 0, 1)),
            tv_tensors.Mask(torch.from_numpy(mask)))
        if seed is None:
            return _plain(self.transform(*pair_tensors))
        with torch.random.fork_rng(devices=[]):  # only the CPU generator: see imagefolder
            torch.default_generator.manual_seed(seed)
            return _plain(self.transform(*pair_tensors))


def _plain(pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    image, mask = pair
    return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()


def joint_transform(crop: int, mean: Sequence[float], std: Sequence[float], *, train: bool,
                    ignore_index: int = IGNORE_INDEX, flip: bool = True) -> v2.Compose:
    """Scale to [0, 1] and normalise the image; when training, a random ``crop`` x ``crop``
    window (0: the whole image) padded where the image is smaller (image: the mean colour,
    mask: void) and a horizontal flip, applied to image and mask alike."""
    ops: list[Any] = [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
                      v2.Normalize(list(mean), list(std))]
    if train and crop:
        ops.append(v2.RandomCrop(crop, pad_if_needed=True,
                                 fill={tv_tensors.Image: 0.0, tv_tensors.Mask: ignore_index}))
    if train and flip:
        ops.append(v2.RandomHorizontalFlip())
    return v2.Compose(ops)


def pad_batch(images: list[torch.Tensor], masks: list[torch.Tensor], ignore_index: int,
              multiple: int = SIZE_MULTIPLE) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack images and masks of any sizes, padded right and bottom to the largest side
    rounded up to ``multiple`` (images with 0, the mean colour; masks with void)."""
    h = max(m.shape[-2] for m in masks)
    w = max(m.shape[-1] for m in masks)
    h, w = -(-h // multiple) * multiple, -(-w // multiple) * multiple
    x = torch.stack([F.pad(i, (0, w - i.shape[-1], 0, h - i.shape[-2])) for i in images])
    y = torch.stack([F.pad(m, (0, w - m.shape[-1], 0, h - m.shape[-2]), value=ignore_index)
                     for m in masks])
    return x, y


class _Collate:
    """Pads a batch's readable pairs; hands the unreadable ones back (a class: workers pickle
    it)."""

    def __init__(self, ignore_index: int) -> None:
        self.ignore_index = ignore_index

    def __call__(self, items: list) -> tuple[torch.Tensor, torch.Tensor, list[BadSample]]:
        bad = [it for it in items if isinstance(it, BadSample)]
        good = [it for it in items if not isinstance(it, BadSample)]
        if not good:
            return torch.empty(0), torch.empty(0, dtype=torch.int64), bad
        x, y = pad_batch([g[0] for g in good], [g[1] for g in good], self.ignore_index)
        return x, y, bad


class _Keyed(Dataset):
    def __init__(self, dataset: Dataset, keys: list[tuple[int, int | None]]) -> None:
        self.dataset, self.keys = dataset, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[self.keys[i]]


def _worker_init(_: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the training process


class MaskLoader(ShardedBatches):
    """Batches of a :class:`MaskFolder`: (images (N, C, H, W), masks (N, H, W)), each pair's
    crop and flip seeded from (seed, epoch, index), so a resumed epoch is reproduced."""

    def __init__(self, dataset: MaskFolder, batch_size: int, *, shuffle: bool = False,
                 seed: int = 0, workers: int = 0, strict: bool = False) -> None:
        self.dataset, self.batch_size, self.shuffle, self.seed = dataset, batch_size, shuffle, seed
        self.num_samples = len(dataset)
        self.readable = len(dataset)
        self.workers, self.strict = workers, strict
        self.reported: set[str] = set()
        self.rank, self.world_size, self.keep_tail = 0, 1, True

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = epoch_order(self.num_samples, self.seed, epoch, self.shuffle)
        base = (int(self.seed) * 1_000_003 + int(epoch)) * 10_000_019
        parts, keys = [], []
        for b in range(start, len(self)):
            mine = rank_slice(self.global_size(b), self.rank, self.world_size)
            chosen = order[b * self.batch_size + mine.start:b * self.batch_size + mine.stop]
            parts.append(list(range(len(keys), len(keys) + len(chosen))))
            keys += [(int(i), (base + int(i)) % 2**63) for i in chosen]
        if not parts:
            return
        loader = DataLoader(_Keyed(self.dataset, keys), batch_sampler=parts,
                            num_workers=self.workers, worker_init_fn=_worker_init,
                            collate_fn=_Collate(self.dataset.ignore_index))
        for x, y, bad in loader:
            for b in bad:
                if self.strict:
                    raise ValueError(f"unreadable image {b.path} ({b.reason}); remove or "
                                     "replace it, or drop --strict to skip it")
                if b.path not in self.reported:
                    self.reported.add(b.path)
                    print(f"densenets: skipped unreadable image {b.path} ({b.reason})",
                          file=sys.stderr)
            yield x, y


class MaskTensorLoader(ShardedBatches):
    """Batches of an in-memory segmentation set (images (N, C, H, W) in [0, 1], masks
    (N, H, W)), normalised on the device; no augmentation."""

    def __init__(self, images: torch.Tensor, masks: torch.Tensor, batch_size: int,
                 mean: Sequence[float], std: Sequence[float], *, shuffle: bool = False,
                 seed: int = 0, device: str | torch.device = "cpu") -> None:
        c = images.shape[1]
        mean_t = torch.tensor(list(mean), dtype=torch.float32).expand(c).view(1, c, 1, 1)
        std_t = torch.tensor(list(std), dtype=torch.float32).expand(c).view(1, c, 1, 1)
        self.images = ((images.float() - mean_t) / std_t).to(device)
        self.masks = masks.long().to(device)
        self.num_samples, self.batch_size = len(masks), batch_size
        self.shuffle, self.seed = shuffle, seed
        self.rank, self.world_size, self.keep_tail = 0, 1, True

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = epoch_order(self.num_samples, self.seed, epoch, self.shuffle)
        for b in range(start, len(self)):
            mine = rank_slice(self.global_size(b), self.rank, self.world_size)
            sel = order[b * self.batch_size + mine.start:b * self.batch_size + mine.stop]
            sel = sel.to(self.images.device)
            yield self.images[sel], self.masks[sel]


# ---------------------------------------------------------------------------- per recipe


def _class_names(cfg: Any, root: Path, train: MaskFolder | None) -> list[str]:
    if cfg.dataset == "camvid":
        return list(CAMVID_CLASSES)
    given = (cfg.model_overrides or {}).get("num_classes")
    listed = root / "classes.txt"
    if listed.is_file():
        names = [line.strip() for line in listed.read_text().splitlines() if line.strip()]
        if given and given != len(names):
            raise ValueError(f"--num-classes {given} but {listed} names {len(names)} classes")
        return names
    if given:
        return [str(i) for i in range(given)]
    if train is None:
        raise ValueError(f"the number of classes is not known: add {listed} (one class name "
                         "per line) or pass --num-classes")
    return [str(i) for i in range(train.max_label + 1)]


def _channels(cfg: Any) -> int:
    return int((cfg.model_overrides or {}).get("in_channels") or 3)


def _stats(values: Sequence[float], channels: int) -> list[float]:
    """The recipe's per-channel statistics for ``channels`` (one channel: their mean)."""
    values = list(values)
    if len(values) == channels:
        return values
    return [sum(values) / len(values)] * channels


def build_mask_data(cfg: Any, device: str | torch.device,
                    splits: Sequence[str] = ("train", "val", "test")) -> DataBundle:
    """Loaders over a ``masks`` or ``camvid`` folder (``cfg.data_dir``) for ``splits``."""
    layout = CAMVID_LAYOUT if cfg.dataset == "camvid" else MASKS_LAYOUT
    if not cfg.data_dir:
        raise ValueError(f"recipe {cfg.recipe} needs --data-dir DIR laid out as {layout}")
    root = Path(cfg.data_dir)
    void = CAMVID_VOID if cfg.dataset == "camvid" else None
    channels = _channels(cfg)
    mean, std = _stats(cfg.mean, channels), _stats(cfg.std, channels)
    required = set(splits) if len(splits) == 1 else {"train", "val"}
    folders: dict[str, MaskFolder] = {}
    for split in ("train", "val", "test"):
        images, masks = split_dirs(root, split, cfg.dataset)
        if split not in splits or (split not in required and not images.is_dir()):
            continue
        training = split == "train"
        tf = joint_transform(cfg.crop, mean, std, train=training, ignore_index=cfg.ignore_index,
                             flip=training and cfg.augmentation != "none")
        folders[split] = MaskFolder(images, masks, tf, layout=layout, channels=channels,
                                    void=void, ignore_index=cfg.ignore_index, strict=cfg.strict)
    names = _class_names(cfg, root, folders.get("train"))
    for ds in folders.values():
        ds.check_classes(len(names))
    loaders = {split: MaskLoader(ds, cfg.batch_size if split == "train" else
                                 max(1, cfg.batch_size), shuffle=split == "train",
                                 seed=cfg.seed, workers=cfg.workers, strict=cfg.strict)
               for split, ds in folders.items()}
    return DataBundle(loaders, names, channels, preprocessing(cfg, mean, std))


def preprocessing(cfg: Any, mean: Sequence[float], std: Sequence[float]) -> dict[str, Any]:
    """What a segmentation checkpoint records for inference: whole images scaled to [0, 1],
    normalised, padded to a multiple of :data:`SIZE_MULTIPLE`; ``crop`` is the training crop
    (the size an export traces at)."""
    return {"resize": None, "crop": cfg.crop or 224, "mean": list(mean), "std": list(std),
            "interpolation": "bilinear", "task": "segmentation",
            "ignore_index": cfg.ignore_index, "size_multiple": SIZE_MULTIPLE}


def build_scene_data(cfg: Any, device: str | torch.device,
                     splits: Sequence[str] = ("train", "val", "test")) -> DataBundle:
    """The digit scenes (:mod:`densenets.training.digit_scenes`) held on the device."""
    if "val" in splits and len(splits) == 1:
        raise ValueError("the digit scenes have train and test splits only; use --split test")
    scenes = digit_scenes()
    loaders = {split: MaskTensorLoader(*scenes[split], cfg.batch_size, cfg.mean, cfg.std,
                                       shuffle=split == "train", seed=cfg.seed, device=device)
               for split in ("train", "test") if split in splits}
    pre = {**preprocessing(cfg, cfg.mean, cfg.std), "crop": DIGIT_SCENE_SIZE}
    return DataBundle(loaders, list(SCENE_CLASSES), 1, pre)


def build_segmentation_data(cfg: Any, device: str | torch.device,
                            splits: Sequence[str] = ("train", "val", "test")) -> DataBundle:
    """The loaders of a segmentation dataset (``masks``, ``camvid`` or ``digit-scenes``)."""
    if cfg.dataset == "digit-scenes":
        return build_scene_data(cfg, device, splits)
    return build_mask_data(cfg, device, splits)
