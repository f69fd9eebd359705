"""Pictures of a DenseNet drawn from the model itself, so they are right for any configuration.

Two panels: the network (input, stem, dense blocks, transitions, head, with channel counts and
spatial sizes from a shape-only forward pass) and one dense block's connections, drawn as in
the paper's Figure 1: node 0 is the block input x_0, node l is layer H_l and its output x_l, and
an arc joins x_s to H_l for every s < l. Layer l has l inputs, so the arcs number L(L+1)/2; the
L+1 maps the block hands on (concatenated into the transition or the head) are drawn dashed
below the line and counted apart.

Every arc is its own artist with an SVG id (``connection-B-S-L``, ``exit-B-S``), so the drawn
picture itself can be checked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.densenet import DenseBlock, DenseNet
from ..models.rdnet import RDNet
from ..models.registry import family_of, model_kinds
from .summary import SIDES, spatial_dims, summary

FORMATS = (".svg", ".png")


@dataclass
class Stage:
    """One box of the overview: what it is, its output channels and spatial size (one side
    per spatial dimension: L; H, W; D, H, W)."""

    name: str
    kind: str  # input | stem | block | transition | head
    lines: list[str]
    channels: int
    size: tuple[int, ...]
    num_layers: int | None = None
    connections: int | None = None


def default_input_size(model: nn.Module) -> tuple[int, ...]:
    """(C, *sides) the model was designed for, as its ``pretrained_cfg`` says: 224 for ImageNet
    stems and RDNets, 32 for CIFAR stems, 96 per side for 3D ImageNet stems."""
    return tuple(model.pretrained_cfg["input_size"])


def network_stages(model: nn.Module, input_size: tuple[int, ...] | None = None
                   ) -> list[Stage]:
    """The overview's boxes, with shapes from a forward pass on the meta device (no compute).
    ``input_size`` is (C, *sides) with one side per spatial dimension of the model."""
    drawing = _drawing(model)
    size = tuple(int(s) for s in (input_size or default_input_size(model)))
    dims = spatial_dims(model)
    if len(size) != dims + 1 or min(size) < 1:
        raise ValueError(f"the input size takes C and {dims} spatial side(s) ({SIDES[dims]}) "
                         f"for this {dims}D model, got {' '.join(map(str, size))}")
    return drawing.stages(model, size)


def _kernel(n: int, dims: int) -> str:
    """A kernel or window of side ``n`` in ``dims`` dimensions: 3×3, 3×3×3, 3."""
    return "×".join([str(n)] * dims)


def _sides(s: tuple[int, ...]) -> str:
    return "×".join(map(str, s))


def _densenet_stages(model: DenseNet, size: tuple[int, ...]) -> list[Stage]:
    """A DenseNet's boxes: the stem, each dense block and transition, the head."""
    c, sides = size[0], size[1:]
    cfg = model.config
    d = cfg.spatial_dims
    with torch.device("meta"):
        shadow = DenseNet(**{**cfg.to_dict(), "memory_efficient": False})
    rows = {r.name: r for r in summary(shadow, (1, *size)).rows if r.depth == 0}
    stages = [Stage("input", "input", ["input", f"{c}×{_sides(sides)}"], c, sides)]
    if cfg.stem == "imagenet":
        s = rows["pool0"].output_shape
        convs = [f"3× conv {_kernel(3, d)} (first /2)"] if cfg.deep_stem else \
            [f"conv {_kernel(7, d)}/2"]
        ops = [*convs, "BN-ReLU", "max pool 3×3 + blur /2" if cfg.blur_pool else
               f"max pool {_kernel(3, d)}/2"]
    else:
        s = rows["conv0"].output_shape
        ops = [f"conv {_kernel(3, d)}"]
    stages.append(Stage("stem", "stem", ["stem", *ops, _shape(s)], s[1], s[2:]))
    in_ch = s[1]
    for i, _ in enumerate(cfg.block_config, start=1):
        block: DenseBlock = getattr(model.features, f"denseblock{i}")
        s = rows[f"denseblock{i}"].output_shape
        stages.append(Stage(
            f"denseblock{i}", "block",
            [f"dense block {i}", f"{block.num_layers} layers, k={block.growth_rate}",
             f"{in_ch} → {s[1]} ch", _sides(s[2:]), f"{block.num_connections} connections"],
            s[1], s[2:], block.num_layers, block.num_connections))
        if f"transition{i}" in rows:
            s = rows[f"transition{i}"].output_shape
            stages.append(Stage(f"transition{i}", "transition",
                                [f"transition {i}", "BN-ReLU", f"conv {_kernel(1, d)}",
                                 f"avg pool {_kernel(2, d)}/2", _shape(s)], s[1], s[2:]))
            in_ch = s[1]
    stages.append(Stage("head", "head",
                        ["head", "BN-ReLU", "global pool", "linear",
                         f"{model.num_features} → {cfg.num_classes}"],
                        cfg.num_classes, (1,) * d))
    return stages


