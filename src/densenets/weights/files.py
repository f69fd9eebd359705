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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..models.densenet import DenseNet
from ..models.rdnet import RDNET, RDNet
from ..models.zoo import model_config
from .hub import hub_meta, hub_weights_file, is_hub_id, timm_config, write_config
from .keymap import (
    adapt_input_conv,
    describe_config,
    format_diff,
    infer_config,
    key_diff,
    remap_state_dict,
)
from .pretrained import (
    PRETRAINED,
    complete_meta,
    download_weights,
    pretrained_entry,
)
from .rdnet_keys import build_rdnet, is_rdnet_checkpoint, load_rdnet, rdnet_state_dict

CHECKPOINT_FORMAT = "densenets.checkpoint"


class KeyMismatchError(ValueError):
    """A checkpoint does not fit the model; the message is the readable diff."""


# ---------------------------------------------------------------- reading files

@dataclass
class Checkpoint:
    """What a weights file holds once read: canonical state dict plus what it says about itself."""

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    model_name: str | None = None
    path: str | None = None


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


def _state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """Canonical keys: timm's layout for RDNet weights, torchvision's for DenseNets."""
    return rdnet_state_dict(obj) if is_rdnet_checkpoint(obj) else remap_state_dict(obj)


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read any supported weights file into a :class:`Checkpoint` with canonical keys.

    Accepts our training checkpoints and weight files, safetensors files (ours, timm's), bare
    state dicts from torchvision (current or legacy keys), timm, DataParallel/DDP, and common
    wrappers (``{"state_dict": ...}``, ``{"model": ...}``).
    """
    p = _resolve_path(path)
    if p.suffix == ".safetensors":
        sd, md = _read_safetensors(p)
        config = json.loads(md["densenets.model_config"]) if "densenets.model_config" in md \
            else None
        meta = json.loads(md.get("densenets.meta", "{}"))
        return Checkpoint(_state_dict(sd), config, meta, md.get("densenets.model_name"),
                          str(p))
    obj = _torch_load(p)
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        if int(obj.get("version", 1)) > 1:
            raise ValueError(f"{p} is checkpoint format version {obj['version']}; this "
                             "densenets reads version 1: upgrade densenets")
        return Checkpoint(_state_dict(obj["model"]), obj.get("model_config"),
                          dict(obj.get("meta") or {}), obj.get("model_name"), str(p))
    return Checkpoint(_state_dict(obj), path=str(p))


# ---------------------------------------------------------------- loading into a model

def load_into(model: DenseNet, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Copy a canonical state dict into ``model``; return notes on what was adapted.

    A classifier of another size is left freshly initialised (fine-tuning), a 3-channel stem
    is adapted to the model's input channels; every other difference raises
    :class:`KeyMismatchError` before anything is copied.
    """
    if isinstance(model, RDNet):
        return load_rdnet(model, state_dict, KeyMismatchError)
    own = model.state_dict()
    sd = dict(state_dict)
    notes: list[str] = []
    w = "features.conv0.weight"
    if w in sd and w in own and sd[w].shape != own[w].shape \
            and sd[w].shape[0] == own[w].shape[0] and sd[w].shape[2:] == own[w].shape[2:]:
        notes.append(f"adapted features.conv0 from {sd[w].shape[1]} to {own[w].shape[1]} input "
                     "channels (summed over RGB for 1, repeated and rescaled otherwise)")
        sd[w] = adapt_input_conv(sd[w], own[w].shape[1])
    cw = "classifier.weight"
    if cw in sd and cw in own and sd[cw].shape != own[cw].shape \
            and sd[cw].shape[1:] == own[cw].shape[1:]:
        notes.append(f"classifier not loaded: the checkpoint has {sd[cw].shape[0]} classes and "
                     f"the model {own[cw].shape[0]}, so it keeps its fresh initialisation for "
                     "fine-tuning; everything else was loaded")
        sd[cw], sd["classifier.bias"] = own[cw], own["classifier.bias"]
    missing, unexpected, conflicts = key_diff(own, sd)
    if missing or unexpected or conflicts:
        raise KeyMismatchError(format_diff(model.config.to_dict(), sd, missing, unexpected,
                                           conflicts))
    for k in own:
        sd.setdefault(k, own[k])  # num_batches_tracked, absent from old checkpoints
    model.load_state_dict(sd, strict=True)
    return notes


def _warn(notes: list[str]) -> None:
    """Warn at the caller's line, the first frame outside this package."""
    level, frame = 1, sys._getframe(0)
    package = os.path.dirname(os.path.abspath(__file__))
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=level)


