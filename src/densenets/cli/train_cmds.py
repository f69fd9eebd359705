"""Verb ``train``: parse flags into a configuration, run it, print the summary.

``densenets train`` with no arguments trains the digits recipe. Exit status: 0 when the run
finished (or stopped at ``--stop-after``), 130 after SIGINT and 143 after SIGTERM (last.pt
saved, resumable), 1 when the loss diverged, 2 for bad input. The run itself is
:func:`densenets.training.run.train`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..training import distributed
from ..training import run as runs
from ..training.config import RUN, TrainConfig
from ..training.model import Architecture
from ..training.recipes import RECIPES
from .flags import add_architecture_flags, add_config_flags, given, verb


def register(sub: argparse._SubParsersAction) -> None:
    p = verb(sub, "train", cmd_train, "train a DenseNet or RDNet with a recipe (default: digits)")
    p.add_argument("--recipe", choices=list(RECIPES), default=None,
                   help="dataset + hyperparameters of the paper (default digits)")
    add_architecture_flags(p)
    g = add_config_flags(p)[RUN]  # --model, the recipe's fields, data, run and speed
    g.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last.pt")
    g.add_argument("--auto-resume", action="store_true", help="start --out DIR, or continue it "
                   "when it holds a checkpoint of this configuration (torchrun --max-restarts)")
    g.add_argument("--save-every", type=int, metavar="N",
                   help="also save last.pt every N optimiser steps (a restart loses at most N)")
    g = p.add_argument_group("several processes (start with torchrun --nproc-per-node N)")
    g.add_argument("--sync-bn", action="store_true", default=None,
                   help="BatchNorm statistics over the global batch instead of each process's")
    g.add_argument("--dist-timeout", type=float, metavar="S",
                   default=distributed.DEFAULT_TIMEOUT_S,
                   help="seconds a process waits for the others before giving up with an "
                        "error (default %(default)g)")


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, dict | None]:
    """The recipe with every flag the user gave applied (and the checkpoint to resume)."""
    overrides = given(args, TrainConfig)
    arch = given(args, Architecture)
    if arch:
        overrides["model_overrides"] = arch
    return runs.configure(args.recipe, overrides, resume=args.resume,
                          auto_resume=args.auto_resume, sync_bn=bool(args.sync_bn))


def cmd_train(args: argparse.Namespace) -> int:
    """Train with a recipe of the paper or a modern one (digits-modern, imagenet-modern,
    imagenet-rdnet); any flag overrides the recipe. With no arguments: the embedded scikit-
    learn digits, DenseNet-BC-40 (k=12)."""
    cfg, state = config_from_args(args)
    try:
        result = runs.train(cfg, state, sync_bn=bool(args.sync_bn), save_every=args.save_every,
                            dist_timeout=args.dist_timeout,
                            log=lambda line: print(line, flush=True))
    except runs.RunFailed as e:
        print(f"densenets train: error: {e}", file=sys.stderr, flush=True)
        return 1
    if result.status == "completed" and result.is_main:
        print_summary(result.summary)
    return result.exit_code


def print_summary(s: dict[str, Any]) -> None:
    final = s["final"]
    splits = [k[: -len("_loss")] for k in final if k.endswith("_loss") and k != "train_loss"]
    print(f"finished {runs.plural(s['epochs_completed'], 'epoch')} in {s['seconds']:.1f} s "
          f"({s['images_per_s']:,.0f} training images/s on {s['device']})")
    for split in splits:
        if f"{split}_miou" in final:  # segmentation
            print(f"  {split}: mean IoU {final[f'{split}_miou']:.2f}%, pixel accuracy "
                  f"{final[f'{split}_pixel_acc']:.2f}%, loss {final[f'{split}_loss']:.4f} "
                  "(last epoch)")
            continue
        err = final[f"{split}_top1_err"]
        print(f"  {split}: top-1 error {err:.2f}% (accuracy {100 - err:.2f}%), top-5 error "
              f"{final[f'{split}_top5_err']:.2f}%, loss {final[f'{split}_loss']:.4f} "
              f"(last epoch)")
    if s["at_best"] and s["best"]["split"] == "val" and "test_miou" in s["at_best"]:
        print(f"  test mean IoU at the best validation epoch ({s['best']['epoch']}): "
              f"{s['at_best']['test_miou']:.2f}%")
    if s["at_best"] and s["best"]["split"] == "val" and "test_top1_err" in s["at_best"]:
        print(f"  test top-1 error at the best validation epoch ({s['best']['epoch']}): "
              f"{s['at_best']['test_top1_err']:.2f}%")
    print(f"  paper: {s['paper_error']}")
    print(f"  {s['run_dir']}: config.json metrics.csv curves.png last.pt best.pt summary.json")
