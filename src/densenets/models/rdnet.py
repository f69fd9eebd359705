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

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from .rdnet_layers import FeatureMixer, LayerNorm2d, MixerStack, RDNetHead, take_indices

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def rdnet_pretrained_cfg(name: str, num_classes: int = 1000, in_channels: int = 3) -> dict:
    """timm's pretrained_cfg fields for an RDNet size (the published ImageNet-1k weights)."""
    return {"architecture": name, "tag": "nv_in1k", "hf_hub_id": f"naver-ai/{name}.nv_in1k",
            "num_classes": num_classes, "input_size": (in_channels, 224, 224),
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
        for field_name in ("num_init_features", "mixers_per_block", "patch_size", "in_channels"):
            if int(getattr(self, field_name)) < 1:
                raise ValueError(f"{field_name} must be >= 1, got {getattr(self, field_name)}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: no classifier), got "
                             f"{self.num_classes}")
        if min(self.growth_rates) < 1:
            raise ValueError(f"every growth rate must be >= 1, got {self.growth_rates}")
        if not 0.0 < self.compression <= 1.0:
            raise ValueError(f"compression must be in (0, 1], got {self.compression}")
        for field_name in ("drop_rate", "proj_drop_rate", "drop_path_rate"):
            if not 0.0 <= float(getattr(self, field_name)) < 1.0:
                raise ValueError(f"{field_name} must be in [0, 1), got "
                                 f"{getattr(self, field_name)}")
        if self.global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '' (no pooling), got "
                             f"{self.global_pool!r}")

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


class RDNet(nn.Module):
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
    """

    # Python-side conveniences that TorchScript need not compile.
    __jit_unused_properties__ = ["default_cfg", "num_classes", "min_input_size"]

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
        cfg = RDNetConfig(tuple(growth_rates), tuple(downsample), tuple(effective_se),
                          num_init_features, mixers_per_block, bottleneck_width_ratio,
                          compression, patch_size, ls_init_value, drop_rate, proj_drop_rate,
                          drop_path_rate, num_classes, in_channels, global_pool)
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
        self.feature_info: list[dict] = []
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
        self.stage_ends = [int(f["module"].rsplit(".", 1)[1]) for f in self.feature_info]
        self.num_features = self.head_hidden_size = channels
        self.head = RDNetHead(channels, cfg.num_classes, cfg.global_pool, cfg.drop_rate)
        self.pretrained_cfg = {}
        self.reset_parameters()

    @property
    def default_cfg(self) -> dict:
        return self.pretrained_cfg

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

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

    @torch.jit.unused
    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError for an input this network cannot take, saying what would work."""
        if x.dim() != 4:
            raise ValueError(f"expected a 4-D batch (N, C, H, W), got shape {tuple(x.shape)}")
        c = self.config.in_channels
        if x.shape[1] != c:
            raise ValueError(f"this RDNet takes {c}-channel images but the input has "
                             f"{x.shape[1]} channels; build it with in_channels={x.shape[1]} "
                             f"or convert the images to {c} channels")
        m = self.min_input_size
        if min(x.shape[2], x.shape[3]) < m:
            raise ValueError(f"input {x.shape[2]}x{x.shape[3]} is too small for this RDNet: "
                             f"the minimum is {m}x{m}")

    # ------------------------------------------------------------ timm's model contract

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for layer-wise learning-rate decay: the stem, then each block."""
        return {"stem": r"^stem", "blocks": r"^dense_stages\.(\d+)"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each mixing block's activations in backward instead of storing them."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh classifier with ``num_classes`` outputs (0: none); ``global_pool=''`` stops
        pooling (the head then normalises the unpooled map)."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0 (0: no classifier), got "
                             f"{num_classes!r}")
        self.head.reset(num_classes, global_pool)
        self.config.num_classes = num_classes
        if global_pool is not None:
            self.config.global_pool = global_pool

    def _eager_checks(self, x: torch.Tensor) -> None:
        # Tracing (jit.trace, FX, torch.compile) must not branch on the input's values or
        # shapes; eager users get the readable error.
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()
                or isinstance(x, torch.fx.Proxy)):
            self.check_input(x)

    def _run_stage(self, i: int, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(stage, x, use_reentrant=False)
        return stage(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last mixing block's map: (N, num_features, H/32, W/32) for the published sizes."""
        if not torch.jit.is_scripting():
            self._eager_checks(x)
            x = self.stem(x)
            for i, stage in enumerate(self.dense_stages):
                x = self._run_stage(i, stage, x)
            return x
        return self.dense_stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, LayerNorm, dropout and, unless ``pre_logits``, the classifier."""
        return self.head(x, pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """The maps at the ``feature_info`` taps (the end of each of the paper's stages).

        ``indices``: None for all, an int n for the last n, or a list (negative from the end).
        Returns ``(final map, [maps])``, or only the list with ``intermediates_only``. ``norm``
        is accepted for the contract; RDNet has no norm between the last block and the head.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW' for RDNet, got {output_fmt!r}")
        taps, last = take_indices(len(self.stage_ends), indices)
        wanted = {self.stage_ends[t] for t in taps}
        end = self.stage_ends[last] if stop_early else len(self.dense_stages) - 1
        self._eager_checks(x)
        x = self.stem(x)
        out = []
        for i, stage in enumerate(self.dense_stages):
            if i > end:
                break
            x = self._run_stage(i, stage, x)
            if i in wanted:
                out.append(x)
        return out if intermediates_only else (x, out)

    @torch.jit.ignore
    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1,
                                  prune_norm: bool = False, prune_head: bool = True) -> list[int]:
        """Drop the mixing blocks after the last wanted tap (and the classifier); return taps."""
        taps, last = take_indices(len(self.stage_ends), indices)
        end = self.stage_ends[last]
        if end < len(self.dense_stages) - 1:
            self.dense_stages = self.dense_stages[:end + 1]
            self.num_features = self.head_hidden_size = self.feature_info[last]["num_chs"]
            self.head = RDNetHead(self.num_features, 0, "", 0.0)
            self.config.num_classes, self.config.global_pool = 0, ""
        elif prune_head:
            self.reset_classifier(0, "")
        return taps


