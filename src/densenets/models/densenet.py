"""DenseNet: stems, dense blocks, transitions, the classifier, and He initialisation."""

# No ``from __future__ import annotations``: torch.fx writes the root forward's annotations
# into the code it generates, and a string annotation there becomes a name (``_torch_Tensor_``)
# that TorchScript cannot resolve when the traced module is scripted.

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .contract import MATCH_PREV_GROUP, TimmContract, check_config, is_eager
from .layers import (
    GLOBAL_POOLS,
    DenseLayer,
    Transition,
    canonical_norm,
    check_act,
    check_spatial_dims,
    compressed_channels,
    conv_nd,
    deep_stem,
    norm_layer,
    stem_pool,
)
from .layers import global_pool as make_global_pool
from .zoo import final_map_side, pretrained_cfg

STEMS = ("imagenet", "cifar")


@dataclass
class DenseNetConfig:
    """Everything that defines a DenseNet's architecture (what a checkpoint must carry)."""

    growth_rate: int = 32
    block_config: tuple[int, ...] = (6, 12, 24, 16)
    num_init_features: int = 64
    bottleneck: bool = True
    bn_size: int = 4
    compression: float = 0.5
    drop_rate: float = 0.0
    num_classes: int = 1000
    in_channels: int = 3
    stem: str = "imagenet"
    memory_efficient: bool = False
    # beyond the paper, as timm names them: the deep stem and blur pool of densenet264d and
    # densenetblur121d, dropout before the classifier (timm's drop_rate), the head's pooling
    deep_stem: bool = False
    blur_pool: bool = False
    head_drop_rate: float = 0.0
    global_pool: str = "avg"
    # 1: signals (N, C, L), 2: images (N, C, H, W), 3: volumes (N, C, D, H, W)
    spatial_dims: int = 2
    # "batch" (the paper's), "instance" or "group", or (name, options) as MONAI spells them
    norm: Any = "batch"

    def __post_init__(self) -> None:
        self.block_config = tuple(self.block_config)
        validate_config(self)
        self.norm = canonical_norm(self.norm)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["block_config"] = list(self.block_config)
        if not isinstance(self.norm, str):  # JSON has lists, not tuples
            d["norm"] = [self.norm[0], dict(self.norm[1])]
        return d


def validate_config(c: DenseNetConfig) -> None:
    """Raise ValueError naming the bad field and what would be valid."""
    if isinstance(c.growth_rate, int) and not isinstance(c.growth_rate, bool) \
            and c.growth_rate < 1:
        raise ValueError(f"growth_rate must be >= 1 (the paper uses 12-48), got {c.growth_rate}")
    if not c.block_config:
        raise ValueError("block_config must list at least one dense block, e.g. (6, 12, 24, 16)")
    for n in c.block_config:
        if isinstance(n, bool) or not isinstance(n, int):
            raise ValueError(f"block_config entries must be an integer, got {n!r}")
        if n < 1:
            raise ValueError(f"every dense block needs at least one layer; got "
                             f"block_config={c.block_config}")
    check_config(c, counts=("growth_rate", "num_init_features", "bn_size", "in_channels"),
                 rates=("drop_rate", "head_drop_rate"), pools=GLOBAL_POOLS)
    if c.stem not in STEMS:
        raise ValueError(f"stem must be one of {STEMS}, got {c.stem!r}")
    if (c.deep_stem or c.blur_pool) and c.stem != "imagenet":
        raise ValueError("deep_stem and blur_pool change the ImageNet stem; the cifar stem is one "
                         "3x3 convolution without pooling: use stem='imagenet' with them")
    check_spatial_dims(c.spatial_dims)
    if c.blur_pool and c.spatial_dims != 2:
        raise ValueError(f"blur_pool is a 2D filter; spatial_dims={c.spatial_dims} takes the "
                         "plain max pool: drop blur_pool")
    canonical_norm(c.norm)


def prepare_efficient() -> None:
    """Load the memory-efficient blocks' code now, with the model, rather than in the first
    training step (whose memory it would otherwise seem to be)."""
    from ..efficient import dispatch  # noqa: F401


