"""Weight files in and out: every DenseNet checkpoint layout in the wild, torchvision's published
ImageNet checkpoints, and safetensors files that carry the model configuration.

Reading never unpickles arbitrary objects (``torch.load(..., weights_only=True)``) and loading
never half-succeeds: a checkpoint that does not fit the model raises :class:`KeyMismatchError`
listing missing and unexpected keys and shape conflicts.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.registry import FAMILIES, family_for, family_of, model_kinds
from .fcdensenet_keys import FCDENSENET_LAYOUT
from .hub import hub_meta, hub_weights_file, is_hub_id, timm_config, write_config
from .layout import Checkpoint, Layout
from .monai_keys import MONAI_LAYOUT, monai_state_dict
from .pretrained import PRETRAINED, complete_meta, download_weights, pretrained_entry
from .rdnet_keys import RDNET_LAYOUT
from .unpickle import is_module_class, read_module
from .xrv import download_xrv, is_xrv_name, xrv_weights

CHECKPOINT_FORMAT = "densenets.checkpoint"
IMAGENET_ALIASES = ("imagenet", "imagenet1k", "default")

# One checkpoint layout per registered family, by the family's name; recognised in this order
# (most particular first), the last one reading, or explaining, whatever the others do not.
# The DenseNets' reads MONAI's keys too and every rank (monai_keys).
LAYOUTS: dict[str, Layout] = {lay.family: lay for lay in (RDNET_LAYOUT, FCDENSENET_LAYOUT,
                                                           MONAI_LAYOUT)}
# Other libraries' layouts save() writes: the bare state dict their own model class loads.
WRITERS = {"monai": monai_state_dict}
assert set(LAYOUTS) == set(FAMILIES), "every model family registers its checkpoint layout"


class KeyMismatchError(ValueError):
    """A checkpoint does not fit the model; the message is the readable diff."""


# ---------------------------------------------------------------- reading files

def _resolve_path(path: str | os.PathLike) -> Path:
    """A file, or a training run directory (its best.pt, else last.pt)."""
    p = Path(path).expanduser()
    if p.is_dir():
        for name in ("best.pt", "last.pt", "model.safetensors"):
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(f"{p} is a directory without best.pt, last.pt or "
                                "model.safetensors; pass the checkpoint file itself")
    if not p.is_file():
        raise FileNotFoundError(f"no such weights file: {p}")
    return p


def _torch_load(p: Path) -> Any:
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found and is_module_class(found.group(1)):  # a whole pickled model, such as
            return read_module(p)  # TorchXRayVision's: read without running its code
        if found:
            raise ValueError(
                f"refused to load {p}: it contains a Python object ({found.group(1)}) besides "
                "tensors and plain containers, and unpickling it could run arbitrary code. If "
                "you trust the file, re-save only its weights (torch.save(state_dict, ...) or "
                "densenets.save) and load that"
            ) from None
        raise ValueError(f"{p} is not a PyTorch checkpoint (unreadable pickle data)") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{p} is not a readable PyTorch checkpoint ({e})") from None


def _read_safetensors(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            names = list(f.keys())  # safe_open is not iterable
            return {k: f.get_tensor(k) for k in names}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{p} is not a readable safetensors file ({e})") from None


def _state_dict(obj: Any) -> tuple[dict[str, torch.Tensor], str]:
    """Canonical keys in the layout of the family whose weights ``obj`` holds, and its name."""
    layouts = list(LAYOUTS.values())
    layout = next((lay for lay in layouts if lay.holds(obj)), layouts[-1])
    return layout.canonical(obj), layout.family


def no_ema(path: str | os.PathLike, why: str) -> ValueError:
    """The one-line refusal of ``ema`` for a file that keeps no EMA of the weights."""
    return ValueError(f"{path} holds no EMA weights: {why}; drop --ema (ema=True in Python)")


def training_weights(state: dict[str, Any], path: str | os.PathLike,
                     ema: bool = False) -> dict[str, torch.Tensor]:
    """The weights a densenets checkpoint holds: the model's, or with ``ema`` the exponential
    moving average a run trained with ``--ema-decay`` kept beside it (parameters and buffers,
    BN running statistics included, as the average holds them)."""
    if not ema:
        return state["model"]
    if not state.get("ema"):
        raise no_ema(path, "it was trained without --ema-decay" if "ema" in state else
                     "only the checkpoints of a run trained with --ema-decay keep one")
    # torch.optim.swa_utils.AveragedModel's keys: the averaged module's under "module.", beside
    # its step counter n_averaged, which is no weight of the model.
    prefix = "module."
    return {k[len(prefix):]: v for k, v in state["ema"].items() if k.startswith(prefix)}


def read_checkpoint(path: str | os.PathLike, ema: bool = False) -> Checkpoint:
    """Read any supported weights file into a :class:`Checkpoint` with canonical keys.

    Accepts our training checkpoints and weight files, safetensors files (ours, timm's), bare
    state dicts from torchvision (current or legacy keys), timm, DataParallel/DDP, and common
    wrappers (``{"state_dict": ...}``, ``{"model": ...}``). ``ema``: the EMA of the weights a
    training checkpoint kept instead of the model's (see :func:`training_weights`).
    """
    p = _resolve_path(path)
    if ema and p.suffix == ".safetensors":
        raise no_ema(p, "a safetensors file holds one set of weights; pass the run directory "
                        "or its .pt checkpoint")
    if p.suffix == ".safetensors":
        sd, md = _read_safetensors(p)
        config = json.loads(md["densenets.model_config"]) if "densenets.model_config" in md \
            else None
        meta = json.loads(md.get("densenets.meta", "{}"))
        sd, family = _state_dict(sd)
        return Checkpoint(sd, config, meta, md.get("densenets.model_name"), str(p), family)
    obj = _torch_load(p)
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        if int(obj.get("version", 1)) > 1:
            raise ValueError(f"{p} is checkpoint format version {obj['version']}; this "
                             "densenets reads version 1: upgrade densenets")
        sd, family = _state_dict(training_weights(obj, p, ema))
        return Checkpoint(sd, obj.get("model_config"), dict(obj.get("meta") or {}),
                          obj.get("model_name"), str(p), family)
    if ema:
        raise no_ema(p, "it is a plain state dict, not a densenets training checkpoint")
    sd, meta = xrv_weights(obj, p)  # a pickled module's weights; TorchXRayVision's meta
    sd, family = _state_dict(sd)
    return Checkpoint(sd, meta=meta, path=str(p), family=family)


# ---------------------------------------------------------------- loading into a model

def _layout_of(model: nn.Module, verb: str) -> Layout:
    family = family_of(model)
    if family is None:
        raise ValueError(f"{verb} takes a densenets {model_kinds()}, got {type(model).__name__}")
    return LAYOUTS[family.name]


def load_into(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Copy a canonical state dict into ``model``; return notes on what was adapted.

    A classifier of another size is left freshly initialised (fine-tuning), a 3-channel stem
    is adapted to the model's input channels; every other difference raises
    :class:`KeyMismatchError` before anything is copied.
    """
    return _layout_of(model, "load_into()").load(model, state_dict, KeyMismatchError)


def _warn(notes: list[str]) -> None:
    """Warn at the caller's line, the first frame outside this package."""
    level, frame = 1, sys._getframe(0)
    package = os.path.dirname(os.path.abspath(__file__))
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=level)


