"""DenseNet checkpoints in the wild, mapped onto this library's (torchvision's) key layout.

Layouts handled: torchvision's current keys; its legacy hosted keys (``denselayer1.norm.1.weight``,
from module names that once contained dots); ``module.`` (DataParallel/DDP), ``_orig_mod.``
(torch.compile) and ``model.`` (Lightning) prefixes; wrappers such as ``{"state_dict": ...}``;
timm's DenseNets, whose parameter names equal torchvision's (timm fuses BN and ReLU into one
``BatchNormAct2d`` that keeps the BN's parameter names), its deep-stem variants included
(densenet264d, densenetblur121d: ``features.conv0..2``/``norm0..2`` in place of the 7x7 stem).
Blur pooling holds no weights, so a state dict cannot show it: a deep-stem DenseNet-121 is read
as densenetblur121d, the only one published; ``create_model("densenet121", deep_stem=True,
weights=PATH)`` builds the unblurred one.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..models.densenet import DenseNet, DenseNetConfig
from ..models.layers import compressed_channels
from ..models.zoo import IMAGENET, VARIANTS, model_config
from .layout import Checkpoint, Error, Layout
from .pretrained import PRETRAINED

_LEGACY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var|"
    r"num_batches_tracked))$"
)
_WRAPPERS = ("model", "state_dict", "model_state_dict", "model_state", "net", "network")
_PREFIXES = ("module.", "_orig_mod.", "model.", "net.")
_ARCH = ("growth_rate", "block_config", "num_init_features", "bottleneck", "bn_size",
         "compression", "stem", "deep_stem", "blur_pool")


def remap_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """Any DenseNet state dict (or a checkpoint wrapping one) with canonical keys."""
    while isinstance(obj, Mapping) and not any(torch.is_tensor(v) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            raise ValueError(f"no state dict found in the checkpoint; its top-level keys are "
                             f"{sorted(map(str, obj))[:8]}")
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state dict (a mapping of names to tensors), got "
                         f"{type(obj).__name__}")
    sd = {str(k): v for k, v in obj.items() if torch.is_tensor(v)}
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if sd and all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    sd = {_legacy_to_current(k): v for k, v in sd.items()}
    if not any(k.startswith("features.") for k in sd):
        raise ValueError(f"no DenseNet weights in the checkpoint (no 'features.*' keys); its "
                         f"keys start {sorted(sd)[:4]}")
    return sd


def _legacy_to_current(key: str) -> str:
    m = _LEGACY.match(key)
    return m.group(1) + m.group(2) if m else key


def to_legacy_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The hosted torchvision layout (``norm.1``, ``conv.2``), for tests and old tooling."""
    pattern = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))([12]\..*)$")
    out = {}
    for k, v in state_dict.items():
        m = pattern.match(k)
        out[f"{m.group(1)}.{m.group(2)}" if m else k] = v
    return out


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise ValueError(f"cannot read the architecture off the checkpoint: {key} is missing")
    return tuple(sd[key].shape)


