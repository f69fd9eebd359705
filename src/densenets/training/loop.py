"""The training loop: the paper's SGD or a modern recipe for any ``nn.Module``, nothing lost.

The loop knows nothing of DenseNet: it takes a module, a training loader with ``batches(epoch,
start)`` and named evaluation loaders. It writes a run directory (``metrics.csv``, ``curves.png``,
``last.pt``, ``best.pt``, ``summary.json``) through one function, saves atomically, stops
cleanly on SIGINT/SIGTERM (finishing the step and saving a mid-epoch checkpoint), stops on a
non-finite loss without overwriting the last good checkpoint, and resumes bit for bit
(schedule, EMA and mixing included). Under torchrun (``dist``) every process runs this loop on
its share of each batch; only rank 0 writes and prints, the processes agree at fixed steps
whether to stop (a signal, a non-finite loss), and evaluation sums counts.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..constants import LOW_PRECISION
from . import checkpoint as ckpt
from .batches import as_loader
from .cuda_graphs import GraphedTrainStep, check_supported
from .distributed import Dist, wrap_ddp
from .evaluate import autocast, evaluate
from .metrics import EpochMetrics
from .optim import (
    OptimizerSettings,
    UpdateRules,
    build_ema,
    check_graphable,
    clip_gradients,
    no_sync,
)
from .resumable import Resumable
from .runlog import EpochProgress, write_curves, write_json, write_metrics
from .schedule import Schedule
from .settings import Checkpointing, Execution, Reporting, regroup
from .signals import EXIT_SIGNAL, StopOnSignal

__all__ = ["Checkpointing", "Execution", "FitResult", "OptimizerSettings", "Reporting",
           "Schedule", "Trainer", "TrainingDiverged", "UpdateRules"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stopped without saving over good checkpoints."""


@dataclass
class FitResult:
    status: str  # completed | interrupted | stopped
    exit_code: int
    summary: dict[str, Any]
    is_main: bool = True  # whether this process reports (rank 0)


def _print(line: str) -> None:
    print(line, flush=True)  # logs are read live (CI, tail -f): no buffering


def wrap_model(model: nn.Module, compile: bool = False, dist: Dist | None = None,
               device: torch.device | None = None) -> nn.Module:
    """The module the steps run through: DDP across processes, then torch.compile."""
    if dist is not None and dist.enabled:
        model = wrap_ddp(model, device or torch.device("cpu"))
    return torch.compile(model) if compile else model