def _rdnet_stages(model: RDNet, size: tuple[int, ...]) -> list[Stage]:
    """RDNet's boxes (2D only): the patchify stem, each transition and mixing block, the
    head."""
    c, sides = size[0], size[1:]
    cfg = model.config
    with torch.device("meta"):
        shadow = RDNet(**cfg.to_dict())
    rows = summary(shadow, (1, *size)).rows
    p = cfg.patch_size
    stages = [Stage("input", "input", ["input", f"{c}×{_sides(sides)}"], c, sides)]
    for i, r in enumerate(rows):
        s = r.output_shape
        if r.name == "stem":
            stages.append(Stage("stem", "stem", ["stem", f"patchify {p}×{p}/{p}", "LayerNorm",
                                                 _shape(s)], s[1], s[2:]))
        elif r.name.startswith("mixing block"):
            b = int(r.name.rsplit(" ", 1)[1])
            stack = model.dense_stages[b][-1]
            stages.append(Stage(
                f"denseblock{b + 1}", "block",
                [f"mixing block {b + 1}", f"{stack.num_layers} mixers, GR={stack.growth_rate}",
                 f"{stack.in_channels} → {s[1]} ch", _sides(s[2:]),
                 f"{stack.num_connections} connections"], s[1], s[2:],
                stack.num_layers, stack.num_connections))
            # its transition row follows it in the summary; draw it before the block
            nxt = rows[i + 1] if i + 1 < len(rows) else None
            if nxt is not None and nxt.name == "transition norm":
                t = next(x for x in rows[i + 1:] if x.name == "transition")
                merge = "merge 2×2/2" if "merging" in t.kind else "conv 1×1"
                ts = t.output_shape
                stages.insert(len(stages) - 1, Stage(
                    f"transition{b}", "transition", [f"transition {b}", "LayerNorm", merge,
                                                     _shape(ts)], ts[1], ts[2:]))
    stages.append(Stage("head", "head", ["head", "global pool", "LayerNorm", "linear",
                                         f"{model.num_features} → {cfg.num_classes}"],
                        cfg.num_classes, (1, 1)))
    return stages


def _shape(s: tuple[int, ...]) -> str:
    """A map's channels and sides, without the batch: 64×56×56."""
    return _sides(s[1:])


_COLOURS = {"input": "#e8e8e8", "stem": "#cfe2f3", "block": "#f9cb9c", "transition": "#b6d7a8",
            "head": "#d9d2e9"}