def infer_config(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The DenseNet arguments a canonical state dict was made with, read off tensor shapes.

    Dropout leaves no trace in weights, so ``drop_rate`` is 0.
    """
    init, in_ch, kh, _ = _shape(sd, "features.conv0.weight")
    deep = "features.conv2.weight" in sd  # timm's deep stem: three 3x3 convolutions
    if deep:
        init = _shape(sd, "features.conv2.weight")[0]
    blocks = []
    while any(k.startswith(f"features.denseblock{len(blocks) + 1}.") for k in sd):
        prefix = f"features.denseblock{len(blocks) + 1}.denselayer"
        blocks.append(max(int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)))
    if not blocks:
        raise ValueError("cannot read the architecture off the checkpoint: no dense blocks")
    first = "features.denseblock1.denselayer1."
    bottleneck = first + "conv2.weight" in sd
    conv1 = _shape(sd, first + "conv1.weight")[0]
    growth = _shape(sd, first + "conv2.weight")[0] if bottleneck else conv1
    bn_size = conv1 // growth if bottleneck else 4
    transitions = [(_shape(sd, f"features.transition{i}.conv.weight")[:2])
                   for i in range(1, len(blocks))]
    cfg = dict(growth_rate=growth, block_config=tuple(blocks), num_init_features=init,
               bottleneck=bottleneck, bn_size=bn_size,
               compression=_compression(transitions), drop_rate=0.0,
               num_classes=_shape(sd, "classifier.weight")[0] if "classifier.weight" in sd
               else 1000,
               in_channels=in_ch, stem="imagenet" if kh == 7 or deep else "cifar",
               memory_efficient=False, deep_stem=deep, blur_pool=False)
    # Blur pooling leaves no weights; the one published deep-stem 121 has it.
    cfg["blur_pool"] = deep and growth == 32 and cfg["block_config"] == (6, 12, 24, 16)
    return cfg


def _compression(transitions: list[tuple[int, ...]]) -> float:
    """The shortest decimal theta with floor(theta * m) == out for every (out, m) transition."""
    if not transitions:
        return 0.5
    # Each transition pins theta to [out / m, (out + 1) / m); theta must lie in all of them.
    lo = max(o / m for o, m in transitions)
    hi = min(min((o + 1) / m for o, m in transitions), 1.0 + 1e-12)
    for digits in range(1, 10):
        scale = 10 ** digits
        theta = math.ceil(round(lo * scale, 6)) / scale
        if theta < hi and 0 < theta <= 1 and all(compressed_channels(m, theta) == o
                                                 for o, m in transitions):
            return theta
    raise ValueError(f"the transitions {transitions} (out, in channels) do not share one "
                     "compression factor; this is not a DenseNet densenets can build")


def describe_config(cfg: Mapping[str, Any]) -> str:
    """The zoo name of an architecture, or a compact description when it has none."""
    defaults = DenseNetConfig().to_dict()  # zoo entries list only what differs from these
    arch = {k: cfg.get(k, defaults[k]) for k in _ARCH}
    arch["block_config"] = tuple(arch["block_config"] or ())

    def same(name: str) -> bool:
        ref = {**defaults, **model_config(name)}
        return all(ref[k] == arch[k] or (k == "block_config" and tuple(ref[k]) == arch[k])
                   for k in _ARCH)

    for name in IMAGENET:
        if same(name):
            return name
    blocks = arch["block_config"]
    if arch["stem"] == "cifar" and len(set(blocks)) == 1 and len(blocks) == 3:
        for variant, (_, _, per_layer) in VARIANTS.items():
            name = f"{variant}-{3 * per_layer * blocks[0] + 4}-k{arch['growth_rate']}"
            if same(name):
                return name
    stem = arch["stem"] + ("-deep" if arch["deep_stem"] else "") + \
        ("-blur" if arch["blur_pool"] else "")
    return (f"DenseNet(k={arch['growth_rate']}, blocks={list(blocks)}, "
            f"stem={stem}, init={arch['num_init_features']}, "
            f"B={arch['bottleneck']}, theta={arch['compression']})")


def key_diff(own: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor]
             ) -> tuple[list[str], list[str], list[tuple[str, tuple, tuple]]]:
    """Missing keys, unexpected keys and (key, model shape, checkpoint shape) conflicts.

    ``num_batches_tracked`` may be missing: checkpoints from before it existed lack it.
    """
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    conflicts = [(k, tuple(own[k].shape), tuple(sd[k].shape)) for k in own
                 if k in sd and own[k].shape != sd[k].shape]
    return missing, unexpected, conflicts


def _compact(keys: list[str]) -> list[str]:
    """Keys as modules, whole dense layers as runs: 'features.denseblock3.denselayer25-32'."""
    out: list[str] = []
    run: list = []  # [prefix, first, last]
    for mod in dict.fromkeys(k.rsplit(".", 1)[0] for k in keys):
        m = re.match(r"(.*\.denselayer)(\d+)\.", mod + ".")
        if m and run and run[0] == m.group(1) and int(m.group(2)) in (run[2], run[2] + 1):
            run[2] = int(m.group(2))
            continue
        if run:
            out.append(f"{run[0]}{run[1]}" + (f"-{run[2]}" if run[2] != run[1] else ""))
            run = []
        if m:
            run = [m.group(1), int(m.group(2)), int(m.group(2))]
        else:
            out.append(mod)
    if run:
        out.append(f"{run[0]}{run[1]}" + (f"-{run[2]}" if run[2] != run[1] else ""))
    return out


def format_diff(config: Mapping[str, Any], sd: Mapping[str, torch.Tensor], missing: list[str],
                unexpected: list[str], conflicts: list[tuple[str, tuple, tuple]]) -> str:
    """The readable report of a failed load: what is missing, unexpected, or shaped wrong,
    and what architecture the checkpoint seems to hold."""
    def some(items: list[str]) -> str:
        more = f", ... and {len(items) - 6} more" if len(items) > 6 else ""
        return ", ".join(items[:6]) + more

    lines = [f"the checkpoint does not fit {describe_config(config)}: "
             f"{len(missing)} missing, {len(unexpected)} unexpected, "
             f"{len(conflicts)} shape conflicts; nothing was loaded"]
    if missing:
        lines.append(f"  missing (in the model, not the checkpoint): {some(_compact(missing))}")
    if unexpected:
        lines.append(f"  unexpected (in the checkpoint, not the model): "
                     f"{some(_compact(unexpected))}")
    first = {}  # one line per module: its first conflicting tensor
    for k, mine, theirs in conflicts:
        first.setdefault(k.rsplit(".", 1)[0], (k, mine, theirs))
    for k, mine, theirs in list(first.values())[:6]:
        lines.append(f"  shape conflict {k}: model {list(mine)}, checkpoint {list(theirs)}")
    if len(first) > 6:
        lines.append(f"  ... and {len(first) - 6} more modules with shape conflicts")
    with contextlib.suppress(ValueError):  # too damaged to read an architecture off
        lines.append(f"  the checkpoint looks like {describe_config(infer_config(sd))}; "
                     "build that model, or use densenets.load(path), which reads it")
    return "\n".join(lines)


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A stem kernel trained on RGB, for ``in_channels`` inputs with the same response scale.

    One channel: sum over RGB (a grey image gives the activation its RGB copy gave). More or
    other counts: repeat the RGB kernels cyclically and rescale by 3 / in_channels.
    """
    c = weight.shape[1]
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = -(-in_channels // c)
    return weight.repeat(1, reps, *[1] * (weight.dim() - 2))[:, :in_channels] * (c / in_channels)


# ---------------------------------------------------------------- the DenseNet family's layout

FIRST_CONV, CLASSIFIER = "features.conv0.weight", "classifier.weight"


def holds_densenet(obj: Any) -> bool:
    """Whether ``obj`` (a state dict or a checkpoint wrapping one) holds DenseNet weights."""
    try:
        remap_state_dict(obj)
    except ValueError:
        return False
    return True


def load_densenet(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                  error: Error = ValueError) -> list[str]:
    """Copy a canonical state dict into ``model``; return notes on what was adapted.

    A classifier of another size is left freshly initialised (fine-tuning), a 3-channel stem
    is adapted to the model's input channels; every other difference raises ``error`` before
    anything is copied.
    """
    own = model.state_dict()
    sd = dict(state_dict)
    notes: list[str] = []
    w = FIRST_CONV
    if w in sd and w in own and sd[w].shape != own[w].shape \
            and sd[w].shape[0] == own[w].shape[0] and sd[w].shape[2:] == own[w].shape[2:]:
        notes.append(f"adapted features.conv0 from {sd[w].shape[1]} to {own[w].shape[1]} input "
                     "channels (summed over RGB for 1, repeated and rescaled otherwise)")
        sd[w] = adapt_input_conv(sd[w], own[w].shape[1])
    cw = CLASSIFIER
    if cw in sd and cw in own and sd[cw].shape != own[cw].shape \
            and sd[cw].shape[1:] == own[cw].shape[1:]:
        notes.append(f"classifier not loaded: the checkpoint has {sd[cw].shape[0]} classes and "
                     f"the model {own[cw].shape[0]}, so it keeps its fresh initialisation for "
                     "fine-tuning; everything else was loaded")
        sd[cw], sd["classifier.bias"] = own[cw], own["classifier.bias"]
    missing, unexpected, conflicts = key_diff(own, sd)
    if missing or unexpected or conflicts:
        raise error(format_diff(model.config.to_dict(), sd, missing, unexpected, conflicts))
    for k in own:
        sd.setdefault(k, own[k])  # num_batches_tracked, absent from old checkpoints
    model.load_state_dict(sd, strict=True)
    return notes


def _shape_config(sd: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """The classes and input channels the tensors show."""
    out = {}
    if CLASSIFIER in sd:
        out["num_classes"] = int(sd[CLASSIFIER].shape[0])
    if FIRST_CONV in sd:
        out["in_channels"] = int(sd[FIRST_CONV].shape[1])
    return out


def _imagenet_meta_if_fits(ckpt: Checkpoint, config: dict[str, Any]) -> None:
    """A checkpoint that says nothing about itself and holds a 1000-class, 3-channel
    architecture of torchvision's gets ImageNet's names and transform."""
    name = describe_config(config)
    if not ckpt.meta and name in PRETRAINED and config.get("num_classes", 1000) == 1000 \
            and config.get("in_channels", 3) == 3:
        ckpt.meta = {k: v for k, v in PRETRAINED[name].meta().items() if k != "source"}
        ckpt.model_name = name


def build_densenet(name: str | None, ckpt: Checkpoint, overrides: Mapping[str, Any],
                   error: Error = ValueError) -> tuple[DenseNet, list[str]]:
    """The zoo DenseNet ``name`` (None: the stored or inferred architecture) with the
    checkpoint's classes and input channels unless ``overrides`` says otherwise, loaded."""
    sd = ckpt.state_dict
    config = dict(model_config(name) if name else ckpt.config or infer_config(sd))
    config.update(_shape_config(sd))
    _imagenet_meta_if_fits(ckpt, config)
    model = DenseNet(**{**config, **overrides})
    return model, load_densenet(model, sd, error)


DENSENET_LAYOUT = Layout(
    family="densenet", holds=holds_densenet, canonical=remap_state_dict, build=build_densenet,
    load=load_densenet, default_meta=lambda model: {},
    name_of=lambda model: describe_config(model.config.to_dict()))
