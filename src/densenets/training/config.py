"""The resolved configuration of one training run, each field declared once.

Every field says here what it means, which flag sets it, which values it takes and whether a
resumed run may change it (:mod:`densenets.training.fields`); the command line's flags, the
overrides of :func:`~densenets.training.recipes.resolve`, ``config.json`` and the checks are
read from these declarations. The defaults are the paper's recipe, so an old ``config.json``
without a later field loads as the paper's.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass
from typing import Any

from ..device import HELP as DEVICE_HELP
from ..device import check_device
from ..weights.preprocessing import check_volume_size, check_window
from .fields import FRACTION, PROBABILITY, Flag, above, at_least, check_fields, setting
from .modern import OPTIMIZERS, SCHEDULES, parse_auto_augment

# Training-time augmentation policies (--augment): "standard" is the paper's CIFAR "+" (pad 4,
# random crop, horizontal flip); "imagenet" its ImageNet one (random-resized crop, flip, colour
# jitter, lighting). A recipe's "auto" picks by the crop: ImageNet's scale and aspect crops are
# made for photos, and cut most of a small image away. "modern" is the random-resized crop and
# flip of current ImageNet recipes without the paper's colour jitter and lighting: what follows it
# (auto_augment, color_jitter, random_erasing) is chosen by the recipe fields.
AUGMENTATIONS = ("none", "standard", "imagenet", "modern")

# The --help sections of ``densenets train``, in the order they are shown.
ARCHITECTURE = "architecture overrides"
RECIPE = "recipe overrides"
MODERN = "beyond the paper (the modern recipes set these)"
DATA, RUN, SPEED = "data", "run", "speed"
GROUPS = (RECIPE, MODERN, DATA, RUN, SPEED)


def default_workers() -> int:
    """Loader processes for image folders on this machine (``--workers``' default).

    0 (decode in the training process) with two usable cores or fewer: there, worker processes
    only take cores from the training threads (measured 5.4x slower with 4 workers on 2 cores).
    Otherwise one per usable core but the trainer's, at most 8.
    """
    try:
        cores = len(os.sched_getaffinity(0))  # the cores this process may run on
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return 0 if cores <= 2 else min(cores - 1, 8)


def _modern(help: str | None, metavar: str | None = None, **kw: Any) -> Flag:
    """The flag of a field beyond the paper (its own --help section)."""
    return Flag(MODERN, help, metavar=metavar, **kw)


@dataclass(kw_only=True)
class TrainConfig:
    """Everything one training run needs, in plain JSON types: written as ``config.json``."""

    recipe: str = "digits"
    dataset: str = "digits"
    augment: bool = False  # whether training images are augmented: augmentation != "none"
    augmentation: str = setting("none", flag=Flag(
        RECIPE, "training augmentation (default: the recipe's; folder: standard up to 64 px); "
        "modern = random-resized crop and flip only", names=("--augment",), choices=AUGMENTATIONS))
    data_dir: str | None = setting(None, resumable=True, flag=Flag(
        DATA, "dataset directory (default data/<dataset>)"))
    download: bool = setting(False, resumable=True, flag=Flag(
        DATA, "download CIFAR/SVHN when missing"))
    model: str = setting("densenet-bc-40-k12", flag=Flag(
        None, "zoo name or variant (default: the recipe's)"))
    model_overrides: dict[str, Any] = setting(factory=dict)  # the architecture flags given
    epochs: int = setting(15, check=at_least(1), resumable=True, flag=Flag(RECIPE))
    batch_size: int = setting(64, check=at_least(1), flag=Flag(
        RECIPE, "global batch: under torchrun it is split evenly over the processes (the "
        "paper's batch sizes are global)"))
    lr: float = setting(0.1, check=above(0), flag=Flag(
        RECIPE, "initial (peak) learning rate (step schedule: divided by 10 at 50%% and 75%% of "
        "the epochs; ImageNet at 1/3 and 2/3)"))
    momentum: float = 0.9
    nesterov: bool = True
    dampening: float = 0.0
    weight_decay: float = setting(1e-4, check=at_least(0), flag=Flag(
        RECIPE, "weight decay (the paper's 1e-4; decoupled for AdamW)", metavar="WD"))
    milestones: list[int] = setting(factory=list)  # epochs where the step schedule divides
    gamma: float = 0.1
    drop_rate: float = setting(0.0, flag=Flag(ARCHITECTURE, "dropout after each convolution"))
    val_split: int = setting(0, check=at_least(0, "images"), flag=Flag(
        RECIPE, "hold N training images out for validation (bare flag: the paper's 5000 for "
        "CIFAR, 6000 for SVHN)", metavar="N", nargs="?", const=-1))
    crop: int = setting(32, flag=Flag(  # the resize follows it (resolve's image_size)
        RECIPE, "crop size for folder recipes", names=("--image-size",), dest="image_size"))
    resize: int | None = None
    mean: list[float] = setting(factory=list)
    std: list[float] = setting(factory=list)
    eval_split: str = "test"
    seed: int = setting(0, flag=Flag(RUN))
    device: str = setting("auto", check=check_device, resumable=True, flag=Flag(
        SPEED, DEVICE_HELP))
    threads: int | None = setting(None, check=at_least(1), resumable=True, flag=Flag(
        SPEED, "CPU threads (digits: 1; others: torch's default)"))
    amp: str | None = setting(None, flag=Flag(SPEED, "mixed precision", choices=("bf16", "fp16")))
    channels_last: bool = setting(False, flag=Flag(SPEED))
    compile: bool = setting(False, flag=Flag(SPEED, "torch.compile the model"))
    cuda_graphs: bool = setting(False, flag=Flag(
        SPEED, "replay each training step as one CUDA graph: fewer kernel launches, for small "
        "batches on a GPU (single process; not with --amp fp16)"))
    workers: int = setting(factory=default_workers, check=at_least(0), resumable=True, flag=Flag(
        DATA, "loader processes for image folders (default: 0 on 2 cores or fewer, else one "
        "per core but one, at most 8)"))
    memory_efficient: bool = setting(False, flag=Flag(SPEED, "memory-efficient dense blocks"))
    deterministic: bool = setting(False, flag=Flag(
        RUN, "deterministic algorithms (slower on GPU)"))
    strict: bool = setting(False, resumable=True, flag=Flag(
        DATA, "stop at the first unreadable image instead of skipping it"))
    stop_after: int | None = setting(None, check=at_least(1, "epoch"), resumable=True, flag=Flag(
        RUN, "stop (resumably) after epoch N of the schedule", metavar="N"))
    out: str = setting("", flag=Flag(RUN, "run directory (default runs/<recipe>-<model>-<time>)"))
    # Beyond the paper; the defaults are the paper's recipe (old config.json files load as such).
    optimizer: str = setting("sgd", flag=_modern(  # sgd: momentum, nesterov, dampening above
        "sgd (the paper's) or adamw (betas 0.9, 0.999); rmsprop (alpha 0.9, eps 1e-6): "
        "FC-DenseNet's", choices=OPTIMIZERS))
    decay_norm_bias: bool = setting(True, flag=_modern(
        "weight decay on norm weights and biases too (the paper: yes)", negatable=True))
    schedule: str = setting("step", flag=_modern(
        "step (the paper's), cosine, or exponential (x gamma per epoch: FC-DenseNet's 0.995)",
        choices=SCHEDULES))
    warmup_epochs: float = setting(0.0, flag=_modern(  # checked against --epochs: check_modern
        "linear warm-up over E epochs, moved every step", "E"))
    warmup_lr: float = setting(0.0, check=at_least(0), flag=_modern("rate the warm-up starts at",
                                                                    "LR"))
    min_lr: float = setting(0.0, check=at_least(0), flag=_modern("floor of the cosine schedule",
                                                                 "LR"))
    label_smoothing: float = setting(0.0, check=FRACTION, flag=_modern(None, "EPS"))
    mixup: float = setting(0.0, check=at_least(0), flag=_modern("mixup Beta(alpha); 0: off",
                                                                "ALPHA"))
    cutmix: float = setting(0.0, check=at_least(0), flag=_modern("cutmix Beta(alpha); 0: off",
                                                                 "ALPHA"))
    mixup_prob: float = setting(1.0, check=PROBABILITY, flag=_modern("share of batches mixed", "P"))
    mixup_switch_prob: float = setting(0.5, check=PROBABILITY, flag=_modern(
        "with both on: chance of cutmix rather than mixup (default 0.5)", "P"))
    auto_augment: str = setting("", check=parse_auto_augment, flag=_modern(
        "rand-m<M>-n<N> (RandAugment, e.g. rand-m9-n2) or trivial", "SPEC"))
    color_jitter: float = setting(0.0, check=at_least(0), flag=_modern(
        "brightness/contrast/saturation jitter (not with --auto-augment)", "S"))
    random_erasing: float = setting(0.0, check=PROBABILITY,
                                    flag=_modern("erase a patch with probability P", "P"))
    drop_path: float = setting(0.0, check=FRACTION, flag=_modern(
        "stochastic depth (RDNet; default: the recipe's for the model size)", "RATE"))
    accum_steps: int = setting(1, check=at_least(1, "batch per step"), flag=_modern(
        "batches per optimiser step (effective batch N x --batch-size)", "N"))
    ema_decay: float = setting(0.0, check=FRACTION, flag=_modern(
        "evaluate an EMA of the weights too (per step; 0: off)", "D"))
    clip_grad: float = setting(0.0, check=at_least(0),
                               flag=_modern("clip the gradients' global L2 norm (0: off)", "NORM"))
    # Volumes (recipes volumes, digits3d): each file's intensities scaled, then resampled.
    volume_size: list[int] = setting(factory=list, check=check_volume_size, flag=Flag(
        DATA, "volumes: resample each volume to D x H x W voxels, trilinear (default: the "
        "recipe's)", metavar=("D", "H", "W"), nargs=3))
    intensity_window: list[float] = setting(factory=list, check=check_window, flag=Flag(
        DATA, "volumes: map intensities LO..HI to 0..1, clipping outside (CT: e.g. -1000 400); "
        "default: z-score each volume by its own mean and standard deviation",
        metavar=("LO", "HI"), nargs=2))
    # Segmentation (recipes segmentation, camvid, camvid-finetune, digit-scenes).
    ignore_index: int = setting(255, check=at_least(0), flag=Flag(
        DATA, "segmentation: the mask value of void pixels, left out of the loss and every "
        "metric (default 255)", metavar="V"))
    class_weights: list[float] = setting(factory=list, flag=Flag(
        RECIPE, "segmentation: one cross-entropy weight per class (default: all 1)",
        metavar="W", nargs="+"))
    weights: str | None = setting(None, flag=Flag(
        RUN, "start from the model weights of this checkpoint or run directory (fine-tuning, "
        "e.g. --recipe camvid-finetune --weights runs/camvid-RUN)", metavar="PATH"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "augmentation" not in d:  # written before the policy was recorded
            d["augmentation"] = policy_of(bool(d.get("augment")), d.get("dataset", "digits"))
        return cls(**d)

    def check(self) -> None:
        """Every field's declared check (ValueError naming the flag)."""
        check_fields(self)


def policy_of(augment: bool, dataset: str) -> str:
    """The policy a boolean ``augment`` meant: ImageNet's for folders, else the CIFAR one."""
    return ("imagenet" if dataset == "folder" else "standard") if augment else "none"
