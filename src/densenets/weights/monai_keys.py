"""MONAI's DenseNet checkpoints both ways, and DenseNet checkpoints of every rank.

MONAI's ``DenseNet`` and ``DenseNet121/169/201/264`` (``monai.networks.nets``) name parameters as
torchvision does but for two places: a dense layer's modules sit in a ``layers`` Sequential
(``features.denseblockN.denselayerM.layers.norm1.weight``) and the classifier is
``class_layers.out``. Its architecture is this library's ImageNet-stem DenseNet with the
bottleneck and compression 0.5 (transitions emit m // 2 channels), ReLU, global average pooling,
for 1, 2 or 3 spatial dimensions and MONAI's ``norm``; its four names are ours
(121, 169, 201 and 264 with k = 32, 64 stem channels and the same blocks).

What the tensors show, for any DenseNet state dict: the rank (the stem kernel's) and the
normalisation (read off the norms' tensors). Running statistics mean batch norm (MONAI's
instance norm with ``track_running_stats`` looks the same and computes the same in eval mode;
to train it as instance norm pass ``norm=``); no tensors mean instance norm without affine
(MONAI's ``"instance"``); a scale and shift alone are instance norm with affine or group norm,
which the tensors cannot tell apart: refused unless ``norm=`` says which. A configuration
stored in the file wins over all of this. 2D weights for a 3D model are inflated
(:mod:`.inflate`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..models.registry import family_of
from .inflate import inflate_state_dict, rank_shown
from .keymap import DENSENET_LAYOUT, build_densenet, infer_config, remap_state_dict
from .layout import Checkpoint, Error

_MONAI_LAYER = re.compile(r"^(.*\.denselayer\d+)\.layers\.")
_OUR_LAYER = re.compile(r"^(.*\.denselayer\d+)\.(?=(?:norm|conv)[12]\.)")
_MONAI_HEAD, _OUR_HEAD = "class_layers.out.", "classifier."
_NORM = re.compile(r"\.norm\d*\.(weight|running_mean)$")


def from_monai_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MONAI's keys as this library's (torchvision's); other keys unchanged."""
    def key(k: str) -> str:
        k = _MONAI_LAYER.sub(r"\1.", k)
        return _OUR_HEAD + k[len(_MONAI_HEAD):] if k.startswith(_MONAI_HEAD) else k
    return {key(k): v for k, v in state_dict.items()}


def to_monai_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This library's keys as MONAI's DenseNet names them."""
    def key(k: str) -> str:
        k = _OUR_LAYER.sub(r"\1.layers.", k)
        return _MONAI_HEAD + k[len(_OUR_HEAD):] if k.startswith(_OUR_HEAD) else k
    return {key(k): v for k, v in state_dict.items()}


def canonical_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """Any DenseNet state dict (or checkpoint wrapping one), MONAI's included, with canonical
    keys."""
    return from_monai_keys(remap_state_dict(obj))


def norm_shown(state_dict: Mapping[str, torch.Tensor]) -> Any:
    """The normalisation a canonical state dict shows, in MONAI's spelling; None where the
    tensors cannot tell (a scale and shift without running statistics)."""
    found = {m.group(1) for k in state_dict if (m := _NORM.search(k))}
    stats, affine = "running_mean" in found, "weight" in found
    if stats:
        return "batch" if affine else ("batch", {"affine": False})
    return None if affine else "instance"


def _ambiguous_norm() -> str:
    return ("the checkpoint's norms have a scale and shift but no running statistics: instance "
            "norm with affine or group norm, which the weights cannot tell apart; pass "
            "norm=('instance', {'affine': True}) or norm=('group', {'num_groups': G})")


def infer_nd_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The DenseNet arguments a canonical state dict of any rank was made with.

    The architecture is read off the kernels' leading axes (as for 2D weights) and the rank
    off the stem kernel; the normalisation as :func:`norm_shown` reads it (None if ambiguous).
    """
    def as_2d(v: torch.Tensor) -> torch.Tensor:  # shapes only: nothing is computed on them
        return torch.empty(*v.shape[:2], v.shape[-1], v.shape[-1], device="meta")

    flat = {k: as_2d(v) if v.dim() in (3, 5) else v for k, v in state_dict.items()}
    return {**infer_config(flat), "spatial_dims": rank_shown(state_dict),
            "norm": norm_shown(state_dict)}


