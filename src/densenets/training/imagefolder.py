"""Image-folder datasets (ImageNet and your own): ``root/{train,val,test}/<class>/<image>``.

Files are read as ``predict`` reads them (:mod:`densenets.weights.preprocessing`): 8-bit images
as they are, wider grayscale (16-bit PNG) scaled by its type's range, never clipped; a folder of
one-channel images trains a one-channel model unless ``--in-channels`` says otherwise, and the
checkpoint records the channels, the bit-depth scaling and the statistics used.

Unreadable images are reported by path and skipped (``strict`` makes them fatal), so one bad
file does not end a long run. Each image's augmentation is seeded from (seed, epoch, index):
the result does not depend on the number of workers, and a resumed epoch is reproduced exactly.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import transforms as T
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from ..weights.preprocessing import (
    HIGH_BIT_DEPTH,
    ONE_CHANNEL,
    TYPE_RANGE,
    channel_stats,
    match_channels,
    open_image,
)
from .batches import DataBundle, ShardedBatches, epoch_order, preprocessing_of, rank_slice
from .modern import parse_auto_augment

LAYOUT = "root/train/<class>/*.jpg and root/val/<class>/*.jpg (optionally root/test/)"


class BadSample(NamedTuple):
    path: str
    reason: str


class Lighting:
    """PCA colour noise ("lighting") of the ImageNet recipe, on a [0, 1] RGB tensor."""

    EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
    EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009],
                           [-0.5808, -0.0045, -0.8140],
                           [-0.5836, -0.6948, 0.4203]])

    def __init__(self, alphastd: float = 0.1) -> None:
        self.alphastd = alphastd

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        alpha = torch.randn(3) * self.alphastd
        rgb = (self.EIGVEC * alpha * self.EIGVAL).sum(1)
        if img.shape[0] == 1:  # a grayscale image: the gray of the coloured light
            return img + rgb.mean()
        return img + rgb.view(3, 1, 1)


def pixel_augmentation(auto_augment: str = "", color_jitter: float = 0.0) -> Any | None:
    """The per-image colour/geometry op of the modern recipes, or None when both are off.

    ``auto_augment`` (``rand-m<M>-n<N>`` or ``trivial``, see
    :func:`~densenets.training.modern.parse_auto_augment`) gives torchvision's RandAugment or
    TrivialAugmentWide; otherwise ``color_jitter`` > 0 gives ColorJitter of that brightness,
    contrast and saturation. Colour jitter is *not* applied while an auto-augment policy is on:
    the published ImageNet pipelines (timm's, torchvision's) behave so, as the policy already
    changes colours. The op accepts PIL images and uint8 or float [0, 1] tensors of 1 or 3
    channels.
    """
    kind, args = parse_auto_augment(auto_augment)
    if not color_jitter >= 0:
        raise ValueError(f"color_jitter must be >= 0 (0 turns it off), got {color_jitter}")
    if kind == "rand":
        return v2.RandAugment(num_ops=args["num_ops"], magnitude=args["magnitude"])
    if kind == "trivial":
        return v2.TrivialAugmentWide()
    if color_jitter > 0:
        return v2.ColorJitter(color_jitter, color_jitter, color_jitter)
    return None


def erasing(random_erasing: float = 0.0) -> Any | None:
    """RandomErasing with probability ``random_erasing`` (None when 0), for normalised images.

    The patch is filled with 0, which after normalisation is the mean colour.
    """
    if not 0 <= random_erasing <= 1:
        raise ValueError(f"random_erasing is a probability in [0, 1], got {random_erasing}")
    return v2.RandomErasing(p=random_erasing, value=0) if random_erasing > 0 else None


def train_transform(crop: int, resize: int | None, mean, std, augment: bool | str, *,
                    auto_augment: str = "", color_jitter: float = 0.0,
                    random_erasing: float = 0.0) -> T.Compose:
    """The training transform of an augmentation policy (``--augment``) and its extras.

    ``"imagenet"`` (or True): scale/aspect crop, flip, colour jitter and lighting.
    ``"standard"``: the paper's CIFAR "+": the evaluation resize and centre crop, then zero-pad 4
    pixels after normalising (so padding is the mean colour, as for the in-memory datasets),
    a random crop back to size and a horizontal flip. ``"none"`` (or False): the evaluation
    transform. ``"modern"``: the scale/aspect crop and flip of current ImageNet recipes.

    The extras apply on top of any policy: the op of :func:`pixel_augmentation` (RandAugment or
    TrivialAugmentWide for ``auto_augment``, else ColorJitter for ``color_jitter``; colour
    jitter is skipped while an auto-augment policy is on, as in the published ImageNet
    pipelines) runs on the PIL image before it becomes a tensor, and RandomErasing with
    probability ``random_erasing`` runs last, after normalising, filling with the mean colour.
    ``"imagenet"`` keeps the paper's own jitter and takes no second one from ``color_jitter``.
    Without extras every policy is exactly what it was before the extras existed.
    """
    policy = ("imagenet" if augment else "none") if isinstance(augment, bool) else augment
    if policy not in ("none", "standard", "imagenet", "modern"):
        raise ValueError(f"unknown augmentation {augment!r}; use none, standard, imagenet or "
                         "modern")
    # ImageNet has its own jitter: drop a second one (a negative value still reaches the check).
    own_jitter = policy == "imagenet" and color_jitter >= 0
    pixel = pixel_augmentation(auto_augment, 0.0 if own_jitter else color_jitter)
    erase = erasing(random_erasing)
    colour = [pixel] if pixel is not None else []
    last = [erase] if erase is not None else []
    norm = T.Normalize(mean, std)
    tensor = [T.ToTensor()]
    if policy == "imagenet":
        return T.Compose([T.RandomResizedCrop(crop), T.RandomHorizontalFlip(),
                          T.ColorJitter(0.4, 0.4, 0.4), *colour, *tensor, Lighting(0.1),
                          norm, *last])
    if policy == "modern":
        return T.Compose([T.RandomResizedCrop(crop), T.RandomHorizontalFlip(), *colour,
                          *tensor, norm, *last])
    if policy == "standard":
        return T.Compose([T.Resize(resize or crop), T.CenterCrop(crop), *colour, *tensor,
                          norm, T.RandomCrop(crop, padding=4), T.RandomHorizontalFlip(), *last])
    if not colour and not last:
        return eval_transform(crop, resize, mean, std)
    return T.Compose([T.Resize(resize or crop), T.CenterCrop(crop), *colour, *tensor,
                      norm, *last])


def eval_transform(crop: int, resize: int | None, mean, std) -> T.Compose:
    """Resize the shorter side (bilinear), centre crop, normalise."""
    return T.Compose([T.Resize(resize or crop), T.CenterCrop(crop), T.ToTensor(),
                      T.Normalize(mean, std)])


def ten_crop_transform(crop: int, resize: int | None, mean, std,
                       channels: int = 3) -> T.Compose:
    """The paper's 10-crop evaluation: four corners and the centre, and their mirror images."""
    return T.Compose([T.Resize(resize or crop), T.TenCrop(crop),
                      _StackCrops(mean, std, channels)])


