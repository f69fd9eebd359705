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

    # A constant lets TorchScript drop the branch that uses conv2 when there is none.
    __constants__ = ["bottleneck"]

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


# ---------------------------------------------------------------- stems and heads beyond the paper

class BlurPool2d(nn.Module):
    """Anti-aliased downsampling (Zhang, "Making Convolutional Networks Shift-Invariant Again").

    A fixed 3x3 binomial low-pass filter ([1, 2, 1] outer [1, 2, 1] / 16) applied per channel
    with stride 2 after reflection padding of one pixel. Sampling after the blur keeps a
    one-pixel shift of the input from reshuffling the downsampled map. The filter is a
    non-persistent buffer: it is no weight, so state dicts stay those of the unblurred stem.
    """

    def __init__(self, channels: int, stride: int = 2) -> None:
        super().__init__()
        self.channels = channels
        self.stride = stride
        self.register_buffer("filt", torch.empty(channels, 1, 3, 3), persistent=False)
        self.init_non_persistent_buffers()

    def init_non_persistent_buffers(self) -> None:
        """(Re)compute the filter, e.g. after ``to_empty`` of a model built on the meta device
        (timm's name for this hook, so timm's meta-device helpers find it)."""
        taps = torch.tensor([1.0, 2.0, 1.0], device=self.filt.device)
        kernel = (taps[:, None] * taps[None, :]) / 16.0
        with torch.no_grad():
            self.filt.copy_(kernel.expand_as(self.filt))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, [1, 1, 1, 1], mode="reflect")
        return F.conv2d(x, self.filt.to(x.dtype), stride=self.stride, groups=self.channels)


def deep_stem(in_channels: int, width: int, out_channels: int, blur: bool
              ) -> list[tuple[str, nn.Module]]:
    """The deep stem: three 3x3 convolutions (the first with stride 2), each BN-ReLU, then pool.

    Names follow timm's deep-stem DenseNets (``conv0..2``, ``norm0..2``, ``pool0``), so their
    checkpoints line up; the ReLUs hold no weights and add no keys.
    """
    chans = [in_channels, width, width, out_channels]
    mods: list[tuple[str, nn.Module]] = []
    for i in range(3):
        mods += [(f"conv{i}", nn.Conv2d(chans[i], chans[i + 1], 3, 2 if i == 0 else 1, 1,
                                        bias=False)),
                 (f"norm{i}", nn.BatchNorm2d(chans[i + 1])), (f"relu{i}", nn.ReLU(inplace=True))]
    return mods + [("pool0", stem_pool(out_channels, blur))]


def stem_pool(channels: int, blur: bool) -> nn.Module:
    """The stem's 3x3/2 max pool, or with ``blur`` a dense 3x3 max then a stride-2 blur."""
    if not blur:
        return nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    return nn.Sequential(nn.MaxPool2d(kernel_size=3, stride=1, padding=1), BlurPool2d(channels))


class AvgMaxPool2d(nn.Module):
    """Global average and max pooling, averaged (``cat=False``) or concatenated (``cat=True``)."""

    def __init__(self, cat: bool = False) -> None:
        super().__init__()
        self.cat = cat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg, mx = F.adaptive_avg_pool2d(x, 1), F.adaptive_max_pool2d(x, 1)
        return torch.cat((avg, mx), 1) if self.cat else 0.5 * (avg + mx)


GLOBAL_POOLS = ("avg", "max", "avgmax", "catavgmax", "")


def global_pool(pool_type: str) -> nn.Module:
    """The head's global pooling by timm's name; ``""`` keeps the map (no pooling)."""
    if pool_type not in GLOBAL_POOLS:
        raise ValueError(f"global_pool must be one of {GLOBAL_POOLS} ('' = no pooling), got "
                         f"{pool_type!r}")
    if pool_type == "avg":
        return nn.AdaptiveAvgPool2d(1)
    if pool_type == "max":
        return nn.AdaptiveMaxPool2d(1)
    if pool_type:
        return AvgMaxPool2d(cat=pool_type == "catavgmax")
    return nn.Identity()