def _build(config: dict[str, Any], ckpt: Checkpoint, overrides: dict[str, Any]) -> DenseNet:
    """Build from ``config`` with the checkpoint's classes and channels unless overridden."""
    cfg = dict(config)
    sd = ckpt.state_dict
    if "num_classes" not in overrides and "classifier.weight" in sd:
        cfg["num_classes"] = int(sd["classifier.weight"].shape[0])
    if "in_channels" not in overrides and "features.conv0.weight" in sd:
        cfg["in_channels"] = int(sd["features.conv0.weight"].shape[1])
    cfg.update(overrides)
    model = DenseNet(**cfg)
    _warn(load_into(model, sd))
    model.weights_meta = complete_meta(model.config.to_dict(), ckpt.meta)
    model.weights_meta.setdefault("source", ckpt.path)
    model.weights_meta.setdefault("model_name", ckpt.model_name or describe_config(cfg))
    return model


def _imagenet_meta_if_fits(ckpt: Checkpoint, config: dict[str, Any]) -> None:
    """A bare 1000-class ImageNet-architecture state dict gets ImageNet's names and transform."""
    name = describe_config(config)
    if not ckpt.meta and name in PRETRAINED and config.get("num_classes", 1000) == 1000 \
            and config.get("in_channels", 3) == 3:
        ckpt.meta = {k: v for k, v in PRETRAINED[name].meta().items() if k != "source"}
        ckpt.model_name = name


def _hub_checkpoint(weights: str) -> Checkpoint:
    """The checkpoint of a ``hf-hub:org/name`` repository, with its config.json's metadata."""
    path, config = hub_weights_file(weights)
    ckpt = read_checkpoint(path)
    ckpt.meta = {**hub_meta(config, weights), **ckpt.meta}
    ckpt.model_name = ckpt.model_name or (config or {}).get("architecture")
    return ckpt


def _holds_rdnet(ckpt: Checkpoint) -> bool:
    return "stem.0.weight" in ckpt.state_dict or any(k.startswith("dense_stages.")
                                                     for k in ckpt.state_dict)


def _build_rdnet(name: str | None, ckpt: Checkpoint, overrides: dict[str, Any]) -> RDNet:
    """An RDNet of the named size (or the checkpoint's own) with the checkpoint's weights."""
    model, notes = build_rdnet(name, ckpt.state_dict, None if name else ckpt.config, overrides,
                               KeyMismatchError)
    _warn(notes)
    pc = model.pretrained_cfg
    crop = int(pc["input_size"][-1])
    data = {"preprocessing": {"resize": int(crop / pc["crop_pct"]), "crop": crop,
                              "mean": list(pc["mean"]), "std": list(pc["std"]),
                              "interpolation": pc["interpolation"]}}
    model.weights_meta = complete_meta(model.config.to_dict(), {**data, **ckpt.meta})
    model.weights_meta.setdefault("source", ckpt.path)
    model.weights_meta.setdefault("model_name", ckpt.model_name or pc["architecture"])
    return model


def pretrained_model(name: str, weights: str | os.PathLike, **overrides: Any
                     ) -> DenseNet | RDNet:
    """``create_model(name, weights=...)``: the zoo architecture with loaded weights.

    ``weights`` is ``"imagenet"`` (torchvision's published checkpoint for ``name``; for an RDNet
    the authors' ImageNet-1k weights on the Hub), ``"hf-hub:org/name"`` (a Hugging Face Hub
    repository, see :mod:`densenets.weights.hub`) or a path. ``num_classes`` and
    ``in_channels`` default to the checkpoint's; overriding ``num_classes`` loads everything
    but the classifier (fine-tuning) and says so.
    """
    rdnet = name.strip().lower() if name.strip().lower() in RDNET else None
    if rdnet and isinstance(weights, str) and weights.lower() in ("imagenet", "imagenet1k",
                                                                  "default"):
        weights = f"hf-hub:naver-ai/{rdnet}.nv_in1k"
    if is_hub_id(weights):
        ckpt = _hub_checkpoint(str(weights))
    elif isinstance(weights, str) and weights.lower() in ("imagenet", "imagenet1k", "default"):
        entry = pretrained_entry(name)
        ckpt = read_checkpoint(download_weights(entry.name))
        ckpt.meta, ckpt.model_name = entry.meta(), entry.name
    elif isinstance(weights, (str, os.PathLike)):
        ckpt = read_checkpoint(weights)
        if not rdnet:
            _imagenet_meta_if_fits(ckpt, {**model_config(name), **_shape_overrides(ckpt)})
    else:
        raise ValueError(f"weights must be 'imagenet', 'hf-hub:ORG/NAME' or a file path, got "
                         f"{weights!r}")
    if rdnet or _holds_rdnet(ckpt):
        if not rdnet:
            raise KeyMismatchError(f"the weights hold an RDNet, not a {name}: build an RDNet "
                                   "(rdnet_tiny, ...) or use densenets.load(path)")
        return _build_rdnet(rdnet, ckpt, overrides)
    return _build(model_config(name), ckpt, overrides)