class _StackCrops:
    """The ten PIL crops as one normalised (10, C, H, W) tensor (a class, so workers can pickle)."""

    def __init__(self, mean, std, channels: int = 3) -> None:
        self.to_tensor, self.norm = T.ToTensor(), T.Normalize(mean, std)
        self.channels = channels

    def __call__(self, crops) -> torch.Tensor:
        return torch.stack([self.norm(match_channels(self.to_tensor(c), self.channels))
                            for c in crops])


# PIL runs its colour operations on 8-bit images only: a wide grayscale image (mode "F", see
# open_image) goes through them as a float tensor in [0, 1], which these ops also take.
_COLOUR_OPS = (T.ColorJitter, v2.ColorJitter, v2.RandAugment, v2.TrivialAugmentWide)


def apply_transform(transform, img, channels: int = 3) -> Any:
    """``transform(img)``. A float ("F") image, a wide grayscale file, runs each colour op on
    its tensor and is repeated to ``channels`` once a tensor (:func:`match_channels`, as
    ``predict`` does); 8-bit files were opened in the model's mode already."""
    if not (isinstance(img, Image.Image) and img.mode == "F"
            and isinstance(transform, T.Compose)):
        return transform(img)
    for op in transform.transforms:
        if isinstance(img, Image.Image) and isinstance(op, _COLOUR_OPS):
            out = op(T.functional.pil_to_tensor(img))
            img = Image.fromarray(out[0].clamp(0, 1).numpy(), mode="F")
        elif isinstance(op, T.ToTensor):
            img = match_channels(op(img), channels)
        else:
            img = op(img)
    return img


