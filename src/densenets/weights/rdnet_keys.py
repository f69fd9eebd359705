"""RDNet checkpoints: their key layouts, the size a state dict holds, and loading into a model.

Two layouts are in the wild: timm's (``stem.0``, ``dense_stages.*``, ``head.*``; also what
``densenets.save`` writes) and the authors' original release, wrapped in ``{"model": ...}``
with the stem one level deeper (``stem.stem.0``). timm's ``features_only`` models flatten the
top level (``stem_0``, ``dense_stages_3``). All of them map to the first.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..models.rdnet import RDNET, RDNet, rdnet_config, rdnet_pretrained_cfg
from .keymap import adapt_input_conv, key_diff
from .layout import Checkpoint, Layout, unwrap_tensors

_WRAPPERS = ("model", "state_dict", "model_state_dict", "model_ema", "state_dict_ema")
_PREFIXES = ("module.", "_orig_mod.")
_FLAT = re.compile(r"^(stem|dense_stages)_(\d+)\.")
FIRST_CONV, CLASSIFIER = "stem.0.weight", "head.fc.weight"


def _tensors(obj: Any) -> Mapping[str, Any] | None:
    return unwrap_tensors(obj, _WRAPPERS)


def is_rdnet_checkpoint(obj: Any) -> bool:
    """Whether ``obj`` (a state dict or a checkpoint wrapping one) holds RDNet weights."""
    sd = _tensors(obj)
    return sd is not None and any(
        re.match(r"^(module\.|_orig_mod\.)*(dense_stages[._]|stem\.stem\.)", str(k))
        for k in sd)


def rdnet_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """Any RDNet state dict (timm's, the authors', DDP-wrapped) with timm's keys."""
    sd = _tensors(obj)
    if sd is None:
        raise ValueError("no state dict found in the RDNet checkpoint")
    out = {str(k): v for k, v in sd.items() if torch.is_tensor(v)}
    for prefix in _PREFIXES:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    # The authors' release keeps the patchify stem inside a wrapper module.
    out = {("stem." + k[len("stem.stem."):] if k.startswith("stem.stem.") else k): v
           for k, v in out.items()}
    return {_FLAT.sub(r"\1.\2.", k): v for k, v in out.items()}


def infer_rdnet_name(sd: Mapping[str, torch.Tensor]) -> str:
    """The published size a state dict holds, read off its stem width and block count."""
    if FIRST_CONV not in sd:
        raise ValueError("not an RDNet state dict: it has no stem.0.weight (the patchify stem)")
    width = int(sd[FIRST_CONV].shape[0])
    blocks = 1 + max((int(m.group(1)) for k in sd
                      if (m := re.match(r"dense_stages\.(\d+)\.", k))), default=-1)
    for name, cfg in RDNET.items():
        if cfg["num_init_features"] == width and len(cfg["growth_rates"]) == blocks:
            return name
    raise ValueError(f"this RDNet state dict ({width}-channel stem, {blocks} mixing blocks) "
                     f"matches none of {', '.join(RDNET)}; build the RDNet with its "
                     "configuration and load_state_dict it")


