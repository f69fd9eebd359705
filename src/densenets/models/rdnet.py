"""RDNet: "DenseNets Reloaded: Paradigm Shift Beyond ResNets and ViTs" (Kim, Heo, Han; ECCV 2024).

A DenseNet widened and made shallower with today's building blocks, keeping concatenation:

- a patchify stem: a ``patch_size`` x ``patch_size`` convolution of the same stride, then LayerNorm;
- a sequence of *mixing blocks*, each a transition (LayerNorm, then a convolution that halves the
  channels: 2x2 with stride 2, the patch merging, where the block downsamples, else 1x1) followed
  by three *feature mixers*; mixer l reads the concatenation of the block input and mixers
  1..l-1 and adds ``growth_rate`` channels, so a block emits ``in + 3 * growth_rate`` channels;
- a feature mixer: depthwise 7x7 convolution, LayerNorm, 1x1 expansion to 4x its input width,
  GELU, 1x1 to the growth rate, effective squeeze-excitation in the later blocks, layer scale,
  drop path;
- a head: global average pool, LayerNorm, linear classifier.

The paper's four *stages* are the runs of mixing blocks between downsamplings; their last maps
are the ``feature_info`` taps. ``state_dict()`` keys follow the layout of the authors' released
models as timm publishes them (``stem.0``, ``dense_stages.{i}.{j}.dense_block{m}.layers.layers.*``,
``head.norm``, ``head.fc``), so those checkpoints load key for key.
"""

# No ``from __future__ import annotations``: torch.fx writes the root forward's annotations
# into the code it generates, and a string annotation there becomes a name (``_torch_Tensor_``)
# that TorchScript cannot resolve when the traced module is scripted.

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from ..constants import IMAGENET_MEAN, IMAGENET_STD
from .backbone import FeatureExtractor
from .contract import TimmContract, check_config, is_eager
from .rdnet_layers import FeatureMixer, LayerNorm2d, MixerStack, RDNetHead


def _sizes(n: int, init: int, growth: Sequence[int], downsample_at: Sequence[int]) -> dict:
    """One RDNet size: ``n`` mixing blocks; the first two without effective SE, as published."""
    return dict(num_init_features=init, growth_rates=tuple(growth),
                downsample=tuple(i in downsample_at for i in range(n)),
                effective_se=tuple(i >= 2 for i in range(n)))


# The four published sizes. Every mixing block has three feature mixers.
RDNET: dict[str, dict[str, Any]] = {
    "rdnet_tiny": _sizes(7, 64, [64, 104] + [128] * 4 + [224], (1, 2, 6)),
    "rdnet_small": _sizes(11, 72, [64, 128] + [128] * 7 + [240] * 2, (1, 2, 9)),
    "rdnet_base": _sizes(11, 120, [96, 128] + [168] * 7 + [336] * 2, (1, 2, 9)),
    "rdnet_large": _sizes(12, 144, [128, 192] + [256] * 8 + [360] * 2, (1, 2, 10)),
}


def rdnet_pretrained_cfg(name: str | None, config: dict[str, Any],
                         preprocessing: dict[str, Any] | None = None) -> dict:
    """timm's pretrained_cfg for an RDNet built with ``config``: a published size's names its
    ImageNet-1k weights. Every size is evaluated as the authors publish it (224 px, crop 0.9,
    bicubic), whatever ``preprocessing`` loaded weights state."""
    published = name in RDNET
    return {"architecture": name, "tag": "nv_in1k" if published else "untrained",
            "hf_hub_id": f"naver-ai/{name}.nv_in1k" if published else None,
            "num_classes": int(config.get("num_classes", 1000)),
            "input_size": (int(config.get("in_channels", 3)), 224, 224),
            "pool_size": (7, 7), "crop_pct": 0.9, "interpolation": "bicubic",
            "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "first_conv": "stem.0",
            "classifier": "head.fc", "license": "apache-2.0",
            "paper_ids": "arXiv:2403.19588",
            "paper_name": "DenseNets Reloaded: Paradigm Shift Beyond ResNets and ViTs"}


def rdnet_config(name: str, **overrides: Any) -> dict[str, Any]:
    """RDNet keyword arguments for a size name plus overrides."""
    key = name.strip().lower()
    if key not in RDNET:
        raise ValueError(f"unknown RDNet {name!r}; choose one of {', '.join(RDNET)}")
    unknown = sorted(set(overrides) - {f.name for f in fields(RDNetConfig)})
    if unknown:
        raise ValueError(f"RDNet has no option {', '.join(unknown)}; its options are "
                         f"{', '.join(f.name for f in fields(RDNetConfig))}")
    return {**RDNET[key], **overrides}