def _built(name: str | None, ckpt: Checkpoint, overrides: dict[str, Any]) -> nn.Module:
    """The model for ``ckpt`` (the zoo entry ``name``, or the checkpoint's own architecture),
    loaded, with the checkpoint's classes and input channels unless overridden, and the
    ``weights_meta`` (class names, preprocessing, provenance) that travels with it."""
    layout = LAYOUTS[ckpt.family]
    model, notes = layout.build(name, ckpt, overrides, KeyMismatchError)
    _warn(notes)
    model.weights_meta = complete_meta(model.config.to_dict(),
                                       {**layout.default_meta(model), **ckpt.meta})
    model.weights_meta.setdefault("source", ckpt.path)
    model.weights_meta.setdefault("model_name", ckpt.model_name or layout.name_of(model))
    family = family_of(model)
    if family is not None:  # the data configuration the weights were evaluated with
        model.pretrained_cfg = family.pretrained_cfg(
            name or model.weights_meta["model_name"], model.config.to_dict(),
            model.weights_meta.get("preprocessing"))
    return model


def _hub_checkpoint(weights: str) -> Checkpoint:
    """The checkpoint of a ``hf-hub:org/name`` repository, with its config.json's metadata."""
    path, config = hub_weights_file(weights)
    ckpt = read_checkpoint(path)
    ckpt.meta = {**hub_meta(config, weights), **ckpt.meta}
    ckpt.model_name = ckpt.model_name or (config or {}).get("architecture")
    return ckpt


def published_weights(name: str) -> str | None:
    """What ``weights="imagenet"`` loads for the zoo entry ``name``: ``"imagenet"`` for
    torchvision's checkpoints, ``"hf-hub:..."`` for the Hub repository its ``pretrained_cfg``
    names (densenetblur121d, the RDNets), None when nothing is published."""
    key = name.strip().lower()
    if key in PRETRAINED:
        return "imagenet"
    hub = family_for(key).pretrained_cfg(key, {}, None).get("hf_hub_id")
    return f"hf-hub:{hub}" if hub else None