class Trainer(Resumable, StopOnSignal):
    """Train ``model`` on ``train_loader``; evaluate on ``eval_loaders`` after every epoch.

    ``optim``: SGD with (Nesterov) momentum and weight decay on every parameter, as in the
    paper, or AdamW (:class:`OptimizerSettings`); ``rules`` adds label smoothing, mixing,
    accumulation, clipping and an EMA (evaluated beside the model: ``<split>_ema_*``
    metrics); ``execution`` says where and how the steps run, ``checkpointing`` what is saved
    and when, ``reporting`` what is shown (:mod:`densenets.training.settings`). Each group's
    fields may also be given as flat keywords (``optimizer="adamw"``, ``amp="bf16"``).
    """

    def __init__(self, model: nn.Module, train_loader, eval_loaders: dict[str, Any], *,
                 epochs: int, schedule: Schedule, run_dir: str | Path,
                 optim: OptimizerSettings | None = None, rules: UpdateRules | None = None,
                 execution: Execution | None = None, checkpointing: Checkpointing | None = None,
                 reporting: Reporting | None = None, dist: Dist | None = None,
                 **flat: Any) -> None:
        g = regroup({"optim": optim, "execution": execution, "checkpointing": checkpointing,
                     "reporting": reporting}, flat)
        run, saving, shown = g["execution"], g["checkpointing"], g["reporting"]
        self.rules = rules or UpdateRules()
        if run.cuda_graphs:  # checked first: it needs no device
            check_graphable(self.rules, g["optim"].optimizer, schedule.per_step())
        self.device = torch.device(run.device)
        self.dist = dist or Dist()
        self.model = model.to(self.device)
        if run.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.net = wrap_model(self.model, run.compile, self.dist, self.device)
        self.train_loader = as_loader(train_loader)
        self.eval_loaders = eval_loaders
        self.epochs, self.schedule, self.run_dir = epochs, schedule, Path(run_dir)
        self.amp, self.channels_last = run.amp, run.channels_last
        self.stop_after, self.save_every = saving.stop_after, saving.save_every
        self.optimizer = g["optim"].build(self.model, schedule.lr)
        self.ema = build_ema(self.model, self.rules.ema_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=run.amp == "fp16")
        self.graphed: GraphedTrainStep | None = None
        if run.cuda_graphs:
            check_supported(self.device, run.amp, self.dist.enabled, run.compile)
            self.graphed = GraphedTrainStep(self.net, self.optimizer,
                                            torch.bfloat16 if run.amp == "bf16" else None)
        self.extra = dict(saving.extra)
        self.summary_extra = dict(shown.summary_extra)
        # One host sync per step is free on CPU; on a GPU it would stall the launch queue.
        self.sync_every = shown.sync_every or (1 if self.device.type == "cpu" else 25)
        live = sys.stdout.isatty() if shown.progress is None else shown.progress
        self.progress = EpochProgress(live and self.dist.is_main)
        self.log = (shown.log or _print) if self.dist.is_main else (lambda line: None)
        self.epoch = 0  # epochs completed
        self.step = 0  # optimiser steps taken
        self.step_in_epoch = 0  # batches of epoch ``self.epoch`` already trained on
        self.metrics = EpochMetrics(saving.select_on or (
            "val" if "val" in eval_loaders else next(iter(eval_loaders), None)),
            self.rules.objective)
        self._stand_in: tuple[torch.Tensor, torch.Tensor] | None = None  # see _train_epoch
        self.stop_signal: int | None = None  # the signal this process received
        self.stopping: int | None = None  # the signal every process agreed to stop on

    @property
    def history(self) -> list[dict[str, Any]]:
        """One row of metrics per finished epoch."""
        return self.metrics.history

    @property
    def best(self) -> dict[str, Any] | None:
        return self.metrics.best

    # ------------------------------------------------------------------ distributed seams
    def _is_main(self) -> bool:
        return self.dist.is_main

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        return self.dist.all_sum(t)

    def _agree(self, nonfinite: bool = False) -> bool:
        """Whether any process saw a non-finite loss; sets ``stopping`` if any got a signal.
        Every process calls this at the same batches, so all stop at the same step."""
        if not self.dist.enabled:
            self.stopping = self.stop_signal
            return nonfinite
        flags = torch.tensor([int(nonfinite), self.stop_signal or 0], device=self.device)
        bad, sig = self.dist.all_max(flags).tolist()
        if sig and self.stopping is None:
            self.stopping = int(sig)
            self.stop_signal = self.stop_signal or self.stopping
        return bool(bad)

    def _write(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Every file a run writes goes through here (rank 0 only, once distributed)."""
        return fn(*args) if self._is_main() else None

    # ------------------------------------------------------------------ the loop
    def fit(self) -> FitResult:
        """Train from ``self.epoch`` to ``epochs``; returns how it ended and the summary."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_temporaries(self.run_dir)
        previous = self._install_signal_handlers()
        try:
            return self._fit()
        finally:
            self._restore_signal_handlers(previous)

    def _fit(self) -> FitResult:
        if self.epoch >= self.epochs:
            self.log(f"{self.run_dir} holds all {self.epochs} epochs: nothing left to train")
        while self.epoch < self.epochs:
            epoch = self.epoch
            lr = self.schedule.lr_at(epoch, 0, self._updates_per_epoch())
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            if not self._train_epoch(epoch, lr):
                return self._interrupted()
            row = self._end_epoch(epoch, lr)
            self.log(self.progress.epoch_line(row, self.epochs))
            self._agree()
            if self.stopping is not None:
                return self._interrupted()
            if self.stop_after is not None and self.stop_after <= self.epoch < self.epochs:
                self.log(f"stopped after epoch {self.epoch} of {self.epochs} (--stop-after); "
                         f"continue with: densenets train --resume {self.run_dir}")
                return self._result("stopped", 0)
        summary = self.summary()
        self._write(write_json, summary, self.run_dir / "summary.json")
        return self._result("completed", 0, summary)

    def _updates_per_epoch(self) -> int:
        return self.rules.updates_per_epoch(len(self.train_loader))

    def _train_epoch(self, epoch: int, lr: float) -> bool:
        """One pass over the training batches; False when a signal asked us to stop."""
        self.net.train()
        loader = self.train_loader
        start, t0, n0 = self.step_in_epoch, time.perf_counter(), self.metrics.partial["n"]
        # The epoch's sums so far, of all processes: carried by rank 0 alone, reduced below.
        sums = self.metrics.carried(self._is_main(), self.device)
        pending: list[tuple[int, torch.Tensor]] = []  # (batch, loss) not yet checked
        interrupted, accumulated = False, False  # gradients waiting for their update
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.start(epoch, self.epochs, len(loader), start)
        for b, (x, y) in enumerate(loader.batches(epoch, start), start):
            n = len(y)
            if self.dist.enabled:
                if n:
                    self._stand_in = (x, y)
                elif self._stand_in is not None:
                    # Every image of this process's share was unreadable. The others' gradient
                    # all-reduce waits for this process, so it joins the step with its last
                    # batch at weight 0: no gradient and no metrics from it, the same step.
                    x, y = self._stand_in
            update, _, ends = self.rules.group(b, len(loader))
            if len(y):  # else a batch of unreadable images only: skipped, counted
                loss, correct = self._train_step(x, y, self._loss_weight(loader, b, n),
                                                 epoch, b, not ends)
                accumulated = True
                if n:
                    pending.append((b, loss))
                    sums += torch.stack([loss.double() * n, correct.double(),
                                         torch.tensor(float(n), dtype=torch.float64,
                                                      device=self.device)])
            stepped = ends and accumulated
            if stepped:
                self._update(epoch, update)
                accumulated = False
            self.step_in_epoch = b + 1
            last = b + 1 == len(loader)
            if self.dist.enabled:  # at the same batches on every process
                due = (b + 1 - start) % self.sync_every == 0 or last
            else:
                due = bool(pending) and (len(pending) >= self.sync_every or last
                                         or self.stop_signal is not None)
            if due:
                self._check_finite(pending, epoch)
                pending.clear()
                loss_sum, hits, n = sums.tolist()
                self.progress.update(b + 1, loss_sum / max(n, 1), 100 * (1 - hits / max(n, 1)),
                                     (n - n0) / max(time.perf_counter() - t0, 1e-9))
            if stepped and self.save_every and self.step % self.save_every == 0 and not last:
                self._save_step(pending, sums, epoch, t0)
            if self.stopping is not None and not last and ends:  # never amid an accumulation
                interrupted = True
                break
        if pending:
            self._check_finite(pending, epoch)
        self.metrics.set_partial(self._reduce(sums), t0)
        self.progress.stop()
        return not interrupted

    def _loss_weight(self, loader, b: int, local: int) -> float:
        """Scales this process's mean loss so that the update (DDP's average over processes, the
        sum over accumulated batches) is the mean over all its images even when the shares
        differ (the last batch of an epoch)."""
        update, size, _ = self.rules.group(b, len(loader))
        if not hasattr(loader, "global_size"):
            return 1.0 / size
        if not self.dist.enabled and size == 1:
            return 1.0
        first = update * self.rules.accum_steps
        total = sum(loader.global_size(i) for i in range(first, first + size))
        return local * self.dist.world_size / total

    def _train_step(self, x: torch.Tensor, y: torch.Tensor, weight: float = 1.0,
                    epoch: int = 0, b: int = 0,
                    accumulating: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of one batch (the update itself is :meth:`_update`)."""
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        target = y
        if self.rules.mix is not None:
            x, target = self.rules.mix(x, y, epoch, b, self.dist.rank)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.graphed is not None:
            return self.graphed(x, y)
        with no_sync(self.net, accumulating), autocast(self.device, self.amp):
            logits = self.net(x)
        if logits.dtype in LOW_PRECISION:
            logits = logits.float()  # the loss in full precision under autocast
        loss = self.rules.loss(logits, target)
        with no_sync(self.net, accumulating):
            self.scaler.scale(loss * weight if weight != 1.0 else loss).backward()
        if self.rules.objective is not None:  # segmentation: the batch's pixel accuracy
            return loss.detach(), self.rules.objective.train_score(logits.detach(), y)
        label = target.argmax(1) if target.ndim == 2 else y  # mixed: the dominant image's class
        return loss.detach(), (logits.detach().argmax(1) == label).sum()

    def _update(self, epoch: int, update: int) -> None:
        """The optimiser step of the accumulated gradients, then the EMA."""
        self.step += 1
        if self.graphed is not None:
            return  # the graphed step already stepped
        if self.schedule.per_step():
            lr = self.schedule.lr_at(epoch, update, self._updates_per_epoch())
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        if self.rules.clip_grad:
            clip_gradients(self.model, self.optimizer, self.scaler, self.rules.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def _check_finite(self, pending: list[tuple[int, torch.Tensor]], epoch: int) -> None:
        values = torch.stack([loss for _, loss in pending]).tolist() if pending else []
        local_bad = not all(math.isfinite(v) for v in values)
        if self._agree(local_bad) and not local_bad:
            self.progress.stop()
            raise TrainingDiverged(
                f"the loss of another process became non-finite by step {self.step} (epoch "
                f"{epoch + 1}); stopped without saving. Lower --lr, or use --amp bf16 "
                "instead of fp16")
        for i, v in enumerate(values):
            if not math.isfinite(v):
                self.progress.stop()
                last = self.run_dir / "last.pt"
                good = str(last) if last.exists() else "none (no epoch finished yet)"
                raise TrainingDiverged(
                    f"loss is {v} at step {self.step - len(values) + i + 1} (epoch {epoch + 1}, "
                    f"batch {pending[i][0] + 1} of {len(self.train_loader)}); stopped without "
                    f"saving. Last good checkpoint: {good}. Lower --lr, or use --amp bf16 "
                    "instead of fp16")

    def _end_epoch(self, epoch: int, lr: float) -> dict[str, Any]:
        t0 = time.perf_counter()
        row = self.metrics.start_row(epoch, lr)
        net = self.net
        if self.dist.enabled:
            # Rank 0's BatchNorm statistics everywhere (they are the checkpoint's), and the
            # bare module: a process may have an empty last batch, and DDP's forward would
            # wait for it in a collective.
            self.dist.broadcast_buffers(self.model)
            net = self.model
            if self.ema is not None:  # each process averaged its own BN statistics
                self.dist.broadcast_buffers(self.ema.module)
        for split, loader in self.eval_loaders.items():
            self.metrics.add_split(row, split, self._evaluate(net, loader))
            if self.ema is not None:  # the averaged weights beside the model, same split
                self.metrics.add_split(row, f"{split}_ema", self._evaluate(self.ema.module,
                                                                           loader))
        improved = self.metrics.finish(row, t0)
        self.epoch, self.step_in_epoch = epoch + 1, 0
        self._write(write_metrics, self.history, self.run_dir / "metrics.csv")
        self._write(write_curves, self.history, self.run_dir / "curves.png")
        self._save_epoch(improved)
        return row

    def _evaluate(self, net: nn.Module, loader) -> dict[str, float]:
        if self.rules.objective is not None:  # segmentation: pixel accuracy, IoU
            return self.rules.objective.evaluate(
                net, loader, self.device, autocast=lambda: autocast(self.device, self.amp),
                channels_last=self.channels_last, reduce=self._reduce)
        return evaluate(net, loader, self.device, amp=self.amp, channels_last=self.channels_last,
                        reduce=self._reduce)

    def _interrupted(self) -> FitResult:
        self._save("last.pt")
        name = signal.Signals(self.stopping).name if self.stopping else "signal"
        where = f"epoch {self.epoch + 1}, batch {self.step_in_epoch}" if self.step_in_epoch \
            else f"the end of epoch {self.epoch}"
        self.log(f"{name}: saved {self.run_dir / 'last.pt'} at {where} (step {self.step}); "
                 f"continue with: densenets train --resume {self.run_dir}")
        return self._result("interrupted", EXIT_SIGNAL.get(self.stopping, 130))

    def summary(self) -> dict[str, Any]:
        """Epochs, time, the last epoch's metrics and those of the best epoch."""
        return self.metrics.summary(**self.summary_extra, epochs_completed=self.epoch,
                                    epochs=self.epochs, steps=self.step)

    def _result(self, status: str, exit_code: int, summary: dict | None = None) -> FitResult:
        summary = self.summary() if summary is None else summary
        return FitResult(status=status, exit_code=exit_code, summary=summary,
                         is_main=self.dist.is_main)
