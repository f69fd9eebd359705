"""Look inside a DenseNet: per-layer shapes, parameters and multiply-adds.

MACs count multiply-accumulates of convolutions (1D, 2D, 3D and transposed) and the classifier
(one per weight use), the convention under which DenseNet-121 at 224x224 costs 2.87 G; a FLOP
counter that counts two per multiply-add (``torch.utils.flop_counter``) reports twice that.
BatchNorm, ReLU and pooling are not counted (they add, compare or scale; none multiplies by a
weight), so a pool's row shows 0.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from ..models.densenet import DenseBlock, DenseNetConfig, Transition
from ..models.fcdensenet import FCDenseNet, FCDenseNetConfig
from ..models.rdnet import RDNet, RDNetConfig
from ..models.registry import family_of, model_kinds, zoo_name


@dataclass
class Row:
    """One line of a summary: a stem op, dense layer, block, transition, pool or classifier."""

    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    macs: int
    depth: int = 0  # 1 for dense layers listed under their block
    connections: int | None = None  # direct connections, for dense blocks


@dataclass
class Summary:
    """The result of :func:`summary`; ``print()`` renders the table."""

    model_name: str
    input_size: tuple[int, ...]
    rows: list[Row] = field(default_factory=list)
    total_params: int = 0
    trainable_params: int = 0
    total_macs: int = 0

    def to_dict(self) -> dict:
        return {
            "model": self.model_name,
            "input_size": list(self.input_size),
            "rows": [dict(asdict(r), output_shape=list(r.output_shape)) for r in self.rows],
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "total_macs": self.total_macs,
            "macs_convention": "multiply-adds of conv and linear layers",
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self):
        """A rich Table of the rows and totals."""
        from rich.table import Table

        t = Table(title=f"{self.model_name}  input {tuple(self.input_size)}", show_lines=False)
        for col, just in (("layer", "left"), ("kind", "left"), ("output shape", "right"),
                          ("params", "right"), ("MACs", "right"), ("connections", "right")):
            t.add_column(col, justify=just)
        for r in self.rows:
            indent = "  " * r.depth
            t.add_row(indent + r.name, r.kind, "x".join(map(str, r.output_shape)),
                      f"{r.params:,}", human(r.macs),
                      "" if r.connections is None else str(r.connections))
        t.add_section()
        t.add_row("total", "", "", f"{self.total_params:,}", human(self.total_macs), "")
        return t

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=110, record=True, file=_Null(), color_system=None)
        console.print(self.table())
        console.print(f"MACs = multiply-adds of conv and linear layers "
                      f"({self.total_macs / 1e9:.3f} G; x2 for FLOPs)")
        return console.export_text().rstrip()

    def __repr__(self) -> str:
        # Short on purpose: the generated dataclass repr spells out every row (10,000+
        # characters for DenseNet-121), which is what a notebook cell would echo.
        return (f"Summary({self.model_name!r}, input {tuple(self.input_size)}, "
                f"{self.total_params:,} params, {human(self.total_macs)} MACs, "
                f"{len(self.rows)} rows)")

    def _repr_pretty_(self, p, cycle: bool) -> None:
        """IPython's text display: the table."""
        p.text(repr(self) if cycle else str(self))

    def _repr_html_(self) -> str:
        """Jupyter's display: the table as HTML."""
        from html import escape

        right = ' style="text-align:right"'
        head = "".join(f"<th{'' if c in ('layer', 'kind') else right}>{c}</th>"
                       for c in ("layer", "kind", "output shape", "params", "MACs",
                                 "connections"))
        body = []
        for r in self.rows:
            cells = ["x".join(map(str, r.output_shape)), f"{r.params:,}", human(r.macs),
                     "" if r.connections is None else str(r.connections)]
            body.append(f'<tr><td style="text-align:left;padding-left:{0.3 + 1.5 * r.depth}em">'
                        f"{escape(r.name)}</td><td style=\"text-align:left\">{escape(r.kind)}"
                        f"</td>" + "".join(f"<td{right}>{c}</td>" for c in cells) + "</tr>")
        body.append(f"<tr><th>total</th><td></td><td></td><td{right}>{self.total_params:,}</td>"
                    f"<td{right}>{human(self.total_macs)}</td><td></td></tr>")
        return (f"<table><caption>{escape(self.model_name)}  input "
                f"{tuple(self.input_size)}</caption><thead><tr>{head}</tr></thead><tbody>"
                + "".join(body) + "</tbody></table><p>MACs = multiply-adds of conv and linear "
                f"layers ({self.total_macs / 1e9:.3f} G; x2 for FLOPs)</p>")


