"""Named configurations: the ImageNet models of Table 1 and the CIFAR/SVHN models of Table 2.

ImageNet names are fixed (``densenet121`` ...). CIFAR/SVHN names are patterns that admit any
valid depth: ``densenet-{L}-k{k}`` (plain, L = 3n + 4, 16-channel stem) and
``densenet-bc-{L}-k{k}`` (bottleneck + compression 0.5, L = 6n + 4, 2k-channel stem), plus the
other two variants ``densenet-b-{L}-k{k}`` (L = 6n + 4, 2k stem) and ``densenet-c-{L}-k{k}``
(L = 3n + 4, 16-channel stem). Two more ImageNet names are timm's variants beyond the paper:
``densenet264d`` (k = 48, deep stem) and ``densenetblur121d`` (deep stem, blur-pooled stem).

Every name also has a ``pretrained_cfg`` in timm's format (input size, pooled map size,
interpolation, crop, normalisation, classes, first convolution, classifier).
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from ..constants import IMAGENET_MEAN, IMAGENET_STD

IMAGENET: dict[str, dict[str, Any]] = {
    "densenet121": dict(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64),
    "densenet161": dict(growth_rate=48, block_config=(6, 12, 36, 24), num_init_features=96),
    "densenet169": dict(growth_rate=32, block_config=(6, 12, 32, 32), num_init_features=64),
    "densenet201": dict(growth_rate=32, block_config=(6, 12, 48, 32), num_init_features=64),
    "densenet264": dict(growth_rate=32, block_config=(6, 12, 64, 48), num_init_features=64),
    # timm's deep-stem variants (its names and layouts; the stem widths are k, k, 2k)
    "densenet264d": dict(growth_rate=48, block_config=(6, 12, 64, 48), num_init_features=96,
                         deep_stem=True),
    "densenetblur121d": dict(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64,
                             deep_stem=True, blur_pool=True),
}

# variant prefix -> (bottleneck, compression, conv layers per dense layer)
VARIANTS: dict[str, tuple[bool, float, int]] = {
    "densenet": (False, 1.0, 1),
    "densenet-b": (True, 1.0, 2),
    "densenet-c": (False, 0.5, 1),
    "densenet-bc": (True, 0.5, 2),
}

# Table 2 of the paper, plus the wide-shallow -BC nets the authors later recommended.
TABLE2 = ["densenet-40-k12", "densenet-100-k12", "densenet-100-k24", "densenet-bc-100-k12",
          "densenet-bc-250-k24", "densenet-bc-190-k40"]
WIDE_SHALLOW = ["densenet-bc-40-k36", "densenet-bc-40-k48", "densenet-bc-40-k60"]

_CIFAR_RE = re.compile(r"^(densenet(?:-bc|-b|-c)?)-(\d+)-k(\d+)$")


def list_models() -> list[str]:
    """Every named model of the zoo (CIFAR patterns accept any other valid depth too)."""
    return list(IMAGENET) + TABLE2 + WIDE_SHALLOW


def is_zoo_name(name: str) -> bool:
    """Whether ``name`` is a DenseNet of the zoo: an ImageNet name or a CIFAR/SVHN pattern."""
    key = name.strip().lower()
    return key in IMAGENET or _CIFAR_RE.match(key) is not None


def native_input_size(name: str) -> tuple[int, int, int]:
    """(C, H, W) the named model was designed for."""
    return (3, 224, 224) if name in IMAGENET else (3, 32, 32)


def valid_depths_near(depth: int, per_layer: int) -> list[int]:
    """The valid depths (3 * per_layer * n + 4, n >= 1) just below and above ``depth``."""
    step = 3 * per_layer
    valid = [step * n + 4 for n in range(1, max(1, (depth - 4) // step) + 2)]
    below = [d for d in valid if d < depth][-1:]
    above = [d for d in valid if d > depth][:1]
    return below + above


def cifar_config(variant: str, depth: int, growth_rate: int) -> dict[str, Any]:
    """The DenseNet kwargs of a three-block CIFAR/SVHN net of the given variant and depth."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(VARIANTS)}")
    bottleneck, compression, per_layer = VARIANTS[variant]
    step = 3 * per_layer
    if depth < step + 4 or (depth - 4) % step:
        near = " and ".join(map(str, valid_depths_near(depth, per_layer)))
        raise ValueError(
            f"{variant} depth must be {step}n + 4 (three blocks of n layers, n >= 1); {depth} is "
            f"not. Valid depths near it: {near}"
        )
    if growth_rate < 1:
        raise ValueError(f"growth_rate must be >= 1, got {growth_rate}")
    n = (depth - 4) // step
    return dict(
        growth_rate=growth_rate,
        block_config=(n, n, n),
        num_init_features=2 * growth_rate if bottleneck else 16,
        bottleneck=bottleneck,
        compression=compression,
        num_classes=10,
        stem="cifar",
    )


