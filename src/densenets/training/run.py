"""One training run from its configuration: the entry point ``densenets train`` calls.

:func:`configure` turns a recipe and the overrides given (or a run directory to resume) into
the configuration; :func:`train` does the rest: joins the processes torchrun started, seeds,
builds the data and the model, agrees on the run directory, writes ``config.json``, builds the
:class:`~densenets.training.loop.Trainer` and fits. Everything here is library code: the
command line only parses flags into these calls and prints what they return.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..device import resolve_device
from ..weights.files import load as load_weights
from . import distributed, rundir
from .checkpoint import load_checkpoint, remove_stale_temporaries
from .config import TrainConfig
from .cuda_graphs import check_supported
from .data import build_data
from .fields import flag_name, pick, resumable
from .loop import FitResult, Trainer, TrainingDiverged
from .mixing import make_mix
from .model import build_model, model_from_checkpoint
from .optim import OptimizerSettings, UpdateRules, check_graphable
from .recipes import RECIPES, check_amp, default_out_dir, resolve
from .runlog import write_json
from .schedule import schedule_of
from .segmentation import check_segmentation, is_segmentation, objective_of
from .settings import Checkpointing, Execution, Reporting

# Fields that may change when a run is resumed; everything else is the stored configuration.
RESUMABLE = resumable(TrainConfig)


class RunFailed(RuntimeError):
    """The run could not go on (no process group, a diverged loss, a lost peer): exit 1."""


def _note(line: str) -> None:
    print(f"densenets train: {line}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- configuration


def configure(recipe: str | None, given: dict[str, Any], *, resume: str | None = None,
              auto_resume: bool = False, sync_bn: bool = False) -> tuple[TrainConfig, dict | None]:
    """The recipe with every override ``given`` applied, and the checkpoint to resume (if any).

    ``resume``: continue that run directory (only :data:`RESUMABLE` fields may change);
    ``auto_resume``: start ``given["out"]``, or continue it when it holds a checkpoint of this
    very configuration (restarts under torchrun).
    """
    if auto_resume:
        return rundir.auto_resume(
            resolve(recipe or "digits", **given), lambda out: resume_config(
                out, {k: v for k, v in given.items() if k in RESUMABLE}, None),
            sync_bn=sync_bn, may_change=RESUMABLE, resuming=bool(resume))
    if resume:
        return resume_config(resume, given, recipe)
    return resolve(recipe or "digits", **given), None


def resume_config(run_dir: str, given: dict[str, Any],
                  recipe: str | None) -> tuple[TrainConfig, dict]:
    """The stored configuration of ``run_dir`` with the resumable fields ``given`` changed."""
    fixed = sorted(k for k in given if k not in RESUMABLE) + (["recipe"] if recipe else [])
    if fixed:
        raise ValueError(f"--resume continues the stored configuration; "
                         f"{', '.join(map(flag_name, fixed))} cannot change (only "
                         f"{', '.join(map(flag_name, RESUMABLE))})")
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


# ---------------------------------------------------------------------------- the run


def train(cfg: TrainConfig, state: dict | None = None, *, sync_bn: bool = False,
          save_every: int | None = None,
          dist_timeout: float = distributed.DEFAULT_TIMEOUT_S,
          log: Callable[[str], None] = print) -> FitResult:
    """Train ``cfg`` (continuing ``state``, a checkpoint) in this process, or in each of the
    processes torchrun started; ``log`` gets the header line (rank 0 only).

    Raises :class:`RunFailed` when the job cannot be joined, the loss diverged or a peer was
    lost; ValueError / FileNotFoundError for bad input (named by process when distributed).
    The calling process's thread count is restored afterwards.
    """
    threads = torch.get_num_threads()
    try:
        d, device = distributed.setup(resolve_device(cfg.device), dist_timeout)
    except ConnectionError as e:
        raise RunFailed(str(e)) from e
    clean = False
    try:
        result = _train(cfg, state, d, device, sync_bn, save_every, log)
        clean = result.exit_code in (0, 130, 143)  # finished or stopped together: all alive
        return result
    except (ValueError, FileNotFoundError) as e:
        if d.rank:  # each process reports; name the ones that are not the first
            raise type(e)(f"process {d.rank} of {d.world_size}: {e}") from e
        raise
    finally:
        distributed.teardown(clean)
        rundir.release_locks()
        torch.set_num_threads(threads)  # leave the calling process as it was


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic


def _train(cfg: TrainConfig, state: dict | None, d: distributed.Dist, device: torch.device,
           sync_bn: bool, save_every: int | None, log: Callable[[str], None]) -> FitResult:
    stored_dist = (state or {}).get("config", {}).get("distributed") or {}
    sync_bn = bool(sync_bn or stored_dist.get("sync_bn"))
    if cfg.cuda_graphs:  # refused before anything is written
        check_supported(device, cfg.amp, d.enabled, cfg.compile)
    check_amp(cfg.amp, device)
    if is_segmentation(cfg):
        check_segmentation(cfg)
    if sync_bn and not d.enabled:
        _note("--sync-bn has no effect in a single process")
    if cfg.threads and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed, cfg.deterministic)
    data = build_data(cfg, device)
    distributed.shard_loaders(data.loaders, d)
    rules = pick(UpdateRules, cfg, mix=make_mix(cfg, data.num_classes),
                 objective=objective_of(cfg, data.num_classes) if is_segmentation(cfg) else None)
    if cfg.cuda_graphs:
        check_graphable(rules, cfg.optimizer, schedule_of(cfg).per_step())
    name, model = model_from_checkpoint(state) if state else \
        build_model(cfg, data.num_classes, data.in_channels)
    if cfg.weights and not state:
        start_from(model, cfg.weights)
    if cfg.memory_efficient:  # DenseNet: the memory-efficient blocks; RDNet: checkpointing
        model.set_grad_checkpointing(True)
    if sync_bn and d.enabled:
        model = distributed.convert_sync_batchnorm(model, device)
    distributed.seed_rank(cfg.seed, d)
    run_dir = agreed_run_dir(cfg, state is not None, d, device)
    per_process = distributed.local_batch_size(cfg.batch_size, d.world_size)
    # The preprocessing (channels, bit depth, statistics, volume size) as predict repeats it.
    record = {**cfg.to_dict(), "preprocessing": data.preprocessing,
              "distributed": {**d.describe(), "sync_bn": sync_bn,
                              "batch_per_process": per_process}}
    if d.is_main:
        write_json(record, run_dir / "config.json")
    params = sum(p.numel() for p in model.parameters())
    meta = {"class_names": data.class_names, "preprocessing": data.preprocessing,
            "recipe": cfg.recipe}
    trainer = Trainer(
        model, data.loaders["train"], {k: v for k, v in data.loaders.items() if k != "train"},
        epochs=cfg.epochs, schedule=schedule_of(cfg), run_dir=run_dir,
        optim=pick(OptimizerSettings, cfg), rules=rules,
        execution=pick(Execution, cfg, device=device),
        checkpointing=Checkpointing(
            save_every=save_every, stop_after=cfg.stop_after,
            extra={"model_config": model.config.to_dict(), "model_name": name, "meta": meta,
                   "config": record}),
        reporting=Reporting(summary_extra={
            "recipe": cfg.recipe, "model": name, "params": params, "device": str(device),
            "run_dir": str(run_dir), "paper_error": RECIPES[cfg.recipe].paper_error,
            "world_size": d.world_size}),
        dist=d)
    if state:
        trainer.load_state_dict(state)
        if d.is_main:
            remove_stale_temporaries(run_dir)
    if d.is_main:
        log(header(cfg, trainer, name, params, data.loaders, d, per_process, bool(state)))
    try:
        return trainer.fit()
    except TrainingDiverged as e:
        raise RunFailed(str(e)) from e
    except (RuntimeError, distributed.dist.DistError) as e:
        if not d.enabled:
            raise
        raise RunFailed(distributed.lost_peer_message(e, d, run_dir)) from e


def start_from(model: torch.nn.Module, path: str) -> None:
    """Load the model weights of a checkpoint or run directory (``--weights``: fine-tuning)."""
    source = load_weights(path)
    try:
        model.load_state_dict(source.state_dict())
    except RuntimeError as e:
        first = str(e).strip().splitlines()[1:2] or [str(e)]
        raise ValueError(f"--weights {path} does not fit this run's model ({first[0].strip()}); "
                         "pass weights of the same architecture and classes") from None


# ---------------------------------------------------------------------------- run directory


def prepare_run_dir(cfg: TrainConfig, resuming: bool) -> Path:
    """Create (and lock) the run directory; a fresh run refuses one that holds a run."""
    default = not cfg.out
    out = Path(cfg.out or default_out_dir(cfg))
    if default:
        base, n = out, 1
        while out.exists():
            n += 1
            out = base.with_name(f"{base.name}-{n}")
    out.mkdir(parents=True, exist_ok=True)
    rundir.acquire_lock(out, log=_note)
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


# ---------------------------------------------------------------------------- what it says


def plural(count: int, noun: str) -> str:
    """``1 epoch``, ``2 epochs``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _drops(cfg: TrainConfig) -> str:
    if cfg.schedule != "step":
        return ""
    drops = [str(m + 1) for m in cfg.milestones if 0 < m < cfg.epochs]
    return f" (/10 from epochs {', '.join(drops)})" if drops else ""