def default_weights(name: str) -> str:
    """What ``pretrained=True`` loads for ``name``, or a ValueError naming what exists."""
    if published_weights(name) is None:
        have = [n for n in PRETRAINED] + [n for f in FAMILIES.values() for n in f.names()
                                          if n not in PRETRAINED and published_weights(n)]
        raise ValueError(f"pretrained=True: there are no published weights for {name!r} (they "
                         f"exist for {', '.join(have)}); pass weights=PATH")
    return "imagenet"


def _xrv_checkpoint(name: str, weights: str) -> Checkpoint:
    """A TorchXRayVision weight set (``"xrv:densenet121-res224-all"``), fetched and checked
    (:func:`densenets.weights.xrv.download_xrv`), with its set's meta and the file's digest."""
    if name.strip().lower() != "densenet121":
        raise ValueError(f"TorchXRayVision's weight sets are DenseNet-121s: use "
                         f"create_model('densenet121', weights={weights!r}), not {name!r}")
    path, entry, digest = download_xrv(weights)
    ckpt = read_checkpoint(path)
    ckpt.meta = {**ckpt.meta, **entry.meta(), "source": entry.url, "sha256": digest}
    return ckpt


def _checkpoint_for(name: str, weights: str | os.PathLike) -> Checkpoint:
    """Read ``weights`` ("imagenet", "hf-hub:org/name", "xrv:SET" or a path) for the zoo entry
    ``name``."""
    if isinstance(weights, str) and weights.lower() in IMAGENET_ALIASES:
        source = published_weights(name)
        if source is None or source == "imagenet":  # torchvision's, or the readable error
            entry = pretrained_entry(name)
            ckpt = read_checkpoint(download_weights(entry.name))
            ckpt.meta, ckpt.model_name = entry.meta(), entry.name
            return ckpt
        weights = source
    if is_xrv_name(weights):
        return _xrv_checkpoint(name, str(weights))
    if is_hub_id(weights):
        return _hub_checkpoint(str(weights))
    if isinstance(weights, (str, os.PathLike)):
        return read_checkpoint(weights)
    raise ValueError(f"weights must be 'imagenet', 'hf-hub:ORG/NAME', 'xrv:SET' or a file path, "
                     f"got {weights!r}")


def pretrained_model(name: str, weights: str | os.PathLike, **overrides: Any) -> nn.Module:
    """``create_model(name, weights=...)``: the zoo architecture with loaded weights.

    ``weights`` is ``"imagenet"`` (the published checkpoint for ``name``: torchvision's, or the
    Hub repository its ``pretrained_cfg`` names, such as the authors' RDNet weights),
    ``"hf-hub:org/name"`` (a Hugging Face Hub repository, see :mod:`densenets.weights.hub`),
    ``"xrv:densenet121-res224-all"`` (a TorchXRayVision weight set, see
    :mod:`densenets.weights.xrv`) or a path. ``num_classes`` and ``in_channels`` default to the
    checkpoint's; overriding ``num_classes`` loads everything but the classifier (fine-tuning)
    and says so.
    """
    family = family_for(name)
    ckpt = _checkpoint_for(name, weights)
    if ckpt.family != family.name:
        held = FAMILIES[ckpt.family]
        raise KeyMismatchError(f"the weights hold {held.title} weights, not {family.title} "
                               f"weights for {name}: build one of the {held.title} models "
                               f"({', '.join(held.names()[:2])}, ...) or use "
                               "densenets.load(path)")
    return _built(name.strip().lower(), ckpt, overrides)


def load(path: str | os.PathLike, *, ema: bool = False, **overrides: Any) -> nn.Module:
    """Rebuild a model of any family from a weights file alone and load its weights.

    The architecture comes from the file's stored configuration (our checkpoints and
    safetensors) or is read off the tensor shapes (any other DenseNet or RDNet state dict).
    The model's ``weights_meta`` holds class names, preprocessing and provenance. Overrides
    such as ``num_classes=10`` (fine-tuning) or ``memory_efficient=True`` change the built
    model. ``path`` may also be a folder written by :func:`save`, ``"hf-hub:org/name"`` or
    ``"xrv:SET"`` (a TorchXRayVision weight set). Whole pickled modules (TorchXRayVision's
    files) are read without running their code (:mod:`densenets.weights.unpickle`).
    ``ema=True`` loads the exponential moving average of the weights that a run trained with
    ``--ema-decay`` kept in its checkpoints (the same file as without it: a run directory's
    best.pt); a file without one raises ValueError saying so.
    """
    if ema and is_hub_id(path):
        raise no_ema(path, "Hub repositories hold one set of weights")
    if ema and is_xrv_name(path):
        raise no_ema(path, "TorchXRayVision's weight sets hold one set of weights")
    ckpt = _hub_checkpoint(path) if is_hub_id(path) else \
        _xrv_checkpoint("densenet121", str(path)) if is_xrv_name(path) else \
        read_checkpoint(path, ema)
    if ema:
        ckpt.meta["ema"] = True  # provenance, beside the source file
    return _built(None, ckpt, overrides)