def model_config(name: str, **overrides: Any) -> dict[str, Any]:
    """Resolve a zoo name plus overrides to DenseNet keyword arguments."""
    key = name.strip().lower()
    if key in IMAGENET:
        cfg: dict[str, Any] = dict(IMAGENET[key])
    elif m := _CIFAR_RE.match(key):
        k = int(overrides.get("growth_rate", m.group(3)))
        cfg = cifar_config(m.group(1), int(m.group(2)), k)
    else:
        close = difflib.get_close_matches(key, list_models(), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown model {name!r}.{hint} Known: {', '.join(list_models())}; CIFAR/SVHN names "
            "take any valid depth: densenet-{L}-k{k}, densenet-bc-{L}-k{k} (also -b, -c)."
        )
    cfg.update(overrides)
    return cfg


# ---------------------------------------------------------------- timm's pretrained_cfg

# The CIFAR-10 training split's statistics (pixels in [0, 1]), the cifar10 recipe's normalisation.
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

# What differs per name from the stem type's defaults below. torchvision's weights were scored
# at resize 256 bilinear, crop 224; timm's two deep-stem names keep timm's own entries.
_NAMED_CFGS: dict[str, dict[str, Any]] = {
    **{n: {"tag": "tv_in1k", "hf_hub_id": f"timm/{n}.tv_in1k"}
       for n in ("densenet121", "densenet161", "densenet169", "densenet201")},
    "densenetblur121d": {"tag": "ra_in1k", "hf_hub_id": "timm/densenetblur121d.ra_in1k",
                         "interpolation": "bicubic", "test_input_size": (3, 288, 288),
                         "test_crop_pct": 0.95},
    "densenet264d": {"tag": "untrained", "interpolation": "bicubic"},
}


def final_map_side(side: int, stem: str, num_blocks: int) -> int:
    """The last dense block's map side for a ``side``-pixel input (0: the input is too small).

    ImageNet stems (7x7 or deep 3x3) halve twice, in a stride-2 convolution and a stride-2
    pool, each rounding up; every transition then halves, rounding down."""
    if stem == "imagenet":
        for _ in range(2):
            side = (side - 1) // 2 + 1 if side >= 1 else 0
    return side >> (num_blocks - 1)


def recorded_sides(preprocessing: dict[str, Any] | None, dims: int) -> tuple[int, ...] | None:
    """The input sides loaded weights' preprocessing records for a model of ``dims`` spatial
    dimensions: the volume size for volumes, the centre crop for images; None when it records
    none for that rank (an image crop says nothing about a signal or a volume, and the fallback
    preprocessing of weights that state none records one for every model)."""
    pre = preprocessing or {}
    if dims == 3 and pre.get("volume_size"):
        return tuple(int(s) for s in pre["volume_size"])
    if dims == 2 and pre.get("crop"):
        return (int(pre["crop"]),) * 2
    return None


def pretrained_cfg(name: str | None, config: dict[str, Any],
                   preprocessing: dict[str, Any] | None = None) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` for the zoo model ``name`` built with ``config``.

    ImageNet stems: 224 px, crop 0.875, ImageNet statistics, 1000 classes. CIFAR stems: 32 px,
    no crop (crop_pct 1.0), CIFAR-10 statistics. ``pool_size`` is the final map at that input,
    and the classes and input channels are the model's own; images with other than 3 channels
    get mean 0.5, std 0.5 per channel, as this library's preprocessing gives them.
    ``preprocessing`` (loaded weights' ``{"resize", "crop", "mean", "std", "interpolation"}``)
    takes precedence: the data transform is the one the weights were evaluated with. Sizes
    have one side per spatial dimension (volumes with an ImageNet stem: 96 per side).
    """
    stem = config.get("stem", "imagenet")
    c = int(config.get("in_channels", 3))
    side = 224 if stem == "imagenet" else 32
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if stem == "imagenet" else (CIFAR10_MEAN,
                                                                          CIFAR10_STD)
    if c != 3:
        mean, std = (0.5,) * c, (0.5,) * c
    dims = int(config.get("spatial_dims", 2))
    if dims == 3 and stem == "imagenet":  # volumes: 96^3, a common crop of CT and MR volumes
        side = 96
    pool = final_map_side(side, stem, len(config.get("block_config") or (6, 12, 24, 16)))
    cfg: dict[str, Any] = {
        "architecture": name, "tag": "untrained", "url": "", "hf_hub_id": None,
        "num_classes": int(config.get("num_classes", 1000)), "input_size": (c, *[side] * dims),
        "pool_size": (pool,) * dims, "crop_pct": 0.875 if stem == "imagenet" else 1.0,
        "interpolation": "bilinear", "mean": tuple(mean), "std": tuple(std),
        "first_conv": "features.conv0", "classifier": "classifier",
    }
    cfg.update(_NAMED_CFGS.get((name or "").lower(), {}))
    if preprocessing:
        sides = recorded_sides(preprocessing, dims)
        if sides is not None:
            blocks = len(config.get("block_config") or (6, 12, 24, 16))
            cfg.update(input_size=(c, *sides),
                       pool_size=tuple(final_map_side(s, stem, blocks) for s in sides))
            if dims == 2:
                cfg["crop_pct"] = round(sides[0] / int(preprocessing.get("resize") or sides[0]),
                                        4)
        for key in ("mean", "std"):
            if key in preprocessing:
                cfg[key] = tuple(preprocessing[key])
        cfg["interpolation"] = preprocessing.get("interpolation", cfg["interpolation"])
    return cfg
