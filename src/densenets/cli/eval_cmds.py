"""Verb ``eval``: the top-1/top-5 error and loss of a training checkpoint on its data.

A run directory means its best.pt when a validation split chose it, else its last.pt; ``--ema``
evaluates the exponential moving average of the weights a modern recipe kept beside the model.
Under torchrun the split is sharded over the processes and the counts are summed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from ..factory import model_from_config
from ..training import distributed, recipes
from ..training.checkpoint import load_checkpoint
from ..training.data import build_data
from ..training.evaluate import evaluate
from ..training.recipes import RECIPES, TrainConfig, resolve
from .train_cmds import pick_device


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="top-1/top-5 error and loss of a checkpoint",
                       description="Evaluate a training checkpoint on the test or validation "
                                   "split of its recipe. A run directory means its best.pt "
                                   "when a validation split chose it, else its last.pt.")
    p.add_argument("checkpoint", help="a .pt checkpoint or a run directory")
    p.add_argument("--recipe", choices=list(RECIPES), help="dataset (default: the training one)")
    p.add_argument("--data-dir", help="dataset directory (default: the training one)")
    p.add_argument("--download", action="store_true", help="download CIFAR/SVHN when missing")
    p.add_argument("--split", choices=("test", "val"),
                   help="default: the split the paper reports (val for ImageNet)")
    p.add_argument("--ten-crop", action="store_true",
                   help="the paper's 10-crop evaluation (image-folder recipes)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--amp", choices=("bf16", "fp16"))
    p.add_argument("--ema", action="store_true",
                   help="evaluate the EMA of the weights the run kept (--ema-decay)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_eval)


def weights_of(state: dict[str, Any], path: Path, ema: bool) -> dict[str, torch.Tensor]:
    """The model's weights from a checkpoint, or those of its EMA (``--ema``)."""
    if not ema:
        return state["model"]
    if not state.get("ema"):
        raise ValueError(f"{path} holds no EMA of the weights: the run did not keep one (train "
                         "with --ema-decay D, or drop --ema)")
    prefix = "module."  # the averaged copy's keys; its step counter n_averaged is not a weight
    return {k[len(prefix):]: v for k, v in state["ema"].items() if k.startswith(prefix)}




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


def cmd_eval(args: argparse.Namespace) -> int:
    with distributed.joined(pick_device(args.device)) as (d, device):  # under torchrun: shards
        return _eval(args, d, device)


def _eval(args: argparse.Namespace, d: distributed.Dist, device: torch.device) -> int:
    recipes.check_amp(args.amp, device)
    path, state = checkpoint_of_run(args.checkpoint)
    if not state.get("model_config"):
        raise ValueError(f"{args.checkpoint} has no model_config, so the network cannot be "
                         "rebuilt; evaluate it from Python with densenets.training.evaluate")
    stored = state.get("config") or {}
    recipe = args.recipe or stored.get("recipe") or state.get("meta", {}).get("recipe")
    if not recipe:
        raise ValueError("the checkpoint does not say which dataset it was trained on; "
                         "pass --recipe")
    cfg = TrainConfig.from_dict(stored) if recipe == stored.get("recipe") else resolve(recipe)
    prep = state.get("meta", {}).get("preprocessing") or {}
    for key in ("resize", "crop", "mean", "std"):  # the model expects what it was trained on
        if key in prep:
            setattr(cfg, key, prep[key])
    for key in ("data_dir", "batch_size", "workers"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    cfg.download = args.download
    split = args.split or cfg.eval_split
    data = build_data(cfg, device, splits=(split,), ten_crop=args.ten_crop)
    if split not in data.loaders:
        raise ValueError(f"recipe {recipe} has no {split} split here; try --split "
                         f"{'val' if split == 'test' else 'test'}")
    model = model_from_config(state["model_config"])
    model.set_grad_checkpointing(False)  # no backward in evaluation: nothing to save memory for
    model.load_state_dict(weights_of(state, path, args.ema))
    if data.num_classes != model.config.num_classes:
        raise ValueError(f"the {recipe} {split} data has {data.num_classes} classes but the "
                         f"checkpoint's model predicts {model.config.num_classes}")
    distributed.shard_loaders({split: data.loaders[split]}, d)
    m = evaluate(model.to(device), data.loaders[split], device, amp=args.amp, reduce=d.all_sum)
    if not d.is_main:
        return 0
    out = {"checkpoint": str(path), "model": state.get("model_name"),
           "epoch": state.get("epoch"), "ema": args.ema, "recipe": recipe, "split": split,
           "ten_crop": args.ten_crop, "images": m["n"], "loss": round(m["loss"], 8),
           "top1_err": round(m["top1_err"], 8), "top5_err": round(m["top5_err"], 8),
           "top1_acc": round(100 - m["top1_err"], 8)}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    crop = "10-crop" if args.ten_crop else "single crop"
    which = " (EMA weights)" if args.ema else ""
    print(f"{path}: {out['model']}{which} after epoch {out['epoch']}, {recipe} {split} split, "
          f"{m['n']:,} images, {crop}:")
    print(f"  top-1 error {m['top1_err']:.2f}% (accuracy {out['top1_acc']:.2f}%)  "
          f"top-5 error {m['top5_err']:.2f}%  loss {m['loss']:.4f}")
    return 0
