"""The network a run trains: a zoo name or a CIFAR variant with its depth, plus architecture
overrides, sized for the data; or the one a checkpoint describes.

The architecture flags are declared here once (:class:`Architecture`) and every verb that
builds a model (train, summary, export, predict, reuse, diagram) takes the same ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..factory import create_model, model_from_config
from ..models.densenet import DenseNet
from ..models.zoo import VARIANTS, cifar_config
from .config import ARCHITECTURE, TrainConfig
from .fields import Flag, setting

__all__ = ["Architecture", "build_model", "model_from_checkpoint", "named_model"]


@dataclass(kw_only=True)
class Architecture:
    """What the architecture flags set: each names the model configuration field it replaces,
    but ``depth``, the layer count L of a CIFAR/SVHN variant name, which picks its blocks.
    None: the zoo entry's value. (``--drop-rate`` is :class:`TrainConfig`'s ``drop_rate``.)"""

    depth: int | None = setting(None, flag=Flag(
        ARCHITECTURE, "depth L for a CIFAR/SVHN variant name"))
    growth_rate: int | None = setting(None, flag=Flag(
        ARCHITECTURE, "growth rate k", names=("--growth-rate", "-k")))
    compression: float | None = setting(None, flag=Flag(
        ARCHITECTURE, "compression theta in (0, 1]"))
    block_config: tuple[int, ...] | None = setting(None, flag=Flag(
        ARCHITECTURE, "layers per block", metavar="N", nargs="+"))
    num_init_features: int | None = setting(None, flag=Flag(
        ARCHITECTURE, "channels of the stem convolution", names=("--init-features",)))
    num_classes: int | None = setting(None, flag=Flag(ARCHITECTURE, "classifier outputs"))
    in_channels: int | None = setting(None, flag=Flag(ARCHITECTURE, "input image channels"))
    stem: str | None = setting(None, flag=Flag(
        ARCHITECTURE, "stem type", choices=("imagenet", "cifar")))
    spatial_dims: int | None = setting(None, flag=Flag(
        ARCHITECTURE, "1: signals, 2: images, 3: volumes", choices=(1, 2, 3)))
    norm: str | None = setting(None, flag=Flag(
        ARCHITECTURE, "normalisation (instance and group norm suit batches of 1-4)",
        choices=("batch", "instance", "group")))

    def given(self) -> dict[str, Any]:
        """The flags that were given, by field name (``depth`` included)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def named_model(name: str, depth: int | None = None, weights: str | None = None,
                **overrides: Any) -> tuple[str, nn.Module]:
    """(name, model) for a zoo name, or a variant (densenet, densenet-b, -c, -bc) with its depth.

    ``overrides`` replace configuration fields (None: keep the zoo entry's); ``weights`` as in
    :func:`~densenets.factory.create_model`. A variant's name is completed with its depth and
    growth rate (``densenet-bc-100-k12``).
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides.get("block_config"):
        overrides["block_config"] = tuple(overrides["block_config"])
    key = name.lower()
    if key in VARIANTS:
        if depth is None:
            raise ValueError(f"{key} needs --depth, e.g. `densenets summary {key} --depth 100`")
        if weights:
            raise ValueError(f"--weights applies to a zoo name; {key} --depth {depth} has none")
        k = overrides.pop("growth_rate", 12)
        return f"{key}-{depth}-k{k}", DenseNet(**{**cifar_config(key, depth, k), **overrides})
    if depth is not None:
        raise ValueError("--depth applies to a variant name (densenet, densenet-b, densenet-c, "
                         f"densenet-bc), not to {name!r}")
    return key, create_model(key, weights=weights, **overrides)


def build_model(cfg: TrainConfig, num_classes: int, in_channels: int) -> tuple[str, nn.Module]:
    """The zoo model (DenseNet or RDNet) the configuration names, sized for the data."""
    arch = dict(cfg.model_overrides)
    arch["num_classes"] = arch.get("num_classes") or num_classes
    arch["in_channels"] = arch.get("in_channels") or in_channels
    name, model = named_model(cfg.model, **arch, drop_rate=cfg.drop_rate,
                              drop_path_rate=cfg.drop_path or None)
    if model.config.num_classes != num_classes or model.config.in_channels != in_channels:
        raise ValueError(f"the data has {num_classes} classes of {in_channels}-channel images but "
                         f"the model takes {model.config.num_classes} classes of "
                         f"{model.config.in_channels} channels; drop --num-classes/--in-channels")
    return name, model


def model_from_checkpoint(state: dict[str, Any]) -> tuple[str, nn.Module]:
    """(name, freshly initialised model) of a training checkpoint's ``model_config``."""
    return state["model_name"], model_from_config(state["model_config"])