PROBE_LIMIT = 50_000  # more files than this, and reading their headers would delay the start


class SafeImageFolder(Dataset):
    """An ImageFolder whose unreadable images come back as :class:`BadSample` markers.

    Images are opened as ``predict`` opens them, for a model of ``channels`` channels.
    Subclasses read other files by changing :attr:`noun`, :attr:`layout`, :meth:`accepts`,
    :meth:`read` and :meth:`probe` (:class:`~densenets.training.volumes.VolumeFolder`).
    """

    noun = "image"
    layout = LAYOUT

    def __init__(self, root: str | os.PathLike, transform, class_names: list[str] | None = None,
                 strict: bool = False, channels: int = 3) -> None:
        self.root = Path(root)
        self.transform, self.channels = transform, channels
        self._probed: list[str | None] | None = None
        classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir()
                         and not e.name.startswith("."))
        if not classes:
            raise FileNotFoundError(f"{self.root} has no class folders; expected {self.layout}")
        if class_names is not None and classes != list(class_names):
            raise ValueError(f"{self.root} has classes {classes[:5]}... but the training set "
                             f"has {list(class_names)[:5]}...: both must hold the same folders")
        self.classes = classes
        self.samples: list[tuple[str, int]] = []
        self.non_images: list[str] = []
        for idx, name in enumerate(classes):
            for dirpath, dirnames, filenames in sorted(os.walk(self.root / name)):
                dirnames.sort()
                for f in sorted(filenames):
                    if f.startswith("."):
                        continue
                    path = os.path.join(dirpath, f)
                    if self.accepts(f):
                        self.samples.append((path, idx))
                    else:
                        self.non_images.append(path)
        if self.non_images:
            shown = ", ".join(self.non_images[:5]) + (" ..." if len(self.non_images) > 5 else "")
            if strict:
                raise ValueError(f"{len(self.non_images)} non-{self.noun} files in {self.root}: "
                                 f"{shown} (--strict); remove them or drop --strict")
            print(f"densenets: skipping {len(self.non_images)} non-{self.noun} files in "
                  f"{self.root}: {shown}", file=sys.stderr)
        if not self.samples:
            raise FileNotFoundError(f"no {self.noun}s in {self.root}; expected {self.layout}")

    def __len__(self) -> int:
        return len(self.samples)

    @staticmethod
    def accepts(name: str) -> bool:
        """Whether a file of this name is a sample (others are listed and skipped)."""
        return name.lower().endswith(IMG_EXTENSIONS)

    def read(self, path: str) -> Any:
        """The sample the transform takes; ValueError saying why a file is unusable."""
        return open_image(path, self.channels)

    @staticmethod
    def probe(path: str) -> str | None:
        """The file's mode from its header, or None when the header does not parse."""
        try:
            with Image.open(path) as img:
                return img.mode
        except Exception:  # PIL raises many types for truncated or foreign files
            return None

    def probed(self, limit: int = PROBE_LIMIT) -> list[str | None] | None:
        """Each sample's :meth:`probe` (headers only, read once), or None above ``limit``
        samples: reading that many headers would delay the start."""
        if self._probed is None and len(self.samples) <= limit:
            self._probed = [self.probe(path) for path, _ in self.samples]
        return self._probed

    def count_readable(self, limit: int = PROBE_LIMIT) -> int:
        """How many samples open (their headers parse), for the training header.

        Only headers are read, so a file damaged further in is still found (and reported) when
        an epoch reads it; above ``limit`` samples nothing is probed and all are counted.
        """
        modes = self.probed(limit)
        return len(self.samples) if modes is None else sum(m is not None for m in modes)

    def __getitem__(self, key: int | tuple[int, int | None]) -> Any:
        index, seed = key if isinstance(key, tuple) else (key, None)
        path, target = self.samples[index]
        try:
            sample = self.read(path)
        except ValueError as e:
            return BadSample(path, str(e))
        if seed is None:
            return apply_transform(self.transform, sample, self.channels), target
        # Only the CPU generator is forked, so only it is seeded: torch.manual_seed would also
        # reset the caller's CUDA generator (workers=0 runs this in the training process).
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return apply_transform(self.transform, sample, self.channels), target


