"""Mixup and cutmix of a training batch, with soft targets (torchvision's v2 MixUp / CutMix).

Mixup blends each image with its neighbour in the batch (``x.roll(1, 0)``) by a weight drawn
from Beta(alpha, alpha); cutmix pastes a box of the neighbour instead, and the target weights
are the pasted area fraction. Every draw of a batch is seeded from (seed, epoch, batch, rank)
under a forked RNG, so a resumed run mixes exactly as the uninterrupted one and the caller's
random state (dropout, the loaders) is untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.transforms import v2


def mix_key(seed: int, epoch: int, batch: int, rank: int = 0) -> int:
    """The seed of one batch's mixing: a pure function of (seed, epoch, batch, rank)."""
    return (((int(seed) * 1_000_003 + int(epoch)) * 10_000_019 + int(batch)) * 1_009
            + int(rank)) % 2**63


@contextlib.contextmanager
def seeded(key: int, device: torch.device) -> Iterator[None]:
    """Run the block with the CPU (and ``device``'s, if CUDA) generator seeded with ``key``;
    restore both afterwards. Other devices' generators are neither seeded nor touched."""
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) \
        if cuda else None
    with torch.random.fork_rng(devices=[index] if cuda else [], device_type="cuda"):
        torch.default_generator.manual_seed(key)
        if cuda:
            # torchvision draws on the CPU today; seeding the device too keeps a later version
            # that draws there deterministic as well.
            with torch.cuda.device(index):
                torch.cuda.manual_seed(key)
        yield


class BatchMix:
    """Mixup and/or cutmix of a batch: ``mix(x, y, epoch, batch, rank) -> (x_mixed, targets)``.

    ``targets`` is a float32 (N, num_classes) tensor of probabilities (rows sum to 1) on
    ``x``'s device, for ``cross_entropy`` with soft targets. With probability ``1 - prob`` a
    batch is not mixed (one-hot targets, ``x`` returned as is); with both alphas > 0 a mixed
    batch gets cutmix with probability ``switch_prob``, else mixup. Batches of fewer than two
    images have no partner and pass through. Under data parallelism each process mixes its own
    slice of the global batch, so ``rank`` is part of the seed: processes draw independently,
    and a job is reproduced exactly by a job of the same size.
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 prob: float = 1.0, switch_prob: float = 0.5, seed: int = 0) -> None:
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        for name, value in (("mixup", mixup_alpha), ("cutmix", cutmix_alpha)):
            if not value >= 0:
                raise ValueError(f"{name} alpha must be >= 0 (0 turns it off), got {value}")
        for name, value in (("mixup_prob", prob), ("mixup_switch_prob", switch_prob)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name} is a probability in [0, 1], got {value}")
        self.num_classes, self.prob, self.switch_prob, self.seed = (
            num_classes, float(prob), float(switch_prob), int(seed))
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
        self.mixup = v2.MixUp(alpha=mixup_alpha, num_classes=num_classes) \
            if mixup_alpha > 0 else None
        self.cutmix = v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes) \
            if cutmix_alpha > 0 else None

    def __repr__(self) -> str:
        return (f"BatchMix(num_classes={self.num_classes}, mixup_alpha={self.mixup_alpha:g}, "
                f"cutmix_alpha={self.cutmix_alpha:g}, prob={self.prob:g}, "
                f"switch_prob={self.switch_prob:g}, seed={self.seed})")

    def __call__(self, x: torch.Tensor, y: torch.Tensor, epoch: int, batch: int,
                 rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix batch ``x`` (N, C, H, W) with integer labels ``y`` (N,); see the class doc."""
        if x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"mixing needs images (N, C, H, W) and labels (N,), got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ValueError(f"labels must be class indices (an integer tensor), got {y.dtype}; "
                             "mix before any one-hot or smoothing")
        # v2's MixUp/CutMix one-hot the labels with F.one_hot, which takes int64 only.
        y = y.to(device=x.device, dtype=torch.int64)
        onehot = F.one_hot(y, self.num_classes).float()
        if len(x) < 2 or (self.mixup is None and self.cutmix is None):
            return x, onehot
        with seeded(mix_key(self.seed, epoch, batch, rank), x.device):
            # Both uniforms are drawn every time, so the op's own draws start at the same point
            # of the stream whichever branch a batch takes.
            apply, switch = torch.rand(2).tolist()
            if apply >= self.prob:
                return x, onehot
            if self.mixup is None or (self.cutmix is not None and switch < self.switch_prob):
                op: Any = self.cutmix
            else:
                op = self.mixup
            mixed, targets = op(x, y)
        return mixed, targets


def make_mix(cfg: Any, num_classes: int) -> BatchMix | None:
    """The :class:`BatchMix` a config asks for (``mixup``, ``cutmix``, ``mixup_prob``,
    ``mixup_switch_prob``, ``seed``), or None when mixup and cutmix are both 0."""
    mixup, cutmix = getattr(cfg, "mixup", 0.0), getattr(cfg, "cutmix", 0.0)
    if not mixup and not cutmix:
        return None
    return BatchMix(num_classes, mixup, cutmix, prob=getattr(cfg, "mixup_prob", 1.0),
                    switch_prob=getattr(cfg, "mixup_switch_prob", 0.5),
                    seed=getattr(cfg, "seed", 0))