def _save_folder(model: nn.Module, d: Path, meta: dict[str, Any] | None,
                 model_name: str | None) -> Path:
    """What the Hugging Face Hub and timm expect: model.safetensors + timm's config.json."""
    weights = save(model, d / "model.safetensors", meta, model_name)
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        md = f.metadata()
    pc = dict(getattr(model, "pretrained_cfg", None) or {})
    written = json.loads(md["densenets.meta"])
    # Preprocessing the weights state (not the library's fallback) replaces the model's own.
    stated = meta if meta is not None else getattr(model, "weights_meta", None)
    pre = (stated or {}).get("preprocessing") or {}
    same = (pc.get("crop_pct") and tuple(pc.get("input_size", ()))[-1:] == (pre.get("crop"),)
            and int(pre["crop"] / pc["crop_pct"]) == pre.get("resize"))
    if pre.get("crop") and pre.get("resize") and not same:  # what the weights were scored at
        pc.update(input_size=(model.config.in_channels, pre["crop"], pre["crop"]),
                  crop_pct=round(pre["crop"] / pre["resize"], 4),
                  interpolation=pre.get("interpolation", "bilinear"),
                  mean=pre.get("mean"), std=pre.get("std"))
    arch = pc.get("architecture") or md["densenets.model_name"]
    write_config(d, timm_config(arch, model.num_classes, model.num_features,
                                model.config.global_pool, pc,
                                written.get("class_names")))
    return d


def _save_foreign(model: nn.Module, p: Path, layout: str, meta: dict[str, Any] | None,
                  model_name: str | None) -> Path:
    """``save(..., layout=...)``: another library's bare state dict, in a .pt/.pth or
    .safetensors file."""
    if layout not in WRITERS:
        raise ValueError(f"unknown layout {layout!r}; save() writes {', '.join(WRITERS)} "
                         "(or None, densenets' own)")
    if meta is not None or model_name is not None:
        raise ValueError(f"a {layout} state dict holds weights only, with no place for meta or "
                         "model_name: drop them, or save in densenets' layout (layout=None)")
    if p.suffix not in (".safetensors", ".pt", ".pth"):
        raise ValueError(f"layout={layout!r} writes one file: give a .pt, .pth or .safetensors "
                         f"path, not {p}")
    sd = WRITERS[layout](model)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(p), metadata={"format": "pt"})
    else:
        torch.save(sd, p)
    return p


def save(model: nn.Module, path: str | os.PathLike, meta: dict[str, Any] | None = None,
         model_name: str | None = None, layout: str | None = None) -> Path:
    """Save ``model``'s weights with its configuration and ``meta`` (class names, preprocessing).

    ``.safetensors`` stores them in the file's metadata; ``.pt``/``.pth`` writes the training
    checkpoint format without optimizer state. Either way :func:`load` rebuilds the model.
    A folder (an existing directory, or a path without a suffix) receives what the Hugging
    Face Hub expects: ``model.safetensors`` and timm's ``config.json`` (architecture, classes,
    ``pretrained_cfg``), ready to upload and readable by timm (``local-dir:``/``hf-hub:``).
    ``layout="monai"`` writes the bare state dict MONAI's ``DenseNet`` loads with
    ``strict=True`` instead (weights only; :func:`load` reads it back).
    """
    if layout is not None:
        return _save_foreign(model, Path(path).expanduser(), layout, meta, model_name)
    own = _layout_of(model, "save()")
    p = Path(path).expanduser()
    if p.is_dir() or not p.suffix:
        return _save_folder(model, p, meta, model_name)
    if p.suffix not in (".safetensors", ".pt", ".pth"):
        raise ValueError(f"unknown weights format {p.suffix!r} for {p}; use .safetensors, .pt "
                         "or .pth, or a folder for the Hub layout")
    config = model.config.to_dict()
    meta = complete_meta(config, meta if meta is not None else getattr(model, "weights_meta", None))
    meta.pop("source", None)
    name = model_name or meta.pop("model_name", None) or own.name_of(model)
    meta.pop("model_name", None)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(p), metadata={
            "format": "pt", "densenets.version": "1", "densenets.model_name": name,
            "densenets.model_config": json.dumps(config), "densenets.meta": json.dumps(meta)})
    else:
        torch.save({"format": CHECKPOINT_FORMAT, "version": 1, "model": sd,
                    "model_config": config, "model_name": name, "meta": meta}, p)
    return p


__all__ = ["CHECKPOINT_FORMAT", "Checkpoint", "KeyMismatchError", "default_weights", "load",
           "load_into", "pretrained_model", "published_weights", "read_checkpoint", "save",
           "training_weights"]
