"""The zoo's front door: ``create_model`` and the named builders.

It sits above :mod:`densenets.models` (the architectures, their named configurations and the
family registry) and :mod:`densenets.weights` (which reads those configurations to build a
model for a checkpoint), so that neither of them needs the other's entry point. Every family
goes through the same path: the registry says which family a name is and how to build it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from .models.registry import Family, family_for, list_models, model_from_config
from .weights.files import default_weights, pretrained_model

__all__ = ["create_model", "densenet121", "densenet161", "densenet169", "densenet201",
           "densenet264", "densenet264d", "densenetblur121d", "fcdensenet56", "fcdensenet67",
           "fcdensenet103", "list_models", "model_from_config",
           "rdnet_base", "rdnet_large", "rdnet_small", "rdnet_tiny"]


def create_model(name: str, weights: str | os.PathLike | None = None,
                 features_only: bool = False,
                 out_indices: int | Sequence[int] | None = None,
                 feature_cls: str | None = None,
                 feature_cfg: Mapping[str, Any] | None = None,
                 **overrides: Any) -> nn.Module:
    """Build a zoo model by name; keyword overrides replace any of its constructor arguments.

    ``create_model("densenet-bc-100-k12", num_classes=100)``,
    ``create_model("densenet121", in_channels=1, memory_efficient=True)``.
    ``weights="imagenet"`` loads the published weights (torchvision's for 121/161/169/201,
    fetched once into torch.hub's cache; the Hub's for densenetblur121d and the RDNets),
    ``"hf-hub:ORG/NAME"`` a Hugging Face Hub repository, ``"xrv:densenet121-res224-all"`` (for
    densenet121) a TorchXRayVision chest X-ray weight set (one channel, 18 pathologies, see
    docs/medical.md), ``weights=PATH`` a local checkpoint (whole pickled TorchXRayVision
    modules included, read without running their code);
    with a different ``num_classes`` everything but the classifier is loaded (see
    :mod:`densenets.weights.files`). ``features_only=True`` returns a backbone giving the maps
    at the model's taps (``out_indices`` picks some, an int n the last n), and timm's
    ``feature_cls`` ("getter", "list", "dict", "hook", "fx") or ``feature_cfg`` (a dict with
    ``feature_cls`` and that kind's options) say how they are taken and returned (see
    :mod:`densenets.models.backbone`). timm's keywords work as in ``timm.create_model``:
    ``pretrained=True``, ``in_chans``, ``global_pool``, ``num_classes=0``; a DenseNet's
    ``drop_rate`` stays the paper's dropout after every convolution and ``head_drop_rate`` is
    timm's ``drop_rate`` (see docs/timm.md). ``rdnet_tiny|small|base|large`` build RDNets
    (:mod:`densenets.models.rdnet`).
    """
    if not features_only and (feature_cls is not None or feature_cfg is not None):
        raise ValueError("feature_cls and feature_cfg choose a backbone's form: pass them with "
                         "features_only=True")
    key = name.strip().lower()
    family = family_for(key)
    kw = _timm_keywords(family, overrides)
    if kw.pop("pretrained", False) and weights is None:
        weights = default_weights(key)
    if weights is None:
        model = family.build(family.model_config(key, **kw))
    else:
        model = _with_weights(key, weights, kw)
    meta = getattr(model, "weights_meta", None) or {}
    # the data configuration the loaded weights were evaluated with, else the zoo entry's
    model.pretrained_cfg = family.pretrained_cfg(key, model.config.to_dict(),
                                                 meta.get("preprocessing"))
    if not features_only:
        return model
    return family.backbone(model, out_indices, feature_cls, feature_cfg)


def _timm_keywords(family: Family, overrides: dict[str, Any]) -> dict[str, Any]:
    """Overrides in the family's own spelling: timm's ``in_chans`` is ``in_channels``, and a
    family's aliases (RDNet's ``head_drop_rate`` is its ``drop_rate``) are renamed."""
    kw = dict(overrides)
    if "in_chans" in kw:
        chans = kw.pop("in_chans")
        if kw.setdefault("in_channels", chans) != chans:
            raise ValueError(f"in_chans={chans} and in_channels={kw['in_channels']} disagree; "
                             "they are one setting (timm's and this library's name): pass one")
    for alias, option in family.aliases.items():
        if alias in kw:
            kw[option] = kw.pop(alias)
    return kw


def _with_weights(key: str, weights: str | os.PathLike, kw: dict[str, Any]) -> nn.Module:
    """The zoo model with loaded weights. A head that cannot take the checkpoint's classifier
    (``num_classes=0``, no pooling, or a pooling that changes its input width) is put on after
    loading."""
    head = kw.get("num_classes") == 0 or kw.get("global_pool") in ("", "catavgmax")
    n, pool = (kw.pop("num_classes", None), kw.pop("global_pool", None)) if head else (0, 0)
    model = pretrained_model(key, weights, **kw)
    if head:
        n = model.num_classes if n is None else n
        if n:
            warnings.warn(f"classifier not loaded: global_pool={pool!r} doubles its input "
                          "features, so it is freshly initialised", UserWarning, stacklevel=3)
        model.reset_classifier(n, pool)
    return model


def builder(name: str):
    """The named builder of the zoo entry ``name``, also torch.hub's entry point for it:
    ``pretrained=True`` (or ``weights="imagenet"``) loads its published weights, ``weights=PATH``
    a local file; other keyword arguments as in :func:`create_model`."""
    def build(pretrained: bool = False, weights: str | os.PathLike | None = None,
              **overrides: Any) -> nn.Module:
        return create_model(name, weights=weights, pretrained=pretrained, **overrides)

    build.__name__ = name.replace("-", "_")
    build.__doc__ = (f"{name} ({family_for(name).about}); weights='imagenet' (or "
                     "pretrained=True) loads its published weights, weights=PATH a local file; "
                     "other keyword arguments as in densenets.create_model (num_classes, "
                     "features_only, ...).")
    return build


densenet121 = builder("densenet121")
densenet161 = builder("densenet161")
densenet169 = builder("densenet169")
densenet201 = builder("densenet201")
densenet264 = builder("densenet264")
densenet264d = builder("densenet264d")
densenetblur121d = builder("densenetblur121d")
rdnet_tiny = builder("rdnet_tiny")
rdnet_small = builder("rdnet_small")
rdnet_base = builder("rdnet_base")
rdnet_large = builder("rdnet_large")
fcdensenet56 = builder("fcdensenet56")
fcdensenet67 = builder("fcdensenet67")
fcdensenet103 = builder("fcdensenet103")
