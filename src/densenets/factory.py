"""The zoo's front door: ``create_model`` and the named builders.

It sits above :mod:`densenets.models` (the architectures and their named configurations) and
:mod:`densenets.weights` (which reads those configurations to build a model for a checkpoint),
so that neither of them needs the other's entry point.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .models.backbone import FeatureExtractor
from .models.densenet import DenseNet
from .models.zoo import IMAGENET, list_models, model_config
from .weights.files import pretrained_model

__all__ = ["create_model", "densenet121", "densenet161", "densenet169", "densenet201",
           "densenet264", "list_models"]


def create_model(name: str, weights: str | os.PathLike | None = None,
                 features_only: bool = False, out_indices: Sequence[int] | None = None,
                 **overrides: Any) -> DenseNet | FeatureExtractor:
    """Build a zoo model by name; keyword overrides replace any DenseNet argument.

    ``create_model("densenet-bc-100-k12", num_classes=100)``,
    ``create_model("densenet121", in_channels=1, memory_efficient=True)``.
    ``weights="imagenet"`` loads torchvision's published weights (121/161/169/201, fetched once
    into torch.hub's cache), ``weights=PATH`` a local checkpoint; with a different
    ``num_classes`` everything but the classifier is loaded (see :mod:`densenets.weights.files`).
    ``features_only=True`` returns a backbone giving the maps after the stem and each dense
    block (``out_indices`` picks some; see :mod:`densenets.models.backbone`).
    """
    if weights is not None:
        model = pretrained_model(name, weights, **overrides)
    else:
        model = DenseNet(**model_config(name, **overrides))
    if features_only:
        return FeatureExtractor(model, out_indices)
    return model


def _builder(name: str):
    def build(**overrides: Any) -> DenseNet:
        return create_model(name, **overrides)

    build.__name__ = name
    build.__doc__ = f"{name} ({IMAGENET[name]}); keyword overrides as in create_model."
    return build


densenet121 = _builder("densenet121")
densenet161 = _builder("densenet161")
densenet169 = _builder("densenet169")
densenet201 = _builder("densenet201")
densenet264 = _builder("densenet264")
