"""The paper's training recipes as data, and how one resolves into a run's configuration.

A :class:`Recipe` holds what the paper fixes for a dataset (optimiser, schedule, batch size,
epochs, augmentation, dropout, validation hold-out) as values of the fields of
:class:`~densenets.training.config.TrainConfig`; :func:`resolve` applies command-line overrides
and returns the configuration, the plain-data record a run writes to ``config.json`` and
reloads on ``--resume``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..constants import IMAGENET_MEAN, IMAGENET_STD
from .config import AUGMENTATIONS, TrainConfig, default_workers, policy_of
from .modern import check_modern

__all__ = ["AUGMENTATIONS", "RECIPES", "Recipe", "TrainConfig", "default_workers", "resolve"]

# Per-channel statistics of the training images, pixels in [0, 1].
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)

SMALL_IMAGE = 64  # crops up to this size get "standard" under "auto"
CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """One training recipe of the paper (or the embedded digits demo).

    ``settings`` are values of :class:`TrainConfig` fields (the rest keep its defaults, the
    paper's SGD). What a run derives rather than copies is said here: ``milestones`` are
    fractions of the epochs at which the learning rate is divided by 10, so a shortened run
    (``--epochs 30``) keeps the paper's schedule shape; ``augment`` may be ``"auto"`` (chosen by
    the crop); ``drop_path`` is a rate per model size.
    """

    name: str
    augment: str  # one of AUGMENTATIONS, or "auto" (chosen by the crop size)
    milestones: tuple[float, ...] = ()
    holdout: int = 0  # the paper's validation hold-out size (used by a bare --val-split)
    drop_path: tuple[tuple[str, float], ...] = ()  # (model name prefix, rate): first match wins
    sources: tuple[str, ...] = ()  # where each value beyond the paper comes from
    paper_error: str = ""
    description: str = ""
    settings: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.settings) - set(CONFIG_FIELDS))
        if unknown:
            raise TypeError(f"recipe {self.name}: {', '.join(unknown)} are no TrainConfig fields")

    def value(self, name: str) -> Any:
        """The recipe's value of the configuration field ``name`` (its default if unset)."""
        if name in self.settings:
            return self.settings[name]
        f = CONFIG_FIELDS[name]
        return f.default_factory() if f.default is dataclasses.MISSING else f.default


# The paper's CIFAR/SVHN net and its hold-out; the test error it reports per dataset.
_CIFAR_ERRORS = {"cifar10": "5.92%", "cifar10+": "4.51%", "cifar100": "24.15%",
                 "cifar100+": "22.27%"}
_CIFAR_STATS = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "cifar100": (CIFAR100_MEAN, CIFAR100_STD)}


def _cifar(name: str) -> Recipe:
    dataset, augment = name.rstrip("+"), name.endswith("+")
    mean, std = _CIFAR_STATS[dataset]
    kind = "standard augmentation (pad 4, random crop 32, flip)" if augment else \
        "no augmentation, dropout 0.2"
    return Recipe(
        name=name, augment="standard" if augment else "none", milestones=(0.5, 0.75),
        holdout=5000, paper_error=f"{_CIFAR_ERRORS[name]} (DenseNet-BC L=100 k=12)",
        description=f"{dataset.upper()}, 300 epochs, {kind}",
        settings=dict(dataset=dataset, model="densenet-bc-100-k12", epochs=300, batch_size=64,
                      drop_rate=0.0 if augment else 0.2, val_split=0, crop=32, mean=mean,
                      std=std))


def _modern_imagenet(name: str, *, drop_path: tuple[tuple[str, float], ...] = (),
                     sources: tuple[str, ...], paper_error: str, description: str,
                     **settings: Any) -> Recipe:
    return Recipe(name=name, augment="modern", drop_path=drop_path, sources=sources,
                  paper_error=paper_error, description=description,
                  settings=dict(dataset="folder", drop_rate=0.0, crop=224, mean=IMAGENET_MEAN,
                                std=IMAGENET_STD, eval_split="val", **settings))


