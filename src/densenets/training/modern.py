"""What the recipes add to the paper's: optimiser, schedule, regularisers, and their checks.

The paper trains with SGD, a step schedule and dropout; current recipes (RDNet's, the modern
ImageNet ones) add AdamW, a cosine schedule with warm-up, label smoothing, mixup/cutmix,
RandAugment, random erasing, drop path, an EMA of the weights and gradient clipping. This module
names their choices and checks what involves more than one field; :mod:`densenets.training.config`
declares the fields and :mod:`densenets.training.recipes` holds the recipes.
"""

from __future__ import annotations

from typing import Any

from ..models.registry import family_for

OPTIMIZERS = ("sgd", "adamw", "rmsprop")
SCHEDULES = ("step", "cosine", "exponential")


def check_modern(cfg: Any) -> None:
    """What no single field's check can see: the fields against each other and the model
    (each field's own range is declared with it in :mod:`densenets.training.config`)."""
    if not 0 <= cfg.warmup_epochs < cfg.epochs:
        raise ValueError(f"--warmup-epochs must be >= 0 and below --epochs ({cfg.epochs}), got "
                         f"{cfg.warmup_epochs:g}")
    if cfg.min_lr > cfg.lr:
        raise ValueError(f"--min-lr {cfg.min_lr:g} is above --lr {cfg.lr:g}; the cosine "
                         "schedule falls from --lr to --min-lr")
    if cfg.drop_path and not family_for(cfg.model).supports_drop_path:
        raise ValueError("--drop-path drops residual branches (stochastic depth), which RDNet "
                         "has; a DenseNet layer's features are concatenated, not added, so there "
                         "is no branch to drop: use --drop-rate (dropout after each convolution)")


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
