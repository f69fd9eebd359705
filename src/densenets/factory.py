"""The zoo's front door: ``create_model`` and the named builders.

It sits above :mod:`densenets.models` (the architectures and their named configurations) and
:mod:`densenets.weights` (which reads those configurations to build a model for a checkpoint),
so that neither of them needs the other's entry point.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

from .models.backbone import FeatureExtractor
from .models.densenet import DenseNet
from .models.rdnet import RDNET, RDNet, RDNetFeatures, rdnet_config, rdnet_pretrained_cfg
from .models.zoo import IMAGENET, model_config, pretrained_cfg
from .models.zoo import list_models as _densenet_models
from .weights.files import pretrained_model
from .weights.pretrained import PRETRAINED

__all__ = ["create_model", "densenet121", "densenet161", "densenet169", "densenet201",
           "densenet264", "densenet264d", "densenetblur121d", "list_models", "rdnet_base",
           "rdnet_large", "rdnet_small", "rdnet_tiny"]


def list_models() -> list[str]:
    """Every named model: the DenseNet zoo (CIFAR patterns accept any other valid depth too)
    and the four RDNet sizes."""
    return _densenet_models() + list(RDNET)


def _create_rdnet(name: str, weights: str | os.PathLike | None, features_only: bool,
                  out_indices: Any, overrides: dict[str, Any]) -> RDNet | RDNetFeatures:
    """An RDNet size; timm's spellings ``in_chans`` and ``pretrained=True`` are understood.

    RDNet's ``drop_rate`` is timm's (dropout before the classifier: the paper has no dropout
    after convolutions), so ``head_drop_rate``, the DenseNets' name for it, means the same.
    """
    if "in_chans" in overrides:
        overrides["in_channels"] = overrides.pop("in_chans")
    if "head_drop_rate" in overrides:
        overrides["drop_rate"] = overrides.pop("head_drop_rate")
    if overrides.pop("pretrained", False) and weights is None:
        weights = "imagenet"
    key = name.strip().lower()
    if weights is not None:
        model = pretrained_model(key, weights, **overrides)
    else:
        model = RDNet(**rdnet_config(key, **overrides))
        model.pretrained_cfg = rdnet_pretrained_cfg(key, model.num_classes,
                                                    model.config.in_channels)
    return RDNetFeatures(model, out_indices) if features_only else model


def create_model(name: str, weights: str | os.PathLike | None = None,
                 features_only: bool = False,
                 out_indices: int | Sequence[int] | None = None,
                 **overrides: Any) -> DenseNet | FeatureExtractor:
    """Build a zoo model by name; keyword overrides replace any DenseNet argument.

    ``create_model("densenet-bc-100-k12", num_classes=100)``,
    ``create_model("densenet121", in_channels=1, memory_efficient=True)``.
    ``weights="imagenet"`` loads torchvision's published weights (121/161/169/201, fetched once
    into torch.hub's cache), ``weights=PATH`` a local checkpoint; with a different
    ``num_classes`` everything but the classifier is loaded (see :mod:`densenets.weights.files`).
    ``features_only=True`` returns a backbone giving the maps after the stem and each dense
    block (``out_indices`` picks some, an int n the last n; see :mod:`densenets.models.backbone`).
    timm's keywords work as in ``timm.create_model``: ``pretrained=True``, ``in_chans``,
    ``global_pool``, ``num_classes=0``; ``drop_rate`` stays the paper's dropout after every
    convolution and ``head_drop_rate`` is timm's ``drop_rate`` (see docs/timm.md).
    ``rdnet_tiny|small|base|large`` build RDNets (:mod:`densenets.models.rdnet`), whose
    ``weights`` may also be ``"imagenet"`` (the authors' ImageNet-1k weights on the Hub) or
    ``"hf-hub:ORG/NAME"``.
    """
    if name.strip().lower() in RDNET:
        return _create_rdnet(name, weights, features_only, out_indices, overrides)
    return _create_densenet(name, weights, features_only, out_indices, overrides)


def _default_weights(name: str) -> str:
    """What ``pretrained=True`` loads: torchvision's weights, else the zoo entry's Hub weights."""
    key = name.strip().lower()
    if key in PRETRAINED:
        return "imagenet"
    hub = pretrained_cfg(key, {}).get("hf_hub_id")
    if hub:
        return f"hf-hub:{hub}"
    raise ValueError(f"pretrained=True: there are no published weights for {name!r} (they exist "
                     f"for {', '.join(PRETRAINED)} and densenetblur121d); pass weights=PATH")


def _create_densenet(name: str, weights: str | os.PathLike | None, features_only: bool,
                     out_indices: int | Sequence[int] | None,
                     overrides: dict[str, Any]) -> DenseNet | FeatureExtractor:
    """A zoo DenseNet. timm's keywords mean what they mean in timm: ``pretrained=True``
    (the default weights), ``in_chans`` (our ``in_channels``), ``global_pool``, and
    ``num_classes=0`` (no classifier), also together with ``weights``."""
    kw = dict(overrides)
    if "in_chans" in kw:
        chans = kw.pop("in_chans")
        if kw.setdefault("in_channels", chans) != chans:
            raise ValueError(f"in_chans={chans} and in_channels={kw['in_channels']} disagree; "
                             "they are one setting (timm's and this library's name): pass one")
    if kw.pop("pretrained", False) and weights is None:
        weights = _default_weights(name)
    if weights is None:
        model = DenseNet(**model_config(name, **kw))
        model.pretrained_cfg = pretrained_cfg(name, model.config.to_dict())
    else:
        # A head that cannot take the checkpoint's classifier is put on after loading.
        head = kw.get("num_classes") == 0 or kw.get("global_pool") in ("", "catavgmax")
        n, pool = (kw.pop("num_classes", None), kw.pop("global_pool", None)) if head else (0, 0)
        model = pretrained_model(name, weights, **kw)
        if head:
            n = model.num_classes if n is None else n
            if n:
                warnings.warn(f"classifier not loaded: global_pool={pool!r} doubles its input "
                              "features, so it is freshly initialised", UserWarning, stacklevel=3)
            model.reset_classifier(n, pool)
        meta = getattr(model, "weights_meta", None) or {}
        model.pretrained_cfg = pretrained_cfg(name, model.config.to_dict(),
                                              meta.get("preprocessing"))
    if features_only:
        return FeatureExtractor(model, out_indices)
    return model


def model_from_config(config: dict[str, Any]) -> DenseNet | RDNet:
    """The architecture a checkpoint's ``model_config`` describes, freshly initialised."""
    if "growth_rates" in config:  # only RDNet's configuration has one growth rate per block
        return RDNet(**config)
    return DenseNet(**config)


def _builder(name: str):
    """A named builder for the zoo entry ``name`` (DenseNet or RDNet)."""
    def build(**overrides: Any) -> DenseNet | RDNet:
        return create_model(name, **overrides)

    about = IMAGENET.get(name, "RDNet, ECCV 2024")
    build.__name__ = name
    build.__doc__ = f"{name} ({about}); keyword overrides as in create_model."
    return build


densenet121 = _builder("densenet121")
densenet161 = _builder("densenet161")
densenet169 = _builder("densenet169")
densenet201 = _builder("densenet201")
densenet264 = _builder("densenet264")
densenet264d = _builder("densenet264d")
densenetblur121d = _builder("densenetblur121d")
rdnet_tiny = _builder("rdnet_tiny")
rdnet_small = _builder("rdnet_small")
rdnet_base = _builder("rdnet_base")
rdnet_large = _builder("rdnet_large")