# Recipes beyond the paper. Every value is the published one unless its `sources` line says what
# differs and why; docs/training.md prints them side by side.
MODERN_RECIPES: dict[str, Recipe] = {
    # The embedded digits with the modern parts that suit 8x8 images (no crops, no mixing).
    "digits-modern": Recipe(
        name="digits-modern", augment="none",
        # Seeds 0/1/2 measured 99.44/99.44/99.72% test accuracy (20 epochs: 99.17/99.44/99.72;
        # lr 2e-3 over 20: 99.72/99.44/98.61; 1e-3, seed 2: 98.61). EMA 0.95: 0.99 trailed the
        # model by up to 1.4 points on these few hundred steps.
        sources=("chosen here for the digits: AdamW lr 4e-3 wd 0.05, 15 epochs cosine with 1.5 "
                 "warm-up epochs, label smoothing 0.1, EMA 0.95 per step",),
        paper_error="none (not in the paper); expect 99% test accuracy or more",
        description="scikit-learn digits, AdamW + cosine with warm-up + label smoothing + EMA",
        settings=dict(
            dataset="digits", model="densenet-bc-40-k12", epochs=15, batch_size=64,
            drop_rate=0.0, crop=8, lr=4e-3, weight_decay=0.05, optimizer="adamw",
            decay_norm_bias=False, schedule="cosine", warmup_epochs=1.5, warmup_lr=1e-4,
            min_lr=1e-5, label_smoothing=0.1, ema_decay=0.95, mean=(0.3054,), std=(0.3761,),
            threads=1)),
    "imagenet-rdnet": _modern_imagenet(
        "imagenet-rdnet", model="rdnet_tiny", epochs=300, batch_size=1024, lr=1e-3,
        weight_decay=0.05, optimizer="adamw", decay_norm_bias=False, schedule="cosine",
        warmup_epochs=20, warmup_lr=1e-4, min_lr=1e-6, label_smoothing=0.1, mixup=0.8,
        cutmix=1.0, auto_augment="rand-m9-n2", color_jitter=0.4, random_erasing=0.25,
        resize=249,
        drop_path=(("rdnet_tiny", 0.15), ("rdnet_small", 0.35), ("rdnet_base", 0.4),
                   ("rdnet_large", 0.5)),
        sources=("RDNet (ECCV 2024) training recipe: AdamW lr 1e-3, wd 0.05, 300 epochs cosine "
                 "with 20 warm-up epochs from 1e-4 to a floor of 1e-6, mixup 0.8, cutmix 1.0, "
                 "label smoothing 0.1, random erasing 0.25, colour jitter 0.4, drop path "
                 "0.15/0.35/0.4/0.5 for tiny/small/base/large",
                 "RandAugment: published rand-m9-mstd0.5-inc1; torchvision's RandAugment has "
                 "no magnitude noise (mstd) nor the increasing-severity ops (inc1), so m9 n2",
                 "colour jitter 0.4 is recorded but, as in the published pipeline, not applied "
                 "while RandAugment is on",
                 "batch 1024 assumed (not among the published values: scale lr with it); "
                 "resize 249 = 224 / crop_pct 0.9"),
        paper_error="RDNet-T 82.8% top-1 (ImageNet-1k, 224 px, published)",
        description="ImageNet folders, RDNet's recipe: AdamW, cosine with warm-up, RandAugment, "
                    "mixup/cutmix, label smoothing, random erasing, drop path by model size"),
    "imagenet-modern": _modern_imagenet(
        "imagenet-modern", model="densenet121", epochs=600, batch_size=1024, lr=0.5,
        momentum=0.9, nesterov=False, weight_decay=2e-5, decay_norm_bias=False,
        schedule="cosine", warmup_epochs=5, warmup_lr=0.005, min_lr=0.0, label_smoothing=0.1,
        mixup=0.2, cutmix=1.0, auto_augment="trivial", random_erasing=0.1, ema_decay=0.99997,
        resize=232,
        sources=("torchvision's recipe for its second-generation ImageNet weights (ResNet-50 "
                 "80.86% top-1): SGD momentum 0.9, lr 0.5 at batch 1024, wd 2e-5 and none on "
                 "norm layers, 600 epochs cosine, 5 linear warm-up epochs from lr x 0.01, label "
                 "smoothing 0.1, mixup 0.2, cutmix 1.0, TrivialAugmentWide, random erasing 0.1, "
                 "EMA, evaluation resize 232",
                 "EMA: published 0.99998 every 32 steps with its batch/epoch adjustment, which "
                 "is 0.99997 per step at batch 1024 over 600 epochs",
                 "one crop size for training and evaluation (224): the published train crop "
                 "176 is not reproduced; no decay on biases too (DenseNet's only bias is the "
                 "classifier's)",
                 "for DenseNet-121..264; not yet run to completion here"),
        paper_error="none published for DenseNet with this recipe (DenseNet-121 25.02% top-1 "
                    "error with the paper's)",
        description="ImageNet folders, a current SGD recipe for DenseNet-121..264: cosine with "
                    "warm-up, TrivialAugment, mixup/cutmix, label smoothing, erasing, EMA"),
}