def draw_overview(ax, stages: list[Stage], highlight: int | None = None) -> None:
    """Boxes left to right joined by arrows; the block drawn below is outlined in red."""
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    width, gap = 1.0, 0.35
    for i, st in enumerate(stages):
        x = i * (width + gap)
        tall = st.kind == "block"
        hgt = 1.1 if tall else 0.95
        edge = "#cc0000" if tall and st.name == f"denseblock{highlight}" else "#444444"
        ax.add_patch(FancyBboxPatch((x, -hgt / 2), width, hgt, boxstyle="round,pad=0.02",
                                    facecolor=_COLOURS[st.kind], edgecolor=edge,
                                    linewidth=2.0 if edge == "#cc0000" else 1.0,
                                    gid=f"stage-{st.name}"))
        text = "\n".join(st.lines)
        ax.text(x + width / 2, 0, text, ha="center", va="center", fontsize=7,
                fontweight="normal", linespacing=1.3)
        if i:
            ax.add_patch(FancyArrowPatch((x - gap, 0), (x, 0), arrowstyle="-|>",
                                         mutation_scale=10, color="#444444"))
    ax.set_xlim(-0.1, len(stages) * (width + gap) - gap + 0.1)
    ax.set_ylim(-0.6, 0.6)
    ax.set_aspect("auto")
    ax.axis("off")


def draw_block(ax, block: DenseBlock, index: int, exit_name: str = "transition") -> dict:
    """One dense block's wiring; returns the number of arcs drawn of each kind."""
    from matplotlib.patches import PathPatch
    from matplotlib.path import Path as MplPath

    L = block.num_layers
    dense = exits = 0
    # Deep blocks have thousands of arcs: fainter, thinner lines keep the pattern visible.
    alpha = max(0.12, min(0.6, 8 / L))
    width = 0.9 if L <= 16 else 0.5
    for l_ in range(1, L + 1):
        for s in range(l_):
            ax.add_patch(PathPatch(_arc(MplPath, s, l_, up=True), facecolor="none",
                                   edgecolor="#cc4125", alpha=alpha, linewidth=width,
                                   gid=f"connection-{index}-{s}-{l_}"))
            dense += 1
    for s in range(L + 1):
        ax.add_patch(PathPatch(_arc(MplPath, s, L + 1, up=False), facecolor="none",
                               edgecolor="#6d9eeb", alpha=max(alpha, 0.3), linewidth=width,
                               linestyle="--", gid=f"exit-{index}-{s}"))
        exits += 1
    # Markers, not patches, for the nodes: they stay round on the panel's free aspect ratio.
    slot = ax.figure.get_figwidth() * 72 / (L + 3)
    size = min(600.0, (0.6 * slot) ** 2)
    colours = ["#e8e8e8"] + ["#f9cb9c"] * L + ["#b6d7a8"]
    ax.scatter(range(L + 2), [0] * (L + 2), s=size, c=colours, edgecolors="#444444", zorder=3)
    step = max(1, round(L / 16))
    for node in range(L + 2):
        if node in (0, L + 1) or node % step == 0:
            label = "x₀" if node == 0 else ("T" if exit_name == "transition" else "C") \
                if node == L + 1 else f"H{node}"
            ax.text(node, 0, label, ha="center", va="center", fontsize=6 if L > 12 else 8,
                    zorder=4)
    reach = _height(L + 1)
    ax.set_xlim(-1, L + 2)
    ax.set_ylim(-reach - 0.6, reach + 0.6)
    ax.axis("off")
    k = block.growth_rate
    ax.set_title(
        f"Dense block {index}: {L} layers, k={k}, {block.in_channels} → {block.out_channels} "
        f"channels. L(L+1)/2 = {dense} connections into its layers (above), "
        f"{exits} into the {exit_name} (below, dashed)", fontsize=9)
    return {"block": index, "num_layers": L, "connections": dense, "exit_connections": exits}


def _arc(MplPath, s: int, t: int, up: bool):
    """A quadratic curve from node s to node t whose height grows with the distance."""
    h = _height(t - s) * (1 if up else -1)
    y0 = 0.0
    # A quadratic Bezier peaks at half its control point's height.
    return MplPath([(s, y0), ((s + t) / 2, y0 + 2 * h), (t, y0)],
                   [MplPath.MOVETO, MplPath.CURVE3, MplPath.CURVE3])