class RDNetFeatures(nn.Module):
    """An RDNet as a backbone: the maps at its ``feature_info`` taps (timm's features_only).

    Keeps the model's ``stem.*`` / ``dense_stages.*`` keys, so RDNet weights load into it.
    ``out_indices`` picks taps (an int n: the last n; negative indices count from the end).
    """

    def __init__(self, model: RDNet, out_indices: int | Sequence[int] | None = None) -> None:
        super().__init__()
        from .backbone import FeatureInfo

        n = len(model.stage_ends)
        try:
            taps, last = take_indices(n, out_indices)
        except ValueError as e:
            raise ValueError(f"out_indices: {e}") from None
        self.out_indices = tuple(taps)
        self.feature_info = FeatureInfo(dict(model.feature_info[t]) for t in taps)
        self.config = model.config
        self.pretrained_cfg = model.pretrained_cfg
        self.weights_meta = getattr(model, "weights_meta", None)
        self.stem = model.stem
        self.dense_stages = model.dense_stages[:model.stage_ends[last] + 1]
        self._taps = [model.stage_ends[t] for t in taps]

    # The input checks read only ``config``, so the RDNet's own serve here too.
    check_input = RDNet.check_input
    min_input_size = RDNet.min_input_size

    __jit_unused_properties__ = ["default_cfg", "min_input_size"]

    @property
    def default_cfg(self) -> dict:
        return self.pretrained_cfg

    _eager_checks = RDNet._eager_checks

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not torch.jit.is_scripting():  # a condition of its own: scripting drops the branch
            self._eager_checks(x)
        x = self.stem(x)
        out = []
        for i, stage in enumerate(self.dense_stages):
            x = stage(x)
            if i in self._taps:
                out.append(x)
        return out
