"""The Trainer's settings in groups: how each step runs, what is saved and when, what is shown.

With :class:`~densenets.training.optim.OptimizerSettings`, the
:class:`~densenets.training.schedule.Schedule` and the
:class:`~densenets.training.optim.UpdateRules` they are everything a
:class:`~densenets.training.loop.Trainer` takes beyond the model and its data. Each group's
fields carry the names of the :class:`~densenets.training.config.TrainConfig` fields they come
from, so a run builds them with :func:`~densenets.training.fields.pick`; the flat keywords
of earlier versions (``Trainer(..., optimizer="adamw", amp="bf16")``) still work through
:func:`regroup`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .optim import OptimizerSettings


@dataclass(kw_only=True)
class Execution:
    """Where and how each step runs."""

    device: str | torch.device = "cpu"
    amp: str | None = None  # bf16 | fp16 autocast
    channels_last: bool = False
    compile: bool = False  # torch.compile the model
    cuda_graphs: bool = False  # replay each step as one CUDA graph (the paper's plain step)


@dataclass(kw_only=True)
class Checkpointing:
    """What every checkpoint holds beyond the training state, when one is written, and when
    the run stops early.

    ``extra`` is merged into every checkpoint (model_config, model_name, meta, config);
    ``save_every`` also writes last.pt every N optimiser steps, not only per epoch;
    ``stop_after`` stops (resumably) after that epoch; ``select_on`` names the evaluation
    split whose top-1 error picks best.pt (default: ``val`` if present, else the first split).
    """

    extra: dict[str, Any] = field(default_factory=dict)
    save_every: int | None = None
    stop_after: int | None = None
    select_on: str | None = None

    def __post_init__(self) -> None:
        if self.save_every is not None and self.save_every < 1:
            raise ValueError(f"--save-every must be >= 1 optimiser step, got {self.save_every}")


@dataclass(kw_only=True)
class Reporting:
    """What the run shows and how often it looks at the device's numbers."""

    summary_extra: dict[str, Any] = field(default_factory=dict)  # merged into summary.json
    progress: bool | None = None  # a live progress line (default: when stdout is a terminal)
    log: Callable[[str], None] | None = None  # where the epoch lines go (default: stdout)
    # Steps between host syncs (loss check, progress): default 1 on CPU, 25 on a GPU.
    sync_every: int | None = None


GROUPS: dict[str, type] = {"optim": OptimizerSettings, "execution": Execution,
                           "checkpointing": Checkpointing, "reporting": Reporting}
_RENAMED = {"checkpoint_extra": "extra"}  # the flat keyword's name where the field's differs


def regroup(groups: dict[str, Any], flat: dict[str, Any]) -> dict[str, Any]:
    """Each group given, or built from the flat keywords that name its fields (or defaults).

    A flat keyword that names no field of any group is a TypeError, as for any function; one
    given together with its group is ambiguous, and refused as well.
    """
    flat = {_RENAMED.get(k, k): v for k, v in flat.items()}
    out = {}
    for name, cls in GROUPS.items():
        mine = {f.name for f in dataclasses.fields(cls)} & set(flat)
        if groups.get(name) is not None and mine:
            raise TypeError(f"Trainer() got {', '.join(sorted(mine))} and {name}=; pass one")
        out[name] = groups.get(name) or cls(**{k: flat.pop(k) for k in mine})
    if flat:
        raise TypeError(f"Trainer() got unexpected keyword arguments: {', '.join(sorted(flat))}")
    return out
