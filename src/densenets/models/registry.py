"""The model families, and what the rest of the library asks of one.

Each family (DenseNet and RDNet now; the 1D/3D DenseNets, the MONAI and TorchXRayVision
layouts, FC-DenseNet next) registers one :class:`Family` record here: its zoo names, its model
and config classes, how a zoo name becomes constructor arguments, its ``pretrained_cfg``, and
which training options apply. The layers above key their own per-family records (checkpoint
layouts in :mod:`densenets.weights`, summary rows and diagrams in :mod:`densenets.analysis`)
by ``Family.name``. Which family a name, a model or a stored configuration belongs to is
decided here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from torch import nn

from . import fcdensenet, rdnet, zoo
from .backbone import FeatureDict, FeatureExtractor, FeatureHooks, backbone_options
from .densenet import DenseNet, DenseNetConfig


@dataclass(frozen=True)
class Family:
    """What the library asks of a model family."""

    name: str  # the key of the per-family records in weights/ and analysis/
    title: str  # for messages: "DenseNet", "RDNet"
    about: str  # one line for the named builders' docstrings
    model: type[nn.Module]
    config: type  # the dataclass a checkpoint's ``model_config`` holds
    names: Callable[[], list[str]]  # the zoo names it lists
    owns: Callable[[str], bool]  # whether a (lower-case) zoo name is one of its models
    model_config: Callable[..., dict[str, Any]]  # zoo name + overrides -> constructor kwargs
    # zoo name (None: not a zoo entry), config dict, loaded weights' preprocessing -> timm's cfg
    pretrained_cfg: Callable[[str | None, dict[str, Any], dict[str, Any] | None],
                             dict[str, Any]]
    features: type[nn.Module] = FeatureExtractor  # the features_only wrapper of its models
    aliases: Mapping[str, str] = field(default_factory=dict)  # other spellings of its options
    supports_drop_path: bool = False  # stochastic depth needs residual branches to drop

    def build(self, config: Mapping[str, Any]) -> nn.Module:
        """A freshly initialised model from constructor arguments (a stored config)."""
        return self.model(**config)

    def backbone(self, model: nn.Module, out_indices: int | Sequence[int] | None = None,
                 feature_cls: str | None = None,
                 feature_cfg: Mapping[str, Any] | None = None) -> nn.Module:
        """``model`` as the ``features_only`` backbone of the kind timm's ``feature_cls``
        names (see :mod:`densenets.models.backbone`); "getter" and "list" are the family's
        ``features`` wrapper."""
        kind, options = backbone_options(feature_cls, feature_cfg, out_indices)
        if kind == "fx":  # torchvision is imported only for this kind
            from .backbone_fx import FeatureGraph

            return FeatureGraph(model, **options)
        cls = {"dict": FeatureDict, "hook": FeatureHooks}.get(kind, self.features)
        return cls(model, **options)

    def config_fields(self) -> set[str]:
        return {f.name for f in fields(self.config)}


DENSENET_FAMILY = Family(
    name="densenet", title="DenseNet", about="DenseNet, Huang et al., CVPR 2017",
    model=DenseNet, config=DenseNetConfig, names=zoo.list_models, owns=zoo.is_zoo_name,
    model_config=zoo.model_config, pretrained_cfg=zoo.pretrained_cfg)

RDNET_FAMILY = Family(
    name="rdnet", title="RDNet", about="RDNet, DenseNets Reloaded, ECCV 2024",
    model=rdnet.RDNet, config=rdnet.RDNetConfig, names=lambda: list(rdnet.RDNET),
    owns=lambda key: key in rdnet.RDNET, model_config=rdnet.rdnet_config,
    pretrained_cfg=rdnet.rdnet_pretrained_cfg, features=rdnet.RDNetFeatures,
    # RDNet's drop_rate is timm's (before the classifier), which the DenseNets call head_drop_rate
    aliases={"head_drop_rate": "drop_rate"}, supports_drop_path=True)

FCDENSENET_FAMILY = Family(
    name="fcdensenet", title="FCDenseNet",
    about="FC-DenseNet (the Tiramisu), Jegou et al., CVPRW 2017",
    model=fcdensenet.FCDenseNet, config=fcdensenet.FCDenseNetConfig,
    names=lambda: list(fcdensenet.FCDENSENET), owns=lambda key: key in fcdensenet.FCDENSENET,
    model_config=fcdensenet.fcdensenet_config,
    pretrained_cfg=fcdensenet.fcdensenet_pretrained_cfg)

# In listing order; the first is the default for names no family claims (its zoo explains).
FAMILIES: dict[str, Family] = {f.name: f for f in (DENSENET_FAMILY, RDNET_FAMILY,
                                                   FCDENSENET_FAMILY)}


def family(name: str) -> Family:
    """The family registered as ``name`` ("densenet", "rdnet")."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; registered: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_for(model_name: str) -> Family:
    """The family of a zoo name. A name no family claims goes to the first (DenseNet), whose
    ``model_config`` then says which names are valid and which are close."""
    key = model_name.strip().lower()
    default = next(iter(FAMILIES.values()))
    return next((f for f in FAMILIES.values() if f.owns(key)), default)


def family_of(model: object) -> Family | None:
    """The family whose model class ``model`` is an instance of; None for anything else."""
    return next((f for f in FAMILIES.values() if isinstance(model, f.model)), None)


def zoo_name(model: nn.Module) -> str | None:
    """The zoo entry ``model`` was created from: its ``pretrained_cfg``'s ``architecture``
    (``create_model`` sets it), else the name its loaded weights carry; None for a model built
    from its class."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    meta = getattr(model, "weights_meta", None) or {}
    return cfg.get("architecture") or meta.get("model_name") or None


def family_for_config(config: Mapping[str, Any]) -> Family:
    """The family whose config dataclass has every key of a stored ``model_config`` (older
    checkpoints may lack newer fields; no two families share all of each other's)."""
    for f in FAMILIES.values():
        if set(config) <= f.config_fields():
            return f
    raise ValueError(f"the stored model_config (keys {sorted(config)}) fits no model family "
                     f"({', '.join(f.title for f in FAMILIES.values())})")


def model_from_config(config: Mapping[str, Any]) -> nn.Module:
    """The architecture a checkpoint's ``model_config`` describes, freshly initialised."""
    return family_for_config(config).build(config)


def list_models() -> list[str]:
    """Every named model, family by family (CIFAR patterns accept any other valid depth)."""
    return [n for f in FAMILIES.values() for n in f.names()]


def model_kinds() -> str:
    """The families' titles, for messages: "DenseNet or RDNet"."""
    titles = [f.title for f in FAMILIES.values()]
    return ", ".join(titles[:-1]) + " or " + titles[-1] if len(titles) > 1 else titles[0]