def _shape_overrides(ckpt: Checkpoint) -> dict[str, int]:
    sd, out = ckpt.state_dict, {}
    if "classifier.weight" in sd:
        out["num_classes"] = int(sd["classifier.weight"].shape[0])
    if "features.conv0.weight" in sd:
        out["in_channels"] = int(sd["features.conv0.weight"].shape[1])
    return out


def load(path: str | os.PathLike, **overrides: Any) -> DenseNet | RDNet:
    """Rebuild a DenseNet or RDNet from a weights file alone and load its weights.

    The architecture comes from the file's stored configuration (our checkpoints and
    safetensors) or is read off the tensor shapes (any other DenseNet state dict). The model's
    ``weights_meta`` holds class names, preprocessing and provenance. Overrides such as
    ``num_classes=10`` (fine-tuning) or ``memory_efficient=True`` change the built model.
    ``path`` may also be a folder written by :func:`save` or ``"hf-hub:org/name"``.
    """
    ckpt = _hub_checkpoint(path) if is_hub_id(path) else read_checkpoint(path)
    if _holds_rdnet(ckpt):
        return _build_rdnet(None, ckpt, overrides)
    config = ckpt.config or infer_config(ckpt.state_dict)
    if ckpt.config is None:
        _imagenet_meta_if_fits(ckpt, config)
    return _build(config, ckpt, overrides)


def _save_folder(model: DenseNet | RDNet, d: Path, meta: dict[str, Any] | None,
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
                                getattr(model.config, "global_pool", "avg"), pc,
                                written.get("class_names")))
    return d


def save(model: DenseNet | RDNet, path: str | os.PathLike, meta: dict[str, Any] | None = None,
         model_name: str | None = None) -> Path:
    """Save ``model``'s weights with its configuration and ``meta`` (class names, preprocessing).

    ``.safetensors`` stores them in the file's metadata; ``.pt``/``.pth`` writes the training
    checkpoint format without optimizer state. Either way :func:`load` rebuilds the model.
    A folder (an existing directory, or a path without a suffix) receives what the Hugging
    Face Hub expects: ``model.safetensors`` and timm's ``config.json`` (architecture, classes,
    ``pretrained_cfg``), ready to upload and readable by timm (``local-dir:``/``hf-hub:``).
    """
    if not isinstance(model, (DenseNet, RDNet)):
        raise ValueError(f"save() takes a densenets DenseNet or RDNet, got "
                         f"{type(model).__name__}")
    p = Path(path).expanduser()
    if p.is_dir() or not p.suffix:
        return _save_folder(model, p, meta, model_name)
    if p.suffix not in (".safetensors", ".pt", ".pth"):
        raise ValueError(f"unknown weights format {p.suffix!r} for {p}; use .safetensors, .pt "
                         "or .pth, or a folder for the Hub layout")
    config = model.config.to_dict()
    meta = complete_meta(config, meta if meta is not None else getattr(model, "weights_meta", None))
    meta.pop("source", None)
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    name = model_name or meta.pop("model_name", None) or (
        (arch or "rdnet") if isinstance(model, RDNet) else describe_config(config))
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


__all__ = ["CHECKPOINT_FORMAT", "Checkpoint", "KeyMismatchError", "load", "load_into",
           "pretrained_model", "read_checkpoint", "save"]