@dataclass
class RDNetConfig:
    """Everything that defines an RDNet's architecture (what a checkpoint must carry)."""

    growth_rates: tuple[int, ...] = RDNET["rdnet_tiny"]["growth_rates"]
    downsample: tuple[bool, ...] = RDNET["rdnet_tiny"]["downsample"]
    effective_se: tuple[bool, ...] = RDNET["rdnet_tiny"]["effective_se"]
    num_init_features: int = 64
    mixers_per_block: int = 3
    bottleneck_width_ratio: float = 4.0
    compression: float = 0.5
    patch_size: int = 4
    ls_init_value: float = 1e-6
    drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    num_classes: int = 1000
    in_channels: int = 3
    global_pool: str = "avg"

    def __post_init__(self) -> None:
        self.growth_rates = tuple(int(g) for g in self.growth_rates)
        self.downsample = tuple(bool(d) for d in self.downsample)
        self.effective_se = tuple(bool(e) for e in self.effective_se)
        n = len(self.growth_rates)
        if not n or len(self.downsample) != n or len(self.effective_se) != n:
            raise ValueError(f"growth_rates, downsample and effective_se need one entry per "
                             f"mixing block; got {n}, {len(self.downsample)} and "
                             f"{len(self.effective_se)}")
        check_config(self, counts=("num_init_features", "mixers_per_block", "patch_size",
                                   "in_channels"),
                     rates=("drop_rate", "proj_drop_rate", "drop_path_rate"), pools=("avg", ""))
        if min(self.growth_rates) < 1:
            raise ValueError(f"every growth rate must be >= 1, got {self.growth_rates}")

    # DenseNet's terms, for tools that describe either family (diagrams, listings).
    @property
    def block_config(self) -> tuple[int, ...]:
        """Feature mixers per mixing block."""
        return (self.mixers_per_block,) * len(self.growth_rates)

    @property
    def growth_rate(self) -> str:
        """The growth rates as a range, e.g. "64-224"."""
        return f"{min(self.growth_rates)}-{max(self.growth_rates)}"

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("growth_rates", "downsample", "effective_se"):
            d[k] = list(d[k])
        return d