def _height(span: int) -> float:
    """Arc height for a span of nodes: sub-linear, so deep blocks stay wide rather than tall."""
    return 0.45 * span ** 0.75


def _densenet_title(model: DenseNet, n: int, params: int) -> str:
    return (f"DenseNet: {n} dense blocks {tuple(model.config.block_config)}, "
            f"k={model.config.growth_rate}, {params:,} parameters")


def _rdnet_title(model: RDNet, n: int, params: int) -> str:
    return (f"RDNet: {n} mixing blocks, growth rates {min(model.config.growth_rates)}-"
            f"{max(model.config.growth_rates)}, {params:,} parameters")


@dataclass(frozen=True)
class _Drawing:
    """How a family's model is drawn: its overview boxes, its dense blocks, its title."""

    stages: Callable[[Any, tuple[int, ...]], list[Stage]]
    blocks: Callable[[Any], list[nn.Module]]  # with num_layers, growth_rate, connections...
    title: Callable[[Any, int, int], str]  # model, number of blocks, parameters


# One drawing per model family, by the registry's family name.
DRAWINGS = {
    "densenet": _Drawing(_densenet_stages, lambda m: [
        getattr(m.features, f"denseblock{i}") for i in range(1, len(m.config.block_config) + 1)],
        _densenet_title),
    "rdnet": _Drawing(_rdnet_stages, lambda m: [stage[-1] for stage in m.dense_stages],
                      _rdnet_title),
}


def _drawing(model: nn.Module) -> _Drawing:
    family = family_of(model)
    if family is None:
        raise TypeError(f"diagrams draw a densenets {model_kinds()}, got "
                        f"{type(model).__name__}")
    if family.name not in DRAWINGS:  # an encoder-decoder is no chain of blocks to one head
        raise ValueError(f"diagrams draw classification networks ({', '.join(DRAWINGS)}); an "
                         f"{type(model).__name__} is not drawn: its layers are listed by "
                         "densenets summary")
    return DRAWINGS[family.name]


def draw(model: nn.Module, block: int = 1, input_size: tuple[int, ...] | None = None,
         title: str | None = None):
    """The figure of the network and dense block ``block`` (1-based), and what was drawn:
    the stages and the block's connection counts."""
    drawing = _drawing(model)
    blocks = drawing.blocks(model)
    n = len(blocks)
    if not 1 <= block <= n:
        raise ValueError(f"--block must be between 1 and {n} (this model has {n} dense blocks), "
                         f"got {block}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = network_stages(model, input_size)
    dense_block = blocks[block - 1]
    L = dense_block.num_layers
    width = max(10.0, 1.15 * len(stages), 0.25 * (L + 3))
    block_h = 4.0 if L <= 24 else 5.0
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(width, 2.2 + block_h),
                                      gridspec_kw={"height_ratios": [2.0, block_h]})
    draw_overview(top, stages, highlight=block)
    exit_name = "transition" if block < n else "classifier"
    counts = draw_block(bottom, dense_block, block, exit_name)
    params = sum(p.numel() for p in model.parameters())
    fig.suptitle(title or drawing.title(model, n, params), fontsize=11)
    fig.tight_layout()
    return fig, {"stages": [asdict(s) for s in stages], **counts}


def diagram(model: nn.Module, path: str | Path, block: int = 1,
            input_size: tuple[int, ...] | None = None, title: str | None = None) -> dict:
    """Draw the network and dense block ``block`` (1-based) to ``path`` (.svg or .png).

    ``input_size`` (C, *sides: L, H W or D H W by the model's rank) sets the sizes shown;
    by default the model's native size.

    Returns what was drawn: the stages and the block's connection counts.
    """
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise ValueError(f"diagram output must end in .svg or .png, got {path.name!r}")
    fig, info = draw(model, block, input_size, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"path": str(path), **info}
