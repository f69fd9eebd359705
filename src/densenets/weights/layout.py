"""What a read checkpoint is, and the record each model family's checkpoint layout fills in.

One :class:`Layout` per family (DenseNet's in :mod:`.keymap`, RDNet's in :mod:`.rdnet_keys`),
keyed by the family's registry name; :mod:`.files` reads, builds, loads and names through them
and decides nothing per family.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


def unwrap_tensors(obj: Any, wrappers: tuple[str, ...]) -> Mapping[str, Any] | None:
    """The state dict inside ``obj``: ``obj`` itself when it holds tensors, else the first of
    its ``wrappers`` keys that is a mapping, looked into the same way (None: no tensors)."""
    while isinstance(obj, Mapping) and not any(torch.is_tensor(v) for v in obj.values()):
        obj = next((obj[k] for k in wrappers if isinstance(obj.get(k), Mapping)), None)
    return obj if isinstance(obj, Mapping) else None


# How a layout reports a checkpoint that does not fit (files.KeyMismatchError).
Error = Callable[[str], Exception]


@dataclass
class Checkpoint:
    """What a weights file holds once read: canonical state dict plus what it says about itself."""

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    model_name: str | None = None
    path: str | None = None
    family: str = "densenet"  # the registry name of the family whose layout the keys are in


@dataclass(frozen=True)
class Layout:
    """One family's checkpoints: recognising them, their canonical keys, a model for them."""

    family: str  # the models registry's Family.name
    holds: Callable[[Any], bool]  # whether a raw checkpoint object holds this family's weights
    canonical: Callable[[Any], dict[str, torch.Tensor]]  # raw object -> canonical keys
    # zoo name (None: the checkpoint's own architecture), checkpoint, overrides, error ->
    # the model with the weights loaded, and notes on what was adapted
    build: Callable[[str | None, Checkpoint, Mapping[str, Any], Error],
                    tuple[nn.Module, list[str]]]
    load: Callable[[nn.Module, Mapping[str, torch.Tensor], Error], list[str]]
    default_meta: Callable[[nn.Module], dict[str, Any]]  # meta the weights imply unless stated
    name_of: Callable[[nn.Module], str]  # the model's name when nothing else names it
