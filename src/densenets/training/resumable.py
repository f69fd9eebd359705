"""What a checkpoint of a training run holds, and when the loop writes one.

last.pt is written at the end of every epoch (and every ``save_every`` optimiser steps), best.pt
when the selected split's top-1 error improves, and last.pt once more when a signal stops the
run. A checkpoint holds everything the next step depends on: weights, optimiser, scaler, EMA,
counters, the running sums of the epoch in progress, and every random state (each process's,
once distributed), so a resumed run continues bit for bit. Files are written atomically by
:mod:`densenets.training.checkpoint`, by rank 0 alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from .distributed import gather_rng, restore_rng


class Resumable:
    """The checkpoint half of :class:`~densenets.training.loop.Trainer` (a mixin: it reads the
    trainer's model, optimiser, scaler, EMA, schedule, counters and metrics)."""

    def state_dict(self) -> dict[str, Any]:
        m = self.metrics
        return {
            "format": ckpt.FORMAT, "version": ckpt.VERSION, **self.extra,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "scheduler": self.schedule.to_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "epoch": self.epoch, "step": self.step, "step_in_epoch": self.step_in_epoch,
            "partial": dict(m.partial), "epochs": self.epochs,
            "metrics": m.history, "best": m.best, "rng": ckpt.capture_rng_state(),
            "rng_per_rank": gather_rng(self.dist, self.device),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint written by :meth:`state_dict` (RNG states included)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if not state.get("ema"):
                raise ValueError("the checkpoint holds no EMA of the weights, but this run keeps "
                                 "one (--ema-decay); resume with the stored configuration")
            self.ema.load_state_dict(state["ema"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.step_in_epoch = int(state.get("step_in_epoch", 0))
        self.metrics.load_state_dict(state)
        ckpt.restore_rng_state(state["rng"])
        restore_rng(state.get("rng_per_rank"), self.dist, self.device)

    def _save(self, name: str) -> Path:
        return self._write(ckpt.save_checkpoint, self.state_dict(), self.run_dir / name)

    def _save_epoch(self, improved: bool) -> None:
        """The end of an epoch: last.pt, and best.pt when the epoch is the best so far."""
        self._save("last.pt")
        if improved or not (self.run_dir / "best.pt").exists():
            self._save("best.pt")

    def _save_step(self, pending: list[tuple[int, torch.Tensor]], sums: torch.Tensor,
                   epoch: int, t0: float) -> None:
        """``save_every``: last.pt in the middle of an epoch, so a restart loses at most N
        steps. Every process joins (at the same step: the sums and RNG states are gathered);
        only rank 0 writes, and no one waits for it: they meet at the next all-reduce."""
        self._check_finite(pending, epoch)  # never save over a good checkpoint with a bad one
        pending.clear()
        if self.stopping is not None:
            return  # the stop saves this very state
        in_epoch = self.metrics.partial
        self.metrics.set_partial(self._reduce(sums), t0)
        try:
            self._save("last.pt")
        finally:
            self.metrics.partial = in_epoch
