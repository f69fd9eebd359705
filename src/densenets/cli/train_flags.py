"""The flags of ``densenets train`` that override a recipe's values, and the names they set.

Every recipe field has a flag; a flag left out keeps the recipe's value. The paper's fields come
first, then what current recipes add (optimiser, schedule, regularisers: see
:mod:`densenets.training.modern`).
"""

from __future__ import annotations

import argparse

from ..training import recipes
from ..training.modern import OPTIMIZERS, SCHEDULES

# TrainConfig fields that a flag of the same name (dashes for underscores) sets.
OVERRIDES = ("model", "epochs", "batch_size", "lr", "weight_decay", "val_split", "image_size",
             "data_dir", "download", "strict", "workers", "out", "stop_after", "seed",
             "deterministic", "threads", "device", "amp", "channels_last", "compile",
             "cuda_graphs", "memory_efficient", "drop_rate", "augmentation", "optimizer",
             "decay_norm_bias", "schedule", "warmup_epochs", "warmup_lr", "min_lr",
             "label_smoothing", "mixup", "cutmix", "mixup_prob", "mixup_switch_prob",
             "auto_augment", "color_jitter", "random_erasing", "drop_path", "accum_steps",
             "ema_decay", "clip_grad")


def add_recipe_overrides(p: argparse.ArgumentParser) -> None:
    """The paper's hyperparameters, then the modern ones, each overriding the recipe."""
    g = p.add_argument_group("recipe overrides")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int,
                   help="global batch: under torchrun it is split evenly over the processes "
                        "(the paper's batch sizes are global)")
    g.add_argument("--lr", type=float, help="initial (peak) learning rate (step schedule: "
                                            "divided by 10 at 50%% and 75%% of the epochs; "
                                            "ImageNet at 1/3 and 2/3)")
    g.add_argument("--weight-decay", type=float, metavar="WD",
                   help="weight decay (the paper's 1e-4; decoupled for AdamW)")
    g.add_argument("--val-split", type=int, nargs="?", const=-1, metavar="N",
                   help="hold N training images out for validation (bare flag: the paper's "
                        "5000 for CIFAR, 6000 for SVHN)")
    g.add_argument("--image-size", type=int, help="crop size for folder recipes")
    g.add_argument("--augment", choices=recipes.AUGMENTATIONS, dest="augmentation",
                   help="training augmentation (default: the recipe's; folder: standard up to "
                        "64 px); modern = random-resized crop and flip only")
    g = p.add_argument_group("beyond the paper (the modern recipes set these)")
    g.add_argument("--optimizer", choices=OPTIMIZERS)
    g.add_argument("--decay-norm-bias", action=argparse.BooleanOptionalAction, default=None,
                   help="weight decay on norm weights and biases too (the paper: yes)")
    g.add_argument("--schedule", choices=SCHEDULES, help="step (the paper's) or cosine")
    g.add_argument("--warmup-epochs", type=float, metavar="E",
                   help="linear warm-up over E epochs, moved every step")
    g.add_argument("--warmup-lr", type=float, metavar="LR", help="rate the warm-up starts at")
    g.add_argument("--min-lr", type=float, metavar="LR", help="floor of the cosine schedule")
    g.add_argument("--label-smoothing", type=float, metavar="EPS")
    g.add_argument("--mixup", type=float, metavar="ALPHA", help="mixup Beta(alpha); 0: off")
    g.add_argument("--cutmix", type=float, metavar="ALPHA", help="cutmix Beta(alpha); 0: off")
    g.add_argument("--mixup-prob", type=float, metavar="P", help="share of batches mixed")
    g.add_argument("--mixup-switch-prob", type=float, metavar="P",
                   help="with both on: chance of cutmix rather than mixup (default 0.5)")
    g.add_argument("--auto-augment", metavar="SPEC",
                   help="rand-m<M>-n<N> (RandAugment, e.g. rand-m9-n2) or trivial")
    g.add_argument("--color-jitter", type=float, metavar="S",
                   help="brightness/contrast/saturation jitter (not with --auto-augment)")
    g.add_argument("--random-erasing", type=float, metavar="P", help="erase a patch with "
                                                                     "probability P")
    g.add_argument("--drop-path", type=float, metavar="RATE",
                   help="stochastic depth (RDNet; default: the recipe's for the model size)")
    g.add_argument("--accum-steps", type=int, metavar="N",
                   help="batches per optimiser step (effective batch N x --batch-size)")
    g.add_argument("--ema-decay", type=float, metavar="D",
                   help="evaluate an EMA of the weights too (per step; 0: off)")
    g.add_argument("--clip-grad", type=float, metavar="NORM",
                   help="clip the gradients' global L2 norm (0: off)")


def describe_regimen(cfg: recipes.TrainConfig) -> str:
    """What the training header says about the optimiser, schedule and regularisers."""
    parts = [cfg.optimizer]
    if cfg.schedule == "cosine":
        parts.append(f"cosine to {cfg.min_lr:g}")
    if cfg.warmup_epochs:
        parts.append(f"{cfg.warmup_epochs:.3g} warm-up epochs from {cfg.warmup_lr:g}")
    named = (("label smoothing", cfg.label_smoothing), ("mixup", cfg.mixup),
             ("cutmix", cfg.cutmix), ("drop path", cfg.drop_path), ("EMA", cfg.ema_decay),
             ("clip", cfg.clip_grad), ("random erasing", cfg.random_erasing))
    parts += [f"{name} {value:g}" for name, value in named if value]
    if cfg.auto_augment:
        parts.append(cfg.auto_augment)
    if cfg.accum_steps > 1:
        parts.append(f"{cfg.accum_steps} batches per step")
    return ", ".join(parts)