class _Null:
    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass


def human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _leaf_macs(module: nn.Module, out: torch.Tensor, inp: torch.Tensor) -> int:
    kernel = math.prod(getattr(module, "kernel_size", ()))
    if isinstance(module, nn.modules.conv._ConvTransposeNd):  # each input meets every tap once
        return inp.numel() * (module.out_channels // module.groups) * kernel
    if isinstance(module, nn.modules.conv._ConvNd):
        return out.numel() * (module.in_channels // module.groups) * kernel
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features
    return 0


class Part(NamedTuple):
    """One row to be: a module of the model, what to call it, and how to count it."""

    name: str
    kind: str
    module: nn.Module
    depth: int = 0
    grows: bool = False  # a dense layer: its row shows the block's width after it
    connections: int | None = None  # a dense block's direct connections


def _densenet_parts(model: nn.Module) -> list[Part]:
    """A DenseNet's rows: each stem op, dense block with its layers, transition, the head."""
    items: list[Part] = []
    for name, m in model.features.named_children():
        if isinstance(m, DenseBlock):
            items.append(Part(name, f"dense block ({m.num_layers} layers)", m,
                              connections=m.num_connections))
            for lname, layer in m.named_children():
                items.append(Part(lname, f"dense layer (+{layer.growth_rate})", layer, 1, True))
        elif isinstance(m, Transition):
            items.append(Part(name, "transition", m))
        else:
            items.append(Part(name, type(m).__name__, m))
    items.append(Part("global_pool", _pool_kind(model.global_pool), model.global_pool))
    items.append(Part("classifier", "Linear", model.classifier))
    return items


def _pool_kind(pool: nn.Module) -> str:
    """The head's pooling by its class (AdaptiveAvgPool1d/2d/3d follow the rank); a head
    without pooling says so."""
    return "no pooling" if isinstance(pool, nn.Identity) else type(pool).__name__


def _rdnet_parts(model: RDNet) -> list[Part]:
    """An RDNet's rows: the stem, each mixing block with its transition and feature mixers."""
    items = [Part("stem", "patchify stem + LayerNorm", model.stem)]
    for i, block in enumerate(model.dense_stages):
        *transition, mixers = list(block.children())
        down = transition and transition[1].stride[0] > 1
        items.append(Part(f"mixing block {i}", f"{len(mixers._modules)} mixers, "
                          f"+{mixers.dense_block0.growth_rate} each", block,
                          connections=mixers.num_connections))
        if transition:
            items.append(Part("transition norm", "LayerNorm", transition[0], 1))
            items.append(Part("transition", "patch merging 2x2/2" if down else "1x1 conv",
                              transition[1], 1))
        for name, mixer in mixers.named_children():
            items.append(Part(name, f"feature mixer (+{mixer.growth_rate})", mixer, 1, True))
    items.append(Part("head", "pool, LayerNorm, linear", model.head))
    return items


def _fcdensenet_parts(model: FCDenseNet) -> list[Part]:
    """An FC-DenseNet's rows: the first convolution, each dense block with its layers, each
    transition down and up, the bottleneck block, the final 1x1 convolution."""
    items: list[Part] = []
    for name, m in model.named_children():
        if isinstance(m, DenseBlock):
            items.append(Part(name, f"dense block ({m.num_layers} layers)", m,
                              connections=m.num_connections))
            for lname, layer in m.named_children():
                items.append(Part(lname, f"dense layer (+{layer.growth_rate})", layer, 1, True))
        else:
            # the first and last convolutions by their kernel (3x3x3 and 1x1x1 in 3D)
            kind = f"{'x'.join(map(str, m.kernel_size))} conv" if isinstance(
                m, nn.modules.conv._ConvNd) else name.rstrip("0123456789").replace("_", " ")
            items.append(Part(name, kind, m))
    return items


def _fcdensenet_terms(c: FCDenseNetConfig) -> dict[str, Any]:
    """An FC-DenseNet in DenseNet's terms: its blocks down, the bottleneck's and up, in order;
    no bottleneck layers, transitions that keep every channel."""
    return {"growth_rate": c.growth_rate,
            "block_config": [*c.down_blocks, c.bottleneck_layers, *c.up_blocks],
            "bottleneck": False, "compression": 1.0, "stem": "3x3 conv",
            "num_classes": c.num_classes}


def _densenet_terms(c: DenseNetConfig) -> dict[str, Any]:
    return {"growth_rate": c.growth_rate, "block_config": list(c.block_config),
            "bottleneck": c.bottleneck, "compression": c.compression, "stem": c.stem,
            "num_classes": c.num_classes}


def _rdnet_terms(c: RDNetConfig) -> dict[str, Any]:
    """An RDNet in DenseNet's terms: one growth rate per mixing block, a patchify stem."""
    return {"growth_rate": list(c.growth_rates),
            "block_config": [c.mixers_per_block] * len(c.growth_rates), "bottleneck": True,
            "compression": c.compression, "stem": "patchify", "num_classes": c.num_classes}


@dataclass(frozen=True)
class _View:
    """How a family's model is tabulated: its rows, and its config in the listings' terms."""

    parts: Callable[[Any], list[Part]]
    terms: Callable[[Any], dict[str, Any]]


# One view per model family, by the registry's family name.
VIEWS = {"densenet": _View(_densenet_parts, _densenet_terms),
         "rdnet": _View(_rdnet_parts, _rdnet_terms),
         "fcdensenet": _View(_fcdensenet_parts, _fcdensenet_terms)}


def _view(model: nn.Module, what: str) -> _View:
    family = family_of(model)
    if family is None:
        raise TypeError(f"{what} expects a densenets {model_kinds()}, got "
                        f"{type(model).__name__}")
    return VIEWS[family.name]


def spatial_dims(model: nn.Module) -> int:
    """The model's spatial rank: 1 (signals), 2 (images) or 3 (volumes)."""
    return int(getattr(model.config, "spatial_dims", 2))


SIDES = {1: "L", 2: "H W", 3: "D H W"}  # each rank's spatial sides, for messages


def batch_size_of(model: nn.Module, input_size: tuple[int, ...] | None) -> tuple[int, ...]:
    """``input_size`` as a batch (N, C, *sides) for ``model``: (C, *sides) gains N = 1, and
    None is the model's native size (its ``pretrained_cfg``'s, one side per spatial
    dimension). Raises ValueError in one line when the number of sides is not the rank's."""
    if input_size is None:
        input_size = tuple(model.pretrained_cfg["input_size"])
    size = tuple(int(s) for s in input_size)
    dims = spatial_dims(model)
    if len(size) == dims + 1:
        size = (1, *size)
    if len(size) != dims + 2 or min(size) < 1:
        raise ValueError(f"input_size must be (N, C, {SIDES[dims].replace(' ', ', ')}) or "
                         f"(C, {SIDES[dims].replace(' ', ', ')}) with positive sizes for this "
                         f"{dims}D model, got {tuple(input_size)}")
    return size


def summary(model: nn.Module, input_size: tuple[int, ...] | None = None,
            name: str | None = None) -> Summary:
    """Run one forward pass (eval mode, no grad) and tabulate every stem op, dense layer,
    dense block, transition, pool and the classifier (an FC-DenseNet: its blocks and
    transitions down and up, to the map of class scores).

    ``input_size`` is (N, C, *sides) or (C, *sides) with one side per spatial dimension (L;
    H, W; D, H, W); None is the model's native size (its ``pretrained_cfg["input_size"]``,
    such as 3x224x224, or 1x96x96x96 for a one-channel 3D DenseNet-121). A dense layer's row
    shows the block's concatenated feature map after that layer (k channels more than the
    row before). The model's train/eval mode is restored afterwards; nothing in it changes.
    The summary is titled ``name``, else the zoo entry the model was created from
    (``create_model``'s name, or the one its loaded weights carry), else its class.
    """
    parts = _view(model, "summary").parts(model)
    size = batch_size_of(model, input_size)
    param = next(model.parameters())
    x = torch.zeros(size, device=param.device, dtype=param.dtype)
    model.check_input(x)

    macs: dict[nn.Module, int] = {}
    shapes: dict[nn.Module, tuple[int, ...]] = {}

    def leaf_hook(m: nn.Module, inp, out) -> None:
        macs[m] = macs.get(m, 0) + _leaf_macs(m, out, inp[0])

    grows = {p.module for p in parts if p.grows}

    def shape_hook(m: nn.Module, inp, out) -> None:
        if m in grows:
            # Show the block's concatenated width after this layer, as the paper counts it.
            prev = inp[0] if isinstance(inp[0], list) else [inp[0]]  # a mixer reads a list
            n, _, *sides = prev[0].shape
            shapes[m] = (n, sum(t.shape[1] for t in prev) + out.shape[1], *sides)
        else:
            shapes[m] = tuple(out.shape)

    handles = [m.register_forward_hook(leaf_hook) for m in model.modules()
               if isinstance(m, nn.modules.conv._ConvNd | nn.Linear)]
    handles += [p.module.register_forward_hook(shape_hook) for p in parts]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()

    result = Summary(name or zoo_name(model) or type(model).__name__, size)
    for p in parts:
        row_macs = sum(macs.get(sub, 0) for sub in p.module.modules())
        result.rows.append(Row(p.name, p.kind, shapes[p.module], count_params(p.module),
                               row_macs, p.depth, p.connections))
    result.total_params = count_params(model)
    result.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result.total_macs = sum(macs.values())
    return result


def model_stats(name: str, **overrides) -> dict:
    """Parameters and MACs of a zoo model at its native input size (its ``pretrained_cfg``'s),
    computed on the meta device (shapes only, no memory, no arithmetic)."""
    if not overrides:  # the zoo's fixed entries: computed once per process
        return json.loads(_cached_stats(name.strip().lower()))
    return _stats(name, overrides)


@functools.cache
def _cached_stats(name: str) -> str:
    """As JSON, so no caller can change the cached copy: `models` lists every zoo entry and
    `paper` most of them again, and on the meta device an RDNet's hundreds of LayerNorms still
    cost seconds."""
    return json.dumps(_stats(name, {}))


def _stats(name: str, overrides: dict) -> dict:
    from ..factory import create_model

    with torch.device("meta"):
        model = create_model(name, **overrides)
    size = (1, *model.pretrained_cfg["input_size"])
    s = summary(model, size, name=name)
    return {"name": name, "input_size": list(size[1:]), "params": s.total_params,
            "macs": s.total_macs, **_view(model, "model_stats").terms(model.config)}


def rdnet_table() -> dict:
    """The published RDNet sizes (params, GMACs, top-1) beside our computed counts."""
    from . import paper

    rows = []
    for name, params_m, gmacs, side, top1 in paper.RDNET_ROWS:
        st = model_stats(name)
        rows.append({**st, "paper_params_m": params_m, "paper_gmacs": gmacs,
                     "params_match": round(st["params"] / 1e6) == params_m,
                     "macs_match": round(st["macs"] / 1e9, 1) == gmacs, "top1_acc": top1,
                     "paper_input": side})
    return {"rdnet": rows, "rdnet_large_384_top1_acc": paper.RDNET_LARGE_384_TOP1}


def paper_tables() -> dict:
    """Table 1 and Table 2 of the paper beside our computed parameter counts and MACs."""
    from . import paper

    t1 = []
    for name, tv_params, e1, e10, t5_1, t5_10, tv1, tv5 in paper.IMAGENET_ROWS:
        st = model_stats(name)
        t1.append({**st, "torchvision_params": tv_params,
                   "params_match": tv_params is None or tv_params == st["params"],
                   "top1_err_1crop": e1, "top1_err_10crop": e10,
                   "top5_err_1crop": t5_1, "top5_err_10crop": t5_10,
                   "torchvision_top1_acc": tv1, "torchvision_top5_acc": tv5})
    t2 = []
    for name, params_m, *errors in paper.TABLE2_ROWS:
        st = model_stats(name)
        t2.append({**st, "paper_params_m": params_m,
                   "params_match": round(st["params"] / 1e6, 1) == params_m,
                   "errors": dict(zip(paper.TABLE2_COLUMNS, errors, strict=True))})
    for name, params_m, c10p, c100p in paper.WIDE_SHALLOW_ROWS:
        st = model_stats(name)
        t2.append({**st, "paper_params_m": params_m,
                   "params_match": round(st["params"] / 1e6, 1) == params_m,
                   "errors": {"C10": None, "C10+": c10p, "C100": None, "C100+": c100p,
                              "SVHN": None}})
    return {"table1": t1, "table2": t2, **rdnet_table(),
            "macs_convention": "multiply-adds of conv and linear layers; FLOPs = 2 x MACs"}