def describe_regimen(cfg: TrainConfig) -> str:
    """What the training header says about the optimiser, schedule and regularisers."""
    parts = [cfg.optimizer]
    if cfg.schedule == "cosine":
        parts.append(f"cosine to {cfg.min_lr:g}")
    if cfg.schedule == "exponential":
        parts.append(f"x{cfg.gamma:g} per epoch")
    if cfg.weights:
        parts.append(f"from {cfg.weights}")
    if cfg.warmup_epochs:
        parts.append(f"{cfg.warmup_epochs:.3g} warm-up epochs from {cfg.warmup_lr:g}")
    named = (("label smoothing", cfg.label_smoothing), ("mixup", cfg.mixup),
             ("cutmix", cfg.cutmix), ("drop path", cfg.drop_path), ("EMA", cfg.ema_decay),
             ("clip", cfg.clip_grad), ("random erasing", cfg.random_erasing))
    parts += [f"{name} {value:g}" for name, value in named if value]
    if cfg.auto_augment:
        parts.append(cfg.auto_augment)
    if cfg.accum_steps > 1:
        parts.append(f"{cfg.accum_steps} batches per step")
    return ", ".join(parts)


def header(cfg: TrainConfig, trainer: Trainer, name: str, params: int,
           loaders: dict[str, Any], d: distributed.Dist, per_process: int,
           resuming: bool) -> str:
    """The line that opens a run: model, data, schedule, regimen, where, run directory."""
    sizes = ", ".join(f"{getattr(v, 'readable', v.num_samples):,} {k}"  # what will be read
                      for k, v in loaders.items())
    where = f"{trainer.device}" if not d.enabled else \
        f"{d.world_size} processes ({d.backend}, {per_process} images each per step)"
    since = f" from step {trainer.step}" if resuming else ""
    return (f"{'resuming' if resuming else 'training'} {name} ({params:,} parameters) on "
            f"{cfg.recipe}{since}: {sizes} images; {plural(cfg.epochs, 'epoch')}, batch "
            f"{cfg.batch_size}, lr {cfg.lr:g}{_drops(cfg)} ({describe_regimen(cfg)}), {where}; "
            f"run directory {trainer.run_dir}")