# FC-DenseNet's CamVid recipe (the paper's section 4): RMSprop lr 1e-3 x 0.995 per epoch, weight
# decay 1e-4, dropout 0.2, 224x224 random crops and horizontal flips, batch 3; best.pt by the
# validation mean IoU plays the part of its early stopping. Weight decay on the convolution
# weights only (the paper's Lasagne code regularises no biases nor BatchNorm parameters).
_FC_DENSENET = dict(optimizer="rmsprop", lr=1e-3, schedule="exponential", gamma=0.995,
                    weight_decay=1e-4, decay_norm_bias=False, drop_rate=0.2,
                    mean=IMAGENET_MEAN, std=IMAGENET_STD)
_CAMVID_PAPER = "66.9% mean IoU, 91.5% global accuracy (FC-DenseNet103, CamVid test, 11 classes)"
_CAMVID_SOURCES = ("the paper gives no epoch count (it stops early on the validation mean IoU): "
                   "750 here, best.pt by validation mean IoU",
                   "normalisation: ImageNet's mean and std (the paper does not state one)")

SEGMENTATION_RECIPES: dict[str, Recipe] = {
    "segmentation": Recipe(
        name="segmentation", augment="standard", sources=_CAMVID_SOURCES[1:],
        paper_error="none (your dataset)",
        description="image/mask folders (train/images + train/masks, val/ likewise), "
                    "FC-DenseNet's CamVid training: crops and flips, RMSprop, x0.995 per epoch",
        settings=dict(_FC_DENSENET, dataset="masks", model="fcdensenet103", epochs=100,
                      batch_size=3, crop=224, eval_split="val")),
    "camvid": Recipe(
        name="camvid", augment="standard", sources=_CAMVID_SOURCES, paper_error=_CAMVID_PAPER,
        description="CamVid in SegNet's layout (367/101/233 images, 11 classes, void 11 -> "
                    "--ignore-index), 224x224 crops and flips, batch 3; then camvid-finetune",
        settings=dict(_FC_DENSENET, dataset="camvid", model="fcdensenet103", epochs=750,
                      batch_size=3, crop=224, eval_split="test")),
    # The second stage: `densenets train --recipe camvid-finetune --weights RUN` (RUN: a camvid
    # run directory, its best.pt) trains on whole 360x480 images (padded to 384x480, the
    # padding void) at lr 1e-4.
    "camvid-finetune": Recipe(
        name="camvid-finetune", augment="standard",
        sources=("fine-tuning on full images at lr 1e-4 is the paper's; batch 1 and 50 "
                 "epochs are chosen here (best.pt by validation mean IoU)",
                 *_CAMVID_SOURCES[1:]),
        paper_error=_CAMVID_PAPER,
        description="stage 2 of camvid: whole images (flips only), lr 1e-4, batch 1, from "
                    "--weights RUN",
        settings=dict(_FC_DENSENET, dataset="camvid", model="fcdensenet103", epochs=50,
                      batch_size=1, lr=1e-4, crop=0, eval_split="test")),
    "digit-scenes": Recipe(
        name="digit-scenes", augment="none",
        sources=("the offline demo (densenets.training.digit_scenes), chosen here",),
        paper_error="none (not in the paper); see docs/segmentation.md for the measured mIoU",
        description="64x64 scenes of 2-4 scikit-learn digits, 11 classes (background + 10 "
                    "digits), 2,000 train / 500 test scenes",
        # A smaller configuration than FC-DenseNet56, to train in under three minutes on two
        # CPU cores: 3 pools, 2 layers per block and in the bottleneck, k=8, 16 first maps
        # (71,771 parameters). Background is about 89% of the pixels: weighting it 0.2 lifts
        # the mean IoU of 3 epochs from 42.6% (unweighted, one thread, 150 s) to 56.1% (two
        # threads, 91 s) on this 2-core CPU.
        settings=dict(_FC_DENSENET, dataset="digit-scenes", model="fcdensenet56", epochs=3,
                      model_overrides=dict(down_blocks=(2, 2, 2), up_blocks=(2, 2, 2),
                                           bottleneck_layers=2, growth_rate=8,
                                           num_init_features=16),
                      batch_size=16, crop=0, drop_rate=0.0, gamma=0.9, memory_efficient=True,
                      class_weights=[0.2] + [1.0] * 10,
                      threads=2, mean=(0.1101,), std=(0.2441,), eval_split="test")),
}

