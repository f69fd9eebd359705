"""Learning-rate schedules as pure functions of the position in training.

The paper's step schedule divides the rate at epoch milestones; current recipes fall along a
cosine to a floor after a linear warm-up, both moved every optimiser step. Either is a function of
(epoch, update within the epoch) alone, so a resumed run, which knows both, continues at exactly
the rate it stopped at: there is no scheduler state to lose. ``tests/test_schedule.py`` checks the
values against torch's ``LinearLR`` + ``CosineAnnealingLR`` composition and the closed form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Schedule:
    """Step decay (``kind="step"``), cosine (``"cosine"``) or exponential decay per epoch
    (``"exponential"``), after an optional linear warm-up.

    ``step``: ``lr * gamma ** (number of milestones <= epoch)``. ``exponential``:
    ``lr * gamma ** epoch``. ``cosine``: from ``lr`` at the end
    of the warm-up to ``min_lr`` at the last update of ``epochs``. Warm-up: ``warmup_epochs``
    (may be fractional) of updates rising linearly from ``warmup_lr`` towards ``lr``.
    """

    lr: float
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    kind: str = "step"
    epochs: int = 1
    warmup_epochs: float = 0.0
    warmup_lr: float = 0.0
    min_lr: float = 0.0

    def per_step(self) -> bool:
        """Whether the rate moves within an epoch (else it is set once per epoch)."""
        return self.kind == "cosine" or self.warmup_epochs > 0

    def lr_at(self, epoch: int, update: int = 0, updates_per_epoch: int = 1) -> float:
        """The rate of update ``update`` (0-based) of epoch ``epoch`` (0-based)."""
        t = epoch * updates_per_epoch + update
        warmup = round(self.warmup_epochs * updates_per_epoch)
        if t < warmup:
            return self.warmup_lr + (self.lr - self.warmup_lr) * t / warmup
        if self.kind == "exponential":  # FC-DenseNet's: x gamma after every epoch
            return self.lr * self.gamma ** epoch
        if self.kind == "cosine":
            span = max(self.epochs * updates_per_epoch - warmup, 1)
            progress = min((t - warmup) / span, 1.0)
            return self.min_lr + (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress)) / 2
        return self.lr * self.gamma ** sum(epoch >= m for m in self.milestones)

    def to_dict(self) -> dict[str, Any]:
        """What a checkpoint records (the schedule is rebuilt from the configuration)."""
        return {"type": "multistep" if self.kind == "step" else self.kind, "lr": self.lr,
                "milestones": list(self.milestones), "gamma": self.gamma,
                "epochs": self.epochs, "warmup_epochs": self.warmup_epochs,
                "warmup_lr": self.warmup_lr, "min_lr": self.min_lr}


def schedule_of(cfg: Any) -> Schedule:
    """The schedule a :class:`~densenets.training.recipes.TrainConfig` describes."""
    return Schedule(lr=cfg.lr, milestones=list(cfg.milestones), gamma=cfg.gamma,
                    kind=cfg.schedule, epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                    warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr)
