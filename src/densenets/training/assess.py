"""The top-1/top-5 error and loss of a training checkpoint on its data (``densenets eval``).

A run directory means its best.pt when a validation split chose it, else its last.pt; ``ema``
evaluates the exponential moving average of the weights a modern recipe kept beside the model.
Under torchrun the split is sharded over the processes and the counts are summed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..device import resolve_device
from ..weights.files import training_weights
from . import distributed
from .checkpoint import load_checkpoint
from .data import build_data
from .evaluate import autocast, evaluate
from .model import model_from_checkpoint
from .recipes import TrainConfig, check_amp, resolve
from .segmentation import is_segmentation, objective_of


def checkpoint_of_run(path: str) -> tuple[Path, dict]:
    """A run directory's model to report: best.pt when a validation split chose it, else
    last.pt (a "best" epoch picked on the test set would flatter the test error)."""
    p = Path(path)
    if not p.is_dir():
        return p, load_checkpoint(p)
    if (p / "best.pt").is_file():
        best = load_checkpoint(p / "best.pt")
        if (best.get("best") or {}).get("split") == "val" or not (p / "last.pt").is_file():
            return p / "best.pt", best
    return p / "last.pt", load_checkpoint(p / "last.pt")


def data_config(state: dict[str, Any], source: str, recipe: str | None) -> TrainConfig:
    """The configuration whose data the checkpoint is evaluated on: the training one, or
    ``recipe``'s, with the preprocessing the model was trained with either way."""
    if not state.get("model_config"):
        raise ValueError(f"{source} has no model_config, so the network cannot be rebuilt; "
                         "evaluate it from Python with densenets.training.evaluate")
    stored = state.get("config") or {}
    recipe = recipe or stored.get("recipe") or state.get("meta", {}).get("recipe")
    if not recipe:
        raise ValueError("the checkpoint does not say which dataset it was trained on; "
                         "pass --recipe")
    cfg = TrainConfig.from_dict(stored) if recipe == stored.get("recipe") else resolve(recipe)
    prep = state.get("meta", {}).get("preprocessing") or {}
    for key in ("resize", "crop", "mean", "std", "volume_size", "intensity_window"):
        if key in prep:  # the model expects what it was trained on
            none = [] if key == "intensity_window" else None  # no window: z-scored
            setattr(cfg, key, none if prep[key] is None else prep[key])
    # Images are read with the channels the model takes (a one-channel run reads grayscale).
    cfg.model_overrides = {**(cfg.model_overrides or {}),
                           "in_channels": state["model_config"].get("in_channels", 3)}
    return cfg


def evaluate_checkpoint(source: str, *, recipe: str | None = None, split: str | None = None,
                        ten_crop: bool = False, ema: bool = False, amp: str | None = None,
                        device: str = "auto", download: bool = False,
                        **data: Any) -> dict[str, Any] | None:
    """Loss and top-1/top-5 error (%) of checkpoint or run directory ``source`` on ``split``
    (default: the one the paper reports), or for a segmentation run its pixel accuracy, mean
    IoU and per-class IoU (%, None for a class in neither targets nor predictions); ``data``
    sets ``data_dir``, ``batch_size`` or ``workers`` (None: the training run's). None on every
    process but the first."""
    with distributed.joined(resolve_device(device)) as (d, dev):  # under torchrun: shards
        check_amp(amp, dev)
        path, state = checkpoint_of_run(source)
        cfg = data_config(state, source, recipe)
        for key, value in data.items():
            if value is not None:
                setattr(cfg, key, value)
        cfg.download = download
        if is_segmentation(cfg):  # the classes are the model's, whichever split is read
            cfg.model_overrides = {**(cfg.model_overrides or {}),
                                   "num_classes": state["model_config"]["num_classes"]}
        split = split or cfg.eval_split
        built = build_data(cfg, dev, splits=(split,), ten_crop=ten_crop)
        if split not in built.loaders:
            raise ValueError(f"recipe {cfg.recipe} has no {split} split here; try --split "
                             f"{'val' if split == 'test' else 'test'}")
        _, model = model_from_checkpoint(state)
        model.set_grad_checkpointing(False)  # no backward in evaluation: nothing to save
        model.load_state_dict(training_weights(state, path, ema))
        if built.num_classes != model.config.num_classes:
            raise ValueError(f"the {cfg.recipe} {split} data has {built.num_classes} classes but "
                             f"the checkpoint's model predicts {model.config.num_classes}")
        distributed.shard_loaders({split: built.loaders[split]}, d)
        if is_segmentation(cfg):
            m = objective_of(cfg, built.num_classes).evaluate(
                model.to(dev), built.loaders[split], dev, autocast=lambda: autocast(dev, amp),
                reduce=d.all_sum)
        else:
            m = evaluate(model.to(dev), built.loaders[split], dev, amp=amp, reduce=d.all_sum)
        if not d.is_main:
            return None
    if is_segmentation(cfg):
        return {"checkpoint": str(path), "model": state.get("model_name"),
                "epoch": state.get("epoch"), "ema": ema, "recipe": cfg.recipe, "split": split,
                "images": m["n"], "pixels": m["pixels"], "ignore_index": cfg.ignore_index,
                "loss": round(m["loss"], 8), "pixel_acc": round(m["pixel_acc"], 8),
                "miou": round(m["miou"], 8),
                "iou": {name: None if v is None else round(100 * v, 8)
                        for name, v in zip(_names(state, built.class_names), m["iou"],
                                           strict=True)}}
    return {"checkpoint": str(path), "model": state.get("model_name"),
            "epoch": state.get("epoch"), "ema": ema, "recipe": cfg.recipe, "split": split,
            "ten_crop": ten_crop, "images": m["n"], "loss": round(m["loss"], 8),
            "top1_err": round(m["top1_err"], 8), "top5_err": round(m["top5_err"], 8),
            "top1_acc": round(100 - m["top1_err"], 8)}


def _names(state: dict[str, Any], fallback: list[str]) -> list[str]:
    """The class names the run trained with (the checkpoint's), else the data's."""
    stored = (state.get("meta") or {}).get("class_names")
    return list(stored) if stored and len(stored) == len(fallback) else fallback
