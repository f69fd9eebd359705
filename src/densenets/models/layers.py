"""The paper's building blocks: the composite function H_l and the transition layer.

Module and parameter names follow torchvision's layout (``norm1``/``conv1``/``norm2``/``conv2``,
``norm``/``conv``), so every published DenseNet checkpoint lines up tensor for tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class DenseLayer(nn.Module):
    """H_l: BN-ReLU-Conv3x3(k); with ``bottleneck``, BN-ReLU-Conv1x1(bn_size*k)-BN-ReLU-Conv3x3(k).

    The layer returns only its ``growth_rate`` new feature maps; the dense block concatenates.
    Dropout (the paper's no-augmentation setting) follows every convolution of the layer.
    Without a bottleneck the single 3x3 convolution is named ``conv1`` (after ``norm1``).
    """

    def __init__(
        self,
        in_channels: int,
        growth_rate: int,
        bottleneck: bool = True,
        bn_size: int = 4,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.growth_rate = growth_rate
        self.bottleneck = bottleneck
        self.drop_rate = float(drop_rate)
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        if bottleneck:
            inter = bn_size * growth_rate
            self.conv1 = nn.Conv2d(in_channels, inter, kernel_size=1, bias=False)
            self.norm2 = nn.BatchNorm2d(inter)
            self.relu2 = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(inter, growth_rate, kernel_size=3, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, growth_rate, kernel_size=3, padding=1, bias=False)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_rate > 0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map the concatenated block input ``x`` to ``growth_rate`` new feature maps."""
        out = self._drop(self.conv1(self.relu1(self.norm1(x))))
        if self.bottleneck:
            out = self._drop(self.conv2(self.relu2(self.norm2(out))))
        return out


def compressed_channels(in_channels: int, compression: float) -> int:
    """Channels a transition emits: floor(theta * m), never fewer than one."""
    return max(1, int(math.floor(compression * in_channels)))


class Transition(nn.Sequential):
    """Between two dense blocks: BN-ReLU-Conv1x1(floor(theta*m))-[Dropout]-AvgPool2x2/2."""

    def __init__(self, in_channels: int, out_channels: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        if drop_rate > 0:
            self.drop = nn.Dropout(drop_rate)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)
