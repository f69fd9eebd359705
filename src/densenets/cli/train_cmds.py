"""Verb ``train``: parse flags, resolve a recipe, build data and model, run.

``densenets train`` with no arguments trains the digits recipe. Exit status: 0 when the run
finished (or stopped at ``--stop-after``), 130 after SIGINT and 143 after SIGTERM (last.pt
saved, resumable), 1 when the loss diverged, 2 for bad input.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..factory import model_from_config
from ..training import distributed, recipes, rundir
from ..training.checkpoint import load_checkpoint, remove_stale_temporaries
from ..training.cuda_graphs import check_supported
from ..training.data import build_data
from ..training.loop import Trainer, TrainingDiverged
from ..training.mixing import make_mix
from ..training.optim import UpdateRules, check_graphable
from ..training.recipes import RECIPES, TrainConfig, default_out_dir, resolve
from ..training.runlog import write_json
from ..training.schedule import schedule_of
from .inspect_cmds import add_model_overrides, model_from_args
from .train_flags import OVERRIDES, add_recipe_overrides, describe_regimen

ARCH_FLAGS = ("depth", "growth_rate", "compression", "block_config", "num_init_features",
              "num_classes", "in_channels", "stem")
# Flags that may change when a run is resumed; everything else is the stored configuration.
RESUMABLE = ("epochs", "device", "workers", "data_dir", "download", "stop_after", "strict",
             "threads")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a DenseNet or RDNet with a recipe (default: digits)",
        description="Train with a recipe of the paper or a modern one (digits-modern, "
                    "imagenet-modern, imagenet-rdnet); any flag overrides the recipe. With no "
                    "arguments: the embedded scikit-learn digits, DenseNet-BC-40 (k=12).")
    p.add_argument("--recipe", choices=list(RECIPES), default=None,
                   help="dataset + hyperparameters of the paper (default digits)")
    p.add_argument("--model", help="zoo name or variant (default: the recipe's)")
    add_model_overrides(p)
    add_recipe_overrides(p)
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", help="dataset directory (default data/<dataset>)")
    g.add_argument("--download", action="store_true", default=None,
                   help="download CIFAR/SVHN when missing")
    g.add_argument("--strict", action="store_true", default=None,
                   help="stop at the first unreadable image instead of skipping it")
    g.add_argument("--workers", type=int, help="loader processes for image folders (default: "
                   "0 on 2 cores or fewer, else one per core but one, at most 8)")
    g = p.add_argument_group("run")
    g.add_argument("--out", help="run directory (default runs/<recipe>-<model>-<time>)")
    g.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last.pt")
    g.add_argument("--auto-resume", action="store_true", help="start --out DIR, or continue it "
                   "when it holds a checkpoint of this configuration (torchrun --max-restarts)")
    g.add_argument("--save-every", type=int, metavar="N",
                   help="also save last.pt every N optimiser steps (a restart loses at most N)")
    g.add_argument("--stop-after", type=int, metavar="N",
                   help="stop (resumably) after epoch N of the schedule")
    g.add_argument("--seed", type=int)
    g.add_argument("--deterministic", action="store_true", default=None,
                   help="deterministic algorithms (slower on GPU)")
    g = p.add_argument_group("speed")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"))
    g.add_argument("--threads", type=int, help="CPU threads (digits: 1; others: torch's default)")
    g.add_argument("--amp", choices=("bf16", "fp16"), help="mixed precision")
    g.add_argument("--channels-last", action="store_true", default=None)
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    g.add_argument("--cuda-graphs", action="store_true", default=None,
                   help="replay each training step as one CUDA graph: fewer kernel launches, "
                        "for small batches on a GPU (single process; not with --amp fp16)")
    g.add_argument("--memory-efficient", action="store_true", default=None,
                   help="memory-efficient dense blocks")
    g = p.add_argument_group("several processes (start with torchrun --nproc-per-node N)")
    g.add_argument("--sync-bn", action="store_true", default=None,
                   help="BatchNorm statistics over the global batch instead of each process's")
    g.add_argument("--dist-timeout", type=float, metavar="S",
                   default=distributed.DEFAULT_TIMEOUT_S,
                   help="seconds a process waits for the others before giving up with an "
                        "error (default %(default)g)")
    p.set_defaults(func=cmd_train)


# ---------------------------------------------------------------------------- train


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, dict | None]:
    """The recipe with every flag the user gave applied (and the checkpoint to resume)."""
    given = {k: getattr(args, k) for k in OVERRIDES if getattr(args, k, None) is not None}
    arch = {k: getattr(args, k) for k in ARCH_FLAGS if getattr(args, k, None) is not None}
    if arch:
        given["model_overrides"] = arch
    if args.auto_resume:  # fresh, or --resume --out with these flags if they match the stored
        return rundir.auto_resume(
            resolve(args.recipe or "digits", **given), lambda out: _resume_config(
                out, {k: v for k, v in given.items() if k in RESUMABLE}, None),
            sync_bn=bool(args.sync_bn), may_change=RESUMABLE, resuming=bool(args.resume))
    if args.resume:
        return _resume_config(args.resume, given, args.recipe)
    return resolve(args.recipe or "digits", **given), None


def _resume_config(run_dir: str, given: dict[str, Any],
                   recipe: str | None) -> tuple[TrainConfig, dict]:
    fixed = sorted(k for k in given if k not in RESUMABLE) + (["recipe"] if recipe else [])
    if fixed:
        flags = ", ".join("--" + k.replace("_", "-") for k in fixed)
        raise ValueError(f"--resume continues the stored configuration; {flags} cannot change "
                         f"(only {', '.join('--' + k.replace('_', '-') for k in RESUMABLE)})")
    path = Path(run_dir) / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: --resume takes a run directory that "
                                "holds last.pt")
    state = load_checkpoint(path)
    stored = state.get("config")
    if not stored:
        raise ValueError(f"{path} has no stored training configuration to resume")
    cfg = TrainConfig.from_dict(stored)
    if "epochs" in given and given["epochs"] != cfg.epochs:
        # A longer (or shorter) run keeps the recipe's schedule shape over its new length.
        rescaled = resolve(cfg.recipe, epochs=given["epochs"])
        cfg.milestones = rescaled.milestones
    cfg.stop_after = None  # a stop applies to the invocation that asked for it
    for k, v in given.items():
        setattr(cfg, k, v)
    cfg.out = str(run_dir)
    return cfg, state


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but this torch sees no CUDA device; use "
                         "--device cpu")
    return torch.device(name)


def build_model(cfg: TrainConfig, num_classes: int, in_channels: int) -> tuple[str, Any]:
    """The zoo model (DenseNet or RDNet) the configuration names, sized for the data."""
    ns = argparse.Namespace(model=cfg.model, depth=None, block_config=None, **{
        k: None for k in ARCH_FLAGS if k not in ("depth", "block_config")})
    for k, v in cfg.model_overrides.items():
        setattr(ns, k, v)
    ns.num_classes = ns.num_classes or num_classes
    ns.in_channels = ns.in_channels or in_channels
    ns.drop_rate = cfg.drop_rate
    ns.drop_path_rate = cfg.drop_path or None
    name, model = model_from_args(ns)
    if model.config.num_classes != num_classes or model.config.in_channels != in_channels:
        raise ValueError(f"the data has {num_classes} classes of {in_channels}-channel images but "
                         f"the model takes {model.config.num_classes} classes of "
                         f"{model.config.in_channels} channels; drop --num-classes/--in-channels")
    return name, model


def prepare_run_dir(cfg: TrainConfig, resuming: bool) -> Path:
    default = not cfg.out
    out = Path(cfg.out or default_out_dir(cfg))
    if default:
        base, n = out, 1
        while out.exists():
            n += 1
            out = base.with_name(f"{base.name}-{n}")
    out.mkdir(parents=True, exist_ok=True)
    rundir.acquire_lock(out, log=lambda m: print(f"densenets train: {m}", file=sys.stderr))
    if not resuming and (out / "last.pt").exists():
        raise ValueError(f"{out} already holds a run; continue it with --resume {out} (or "
                         "--auto-resume) or choose another --out")
    cfg.out = str(out)
    if default:
        latest = out.parent / "latest"
        if latest.is_symlink() or not latest.exists():
            latest.unlink(missing_ok=True)
            latest.symlink_to(out.name)
    return out


def cmd_train(args: argparse.Namespace) -> int:
    threads = torch.get_num_threads()
    cfg, state = config_from_args(args)
    try:
        d, device = distributed.setup(pick_device(cfg.device), args.dist_timeout)
    except ConnectionError as e:
        print(f"densenets train: error: {e}", file=sys.stderr)
        return 1
    clean = False
    try:
        code = _train(args, cfg, state, d, device)
        clean = code in (0, 130, 143)  # finished or stopped together: every peer is alive
        return code
    except (ValueError, FileNotFoundError) as e:
        if d.rank:  # each process reports; name the ones that are not the first
            raise type(e)(f"process {d.rank} of {d.world_size}: {e}") from e
        raise
    finally:
        distributed.teardown(clean)
        rundir.release_locks()
        torch.set_num_threads(threads)  # leave the calling process as it was


def _train(args: argparse.Namespace, cfg: TrainConfig, state: dict | None,
           d: distributed.Dist, device: torch.device) -> int:
    resuming = state is not None
    stored_dist = (state or {}).get("config", {}).get("distributed") or {}
    sync_bn = bool(args.sync_bn or stored_dist.get("sync_bn"))
    per_process = distributed.local_batch_size(cfg.batch_size, d.world_size)
    if cfg.cuda_graphs:  # refused before anything is written
        check_supported(device, cfg.amp, d.enabled, cfg.compile)
    recipes.check_amp(cfg.amp, device)
    if sync_bn and not d.enabled:
        print("densenets train: --sync-bn has no effect in a single process", file=sys.stderr)
    if cfg.threads and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed, cfg.deterministic)
    data = build_data(cfg, device)
    distributed.shard_loaders(data.loaders, d)
    rules = UpdateRules(cfg.label_smoothing, cfg.accum_steps, cfg.clip_grad, cfg.ema_decay,
                        make_mix(cfg, data.num_classes))
    if cfg.cuda_graphs:
        check_graphable(rules, cfg.optimizer, schedule_of(cfg).per_step())
    if state:
        model: Any = model_from_config(state["model_config"])
        name = state["model_name"]
    else:
        name, model = build_model(cfg, data.num_classes, data.in_channels)
    if cfg.memory_efficient:  # DenseNet: the memory-efficient blocks; RDNet: checkpointing
        model.set_grad_checkpointing(True)
    if sync_bn and d.enabled:
        model = distributed.convert_sync_batchnorm(model, device)
    distributed.seed_rank(cfg.seed, d)
    run_dir = agreed_run_dir(cfg, resuming, d, device)
    job = {**d.describe(), "sync_bn": sync_bn, "batch_per_process": per_process}
    record = {**cfg.to_dict(), "distributed": job}
    if d.is_main:
        write_json(record, run_dir / "config.json")
    params = sum(p.numel() for p in model.parameters())
    meta = {"class_names": data.class_names, "preprocessing": data.preprocessing,
            "recipe": cfg.recipe}
    recipe = RECIPES[cfg.recipe]
    trainer = Trainer(
        model, data.loaders["train"], {k: v for k, v in data.loaders.items() if k != "train"},
        epochs=cfg.epochs, schedule=schedule_of(cfg), run_dir=run_dir,
        momentum=cfg.momentum, nesterov=cfg.nesterov, dampening=cfg.dampening,
        weight_decay=cfg.weight_decay, optimizer=cfg.optimizer,
        decay_norm_bias=cfg.decay_norm_bias, rules=rules, device=device, amp=cfg.amp,
        channels_last=cfg.channels_last, compile=cfg.compile, cuda_graphs=cfg.cuda_graphs,
        stop_after=cfg.stop_after, save_every=args.save_every,
        checkpoint_extra={"model_config": model.config.to_dict(), "model_name": name,
                          "meta": meta, "config": record},
        summary_extra={"recipe": cfg.recipe, "model": name, "params": params,
                       "device": str(device), "run_dir": str(run_dir),
                       "paper_error": recipe.paper_error, "world_size": d.world_size},
        dist=d)
    if state:
        trainer.load_state_dict(state)
        if d.is_main:
            remove_stale_temporaries(run_dir)
    if d.is_main:
        sizes = ", ".join(f"{getattr(v, 'readable', v.num_samples):,} {k}"  # what will be read
                          for k, v in data.loaders.items())
        where = f"{device}" if not d.enabled else \
            f"{d.world_size} processes ({d.backend}, {per_process} images each per step)"
        since = f" from step {trainer.step}" if state else ""
        print(f"{'resuming' if state else 'training'} {name} ({params:,} parameters) on "
              f"{cfg.recipe}{since}: {sizes} images; {_n(cfg.epochs, 'epoch')}, batch "
              f"{cfg.batch_size}, lr {cfg.lr:g}{_drops(cfg)} ({describe_regimen(cfg)}), {where}; "
              f"run directory {run_dir}",
              flush=True)
    try:
        result = trainer.fit()
    except TrainingDiverged as e:
        print(f"densenets train: error: {e}", file=sys.stderr)
        return 1
    except (RuntimeError, distributed.dist.DistError) as e:
        if not d.enabled:
            raise
        print(f"densenets train: error: {distributed.lost_peer_message(e, d, run_dir)}",
              file=sys.stderr, flush=True)
        return 1
    if result.status == "completed" and d.is_main:
        print_summary(result.summary)
    return result.exit_code


def agreed_run_dir(cfg: TrainConfig, resuming: bool, d: distributed.Dist,
                   device: torch.device) -> Path:
    """Rank 0 picks (and checks) the run directory; every process gets its answer."""
    answer = None
    if d.is_main:
        try:
            answer = "ok:" + str(prepare_run_dir(cfg, resuming))
        except (ValueError, OSError) as e:
            answer = f"error:{e}"
    answer = d.broadcast_text(answer, device)
    if answer.startswith("error:"):
        raise ValueError(answer[len("error:"):])
    cfg.out = answer[len("ok:"):]
    return Path(cfg.out)


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _drops(cfg: TrainConfig) -> str:
    if cfg.schedule != "step":
        return ""
    drops = [str(m + 1) for m in cfg.milestones if 0 < m < cfg.epochs]
    return f" (/10 from epochs {', '.join(drops)})" if drops else ""


def print_summary(s: dict[str, Any]) -> None:
    final = s["final"]
    splits = [k[: -len("_loss")] for k in final if k.endswith("_loss") and k != "train_loss"]
    print(f"finished {_n(s['epochs_completed'], 'epoch')} in {s['seconds']:.1f} s "
          f"({s['images_per_s']:,.0f} training images/s on {s['device']})")
    for split in splits:
        err = final[f"{split}_top1_err"]
        print(f"  {split}: top-1 error {err:.2f}% (accuracy {100 - err:.2f}%), top-5 error "
              f"{final[f'{split}_top5_err']:.2f}%, loss {final[f'{split}_loss']:.4f} "
              f"(last epoch)")
    if s["at_best"] and s["best"]["split"] == "val" and "test_top1_err" in s["at_best"]:
        print(f"  test top-1 error at the best validation epoch ({s['best']['epoch']}): "
              f"{s['at_best']['test_top1_err']:.2f}%")
    print(f"  paper: {s['paper_error']}")
    print(f"  {s['run_dir']}: config.json metrics.csv curves.png last.pt best.pt summary.json")
