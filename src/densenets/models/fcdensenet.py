"""FC-DenseNet, the "One Hundred Layers Tiramisu" (Jegou et al., CVPRW 2017): DenseNets for
semantic segmentation, in 1D, 2D and 3D.

A 3x3 convolution (48 maps), then a downsampling path of dense blocks each followed by a
transition down (BN-ReLU-1x1 conv-dropout-2x2 max pool), a bottleneck dense block, and an
upsampling path: a transition up (3x3 transposed convolution, stride 2) applied only to the maps
the previous block created, concatenated with the skip connection from the downsampling path at
that resolution, then a dense block. A final 1x1 convolution gives one map per class.

The dense layers are the library's (:class:`~densenets.models.layers.DenseLayer` without a
bottleneck: BN-ReLU-3x3 conv-dropout) in the library's :class:`DenseBlock`, so
``memory_efficient=True`` trains every block through the shared-buffer implementation, with the
plain model's outputs, gradients and running statistics. A block returns the concatenation of its
input and its new maps; the new maps alone are the slice ``full[:, in_channels:]`` (in the
memory-efficient mode a view of the block's buffer, nothing copied).

Choices the paper's text leaves open, taken from the authors' released code unless said:
docs/segmentation.md lists them.
"""

# No ``from __future__ import annotations``: torch.fx and TorchScript read the annotations.

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from ..constants import IMAGENET_MEAN, IMAGENET_STD
from .contract import Taps, is_eager
from .densenet import DenseBlock
from .layers import (
    canonical_norm,
    check_spatial_dims,
    conv_nd,
    conv_transpose_nd,
    max_pool_nd,
    norm_layer,
)
from .zoo import recorded_sides

# The paper's three configurations (Table 2 and Section 4): layers per dense block down, in the
# bottleneck and up, and the growth rate.
FCDENSENET: dict[str, dict[str, Any]] = {
    "fcdensenet56": dict(down_blocks=(4,) * 5, bottleneck_layers=4, up_blocks=(4,) * 5,
                         growth_rate=12),
    "fcdensenet67": dict(down_blocks=(5,) * 5, bottleneck_layers=5, up_blocks=(5,) * 5,
                         growth_rate=16),
    "fcdensenet103": dict(down_blocks=(4, 5, 7, 10, 12), bottleneck_layers=15,
                          up_blocks=(12, 10, 7, 5, 4), growth_rate=16),
}
# The parameter counts the paper reports, in millions (Table 1 and Section 4).
PAPER_PARAMS_M = {"fcdensenet56": 1.5, "fcdensenet67": 3.5, "fcdensenet103": 9.4}

# The transposed convolution of each rank; layers.py picks every other layer class by rank.


@dataclass
class FCDenseNetConfig:
    """Everything that defines an FC-DenseNet's architecture (what a checkpoint must carry)."""

    down_blocks: tuple[int, ...] = (4, 5, 7, 10, 12)
    bottleneck_layers: int = 15
    up_blocks: tuple[int, ...] = (12, 10, 7, 5, 4)  # one per down block, deepest first
    growth_rate: int = 16
    num_init_features: int = 48  # the first 3x3 convolution's maps
    drop_rate: float = 0.2  # after every convolution but the first and the transposed ones
    num_classes: int = 11  # CamVid's 11 classes (void is ignored, not predicted)
    in_channels: int = 3
    # 1: signals (N, C, L), 2: images (N, C, H, W), 3: volumes (N, C, D, H, W)
    spatial_dims: int = 2
    norm: Any = "batch"
    memory_efficient: bool = False

    def __post_init__(self) -> None:
        self.down_blocks = tuple(self.down_blocks)
        self.up_blocks = tuple(self.up_blocks)
        validate_config(self)
        self.norm = canonical_norm(self.norm)

    @property
    def num_pools(self) -> int:
        """Transitions down, each halving every side (rounding down)."""
        return len(self.down_blocks)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["down_blocks"], d["up_blocks"] = list(self.down_blocks), list(self.up_blocks)
        if not isinstance(self.norm, str):  # JSON has lists, not tuples
            d["norm"] = [self.norm[0], dict(self.norm[1])]
        return d