# 3D DenseNets on volumes, one input channel. The default model is DenseNet-BC-40 (k = 12) with
# the CIFAR stem (no early downsampling), small enough for a CPU at 32^3; name densenet121 (or
# any zoo name) for larger volumes. Augmentation "standard" means random crops and flips here.
VOLUME_RECIPES: dict[str, Recipe] = {
    "volumes": Recipe(
        name="volumes", augment="standard", milestones=(0.5, 0.75),
        paper_error="none (your dataset)",
        description="volume folders (train/ and val/ class folders of .nii/.nii.gz/.npy), 3D "
                    "DenseNet, resampled to --volume-size, z-scored or --intensity-window",
        settings=dict(dataset="volumes", model="densenet-bc-40-k12",
                      model_overrides={"spatial_dims": 3}, epochs=30, batch_size=8,
                      drop_rate=0.0, volume_size=[32, 32, 32], mean=(0.0,), std=(1.0,),
                      eval_split="val")),
    "digits3d": Recipe(
        name="digits3d", augment="none", milestones=(0.5, 0.75),
        # Measured on the shared 2-core CPU: 94.17% test accuracy in 65.5 s (k = 12: 96.11% in
        # 186.5 s; the memory-efficient blocks gave no speed here at these tiny volumes).
        sources=("the offline 3D demo (densenets.training.digits3d), chosen here: AdamW lr "
                 "4e-3 wd 0.05, 10 epochs cosine, DenseNet-BC-22 (k = 8), one thread",),
        paper_error="none (not in the paper); see docs/medical.md for the measured accuracy",
        description="scikit-learn digits as 8x8x8 volumes (a slab of 1-3 slices at a random "
                    "depth, noise 0.2), 1,437 train / 360 test",
        settings=dict(dataset="digits3d", model="densenet-bc-22-k8",
                      model_overrides={"spatial_dims": 3}, epochs=10, batch_size=64,
                      drop_rate=0.0, volume_size=[8, 8, 8], mean=(0.0,), std=(1.0,),
                      lr=4e-3, weight_decay=0.05, optimizer="adamw", decay_norm_bias=False,
                      schedule="cosine", threads=1)),
}

_FOLDERS = dict(dataset="folder", model="densenet121", epochs=90, drop_rate=0.0, crop=224,
                resize=256, mean=IMAGENET_MEAN, std=IMAGENET_STD, eval_split="val")

RECIPES: dict[str, Recipe] = {
    # The embedded default: 1,797 real 8x8 digits that ship with scikit-learn. No dropout: at 15
    # epochs it costs accuracy (99.7% -> 95.6% measured), and the paper's rule is for CIFAR/SVHN.
    # 20 epochs, not 15: seeds 0/1/2 measured 98.9/99.7/99.4% at 15 and 99.2% each at 20.
    "digits": Recipe(
        name="digits", augment="none", milestones=(0.5, 0.75),
        paper_error="none (not in the paper); expect about 1% test error or less",
        description="scikit-learn digits, 8x8 grayscale, stratified 80/20 split, 20 epochs",
        settings=dict(
            dataset="digits", model="densenet-bc-40-k12", epochs=20, batch_size=64,
            drop_rate=0.0, crop=8,
            mean=(0.3054,), std=(0.3761,),  # of the training split, pixels scaled to [0, 1]
            # Ops on 8x8 maps are too small to split across cores; with other processes on the
            # 2-core machine, two threads ran an epoch in 5-50 s against 1.4 s for one.
            threads=1)),
    **{name: _cifar(name) for name in _CIFAR_ERRORS},
    # SVHN: train + extra, pixels / 255 and nothing else, test error at the best-validation epoch.
    "svhn": Recipe(
        name="svhn", augment="none", milestones=(0.5, 0.75), holdout=6000,
        paper_error="1.76% (DenseNet-BC L=100 k=12)",
        description="SVHN train + extra (604,388 images), 40 epochs, pixels / 255, dropout 0.2",
        settings=dict(dataset="svhn", model="densenet-bc-100-k12", epochs=40, batch_size=64,
                      drop_rate=0.2, val_split=6000, crop=32, mean=(0.0, 0.0, 0.0),
                      std=(1.0, 1.0, 1.0))),
    "imagenet": Recipe(
        name="imagenet", augment="imagenet", milestones=(1 / 3, 2 / 3),
        paper_error="25.02% top-1 / 7.71% top-5 single-crop, 23.61 / 6.66 10-crop (DenseNet-121)",
        description="ImageNet (train/ and val/ folders), 90 epochs, lr / 10 at 30 and 60",
        settings=dict(_FOLDERS, batch_size=256)),
    "folder": Recipe(
        name="folder", augment="auto", milestones=(1 / 3, 2 / 3),
        paper_error="none (your dataset)",
        description="any ImageFolder-style dataset (train/ and val/ class folders); "
                    "augmentation by image size (--augment)",
        settings=dict(_FOLDERS, batch_size=64)),
    **MODERN_RECIPES,
    **VOLUME_RECIPES,
    **SEGMENTATION_RECIPES,
}


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; ValueError listing the known ones otherwise."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]