def build_any_rank(name: str | None, ckpt: Checkpoint, overrides: Mapping[str, Any],
                   error: Error = ValueError) -> tuple[nn.Module, list[str]]:
    """:func:`~.keymap.build_densenet` for a checkpoint of any rank and normalisation: the
    model's rank and norm are the overrides', else the stored configuration's, else what the
    tensors show; 2D weights for a 3D model are inflated first."""
    stored = ckpt.config or {}
    shown = rank_shown(ckpt.state_dict)
    dims = overrides.get("spatial_dims", stored.get("spatial_dims", shown))
    norm = overrides.get("norm", stored.get("norm")) or norm_shown(ckpt.state_dict)
    if norm is None:
        raise error(_ambiguous_norm())
    notes: list[str] = []
    if shown is not None and dims is not None and dims != shown:
        try:
            ckpt.state_dict, notes = inflate_state_dict(ckpt.state_dict, shown, dims,
                                                        overrides.get("in_channels"))
        except ValueError as e:
            raise error(str(e)) from None
    if name is None and not ckpt.config:
        ckpt.config = infer_nd_config(ckpt.state_dict)
    extra = {"spatial_dims": dims, "norm": norm} if dims is not None else {"norm": norm}
    model, more = build_densenet(name, ckpt, {**overrides, **extra}, error)
    return model, notes + more


# ---------------------------------------------------------------- writing MONAI's layout

def _monai_cannot(model: nn.Module) -> str | None:
    """Why MONAI's DenseNet cannot hold ``model``'s weights and computation, or None."""
    family = family_of(model)
    if family is None or family.name != "densenet":
        return f"it is a {type(model).__name__}, and MONAI's DenseNet holds DenseNets only"
    c = model.config
    if c.stem != "imagenet" or c.deep_stem or c.blur_pool:
        return ("its stem is not the 7x7 convolution + max pool (MONAI's only stem); "
                f"stem={c.stem!r}, deep_stem={c.deep_stem}, blur_pool={c.blur_pool}")
    if not c.bottleneck:
        return "it has no bottleneck, and MONAI's dense layers always have the 1x1 bottleneck"
    halves = all(t.conv.out_channels == t.conv.in_channels // 2 for n, t in
                 model.features.named_children() if n.startswith("transition"))
    if not halves:
        return (f"its transitions compress by theta = {c.compression}, and MONAI's halve the "
                "channels (theta = 0.5)")
    if c.global_pool != "avg" or not c.num_classes:
        return (f"its head is global_pool={c.global_pool!r} with {c.num_classes} classes, and "
                "MONAI's is global average pooling into a linear classifier")
    return None


def _check_monai(model: nn.Module) -> None:
    why = _monai_cannot(model)
    if why:
        raise ValueError(f"MONAI's DenseNet cannot hold this model: {why}; save it in "
                         "densenets' layout (layout=None)")


def monai_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s weights in the layout MONAI's ``DenseNet`` (and ``DenseNet121/169/201/264``
    of the same configuration) loads with ``strict=True``, or ValueError saying why MONAI's
    DenseNet cannot express the model."""
    _check_monai(model)
    return to_monai_keys({k: v.detach().cpu().contiguous()
                          for k, v in model.state_dict().items()})


def monai_kwargs(model: nn.Module) -> dict[str, Any]:
    """The arguments of MONAI's ``DenseNet`` that build ``model``'s network: the one a file
    written by :func:`monai_state_dict` loads into (ValueError as there when there is none)."""
    _check_monai(model)
    c = model.config
    norm = c.norm if isinstance(c.norm, str) else (c.norm[0], dict(c.norm[1]))
    return {"spatial_dims": c.spatial_dims, "in_channels": c.in_channels,
            "out_channels": c.num_classes, "init_features": c.num_init_features,
            "growth_rate": c.growth_rate, "block_config": tuple(c.block_config),
            "bn_size": c.bn_size, "norm": norm, "dropout_prob": float(c.drop_rate)}


# The DenseNet family's checkpoint layout (keymap's) that reads MONAI's keys too, and builds
# for any rank and normalisation: the one registered for the family.
MONAI_LAYOUT = dataclasses.replace(DENSENET_LAYOUT, canonical=canonical_state_dict,
                                   build=build_any_rank)

__all__ = ["MONAI_LAYOUT", "build_any_rank", "canonical_state_dict", "from_monai_keys",
           "infer_nd_config", "monai_kwargs", "monai_state_dict", "norm_shown",
           "to_monai_keys"]