class RDNet(TimmContract, nn.Module):
    """Revitalized DenseNet (Kim, Heo and Han, ECCV 2024); see the module docstring.

    Args:
        growth_rates: channels each feature mixer of mixing block i adds.
        downsample: per mixing block, whether its transition halves the resolution (patch
            merging); the first block has no transition.
        effective_se: per mixing block, whether its mixers end in effective squeeze-excitation.
        num_init_features: channels of the patchify stem.
        mixers_per_block: feature mixers per mixing block (3 in every published size).
        bottleneck_width_ratio: a mixer's expansion width relative to its input width.
        compression: a transition keeps this fraction of the channels (rounded down to 8s).
        patch_size: the stem's kernel and stride.
        ls_init_value: initial layer scale (0 disables it).
        drop_rate: dropout before the classifier (timm's meaning of drop_rate).
        proj_drop_rate: dropout on every feature mixer's output.
        drop_path_rate: stochastic depth, rising linearly to this over all feature mixers.
        num_classes: classifier outputs (0: none; forward returns pooled features).
        in_channels: channels of the input image.
        global_pool: "avg" or "" (no pooling: the head normalises the unpooled map).

    timm's model contract comes from :class:`densenets.models.contract.TimmContract`, as for
    the DenseNets; the taps are the ends of the paper's stages.
    """

    # Python-side conveniences that TorchScript need not compile.
    __jit_unused_properties__ = ["default_cfg", "num_classes", "min_input_size"]
    tap_help = "i = the end of stage i + 1"

    def __init__(
        self,
        growth_rates: Sequence[int] = RDNET["rdnet_tiny"]["growth_rates"],
        downsample: Sequence[bool] = RDNET["rdnet_tiny"]["downsample"],
        effective_se: Sequence[bool] = RDNET["rdnet_tiny"]["effective_se"],
        num_init_features: int = 64,
        mixers_per_block: int = 3,
        bottleneck_width_ratio: float = 4.0,
        compression: float = 0.5,
        patch_size: int = 4,
        ls_init_value: float = 1e-6,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        num_classes: int = 1000,
        in_channels: int = 3,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        cfg = RDNetConfig(
            growth_rates=tuple(growth_rates), downsample=tuple(downsample),
            effective_se=tuple(effective_se), num_init_features=num_init_features,
            mixers_per_block=mixers_per_block, bottleneck_width_ratio=bottleneck_width_ratio,
            compression=compression, patch_size=patch_size, ls_init_value=ls_init_value,
            drop_rate=drop_rate, proj_drop_rate=proj_drop_rate, drop_path_rate=drop_path_rate,
            num_classes=num_classes, in_channels=in_channels, global_pool=global_pool)
        self.config = cfg
        self.grad_checkpointing = False
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.in_channels, cfg.num_init_features, cfg.patch_size, cfg.patch_size),
            LayerNorm2d(cfg.num_init_features))
        n_mixers = len(cfg.growth_rates) * cfg.mixers_per_block
        # Linear in depth over all mixers; plain floats, so it also builds on the meta device.
        rates = [cfg.drop_path_rate * i / max(n_mixers - 1, 1) for i in range(n_mixers)]
        channels, reduction = cfg.num_init_features, cfg.patch_size
        blocks: list[nn.Module] = []
        self.feature_info = []  # (unannotated: TorchScript would read an annotation here)
        for i, growth in enumerate(cfg.growth_rates):
            parts: list[nn.Module] = []
            if i > 0:
                out = int(channels * cfg.compression / 8) * 8
                size = 2 if cfg.downsample[i] else 1
                reduction *= size
                parts += [LayerNorm2d(channels), nn.Conv2d(channels, out, size, size)]
                channels = out
            mixers = []
            for j in range(cfg.mixers_per_block):
                mixers.append(FeatureMixer(
                    channels + j * growth, growth, cfg.bottleneck_width_ratio,
                    cfg.effective_se[i], cfg.ls_init_value,
                    rates[i * cfg.mixers_per_block + j], cfg.proj_drop_rate))
            parts.append(MixerStack(mixers))
            channels += cfg.mixers_per_block * growth
            blocks.append(nn.Sequential(*parts))
            if i + 1 == len(cfg.growth_rates) or cfg.downsample[i + 1]:
                self.feature_info.append({"num_chs": channels, "reduction": reduction,
                                          "module": f"dense_stages.{i}", "growth_rate": growth})
        self.dense_stages = nn.Sequential(*blocks)
        self.num_features = self.head_hidden_size = channels
        self.head = RDNetHead(channels, cfg.num_classes, cfg.global_pool, cfg.drop_rate)
        # what timm.data.resolve_data_config reads; create_model names the published size
        self.pretrained_cfg = rdnet_pretrained_cfg(None, cfg.to_dict())
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He-normal convolutions (fan-in), zero classifier bias, as the authors initialise."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @property
    def min_input_size(self) -> int:
        """The smallest square input whose last mixing block still sees a 1x1 map."""
        return self.config.patch_size * 2 ** sum(self.config.downsample[1:])

    # ------------------------------------------------------------ what the contract asks

    def _trunk(self) -> list[tuple[str, nn.Module]]:
        return [("stem", self.stem)] + [(f"dense_stages.{i}", s)
                                        for i, s in enumerate(self.dense_stages)]

    def _run_trunk(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """With gradient checkpointing, a mixing block recomputes its activations in backward."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled() \
                and module is not self.stem:
            from torch.utils.checkpoint import checkpoint

            return checkpoint(module, x, use_reentrant=False)
        return module(x)

    def _build_head(self, num_classes: int, pool: str) -> None:
        if self.head.in_features != self.num_features:  # pruned: a norm for the new width
            self.head = RDNetHead(self.num_features, num_classes, pool, self.config.drop_rate)
        else:
            self.head.reset(num_classes, pool)
        self.head_hidden_size = self.num_features

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for layer-wise learning-rate decay: the stem, then each block."""
        return {"stem": r"^stem", "blocks": r"^dense_stages\.(\d+)"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each mixing block's activations in backward instead of storing them."""
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last mixing block's map: (N, num_features, H/32, W/32) for the published sizes."""
        if not torch.jit.is_scripting():  # a condition of its own: scripting drops the branch
            if is_eager(x):
                self.check_input(x)
            for _, module in self._trunk():
                x = self._run_trunk(module, x)
            return x
        return self.dense_stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, LayerNorm, dropout and, unless ``pre_logits``, the classifier."""
        return self.head(x, pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class RDNetFeatures(FeatureExtractor):
    """An RDNet as a backbone: the generic wrapper, whose forward also compiles with
    TorchScript (a scripted module cannot run the Python ``forward_intermediates``)."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if torch.jit.is_scripting():  # the same maps: trunk position i + 1 is mixing block i
            x = self.stem(x)
            out = []
            for i, stage in enumerate(self.dense_stages):
                x = stage(x)
                if i + 1 in self._taps:
                    out.append(x)
            return out
        return self._maps(x)