def augmentation_for(policy: str, crop: int) -> str:
    """Resolve a recipe's ``"auto"`` by the crop size; other policies pass through."""
    if policy == "auto":
        return "standard" if crop <= SMALL_IMAGE else "imagenet"
    return policy


def check_amp(amp: str | None, device: Any) -> None:
    """Refuse fp16 autocast on a CPU, where it is emulated and tens of times slower."""
    if amp == "fp16" and str(getattr(device, "type", device)).split(":")[0] == "cpu":
        raise ValueError("--amp fp16 needs a GPU: on a CPU it is emulated and runs tens of times "
                         "slower than float32; use --amp bf16 (or no --amp)")


def milestone_epochs(fractions: tuple[float, ...], epochs: int) -> list[int]:
    """Epochs (0-based, the first epoch run at the lower rate) where the lr is divided."""
    # Half rounds up; the first epoch always runs at the initial rate.
    return [max(1, math.floor(f * epochs + 0.5)) for f in fractions]


def resolve(recipe: str = "digits", **overrides: Any) -> TrainConfig:
    """The recipe's hyperparameters with ``overrides`` (None = keep the recipe's) applied.

    ``overrides`` are :class:`TrainConfig` fields. ``epochs`` also rescales the milestones and
    the warm-up; ``image_size`` sets the crop (and the resize at the ImageNet ratio 256/224);
    ``val_split=-1`` means the paper's hold-out size; ``augmentation`` is one of
    :data:`AUGMENTATIONS` (a boolean ``augment`` still works).
    """
    r = get_recipe(recipe)
    o = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(o) - set(CONFIG_FIELDS) - {"image_size"}
    if unknown:
        raise ValueError(f"unknown training options: {', '.join(sorted(unknown))}")
    recipe_epochs = r.value("epochs")
    epochs = int(o.pop("epochs", recipe_epochs))
    if o.get("val_split") == -1:
        o["val_split"] = r.holdout
    crop, resize = r.value("crop"), r.value("resize")
    if "image_size" in o:
        crop = int(o.pop("image_size"))
        resize = int(round(crop * 256 / 224)) if resize else None
    policy = o.pop("augmentation", None)
    if "augment" in o:
        given = o.pop("augment")
        policy = policy or policy_of(bool(given), r.value("dataset"))
    if "model_overrides" in o:  # the flags given refine the recipe's (a volume recipe's 3D)
        o["model_overrides"] = {**r.value("model_overrides"), **o["model_overrides"]}
    policy = augmentation_for(policy or r.augment, crop)
    _check_augmentation(policy, r)
    cfg = TrainConfig(**{
        **r.settings, "recipe": r.name, "augment": policy != "none", "augmentation": policy,
        "epochs": epochs, "milestones": milestone_epochs(r.milestones, epochs), "crop": crop,
        "resize": resize, "mean": list(r.value("mean")), "std": list(r.value("std")),
        # like the milestones, a share of the run
        "warmup_epochs": r.value("warmup_epochs") * epochs / recipe_epochs, **o})
    if "drop_path" not in o:  # the recipe's rate for this model size
        cfg.drop_path = next((rate for prefix, rate in r.drop_path
                              if cfg.model.lower().startswith(prefix)), 0.0)
    cfg.check()
    check_modern(cfg)
    return cfg


def _check_augmentation(policy: str, r: Recipe) -> None:
    if policy not in AUGMENTATIONS:
        raise ValueError(f"--augment must be one of {', '.join(AUGMENTATIONS)}, got {policy!r}")
    if policy in ("imagenet", "modern") and r.value("dataset") != "folder":
        crop = r.value("crop")
        raise ValueError(f"--augment {policy} is for image folders; the {r.name} images are "
                         f"{crop}x{crop}: use --augment standard or none")


def default_out_dir(cfg: TrainConfig, root: str = "runs") -> str:
    """``runs/<recipe>-<model>-<time>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{root}/{cfg.recipe}-{cfg.model}-{stamp}"
