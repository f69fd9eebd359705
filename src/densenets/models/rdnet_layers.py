"""RDNet's building blocks: LayerNorm over channels, effective SE, drop path, the feature mixer,
the mixing block's concatenating stack of mixers, and the head (pool, LayerNorm, classifier)."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an (N, C, H, W) map, at every pixel."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                         self.eps)
        return x.permute(0, 3, 1, 2)


class EffectiveSE(nn.Module):
    """Effective squeeze-excitation: one 1x1 convolution on the pooled map, hard-sigmoid gate."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.hardsigmoid(self.fc(x.mean((2, 3), keepdim=True)))


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's new features with probability ``p`` while training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class FeatureMixer(nn.Module):
    """One feature mixer: reads every earlier map of its mixing block, emits ``growth_rate``."""

    def __init__(self, in_channels: int, growth_rate: int, bottleneck_width_ratio: float = 4.0,
                 effective_se: bool = False, ls_init_value: float = 1e-6,
                 drop_path: float = 0.0, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.growth_rate = growth_rate
        self.in_channels = in_channels
        # The expansion width is rounded down to a multiple of 8, as in the released models.
        width = int(in_channels * bottleneck_width_ratio / 8) * 8
        ops: list[nn.Module] = [
            nn.Conv2d(in_channels, in_channels, 7, padding=3, groups=in_channels),
            LayerNorm2d(in_channels),
            nn.Conv2d(in_channels, width, 1),
            nn.GELU(),
            nn.Conv2d(width, growth_rate, 1),
        ]
        if effective_se:
            ops.append(EffectiveSE(growth_rate))
        # Nested twice so the keys read `layers.layers.N`, those of the released checkpoints.
        self.layers = nn.Sequential(OrderedDict(layers=nn.Sequential(*ops)))
        self.gamma = (nn.Parameter(torch.full((growth_rate,), float(ls_init_value)))
                      if ls_init_value > 0 else None)
        self.drop_path = DropPath(drop_path)
        self.drop_rate = drop_rate

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.layers(torch.cat(features, 1))
        if self.gamma is not None:
            x = x * self.gamma.reshape(1, -1, 1, 1)
        x = self.drop_path(x)
        return F.dropout(x, self.drop_rate, self.training) if self.drop_rate > 0 else x


class MixerStack(nn.Module):
    """The feature mixers of one mixing block, with dense connectivity by concatenation."""

    __jit_unused_properties__ = ["num_connections"]

    def __init__(self, mixers: list[FeatureMixer]) -> None:
        super().__init__()
        # What a dense block reports (for summaries and diagrams), in DenseNet's terms.
        self.num_layers = len(mixers)
        self.growth_rate = mixers[0].growth_rate
        self.in_channels = mixers[0].in_channels
        self.out_channels = self.in_channels + sum(m.growth_rate for m in mixers)
        for i, m in enumerate(mixers):
            self.add_module(f"dense_block{i}", m)

    @property
    def num_connections(self) -> int:
        """Direct connections: mixer l reads l earlier maps, so L(L+1)/2 in all."""
        return self.num_layers * (self.num_layers + 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for mixer in self.children():
            features.append(mixer(features))
        return torch.cat(features, 1)


class RDNetHead(nn.Module):
    """Global average pool, LayerNorm, dropout, linear classifier (pool before norm, as the
    released models are trained). ``num_classes=0`` leaves the classifier out; ``pool=''``
    normalises the unpooled map."""

    def __init__(self, in_features: int, num_classes: int, pool: str = "avg",
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        self.in_features = in_features
        self.global_pool: nn.Module = nn.Identity()
        self.flatten: nn.Module = nn.Identity()
        self._set_pool(pool)
        self.norm = LayerNorm2d(in_features)
        self.drop = nn.Dropout(drop_rate)
        self.fc: nn.Module = nn.Identity()
        self.reset(num_classes, pool)

    def _set_pool(self, pool: str) -> None:
        if pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '' (no pooling), got {pool!r}")
        self.global_pool = nn.AdaptiveAvgPool2d(1) if pool else nn.Identity()
        self.flatten = nn.Flatten(1) if pool else nn.Identity()

    def reset(self, num_classes: int, pool: str) -> None:
        """A fresh classifier (zero bias) with ``num_classes`` outputs (0: none) after ``pool``
        (the contract's ``reset_classifier`` has checked that the two fit together)."""
        self._set_pool(pool)
        ref = self.norm.weight
        if num_classes > 0:
            self.fc = nn.Linear(self.in_features, num_classes, device=ref.device, dtype=ref.dtype)
            nn.init.zeros_(self.fc.bias)
        else:
            self.fc = nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.flatten(self.norm(self.global_pool(x))))
        return x if pre_logits else self.fc(x)
