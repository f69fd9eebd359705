"""The paper's building blocks: the composite function H_l and the transition layer.

Module and parameter names follow torchvision's layout (``norm1``/``conv1``/``norm2``/``conv2``,
``norm``/``conv``), so every published DenseNet checkpoint lines up tensor for tensor. Every
block takes the number of spatial dimensions (1: signals, 2: images, 3: volumes) and the
normalisation; the names and the parameter shapes but the kernels' trailing axes do not change
with the rank.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SPATIAL_DIMS = (1, 2, 3)

# The layers of each rank, by what they do; the only place a rank picks a class.
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_TRANSPOSE = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_MAX_POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
_AVG_POOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
_ADAPTIVE_AVG = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
_ADAPTIVE_MAX = {1: nn.AdaptiveMaxPool1d, 2: nn.AdaptiveMaxPool2d, 3: nn.AdaptiveMaxPool3d}
_BATCH_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_INSTANCE_NORM = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


def check_spatial_dims(spatial_dims: Any) -> int:
    """``spatial_dims`` as an int in (1, 2, 3), or ValueError saying what it may be."""
    if isinstance(spatial_dims, bool) or spatial_dims not in SPATIAL_DIMS:
        raise ValueError(f"spatial_dims must be 1 (signals), 2 (images) or 3 (volumes), got "
                         f"{spatial_dims!r}")
    return int(spatial_dims)


def conv_nd(spatial_dims: int) -> type[nn.Module]:
    """nn.Conv1d, nn.Conv2d or nn.Conv3d."""
    return _CONV[spatial_dims]


def conv_transpose_nd(spatial_dims: int) -> type[nn.Module]:
    """nn.ConvTranspose1d, 2d or 3d (FC-DenseNet's transition up)."""
    return _CONV_TRANSPOSE[spatial_dims]


def max_pool_nd(spatial_dims: int) -> type[nn.Module]:
    return _MAX_POOL[spatial_dims]


def avg_pool_nd(spatial_dims: int) -> type[nn.Module]:
    return _AVG_POOL[spatial_dims]


def adaptive_avg_pool_nd(spatial_dims: int) -> type[nn.Module]:
    return _ADAPTIVE_AVG[spatial_dims]


def adaptive_max_pool_nd(spatial_dims: int) -> type[nn.Module]:
    return _ADAPTIVE_MAX[spatial_dims]


# ---------------------------------------------------------------- normalisation

NORMS = ("batch", "instance", "group")
# The options each normalisation takes, as its torch module names them.
_NORM_OPTIONS = {"batch": {"eps", "momentum", "affine", "track_running_stats"},
                 "instance": {"eps", "momentum", "affine", "track_running_stats"},
                 "group": {"num_groups", "eps", "affine"}}
DEFAULT_GROUPS = 8


def canonical_norm(norm: Any) -> str | tuple[str, dict[str, Any]]:
    """A normalisation in its one stored form: ``"batch"``, ``"instance"``, ``"group"``, or
    (name, options) when options are given. MONAI's spellings are taken as they mean the same:
    ``"BATCH"``, ``("instance", {"affine": True})``, ``("group", {"num_groups": 8})``; a JSON
    list [name, {options}] (a saved config) is read back. ValueError for anything else."""
    name, options = (norm, {}) if isinstance(norm, str) else _split_norm(norm)
    name = name.strip().lower()
    if name not in NORMS:
        raise ValueError(f"norm must be one of {NORMS} (or (name, options) as in MONAI), got "
                         f"{norm!r}")
    unknown = set(options) - _NORM_OPTIONS[name]
    if unknown:
        raise ValueError(f"norm {name!r} takes the options {sorted(_NORM_OPTIONS[name])}, not "
                         f"{sorted(unknown)}")
    return (name, dict(options)) if options else name


def _split_norm(norm: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(norm, (tuple, list)) and len(norm) == 2 and isinstance(norm[0], str) \
            and isinstance(norm[1], dict):
        return norm[0], norm[1]
    if isinstance(norm, (tuple, list)) and len(norm) == 1 and isinstance(norm[0], str):
        return norm[0], {}
    raise ValueError(f"norm must be a name {NORMS} or (name, options dict), got {norm!r}")


def norm_name(norm: Any) -> str:
    """"batch", "instance" or "group"."""
    norm = canonical_norm(norm)
    return norm if isinstance(norm, str) else norm[0]


def norm_layer(norm: Any, channels: int, spatial_dims: int = 2) -> nn.Module:
    """The normalisation of ``channels`` maps. ``"instance"`` is InstanceNormNd as torch and
    MONAI build it (no affine, no running statistics) unless options say otherwise; ``"group"``
    takes 8 groups unless ``num_groups`` says otherwise, and refuses a width they do not
    divide."""
    norm = canonical_norm(norm)
    name, options = (norm, {}) if isinstance(norm, str) else norm
    if name == "batch":
        return _BATCH_NORM[spatial_dims](channels, **options)
    if name == "instance":
        return _INSTANCE_NORM[spatial_dims](channels, **options)
    options = dict(options)
    groups = options.pop("num_groups", DEFAULT_GROUPS)
    if channels % groups:
        raise ValueError(f"group norm with {groups} groups cannot split a layer of {channels} "
                         f"channels; pick num_groups dividing every width, e.g. "
                         f"norm=('group', {{'num_groups': {math.gcd(channels, groups)}}})")
    return nn.GroupNorm(groups, channels, **options)


ACTIVATIONS = ("relu",)


def check_act(act: Any) -> None:
    """The paper's (and MONAI's default) activation is the only one: ``"relu"`` or MONAI's
    ``("relu", {"inplace": True})``; anything else is refused rather than silently replaced."""
    name = act if isinstance(act, str) else (act[0] if isinstance(act, (tuple, list)) and act
                                             else None)
    options = act[1] if isinstance(act, (tuple, list)) and len(act) > 1 else {}
    if not isinstance(name, str) or name.lower() not in ACTIVATIONS \
            or not isinstance(options, dict) or set(options) - {"inplace"}:
        raise ValueError(f"act must be 'relu' (DenseNet's BN-ReLU-Conv), got {act!r}")


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
        spatial_dims: int = 2,
        norm: Any = "batch",
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.growth_rate = growth_rate
        self.bottleneck = bottleneck
        self.drop_rate = float(drop_rate)
        conv = conv_nd(spatial_dims)
        self.norm1 = norm_layer(norm, in_channels, spatial_dims)
        self.relu1 = nn.ReLU(inplace=True)
        if bottleneck:
            inter = bn_size * growth_rate
            self.conv1 = conv(in_channels, inter, kernel_size=1, bias=False)
            self.norm2 = norm_layer(norm, inter, spatial_dims)
            self.relu2 = nn.ReLU(inplace=True)
            self.conv2 = conv(inter, growth_rate, kernel_size=3, padding=1, bias=False)
        else:
            self.conv1 = conv(in_channels, growth_rate, kernel_size=3, padding=1, bias=False)

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

    def __init__(self, in_channels: int, out_channels: int, drop_rate: float = 0.0,
                 spatial_dims: int = 2, norm: Any = "batch") -> None:
        super().__init__()
        self.norm = norm_layer(norm, in_channels, spatial_dims)
        self.relu = nn.ReLU(inplace=True)
        self.conv = conv_nd(spatial_dims)(in_channels, out_channels, kernel_size=1, bias=False)
        if drop_rate > 0:
            self.drop = nn.Dropout(drop_rate)
        self.pool = avg_pool_nd(spatial_dims)(kernel_size=2, stride=2)


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


def deep_stem(in_channels: int, width: int, out_channels: int, blur: bool,
              spatial_dims: int = 2, norm: Any = "batch") -> list[tuple[str, nn.Module]]:
    """The deep stem: three 3x3 convolutions (the first with stride 2), each BN-ReLU, then pool.

    Names follow timm's deep-stem DenseNets (``conv0..2``, ``norm0..2``, ``pool0``), so their
    checkpoints line up; the ReLUs hold no weights and add no keys.
    """
    chans = [in_channels, width, width, out_channels]
    mods: list[tuple[str, nn.Module]] = []
    for i in range(3):
        mods += [(f"conv{i}", conv_nd(spatial_dims)(chans[i], chans[i + 1], 3, 2 if i == 0 else 1,
                                                    1, bias=False)),
                 (f"norm{i}", norm_layer(norm, chans[i + 1], spatial_dims)),
                 (f"relu{i}", nn.ReLU(inplace=True))]
    return mods + [("pool0", stem_pool(out_channels, blur, spatial_dims))]


def stem_pool(channels: int, blur: bool, spatial_dims: int = 2) -> nn.Module:
    """The stem's 3x3/2 max pool, or with ``blur`` (2D) a dense 3x3 max then a stride-2 blur."""
    pool = max_pool_nd(spatial_dims)
    if not blur:
        return pool(kernel_size=3, stride=2, padding=1)
    return nn.Sequential(pool(kernel_size=3, stride=1, padding=1), BlurPool2d(channels))


class AvgMaxPool2d(nn.Module):
    """Global average and max pooling, averaged (``cat=False``) or concatenated (``cat=True``),
    over every spatial axis (the name is timm's; it pools 1D and 3D maps too)."""

    def __init__(self, cat: bool = False, spatial_dims: int = 2) -> None:
        super().__init__()
        self.cat = cat
        self.avg, self.max = adaptive_avg_pool_nd(spatial_dims)(1), \
            adaptive_max_pool_nd(spatial_dims)(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg, mx = self.avg(x), self.max(x)
        return torch.cat((avg, mx), 1) if self.cat else 0.5 * (avg + mx)


GLOBAL_POOLS = ("avg", "max", "avgmax", "catavgmax", "")


def global_pool(pool_type: str, spatial_dims: int = 2) -> nn.Module:
    """The head's global pooling by timm's name; ``""`` keeps the map (no pooling)."""
    if pool_type not in GLOBAL_POOLS:
        raise ValueError(f"global_pool must be one of {GLOBAL_POOLS} ('' = no pooling), got "
                         f"{pool_type!r}")
    if pool_type == "avg":
        return adaptive_avg_pool_nd(spatial_dims)(1)
    if pool_type == "max":
        return adaptive_max_pool_nd(spatial_dims)(1)
    if pool_type:
        return AvgMaxPool2d(cat=pool_type == "catavgmax", spatial_dims=spatial_dims)
    return nn.Identity()
