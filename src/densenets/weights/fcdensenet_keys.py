"""FC-DenseNet checkpoints: recognising them, reading their architecture off the tensors, and
loading into a model.

The layout is the model's own (``conv0``, ``denseblock_down1.denselayer1.norm1``,
``transition_down1``, ``bottleneck``, ``transition_up1.conv``, ``denseblock_up1``,
``classifier``), as ``densenets.save`` writes it; DataParallel/DDP and torch.compile prefixes
and the usual wrappers (``{"state_dict": ...}``, ``{"model": ...}``) are taken off.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..models.fcdensenet import FCDENSENET, FCDenseNet, fcdensenet_config
from .keymap import adapt_input_conv, key_diff
from .layout import Checkpoint, Error, Layout, unwrap_tensors

_WRAPPERS = ("model", "state_dict", "model_state_dict", "model_state", "net", "network")
_PREFIXES = ("module.", "_orig_mod.")
_MARK = re.compile(r"^(module\.|_orig_mod\.)*(denseblock_down|transition_up)\d+\.")
FIRST_CONV, CLASSIFIER = "conv0.weight", "classifier.weight"


def _tensors(obj: Any) -> Mapping[str, Any] | None:
    return unwrap_tensors(obj, _WRAPPERS)


def holds_fcdensenet(obj: Any) -> bool:
    """Whether ``obj`` (a state dict or a checkpoint wrapping one) holds FC-DenseNet weights."""
    sd = _tensors(obj)
    return sd is not None and any(_MARK.match(str(k)) for k in sd)


def fcdensenet_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The state dict in ``obj`` with the model's own keys."""
    sd = _tensors(obj)
    if sd is None:
        raise ValueError("no state dict found in the FC-DenseNet checkpoint")
    out = {str(k): v for k, v in sd.items() if torch.is_tensor(v)}
    for prefix in _PREFIXES:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    return out


def _layers(sd: Mapping[str, torch.Tensor], block: str) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(rf"{block}\.denselayer(\d+)\.", k))}
    return max(found, default=0)


def infer_fcdensenet_config(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The architecture a state dict holds, read off its tensors."""
    if FIRST_CONV not in sd or CLASSIFIER not in sd:
        raise ValueError("not an FC-DenseNet state dict: it lacks conv0.weight or "
                         "classifier.weight")
    pools = max((int(m.group(1)) for k in sd if (m := re.match(r"denseblock_down(\d+)\.", k))),
                default=0)
    first = sd[FIRST_CONV]
    return dict(
        down_blocks=tuple(_layers(sd, f"denseblock_down{i}") for i in range(1, pools + 1)),
        bottleneck_layers=_layers(sd, "bottleneck"),
        up_blocks=tuple(_layers(sd, f"denseblock_up{i}") for i in range(1, pools + 1)),
        growth_rate=int(sd["bottleneck.denselayer1.conv1.weight"].shape[0]),
        num_init_features=int(first.shape[0]), in_channels=int(first.shape[1]),
        num_classes=int(sd[CLASSIFIER].shape[0]), spatial_dims=first.dim() - 2)


def load_fcdensenet(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                    error: Error = ValueError) -> list[str]:
    """Copy a state dict into ``model``; return notes on what was adapted.

    A classifier of another size keeps its fresh initialisation (fine-tuning) and a 3-channel
    first convolution is adapted to the model's input channels; any other difference raises
    ``error`` before anything is copied."""
    own, sd, notes = model.state_dict(), dict(state_dict), []
    w = FIRST_CONV
    if w in sd and sd[w].shape != own[w].shape and sd[w].shape[0] == own[w].shape[0] \
            and sd[w].shape[2:] == own[w].shape[2:]:
        notes.append(f"adapted conv0 from {sd[w].shape[1]} to {own[w].shape[1]} input channels")
        sd[w] = adapt_input_conv(sd[w], own[w].shape[1])
    c = CLASSIFIER
    if c in sd and sd[c].shape != own[c].shape and sd[c].shape[1:] == own[c].shape[1:]:
        notes.append(f"classifier not loaded: the checkpoint has {sd[c].shape[0]} classes and "
                     f"the model {own[c].shape[0]}, so it keeps its fresh initialisation; "
                     "everything else was loaded")
        sd[c], sd["classifier.bias"] = own[c], own["classifier.bias"]
    missing, unexpected, conflicts = key_diff(own, sd)
    if missing or unexpected or conflicts:
        parts = [f"{len(missing)} missing ({', '.join(missing[:4])})" if missing else "",
                 f"{len(unexpected)} unexpected ({', '.join(unexpected[:4])})"
                 if unexpected else "",
                 "shape conflicts: " + ", ".join(f"{k} model {list(a)} checkpoint {list(b)}"
                                                 for k, a, b in conflicts[:3])
                 if conflicts else ""]
        raise error("the checkpoint does not fit this FCDenseNet: "
                    + "; ".join(p for p in parts if p) + "; nothing was loaded")
    for k in own:
        sd.setdefault(k, own[k])  # num_batches_tracked
    model.load_state_dict(sd, strict=True)
    return notes


def _build(name: str | None, ckpt: Checkpoint, overrides: Mapping[str, Any],
           error: Error) -> tuple[FCDenseNet, list[str]]:
    """The zoo entry ``name`` (None: the stored or inferred architecture) with the checkpoint's
    classes and input channels unless ``overrides`` says otherwise, loaded."""
    sd = ckpt.state_dict
    config = fcdensenet_config(name, **overrides) if name else \
        {**(ckpt.config or infer_fcdensenet_config(sd)), **overrides}
    if CLASSIFIER in sd and "num_classes" not in overrides:
        config["num_classes"] = int(sd[CLASSIFIER].shape[0])
    if FIRST_CONV in sd and "in_channels" not in overrides:
        config["in_channels"] = int(sd[FIRST_CONV].shape[1])
    model = FCDenseNet(**config)
    return model, load_fcdensenet(model, sd, error)


def _name_of(model: nn.Module) -> str:
    """The zoo name whose architecture ``model`` has, else a description of it."""
    c = model.config
    for name, cfg in FCDENSENET.items():
        if all(getattr(c, k) == v for k, v in cfg.items()) and c.num_init_features == 48:
            return name
    return (f"FCDenseNet(k={c.growth_rate}, down={list(c.down_blocks)}, "
            f"bottleneck={c.bottleneck_layers}, up={list(c.up_blocks)})")


FCDENSENET_LAYOUT = Layout(
    family="fcdensenet", holds=holds_fcdensenet, canonical=fcdensenet_state_dict, build=_build,
    load=load_fcdensenet, default_meta=lambda model: {}, name_of=_name_of)
