"""Verb ``eval``: the top-1/top-5 error and loss of a training checkpoint on its data.

A run directory means its best.pt when a validation split chose it, else its last.pt; ``--ema``
evaluates the exponential moving average of the weights a modern recipe kept beside the model.
Under torchrun the split is sharded over the processes and the counts are summed
(:func:`densenets.training.assess.evaluate_checkpoint`).
"""

from __future__ import annotations

import argparse
import json

from ..training.assess import evaluate_checkpoint
from ..training.recipes import RECIPES
from .flags import JSON, add_device_flag, verb


def register(sub: argparse._SubParsersAction) -> None:
    p = verb(sub, "eval", cmd_eval, "top-1/top-5 error and loss of a checkpoint", json=JSON)
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
    add_device_flag(p)
    p.add_argument("--amp", choices=("bf16", "fp16"))
    p.add_argument("--ema", action="store_true",
                   help="evaluate the EMA of the weights the run kept (--ema-decay)")


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a training checkpoint on the test or validation split of its recipe. A run
    directory means its best.pt when a validation split chose it, else its last.pt."""
    out = evaluate_checkpoint(
        args.checkpoint, recipe=args.recipe, split=args.split, ten_crop=args.ten_crop,
        ema=args.ema, amp=args.amp, device=args.device, download=args.download,
        data_dir=args.data_dir, batch_size=args.batch_size, workers=args.workers)
    if out is None:  # not the first process
        return 0
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    if "miou" in out:  # a segmentation run
        print_segmentation(out)
        return 0
    crop = "10-crop" if args.ten_crop else "single crop"
    which = " (EMA weights)" if args.ema else ""
    print(f"{out['checkpoint']}: {out['model']}{which} after epoch {out['epoch']}, "
          f"{out['recipe']} {out['split']} split, {out['images']:,} images, {crop}:")
    print(f"  top-1 error {out['top1_err']:.2f}% (accuracy {out['top1_acc']:.2f}%)  "
          f"top-5 error {out['top5_err']:.2f}%  loss {out['loss']:.4f}")
    return 0


def print_segmentation(out: dict) -> None:
    """Mean IoU, pixel accuracy, loss, and each class's IoU."""
    which = " (EMA weights)" if out["ema"] else ""
    print(f"{out['checkpoint']}: {out['model']}{which} after epoch {out['epoch']}, "
          f"{out['recipe']} {out['split']} split, {out['images']:,} images, "
          f"{out['pixels']:,} labelled pixels (void {out['ignore_index']} left out):")
    print(f"  mean IoU {out['miou']:.2f}%  pixel accuracy {out['pixel_acc']:.2f}%  "
          f"loss {out['loss']:.4f}")
    width = max(len(name) for name in out["iou"])
    for name, iou in out["iou"].items():
        shown = "-  (in neither targets nor predictions)" if iou is None else f"{iou:6.2f}%"
        print(f"  {name:<{width}}  IoU {shown}")
