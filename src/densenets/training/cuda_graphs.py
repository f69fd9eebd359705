"""Whole training steps replayed as CUDA graphs: one launch for thousands of kernels.

At the paper's CIFAR batch of 64 a DenseNet step on a current GPU is bound by kernel launches:
the host needs longer to launch the ~2,600 kernels of DenseNet-BC-100 (~5,400 in the
memory-efficient mode) than the card needs to run them. A CUDA graph records the step's kernels
once and replays them with one call, so the step then costs what the GPU work costs.

:class:`GraphedTrainStep` runs forward, loss, backward and the optimiser step. Its first steps
run eagerly on a side stream (they are real training steps, and warm cuDNN's algorithm choice and
the optimiser's momentum buffers up); then the step is captured and replayed, each batch copied
into the graph's static input. A batch of another shape (an epoch's last, smaller batch) runs
eagerly, and a change of learning rate (a milestone) captures again: SGD bakes the rate into the
captured kernels.

Limits, each refused with a message by :func:`check_supported`: CUDA only; no fp16 loss scaling
(its overflow check reads the GPU from the host every step); a single process (DDP's
communication would need its own capture set-up); no ``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

WARMUP_STEPS = 3


def check_supported(device: torch.device, amp: str | None, distributed: bool,
                    compile: bool) -> None:
    """Raise ValueError when a training set-up cannot be replayed as a CUDA graph."""
    if device.type != "cuda":
        raise ValueError(f"--cuda-graphs needs a CUDA device (training runs on {device}); "
                         "drop the flag or use --device cuda")
    if amp == "fp16":
        raise ValueError("--cuda-graphs does not work with --amp fp16 (loss scaling checks for "
                         "overflow on the host every step); use --amp bf16")
    if distributed:
        raise ValueError("--cuda-graphs is single-process for now; under torchrun drop the flag")
    if compile:
        raise ValueError("--cuda-graphs and --compile do not combine; pick one "
                         "(--compile's mode='reduce-overhead' uses CUDA graphs itself)")


class GraphedTrainStep:
    """Forward, cross-entropy, backward and ``optimizer.step()`` of ``model``, as a CUDA graph.

    ``step(x, y)`` returns the batch's mean loss and its number of correct top-1 predictions
    (tensors on the device, valid until the next call). ``amp_dtype`` runs the forward under
    autocast. ``loss_fn(logits, y)`` defaults to cross-entropy in float32.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 amp_dtype: torch.dtype | None = None,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 warmup: int = WARMUP_STEPS) -> None:
        self.model, self.optimizer, self.amp_dtype = model, optimizer, amp_dtype
        self.loss_fn = loss_fn or (lambda logits, y: F.cross_entropy(logits.float(), y))
        # at least one eager step: SGD creates its momentum buffers on its first step, and a
        # capture of that first step would replay "create" instead of "update" forever
        self.warmup = max(1, warmup)
        self.steps = 0
        self.captures = 0  # how many times the step was (re)captured
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key: tuple | None = None
        self.static: dict[str, torch.Tensor] = {}
        self.side = torch.cuda.Stream()

    def _compute(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the autocast cache would hold casts made during capture: off, as graphs require
        with torch.autocast("cuda", dtype=self.amp_dtype or torch.bfloat16,
                            enabled=self.amp_dtype is not None, cache_enabled=False):
            logits = self.model(x)
        loss = self.loss_fn(logits, y)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), (logits.detach().argmax(1) == y).sum()

    def _eager(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        return self._compute(x, y)

    def _key(self, x: torch.Tensor, y: torch.Tensor) -> tuple:
        """What a recorded graph is valid for: key[:5] the batch's layout, key[5] the rates."""
        lrs = tuple(float(g["lr"]) for g in self.optimizer.param_groups)
        return (tuple(x.shape), x.stride(), x.dtype, tuple(y.shape), y.dtype, lrs)

    def _capture(self, x: torch.Tensor, y: torch.Tensor, key: tuple) -> None:
        self.graph = None  # free the previous graph's memory before recording the new one
        self.static = {"x": x.clone(memory_format=torch.preserve_format), "y": y.clone()}
        torch.cuda.synchronize()
        self.optimizer.zero_grad(set_to_none=True)  # gradients are then allocated in the graph
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static["loss"], self.static["correct"] = self._compute(self.static["x"],
                                                                        self.static["y"])
        self.graph, self.key = graph, key
        self.captures += 1

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.steps += 1
        if self.steps <= self.warmup:  # real steps, on a side stream as capture requires
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                out = self._eager(x, y)
            torch.cuda.current_stream().wait_stream(self.side)
            return out
        key = self._key(x, y)
        if (self.graph is not None and key[5] == self.key[5] and key[:5] != self.key[:5]
                and x.shape[0] <= self.static["x"].shape[0]):
            return self._eager(x, y)  # a smaller batch (an epoch's last): not worth a capture
        if key != self.key:
            self._capture(x, y, key)
        else:
            self.static["x"].copy_(x)
            self.static["y"].copy_(y)
        self.graph.replay()
        return self.static["loss"].clone(), self.static["correct"].clone()
