"""What the recipes add to the paper's: optimiser, schedule, regularisers, as checked fields.

The paper trains with SGD, a step schedule and dropout; current recipes (RDNet's, the modern
ImageNet ones) add AdamW, a cosine schedule with warm-up, label smoothing, mixup/cutmix,
RandAugment, random erasing, drop path, an EMA of the weights and gradient clipping. This module
names those fields and checks their values; :mod:`densenets.training.recipes` holds the recipes.
"""

from __future__ import annotations

from typing import Any

from ..models.rdnet import RDNET

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine")

# The fields beyond the paper, shared by Recipe and TrainConfig.
MODERN = ("optimizer", "decay_norm_bias", "schedule", "warmup_epochs", "warmup_lr", "min_lr",
          "label_smoothing", "mixup", "cutmix", "mixup_prob", "mixup_switch_prob",
          "auto_augment", "color_jitter", "random_erasing", "drop_path", "accum_steps",
          "ema_decay", "clip_grad")


def check_modern(cfg: Any) -> None:
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got "
                         f"{cfg.optimizer!r}")
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"--schedule must be one of {', '.join(SCHEDULES)}, got "
                         f"{cfg.schedule!r}")
    if not 0 <= cfg.warmup_epochs < cfg.epochs:
        raise ValueError(f"--warmup-epochs must be >= 0 and below --epochs ({cfg.epochs}), got "
                         f"{cfg.warmup_epochs:g}")
    for name in ("warmup_lr", "min_lr", "mixup", "cutmix", "color_jitter", "clip_grad"):
        if not getattr(cfg, name) >= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.min_lr > cfg.lr:
        raise ValueError(f"--min-lr {cfg.min_lr:g} is above --lr {cfg.lr:g}; the cosine "
                         "schedule falls from --lr to --min-lr")
    for name in ("label_smoothing", "drop_path", "ema_decay"):
        if not 0 <= getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1), got "
                             f"{getattr(cfg, name)}")
    for name in ("mixup_prob", "mixup_switch_prob", "random_erasing"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise ValueError(f"--{name.replace('_', '-')} is a probability in [0, 1], got "
                             f"{getattr(cfg, name)}")
    if cfg.drop_path and cfg.model.strip().lower() not in RDNET:
        raise ValueError("--drop-path drops residual branches (stochastic depth), which RDNet "
                         "has; a DenseNet layer's features are concatenated, not added, so there "
                         "is no branch to drop: use --drop-rate (dropout after each convolution)")
    if cfg.accum_steps < 1:
        raise ValueError(f"--accum-steps must be >= 1 batch per step, got {cfg.accum_steps}")
    parse_auto_augment(cfg.auto_augment)


def parse_auto_augment(spec: str) -> tuple[str, dict[str, int]]:
    """``""`` -> ("none", {}); ``rand-m9-n2`` -> ("rand", {"magnitude": 9, "num_ops": 2});
    ``trivial`` -> ("trivial", {}). Other parts of a policy string are refused, not ignored."""
    if not spec:
        return "none", {}
    if spec == "trivial":
        return "trivial", {}
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"--auto-augment {spec!r}: use rand-m<M>-n<N> (RandAugment, e.g. "
                         "rand-m9-n2) or trivial (TrivialAugmentWide)")
    args = {"magnitude": 9, "num_ops": 2}
    for part in parts[1:]:
        key = {"m": "magnitude", "n": "num_ops"}.get(part[:1])
        if key is None or not part[1:].isdigit():
            raise ValueError(f"--auto-augment {spec!r}: {part!r} is not supported; RandAugment "
                             "here takes m<magnitude 0-30> and n<number of ops> only")
        args[key] = int(part[1:])
    if not 0 <= args["magnitude"] <= 30:
        raise ValueError(f"--auto-augment {spec!r}: the magnitude must be 0..30")
    return "rand", args