def load_rdnet(model: RDNet, state_dict: Mapping[str, torch.Tensor],
               error: Callable[[str], Exception] = ValueError) -> list[str]:
    """Copy an RDNet state dict into ``model``; return notes on what was adapted.

    A classifier of another size keeps its fresh initialisation (fine-tuning) and a 3-channel
    stem is adapted to the model's input channels; any other difference raises ``error``
    before anything is copied.
    """
    own, sd, notes = model.state_dict(), dict(state_dict), []
    w = FIRST_CONV
    if w in sd and w in own and sd[w].shape != own[w].shape and sd[w].shape[0] == own[w].shape[0]:
        notes.append(f"adapted stem.0 from {sd[w].shape[1]} to {own[w].shape[1]} input channels")
        sd[w] = adapt_input_conv(sd[w], own[w].shape[1])
    head = [k for k in sd if k.startswith("head.fc.")]
    if head and (CLASSIFIER not in own or sd[CLASSIFIER].shape != own[CLASSIFIER].shape):
        have = sd[CLASSIFIER].shape[0] if CLASSIFIER in sd else "?"
        notes.append(f"classifier not loaded: the checkpoint has {have} classes and the model "
                     f"{model.num_classes}, so it keeps its fresh initialisation; everything "
                     "else was loaded")
        for k in head:
            del sd[k]
        sd.update({k: v for k, v in own.items() if k.startswith("head.fc.")})
    missing, unexpected, conflicts = key_diff(own, sd)
    if missing or unexpected or conflicts:
        parts = [f"{len(missing)} missing ({', '.join(missing[:4])})" if missing else "",
                 f"{len(unexpected)} unexpected ({', '.join(unexpected[:4])})"
                 if unexpected else "",
                 "shape conflicts: " + ", ".join(f"{k} model {list(a)} checkpoint {list(b)}"
                                                 for k, a, b in conflicts[:3])
                 if conflicts else ""]
        hint = ""
        with contextlib.suppress(ValueError):  # too damaged to name a size
            hint = f"; the checkpoint looks like {infer_rdnet_name(sd)}"
        raise error("the checkpoint does not fit this RDNet: "
                    + "; ".join(p for p in parts if p) + f"; nothing was loaded{hint}")
    model.load_state_dict(sd, strict=True)
    return notes


def build_rdnet(name: str | None, sd: Mapping[str, torch.Tensor],
                config: Mapping[str, Any] | None = None,
                overrides: Mapping[str, Any] | None = None,
                error: Callable[[str], Exception] = ValueError) -> tuple[RDNet, list[str]]:
    """An RDNet for ``sd``: from ``config`` (what our checkpoints carry) or the named size
    (read off the tensors when ``name`` is None), with the checkpoint's classes and input
    channels unless ``overrides`` says otherwise. Returns the model and the load notes."""
    if name is None and not config:
        name = infer_rdnet_name(sd)
    overrides = dict(overrides or {})
    rdnet_config(name or "rdnet_tiny", **overrides)  # an unknown option fails here, by name
    cfg = dict(config) if config else dict(RDNET[name])
    if "num_classes" not in overrides:
        cfg["num_classes"] = int(sd[CLASSIFIER].shape[0]) if CLASSIFIER in sd else 0
    if "in_channels" not in overrides and FIRST_CONV in sd:
        cfg["in_channels"] = int(sd[FIRST_CONV].shape[1])
    cfg.update(overrides)
    model = RDNet(**cfg)
    if name is None:
        with contextlib.suppress(ValueError):  # a custom configuration has no published name
            name = infer_rdnet_name(sd)
    model.pretrained_cfg = rdnet_pretrained_cfg(name or "rdnet", model.config.to_dict())
    return model, load_rdnet(model, sd, error)


def _published_preprocessing(model: RDNet) -> dict[str, Any]:
    """The transform the published sizes are evaluated with, from the model's pretrained_cfg."""
    pc = model.pretrained_cfg
    crop = int(pc["input_size"][-1])
    return {"preprocessing": {"resize": int(crop / pc["crop_pct"]), "crop": crop,
                              "mean": list(pc["mean"]), "std": list(pc["std"]),
                              "interpolation": pc["interpolation"]}}


def _build(name: str | None, ckpt: Checkpoint, overrides: Mapping[str, Any],
           error: Callable[[str], Exception]) -> tuple[RDNet, list[str]]:
    # a zoo name fixes the size; without one the stored configuration (or the tensors) does
    return build_rdnet(name, ckpt.state_dict, None if name else ckpt.config, overrides, error)


RDNET_LAYOUT = Layout(
    family="rdnet", holds=is_rdnet_checkpoint, canonical=rdnet_state_dict, build=_build,
    load=load_rdnet, default_meta=_published_preprocessing,
    name_of=lambda model: model.pretrained_cfg.get("architecture") or "rdnet")