def collate_skip_bad(items: list) -> tuple[torch.Tensor, torch.Tensor, list[BadSample]]:
    """Stack the readable samples of a batch; hand the unreadable ones back for reporting."""
    bad = [it for it in items if isinstance(it, BadSample)]
    good = [it for it in items if not isinstance(it, BadSample)]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.int64), bad
    x, y = default_collate(good)
    return x, y, bad


def _worker_init(_: int) -> None:
    # Ctrl-C belongs to the main process, which finishes its step and saves; workers carry on.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class FolderLoader(ShardedBatches):
    """Batches of a :class:`SafeImageFolder`, with worker processes and per-image seeds."""

    def __init__(self, dataset: SafeImageFolder, batch_size: int, *, shuffle: bool = False,
                 seed: int = 0, workers: int = 0, strict: bool = False,
                 pin_memory: bool = False) -> None:
        self.dataset = dataset
        self.num_samples = len(dataset)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.workers, self.strict, self.pin_memory = workers, strict, pin_memory
        self.reported: set[str] = set()
        self.rank, self.world_size, self.keep_tail = 0, 1, True
        self._readable: int | None = None

    @property
    def readable(self) -> int:
        """Images of the dataset that will be read (files whose image header parses)."""
        if self._readable is None:
            self._readable = self.dataset.count_readable()
        return self._readable

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = epoch_order(self.num_samples, self.seed, epoch, self.shuffle)
        base = (int(self.seed) * 1_000_003 + int(epoch)) * 10_000_019
        parts, keys = [], []
        for b in range(start, len(self)):  # this process's slice of each global batch
            mine = rank_slice(self.global_size(b), self.rank, self.world_size)
            chosen = order[b * self.batch_size + mine.start:b * self.batch_size + mine.stop]
            parts.append(list(range(len(keys), len(keys) + len(chosen))))
            keys += [(int(i), (base + int(i)) % 2**63 if self.shuffle else None)
                     for i in chosen]
        if not parts:
            return
        loader = DataLoader(_KeyedView(self.dataset, keys), batch_sampler=parts,
                            num_workers=self.workers,
                            collate_fn=collate_skip_bad, worker_init_fn=_worker_init,
                            pin_memory=self.pin_memory)
        for x, y, bad in loader:
            self._report(bad)
            yield x, y  # possibly empty: the trainer skips it but keeps counting batches

    def _report(self, bad: list[BadSample]) -> None:
        noun = getattr(self.dataset, "noun", "image")
        for b in bad:
            if self.strict:
                raise ValueError(f"unreadable {noun} {b.path} ({b.reason}); remove or replace "
                                 "it, or drop --strict to skip such files")
            if b.path not in self.reported:
                self.reported.add(b.path)
                print(f"densenets: skipped unreadable {noun} {b.path} ({b.reason})",
                      file=sys.stderr)