class DenseBlock(nn.ModuleDict):
    """L dense layers; layer l reads the concatenation of the block input and layers 1..l-1.

    Returns the concatenation of the input and all L new maps: in + L*k channels.
    ``memory_efficient`` switches training-mode forward to the shared-buffer implementation
    in :mod:`densenets.efficient.dispatch`; parameters and outputs are the same in both modes.
    A ModuleDict of its layers (``denselayer1``...) so that TorchScript can iterate them.
    """

    __jit_unused_properties__ = ["layers", "num_connections"]

    def __init__(
        self,
        num_layers: int,
        in_channels: int,
        growth_rate: int,
        bottleneck: bool = True,
        bn_size: int = 4,
        drop_rate: float = 0.0,
        memory_efficient: bool = False,
        spatial_dims: int = 2,
        norm: Any = "batch",
    ) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.in_channels = in_channels
        self.growth_rate = growth_rate
        self.out_channels = in_channels + num_layers * growth_rate
        self.memory_efficient = memory_efficient
        if memory_efficient:
            prepare_efficient()
        for i in range(num_layers):
            layer = DenseLayer(in_channels + i * growth_rate, growth_rate, bottleneck, bn_size,
                               drop_rate, spatial_dims, norm)
            self.add_module(f"denselayer{i + 1}", layer)

    @property
    def layers(self) -> list[DenseLayer]:
        return [m for m in self.children() if isinstance(m, DenseLayer)]

    @property
    def num_connections(self) -> int:
        """Direct connections in the block: layer l has l inputs, so L(L+1)/2 in all."""
        return self.num_layers * (self.num_layers + 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # scripted models run the plain path (the efficient one is Python and custom kernels)
        if not torch.jit.is_scripting() and self.memory_efficient and self.training \
                and torch.is_grad_enabled():
            return self._efficient_forward(x)
        return self.plain_forward(x)

    @torch.jit.unused
    def _efficient_forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..efficient.dispatch import efficient_block_forward

        return efficient_block_forward(self, x)

    def plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The direct forward: concatenate every earlier map before each layer."""
        features = [x]
        for layer in self.values():
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class DenseNet(TimmContract, nn.Module):
    """Densely Connected Convolutional Network (Huang et al., CVPR 2017).

    Args:
        growth_rate: k, the feature maps each dense layer adds.
        block_config: layers per dense block.
        num_init_features: channels of the stem convolution (2k for -BC nets, 16 for plain CIFAR).
        bottleneck: use the 1x1 bottleneck of width ``bn_size * k`` (the paper's -B).
        bn_size: bottleneck width multiplier (4 in the paper).
        compression: theta in (0, 1]; a transition after m channels emits floor(theta * m).
        drop_rate: dropout after every convolution except the stem (0.2 without augmentation).
        num_classes: size of the classifier.
        in_channels: channels of the input image (1 for grayscale, more for multispectral).
        stem: "imagenet" (7x7/2 conv, BN, ReLU, 3x3/2 max pool) or "cifar" (one 3x3 conv).
        memory_efficient: shared-buffer dense blocks whose memory is linear in depth (batch and
            instance norm; group norm runs the plain blocks).
        deep_stem: three 3x3 convolutions (widths k, k, num_init_features) replace the 7x7.
        blur_pool: the stem's max pool samples through a blur (anti-aliased, stride 2).
        head_drop_rate: dropout on the pooled features before the classifier.
        global_pool: "avg", "max", "avgmax", "catavgmax", or "" (no pooling, num_classes=0).
        spatial_dims: 1 (signals), 2 (images) or 3 (volumes): every convolution, pool and norm
            follows; the names of modules and parameters do not change.
        norm: "batch" (the paper's), "instance" or "group" (8 groups), or MONAI's spelling
            (name, options), e.g. ("instance", {"affine": True}) or ("group", {"num_groups": 4}).
        act: "relu" only (accepted for MONAI's signature; DenseNet's layers are BN-ReLU-Conv).

    Besides the paper's model it carries timm's model contract (see
    :mod:`densenets.models.contract`): ``num_classes``, ``pretrained_cfg``,
    ``forward_intermediates``, ``reset_classifier(0)``, ``group_matcher`` and the rest.
    """

    # Python-side helpers that TorchScript must not try to compile
    __jit_unused_properties__ = ["stem_reduction", "min_input_size", "num_classes",
                                 "default_cfg", "grad_checkpointing"]

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bottleneck: bool = True,
        bn_size: int = 4,
        compression: float = 0.5,
        drop_rate: float = 0.0,
        num_classes: int = 1000,
        in_channels: int = 3,
        stem: str = "imagenet",
        memory_efficient: bool = False,
        deep_stem: bool = False,
        blur_pool: bool = False,
        head_drop_rate: float = 0.0,
        global_pool: str = "avg",
        spatial_dims: int = 2,
        norm: Any = "batch",
        act: Any = "relu",
    ) -> None:
        super().__init__()
        check_act(act)
        cfg = DenseNetConfig(
            growth_rate=growth_rate, block_config=tuple(block_config),
            num_init_features=num_init_features, bottleneck=bottleneck, bn_size=bn_size,
            compression=compression, drop_rate=drop_rate, num_classes=num_classes,
            in_channels=in_channels, stem=stem, memory_efficient=memory_efficient,
            deep_stem=deep_stem, blur_pool=blur_pool, head_drop_rate=head_drop_rate,
            global_pool=global_pool, spatial_dims=spatial_dims, norm=norm)
        self.config = cfg
        self.features = nn.Sequential()
        self._add_stem(cfg)
        channels = cfg.num_init_features
        # timm's stem tap: after the stem's last BN-ReLU, before its pooling
        stem_tap = "features.conv0" if cfg.stem == "cifar" else \
            f"features.relu{2 if cfg.deep_stem else 0}"
        self.feature_info = [  # (unannotated: TorchScript would read an annotation here)
            {"module": stem_tap, "num_chs": channels, "reduction": 1 if cfg.stem == "cifar" else 2}
        ]
        reduction = self.stem_reduction
        for i, num_layers in enumerate(cfg.block_config):
            block = DenseBlock(num_layers, channels, cfg.growth_rate, cfg.bottleneck, cfg.bn_size,
                               cfg.drop_rate, cfg.memory_efficient, cfg.spatial_dims, cfg.norm)
            self.features.add_module(f"denseblock{i + 1}", block)
            channels = block.out_channels
            self.feature_info.append(
                {"module": f"features.denseblock{i + 1}", "num_chs": channels,
                 "reduction": reduction}
            )
            if i != len(cfg.block_config) - 1:
                out = compressed_channels(channels, cfg.compression)
                self.features.add_module(f"transition{i + 1}", Transition(
                    channels, out, cfg.drop_rate, cfg.spatial_dims, cfg.norm))
                channels = out
                reduction *= 2
        self.features.add_module("norm5", norm_layer(cfg.norm, channels, cfg.spatial_dims))
        self.features.add_module("relu5", nn.ReLU(inplace=True))
        self.feature_info[-1]["module"] = "features.relu5"  # the last map is after BN-ReLU
        self.num_features = channels
        # timm's drop_rate; no module call at all when off (nothing to draw, nothing to trace)
        self.head_drop = nn.Dropout(cfg.head_drop_rate) if cfg.head_drop_rate else nn.Identity()
        self._build_head(cfg.num_classes, cfg.global_pool)
        self.reset_parameters()
        # what timm.data.resolve_data_config reads; create_model puts the zoo entry's here
        self.pretrained_cfg = pretrained_cfg(None, cfg.to_dict())

    @property
    def stem_reduction(self) -> int:
        return 4 if self.config.stem == "imagenet" else 1

    def _add_stem(self, cfg: DenseNetConfig) -> None:
        f = self.features
        dims, conv = cfg.spatial_dims, conv_nd(cfg.spatial_dims)
        if cfg.deep_stem:
            for name, module in deep_stem(cfg.in_channels, cfg.growth_rate, cfg.num_init_features,
                                          cfg.blur_pool, dims, cfg.norm):
                f.add_module(name, module)
        elif cfg.stem == "imagenet":
            f.add_module("conv0", conv(cfg.in_channels, cfg.num_init_features, 7, 2, 3,
                                       bias=False))
            f.add_module("norm0", norm_layer(cfg.norm, cfg.num_init_features, dims))
            f.add_module("relu0", nn.ReLU(inplace=True))
            f.add_module("pool0", stem_pool(cfg.num_init_features, cfg.blur_pool, dims))
        else:
            f.add_module("conv0", conv(cfg.in_channels, cfg.num_init_features, 3, 1, 1,
                                       bias=False))

    def reset_parameters(self) -> None:
        """He initialisation with fan-out, as the authors' released training code draws it.

        N(0, 2 / (kh * kw * out_channels)) for every convolution; BN scale 1, shift 0;
        classifier bias 0. Fan-out keeps backward signal variance constant through the
        concatenations, whose fan-in grows with depth inside a block.
        """
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm)) \
                    and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @property
    def min_input_size(self) -> int:
        """The smallest square input whose last dense block still sees a 1x1 map."""
        size = 1
        while final_map_side(size, self.config.stem, len(self.config.block_config)) < 1:
            size += 1
        return size

    # ------------------------------------------------------------ what the contract asks

    def _trunk(self) -> list[tuple[str, nn.Module]]:
        return [(f"features.{n}", m) for n, m in self.features.named_children()]

    def features_only_info(self) -> list[dict]:
        """The backbone taps: the stem map after its max pool (reduction 4 for ImageNet stems),
        as this library has always given it, where ``feature_info`` taps it before the pool
        (reduction 2), as timm does."""
        info = [dict(f) for f in self.feature_info]
        if self.config.stem == "imagenet":
            info[0].update(module="features.pool0", reduction=4)
        return info

    def _build_head(self, num_classes: int, pool_type: str) -> None:
        pool = make_global_pool(pool_type, self.config.spatial_dims)
        ref = next(iter(self.features.parameters()), None)
        kw = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        hidden = self.num_features * (2 if pool_type == "catavgmax" else 1)
        if num_classes:
            classifier: nn.Module = nn.Linear(hidden, num_classes, **kw)
            nn.init.zeros_(classifier.bias)
        else:
            classifier = nn.Identity()
        self.global_pool, self.classifier = pool, classifier
        self.head_hidden_size = hidden
        # forward_head flattens only what was pooled (TorchScript reads this as a bool)
        self.pooled = pool_type != ""
        pool.train(self.training)
        classifier.train(self.training)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The final linear layer (an ``nn.Identity`` once removed)."""
        return self.classifier

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade compute for activation memory in training: here the memory-efficient dense
        blocks (``set_memory_efficient``), which recompute each block's BN-ReLU in backward
        and keep memory linear in depth, with the plain model's outputs and gradients."""
        self.set_memory_efficient(enable)

    @property
    def grad_checkpointing(self) -> bool:
        return bool(self.config.memory_efficient)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for layer-wise learning-rate decay, in timm's format.

        The stem is one group; then each dense block (``coarse``) or each dense layer, with
        each transition joining the layer before it. The final norm and the classifier match
        nothing and so form the last group.
        """
        stem = r"^features\.conv[012]|features\.norm[012]|features\.pool[012]"
        if coarse:
            return {"stem": stem, "blocks": r"^features\.(?:denseblock|transition)(\d+)"}
        return {"stem": stem, "blocks": [(r"^features\.denseblock(\d+)\.denselayer(\d+)", None),
                                         (r"^features\.transition(\d+)", MATCH_PREV_GROUP)]}

    def set_memory_efficient(self, enabled: bool = True) -> "DenseNet":
        """Switch every dense block between the plain and the memory-efficient forward."""
        if enabled:
            prepare_efficient()
        self.config.memory_efficient = enabled
        for m in self.modules():
            if isinstance(m, DenseBlock):
                m.memory_efficient = enabled
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The final feature map after BN-ReLU: (N, num_features, *spatial')."""
        # The checks branch on shapes, which scripting, tracing and FX make symbolic.
        # is_scripting() must be a condition of its own for scripting to skip the block
        if not torch.jit.is_scripting():  # noqa: SIM102
            if is_eager(x):
                self.check_input(x)
                if self.config.memory_efficient and self.training and torch.is_grad_enabled():
                    return self._efficient_features(x)
        return self.features(x)

    @torch.jit.unused
    def _efficient_features(self, x: torch.Tensor) -> torch.Tensor:
        """Training: the stem and transitions recomputed in backward too (see
        :mod:`densenets.efficient.stages`)."""
        from ..efficient.layout import plain_layout
        from ..efficient.stages import run_features

        with plain_layout(x):  # blocks of volumes return channels-last buffers: draw as x is
            return run_features(self.features, x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global pool, head dropout, then the classifier unless ``pre_logits``.

        ``reset_classifier(num_classes, global_pool)`` changes both; with ``num_classes=0``
        the classifier is gone and this returns the pooled features.
        """
        x = self.global_pool(x)
        if self.pooled:
            x = torch.flatten(x, 1)
        x = self.head_drop(x)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