def _count(name: str, v: Any, least: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {v!r}")


def validate_config(c: FCDenseNetConfig) -> None:
    """Raise ValueError naming the bad field and what would be valid."""
    if not c.down_blocks:
        raise ValueError("down_blocks must list at least one dense block, e.g. (4, 5, 7, 10, 12)")
    if len(c.up_blocks) != len(c.down_blocks):
        raise ValueError(f"up_blocks needs one dense block per down block ({len(c.down_blocks)}),"
                         f" got {len(c.up_blocks)}: e.g. up_blocks="
                         f"{tuple(reversed(c.down_blocks))}")
    for n in (*c.down_blocks, *c.up_blocks):
        _count("every entry of down_blocks and up_blocks", n, 1)
    for name, least in (("bottleneck_layers", 1), ("growth_rate", 1), ("num_init_features", 1),
                        ("num_classes", 1), ("in_channels", 1)):
        _count(name, getattr(c, name), least)
    if not 0.0 <= float(c.drop_rate) < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1) (the paper uses 0.2), got {c.drop_rate}")
    check_spatial_dims(c.spatial_dims)
    canonical_norm(c.norm)


def fcdensenet_config(name: str, **overrides: Any) -> dict[str, Any]:
    """FCDenseNet keyword arguments for a zoo name plus overrides; a new ``down_blocks``
    without ``up_blocks`` is mirrored in the upsampling path."""
    key = name.strip().lower()
    if key not in FCDENSENET:
        raise ValueError(f"unknown FC-DenseNet {name!r}; choose one of {', '.join(FCDENSENET)}")
    known = {f.name for f in fields(FCDenseNetConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"FCDenseNet has no option {', '.join(unknown)}; its options are "
                         f"{', '.join(sorted(known))}")
    cfg = {**FCDENSENET[key], **overrides}
    if "down_blocks" in overrides and "up_blocks" not in overrides:  # mirror a new down path
        cfg["up_blocks"] = tuple(reversed(tuple(overrides["down_blocks"])))
    return cfg


def fcdensenet_pretrained_cfg(name: str | None, config: dict[str, Any],
                              preprocessing: dict[str, Any] | None = None) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` for an FC-DenseNet built with ``config``: the paper's 224-pixel
    crops (64 per side for volumes), no resize or centre crop (crop_pct 1), ImageNet's statistics
    for RGB and 0.5/0.5 per channel otherwise. ``preprocessing`` (loaded weights'
    ``{"crop", "mean", "std", "interpolation"}``) takes precedence."""
    c, dims = int(config.get("in_channels", 3)), int(config.get("spatial_dims", 2))
    sides = recorded_sides(preprocessing, dims) or (224 if dims < 3 else 64,) * dims
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if c == 3 else ((0.5,) * c, (0.5,) * c)
    cfg: dict[str, Any] = {
        "architecture": name, "tag": "untrained", "url": "", "hf_hub_id": None,
        "num_classes": int(config.get("num_classes", 11)), "input_size": (c, *sides),
        "crop_pct": 1.0, "interpolation": "bilinear", "mean": tuple(mean), "std": tuple(std),
        "first_conv": "conv0", "classifier": "classifier",
        "paper_ids": "arXiv:1611.09326",
        "paper_name": "The One Hundred Layers Tiramisu: Fully Convolutional DenseNets for "
                      "Semantic Segmentation"}
    for key in ("mean", "std", "interpolation"):
        if key in (preprocessing or {}):
            value = preprocessing[key]  # type: ignore[index]
            cfg[key] = tuple(value) if isinstance(value, list) else value
    return cfg


class TransitionDown(nn.Sequential):
    """BN-ReLU-1x1 conv (same width)-dropout-2x2 max pool (stride 2, rounding down)."""

    def __init__(self, channels: int, drop_rate: float, spatial_dims: int, norm: Any) -> None:
        super().__init__()
        self.norm = norm_layer(norm, channels, spatial_dims)
        self.relu = nn.ReLU(inplace=True)
        self.conv = conv_nd(spatial_dims)(channels, channels, kernel_size=1, bias=False)
        if drop_rate > 0:
            self.drop = nn.Dropout(drop_rate)
        self.pool = max_pool_nd(spatial_dims)(kernel_size=2, stride=2)


class TransitionUp(nn.Module):
    """3x3 transposed convolution with stride 2 (no padding: 2n + 1 outputs from n), cropped to
    the skip connection's size and concatenated before it, as the authors' code does. The crop
    keeps the first 2n or 2n + 1 positions, so every input side the pools accept comes back
    at its own size."""

    def __init__(self, channels: int, spatial_dims: int) -> None:
        super().__init__()
        self.conv = conv_transpose_nd(spatial_dims)(channels, channels, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.conv(x)
        for axis in range(2, skip.dim()):
            up = up.narrow(axis, 0, skip.shape[axis])
        return torch.cat([up, skip], 1)


class FCDenseNet(nn.Module):
    """Fully convolutional DenseNet for semantic segmentation (Jegou et al., CVPRW 2017).

    Args:
        down_blocks: layers per dense block of the downsampling path, each followed by a
            transition down (so ``len(down_blocks)`` max pools).
        bottleneck_layers: layers of the dense block between the two paths.
        up_blocks: layers per dense block of the upsampling path, deepest first (default: the
            down path's in reverse).
        growth_rate: k, the maps each dense layer adds (12 or 16 in the paper).
        num_init_features: maps of the first 3x3 convolution (48).
        drop_rate: dropout after each dense layer's and transition down's convolution (0.2).
        num_classes: output maps, one score per class and position.
        in_channels: channels of the input.
        spatial_dims: 1 (signals), 2 (images) or 3 (volumes).
        norm: "batch" (the paper's), "instance" or "group", or (name, options) as MONAI spells it.
        memory_efficient: dense blocks through the shared buffer (memory linear in depth).

    ``forward(x)`` maps (N, in_channels, *sides) to (N, num_classes, *sides) scores (logits)
    for every side of at least ``2 ** len(down_blocks)``.
    """

    def __init__(
        self,
        down_blocks: tuple[int, ...] = (4, 5, 7, 10, 12),
        bottleneck_layers: int = 15,
        up_blocks: tuple[int, ...] | None = None,
        growth_rate: int = 16,
        num_init_features: int = 48,
        drop_rate: float = 0.2,
        num_classes: int = 11,
        in_channels: int = 3,
        spatial_dims: int = 2,
        norm: Any = "batch",
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        cfg = FCDenseNetConfig(
            down_blocks=tuple(down_blocks), bottleneck_layers=bottleneck_layers,
            up_blocks=tuple(reversed(tuple(down_blocks))) if up_blocks is None else
            tuple(up_blocks), growth_rate=growth_rate, num_init_features=num_init_features,
            drop_rate=drop_rate, num_classes=num_classes, in_channels=in_channels,
            spatial_dims=spatial_dims, norm=norm, memory_efficient=memory_efficient)
        self.config = cfg
        dims, k = cfg.spatial_dims, cfg.growth_rate

        def block(layers: int, channels: int) -> DenseBlock:
            return DenseBlock(layers, channels, k, bottleneck=False, drop_rate=cfg.drop_rate,
                              memory_efficient=cfg.memory_efficient, spatial_dims=dims,
                              norm=cfg.norm)

        self.conv0 = conv_nd(dims)(cfg.in_channels, cfg.num_init_features, 3, padding=1,
                                   bias=False)
        channels, skips = cfg.num_init_features, []
        for i, layers in enumerate(cfg.down_blocks, 1):
            self.add_module(f"denseblock_down{i}", block(layers, channels))
            channels += layers * k
            skips.append(channels)
            self.add_module(f"transition_down{i}", TransitionDown(channels, cfg.drop_rate, dims,
                                                                  cfg.norm))
        self.bottleneck = block(cfg.bottleneck_layers, channels)
        new = cfg.bottleneck_layers * k  # only the bottleneck's new maps go up
        for i, (layers, skip) in enumerate(zip(cfg.up_blocks, reversed(skips), strict=True), 1):
            self.add_module(f"transition_up{i}", TransitionUp(new, dims))
            self.add_module(f"denseblock_up{i}", block(layers, new + skip))
            channels, new = new + skip + layers * k, layers * k
        # the last block's input and new maps together (Table 2: 256 maps for FC-DenseNet103)
        self.classifier = conv_nd(dims)(channels, cfg.num_classes, kernel_size=1)
        self.num_features = channels
        self.reset_parameters()
        self.pretrained_cfg = fcdensenet_pretrained_cfg(None, cfg.to_dict())

    def reset_parameters(self) -> None:
        """He's uniform initialisation (fan-in, ReLU gain), as the authors' code draws every
        convolution; biases 0, norm scale 1 and shift 0."""
        for m in self.modules():
            if isinstance(m, (nn.modules.conv._ConvNd)):
                nn.init.kaiming_uniform_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm)) \
                    and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------ the pieces, by path

    def down_path(self) -> list[tuple[DenseBlock, TransitionDown]]:
        n = self.config.num_pools
        return [(self.get_submodule(f"denseblock_down{i}"),
                 self.get_submodule(f"transition_down{i}")) for i in range(1, n + 1)]

    def up_path(self) -> list[tuple[TransitionUp, DenseBlock]]:
        n = self.config.num_pools
        return [(self.get_submodule(f"transition_up{i}"),
                 self.get_submodule(f"denseblock_up{i}")) for i in range(1, n + 1)]

    @property
    def num_classes(self) -> int:
        return int(self.config.num_classes)

    @property
    def min_input_size(self) -> int:
        """The smallest side: every transition down halves it, and the bottleneck needs one."""
        return 2 ** self.config.num_pools

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError for an input this network cannot take, saying what would work."""
        m = self.min_input_size
        if x.dim() == self.config.spatial_dims + 2 and min(x.shape[2:]) < m:
            sides = "x".join(str(int(s)) for s in x.shape[2:])
            valid = "x".join(str(max(int(s), m)) for s in x.shape[2:])
            raise ValueError(f"input {sides} is too small for this FCDenseNet: its "
                             f"{self.config.num_pools} max pools need every side >= {m} "
                             f"(any size from {m} up works); nearest valid size: {valid}")
        Taps.check_input(self, x)  # rank, dtype and channels, as every family checks them

    def features_only_info(self) -> list[dict]:
        """No backbone taps: an FC-DenseNet is a whole segmentation network. (A classification
        DenseNet is the encoder: ``create_model("densenet121", features_only=True)``.)"""
        raise ValueError("features_only: an FCDenseNet is a whole segmentation network with no "
                         "backbone taps; use a classification DenseNet as the encoder, e.g. "
                         "create_model('densenet121', features_only=True) (docs/segmentation.md)")

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh final 1x1 convolution for ``num_classes`` classes (fine-tuning)."""
        _count("num_classes", num_classes, 1)
        old = self.classifier
        self.classifier = conv_nd(self.config.spatial_dims)(
            old.in_channels, num_classes, kernel_size=1, device=old.weight.device,
            dtype=old.weight.dtype)
        nn.init.kaiming_uniform_(self.classifier.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.classifier.bias)
        self.classifier.train(self.training)
        self.config.num_classes = num_classes
        self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": num_classes}

    def set_memory_efficient(self, enabled: bool = True) -> "FCDenseNet":
        """Switch every dense block between the plain and the memory-efficient forward."""
        self.config.memory_efficient = enabled
        for m in self.modules():
            if isinstance(m, DenseBlock):
                m.memory_efficient = enabled
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's name for trading compute for activation memory: here the memory-efficient
        dense blocks (``set_memory_efficient``)."""
        self.set_memory_efficient(enable)

    @property
    def grad_checkpointing(self) -> bool:
        return bool(self.config.memory_efficient)

    @torch.jit.unused
    def _efficient_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Memory-efficient training: channels-last throughout, the layout of the blocks'
        buffers, so a block's output is its buffer (no copy) and backward reads the gradients
        in place; the transitions down recomputed in backward. Dropout draws as the plain model
        does on ``x``'s layout, and the scores come back in that layout."""
        from ..efficient.layout import (
            MEMORY_FORMATS,
            is_channels_last,
            memory_format,
            plain_layout,
        )

        rank = x.dim() - 2
        with plain_layout(x):
            y = self._forward(x.contiguous(memory_format=MEMORY_FORMATS[rank]), True)
        return y.contiguous(memory_format=memory_format(rank, is_channels_last(x)))

    @torch.jit.unused
    def _recomputed_transition(self, down: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # it keeps only its input, which is the skip connection, kept anyway (see
        # densenets.efficient.stages)
        from ..efficient.stages import transition

        return transition(down, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scores (N, num_classes, *sides) for an input (N, in_channels, *sides)."""
        # is_scripting() must be a condition of its own for scripting to skip the block
        if not torch.jit.is_scripting():  # noqa: SIM102
            if is_eager(x):
                self.check_input(x)
                if self.config.memory_efficient and self.training and torch.is_grad_enabled():
                    return self._efficient_forward(x)
        return self._forward(x, False)

    def _forward(self, x: torch.Tensor, recompute: bool) -> torch.Tensor:
        x = self.conv0(x)
        skips = []
        for block, down in self.down_path():
            x = block(x)
            skips.append(x)
            x = self._recomputed_transition(down, x) if recompute else down(x)
        block: DenseBlock = self.bottleneck
        full = block(x)
        for (up, next_block), skip in zip(self.up_path(), reversed(skips), strict=True):
            # only the maps the previous block created go up: a view, nothing copied
            full = next_block(up(full[:, block.in_channels:], skip))
            block = next_block
        return self.classifier(full)
