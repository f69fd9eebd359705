"""What one optimiser update is made of: the optimiser, its parameter groups, the loss, the EMA.

The paper's SGD decays every parameter; current recipes use AdamW and exempt norm weights and
biases (every 1-D parameter, as in the published recipes). :class:`UpdateRules` gathers what the
loop applies around each update beyond the paper's plain step: label smoothing, mixup/cutmix,
gradient accumulation, clipping and an exponential moving average (EMA) of the weights. All of it
comes from torch: ``torch.optim.AdamW``, ``cross_entropy(label_smoothing=...)`` (which takes the
soft targets of mixup too), ``clip_grad_norm_`` and ``swa_utils.AveragedModel``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def param_groups(model: nn.Module, weight_decay: float,
                 decay_norm_bias: bool = True) -> list[dict[str, Any]]:
    """One group decayed by ``weight_decay``; with ``decay_norm_bias=False`` a second, undecayed
    group of the 1-D parameters (BatchNorm/LayerNorm weights, biases, RDNet's layer scales)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if decay_norm_bias:
        return [{"params": params, "weight_decay": weight_decay}]
    decay = [p for p in params if p.ndim > 1]
    exempt = [p for p in params if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": exempt, "weight_decay": 0.0}]


@dataclass(kw_only=True)
class OptimizerSettings:
    """The optimiser of every update: the paper's SGD (momentum, Nesterov, dampening, weight
    decay on every parameter) or AdamW (betas 0.9, 0.999; decoupled weight decay);
    ``decay_norm_bias=False`` exempts the 1-D parameters from weight decay."""

    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    dampening: float = 0.0
    weight_decay: float = 1e-4
    decay_norm_bias: bool = True

    def build(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        return build_optimizer(model, self.optimizer, lr=lr, weight_decay=self.weight_decay,
                               decay_norm_bias=self.decay_norm_bias, momentum=self.momentum,
                               nesterov=self.nesterov, dampening=self.dampening)


def build_optimizer(model: nn.Module, name: str = "sgd", *, lr: float, weight_decay: float,
                    decay_norm_bias: bool = True, momentum: float = 0.9, nesterov: bool = True,
                    dampening: float = 0.0) -> torch.optim.Optimizer:
    """SGD (the paper's: momentum, Nesterov, weight decay), AdamW (betas 0.9, 0.999) or
    RMSprop (alpha 0.9, eps 1e-6, weight decay added to the gradient: FC-DenseNet's)."""
    groups = param_groups(model, weight_decay, decay_norm_bias)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, dampening=dampening,
                               nesterov=nesterov)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "rmsprop":  # FC-DenseNet's: Lasagne's rmsprop defaults, rho 0.9, epsilon 1e-6
        return torch.optim.RMSprop(groups, lr=lr, alpha=0.9, eps=1e-6)
    raise ValueError(f"unknown optimizer {name!r}; use sgd, adamw or rmsprop")


def build_ema(model: nn.Module, decay: float) -> AveragedModel | None:
    """An EMA of ``model``'s parameters and BatchNorm statistics (None when ``decay`` is 0).

    It starts at the model's current weights, so after n updates it holds
    ``decay**n * w0 + sum_i (1 - decay) * decay**(n - i) * w_i``.
    """
    if not decay:
        return None
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    ema.update_parameters(model)  # the first update copies: the average starts at w0
    ema.requires_grad_(False)
    return ema


@dataclass(kw_only=True)
class UpdateRules:
    """What each optimiser update applies beyond forward, cross-entropy, backward and step.

    ``mix(x, y, epoch, batch, rank) -> (x, soft targets)`` mixes a batch (mixup/cutmix);
    ``accum_steps`` batches make one update (their gradients add up, each weighted so that the
    update is the mean over all their images); ``clip_grad`` caps the L2 norm of all gradients.
    ``objective``: a segmentation run's pixel-wise loss and metrics
    (:class:`~densenets.training.segmetrics.PixelObjective`); None for a classifier.
    """

    label_smoothing: float = 0.0
    accum_steps: int = 1
    clip_grad: float = 0.0
    ema_decay: float = 0.0
    mix: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    objective: Any = None

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy against class indices or (mixed) class probabilities (segmentation:
        per pixel, the objective's)."""
        if self.objective is not None:
            return self.objective.loss(logits, target)
        return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)

    def beyond_paper(self) -> list[str]:
        """The flags that depart from the paper's plain update (for refusals that name them)."""
        on = [("--label-smoothing", self.label_smoothing), ("--accum-steps", self.accum_steps > 1),
              ("--clip-grad", self.clip_grad), ("--ema-decay", self.ema_decay),
              ("--mixup/--cutmix", self.mix is not None)]
        return [flag for flag, value in on if value]

    def group(self, b: int, batches: int) -> tuple[int, int, bool]:
        """(update index in the epoch, batches in that update, whether batch b ends it)."""
        a = self.accum_steps
        u = b // a
        size = min(a, batches - u * a)
        return u, size, (b + 1) % a == 0 or b + 1 == batches

    def updates_per_epoch(self, batches: int) -> int:
        return -(-batches // self.accum_steps)


def check_graphable(rules: UpdateRules, optimizer: str, per_step_lr: bool) -> None:
    """CUDA graphs replay the paper's plain SGD step at a fixed rate; refuse anything else."""
    beyond = rules.beyond_paper() + (["--optimizer adamw"] if optimizer != "sgd" else []) + \
        (["--schedule cosine / --warmup-epochs"] if per_step_lr else [])
    if beyond:
        raise ValueError(f"--cuda-graphs replays the paper's plain SGD step; it does not take "
                         f"{', '.join(beyond)}: drop one or the other")


def no_sync(net: nn.Module, accumulating: bool):
    """DDP's ``no_sync`` while gradients only accumulate (the all-reduce waits for the last)."""
    if not accumulating:
        return nullcontext()
    ddp = getattr(net, "_orig_mod", net)  # under torch.compile the DDP module is inside
    return ddp.no_sync() if hasattr(ddp, "no_sync") else nullcontext()


def clip_gradients(model: nn.Module, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler, max_norm: float) -> None:
    """Clip the true (unscaled) gradients to ``max_norm`` before the step."""
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