class _KeyedView(Dataset):
    """The samples of one epoch, in order: item i is ``dataset[keys[i]]``."""

    def __init__(self, dataset: SafeImageFolder, keys: list[tuple[int, int | None]]) -> None:
        self.dataset, self.keys = dataset, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[self.keys[i]]


def folder_root(cfg: Any, splits: Sequence[str], layout: str) -> Path:
    """``cfg.data_dir`` with the split folders it needs (the one asked for, else train and
    val), or a one-line error naming what is missing and the ``layout`` expected."""
    if not cfg.data_dir:
        raise ValueError(f"recipe {cfg.recipe} needs --data-dir DIR laid out as {layout}")
    root = Path(cfg.data_dir)
    required = set(splits) if len(splits) == 1 else {"train", "val"}
    for split in sorted(required):
        if not (root / split).is_dir():
            raise FileNotFoundError(f"{root / split} does not exist; {cfg.recipe} expects {layout}")
    return root


def build_folder_data(cfg, device, splits=("train", "val", "test"),
                      ten_crop: bool = False) -> DataBundle:
    """Loaders over ``data_dir/{train,val,test}``; train and val must exist for training."""
    root = folder_root(cfg, splits, LAYOUT)
    pin = torch.device(device).type == "cuda"
    loaders: dict[str, FolderLoader] = {}
    classes: list[str] | None = None
    given = (getattr(cfg, "model_overrides", None) or {}).get("in_channels")
    channels = int(given or 3)  # the first split's files decide when no model size is given
    mean, std = cfg.mean, cfg.std
    for split in ("train", "val", "test"):
        if split not in splits or not (root / split).is_dir():
            continue
        training = split == "train"
        ds = SafeImageFolder(root / split, None, classes, cfg.strict)
        if classes is None:
            channels = int(given or channels_of(ds))
            mean, std = channel_stats(cfg.mean, channels), channel_stats(cfg.std, channels)
            note_high_bit_depth(ds)
        ds.channels = channels
        if training:
            # getattr: a config written before the modern recipes has none of the extras.
            ds.transform = train_transform(
                cfg.crop, cfg.resize, mean, std, cfg.augmentation,
                auto_augment=getattr(cfg, "auto_augment", ""),
                color_jitter=getattr(cfg, "color_jitter", 0.0),
                random_erasing=getattr(cfg, "random_erasing", 0.0))
        elif ten_crop:
            ds.transform = ten_crop_transform(cfg.crop, cfg.resize, mean, std, channels)
        else:
            ds.transform = eval_transform(cfg.crop, cfg.resize, mean, std)
        classes = classes or ds.classes
        bs = cfg.batch_size if training or not ten_crop else max(1, cfg.batch_size // 10)
        loaders[split] = FolderLoader(ds, bs, shuffle=training, seed=cfg.seed,
                                      workers=cfg.workers, strict=cfg.strict, pin_memory=pin)
    # What predict and eval must repeat: the channels, the bit-depth scaling, the statistics.
    pre = {**preprocessing_of(cfg), "mean": mean, "std": std, "channels": channels,
           "high_bit_depth": TYPE_RANGE}
    return DataBundle(loaders, classes or [], channels, pre)


def channels_of(ds: SafeImageFolder) -> int:
    """1 when every readable image of ``ds`` holds one channel (grayscale of any bit depth),
    else 3; 3 when the folder is too large to read every header."""
    modes = {m for m in ds.probed() or [None] if m is not None}
    return 1 if modes and modes <= ONE_CHANNEL else 3


def note_high_bit_depth(ds: SafeImageFolder) -> None:
    """Say once that wide grayscale files are scaled (a silent change of the data is a bug)."""
    wide = sorted({m for m in ds.probed() or [] if m in HIGH_BIT_DEPTH})
    if wide:
        print(f"densenets: {ds.root} holds {'/'.join(wide)} grayscale images: each is {TYPE_RANGE} "
              "(as predict does), not clipped to 8 bits", file=sys.stderr)
