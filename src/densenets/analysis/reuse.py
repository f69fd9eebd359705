"""Feature reuse: the paper's Figure 5, computed from a DenseNet's weights.

For every dense block, target layer l (1..L) reads the concatenation of the block input (source
s = 0) and the maps of layers 1..l-1 (sources s = 1..l-1). Cell (l, s) is the mean absolute
weight of layer l's first convolution over the input channels that source s produced, so a
source with many channels (the block input) is not favoured over one with k channels: this is
the paper's "average L1 norm normalised by the number of input feature maps". As in the paper,
the layer after the block is the last target: the transition's 1x1 convolution, or for the last
block the classification layer, each reading all L+1 sources.

The matrix comes from a state_dict in torchvision's key layout, so it works on any DenseNet
checkpoint (ours, torchvision's, a training run's) without building the model.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

# How the heatmap colours a cell: the paper's mean |w|, that scaled to each target's maximum, or
# a z-score against shuffling the target's input channels (how far from chance the cell is).
SCALES = ("mean", "target", "z")

_LAYER_RE = re.compile(r"^features\.denseblock(\d+)\.denselayer(\d+)\.conv1\.weight$")


@dataclass
class BlockReuse:
    """One dense block's matrix: ``matrix[t][s]`` is how strongly target t uses source s.

    Targets are the L dense layers then ``exit`` (the transition or classifier); sources are the
    block input (``"input"``) then layers 1..L. Cells with no connection (s >= t) are NaN.
    """

    block: int
    num_layers: int
    in_channels: int
    growth_rate: int
    exit: str  # "transition" or "classifier"
    matrix: list[list[float]]
    zscore: list[list[float]] = field(default_factory=list)

    @property
    def structure(self) -> float:
        """Mean z^2 over the cells of targets with two or more sources: about 1 when sources
        are weighted no differently than a random shuffle of input channels would give (as at
        initialisation), well above 1 when the layers favour some sources over others."""
        cells = [z for row in self.zscore for z in row if not math.isnan(z)]
        return sum(z * z for z in cells) / len(cells) if cells else math.nan

    @property
    def sources(self) -> list[str]:
        return ["input"] + [str(s) for s in range(1, self.num_layers + 1)]

    @property
    def targets(self) -> list[str]:
        return [str(t) for t in range(1, self.num_layers + 1)] + [self.exit]

    def source_channels(self, s: int) -> range:
        """The input channels of every target that source ``s`` produced."""
        if s == 0:
            return range(0, self.in_channels)
        start = self.in_channels + (s - 1) * self.growth_rate
        return range(start, start + self.growth_rate)

    def to_dict(self) -> dict:
        return {"block": self.block, "num_layers": self.num_layers,
                "in_channels": self.in_channels, "growth_rate": self.growth_rate,
                "sources": self.sources, "targets": self.targets,
                "matrix": _nulls(self.matrix), "zscore": _nulls(self.zscore),
                "structure": None if math.isnan(self.structure) else self.structure}


def _nulls(m: list[list[float]]) -> list[list[float | None]]:
    return [[None if math.isnan(v) else v for v in row] for row in m]


def _state_dict(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> Mapping:
    if isinstance(model_or_state, nn.Module):
        return model_or_state.state_dict()
    return model_or_state


def _source_stats(weight: torch.Tensor, bounds: Sequence[range]) -> tuple[list[float],
                                                                           list[float]]:
    """Mean |w| over each slice of input channels (dim 1), and its z-score, in float64.

    The z-score compares a slice's mean with what a random slice of as many input channels
    would give: under that null the slice mean has the channel means' variance / n, times the
    finite-population factor (C - n) / (C - 1). A lone slice covering every channel gets NaN.
    """
    w = weight.detach().to("cpu", torch.float64).abs()
    per_channel = w.transpose(0, 1).reshape(w.shape[1], -1).mean(1)
    C = per_channel.numel()
    mu, var = float(per_channel.mean()), float(per_channel.var(unbiased=False))
    means, zs = [], []
    for r in bounds:
        m = float(per_channel[r.start:r.stop].mean())
        n = r.stop - r.start
        spread = var / n * (C - n) / (C - 1) if C > 1 else 0.0
        means.append(m)
        zs.append((m - mu) / math.sqrt(spread) if spread > 0 else math.nan)
    return means, zs


def feature_reuse(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> list[BlockReuse]:
    """The Figure 5 matrix of every dense block of a DenseNet (a model or its state_dict).

    Raises ValueError when the weights do not have DenseNet's torchvision key layout.
    """
    sd = _state_dict(model_or_state)
    layers: dict[int, dict[int, torch.Tensor]] = {}
    for key, value in sd.items():
        if m := _LAYER_RE.match(key):
            layers.setdefault(int(m.group(1)), {})[int(m.group(2))] = value
    if not layers:
        raise ValueError("no dense layers found: expected DenseNet weights with keys like "
                         "'features.denseblock1.denselayer1.conv1.weight'")
    blocks = sorted(layers)
    result = []
    for b in blocks:
        convs = [layers[b][i] for i in sorted(layers[b])]
        L = len(convs)
        c0 = int(convs[0].shape[1])
        k = _growth_rate(sd, b, convs)
        last = b == blocks[-1]
        exit_key = "classifier.weight" if last else f"features.transition{b}.conv.weight"
        if exit_key not in sd:
            raise ValueError(f"block {b} has no {exit_key!r}; the weights are not a full DenseNet")
        reuse = BlockReuse(b, L, c0, k, "classifier" if last else "transition", [])
        exit_w = sd[exit_key]
        for t, w in enumerate([*convs, exit_w], start=1):
            expected = c0 + (t - 1) * k
            if int(w.shape[1]) != expected:
                raise ValueError(f"block {b} target {t} reads {int(w.shape[1])} channels, "
                                 f"expected {expected} (= {c0} + {t - 1} x {k})")
            means, zs = _source_stats(w, [reuse.source_channels(s) for s in range(t)])
            reuse.matrix.append(means + [math.nan] * (L + 1 - t))
            reuse.zscore.append(zs + [math.nan] * (L + 1 - t))
        result.append(reuse)
    return result


def _growth_rate(sd: Mapping, block: int, convs: list[torch.Tensor]) -> int:
    """k: the channels each layer adds, read from consecutive layers or the last conv's width."""
    if len(convs) > 1:
        return int(convs[1].shape[1] - convs[0].shape[1])
    prefix = f"features.denseblock{block}.denselayer1."
    last = sd.get(prefix + "conv2.weight", sd[prefix + "conv1.weight"])
    return int(last.shape[0])


def cell_values(reuse: BlockReuse, scale: str = "mean") -> list[list[float]]:
    """The matrix as drawn: the paper's mean |w| (``mean``), each target row scaled to a maximum
    of 1 (``target``, to compare sources within a layer when layers differ in scale), or the
    z-scores against shuffled input channels (``z``)."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if scale == "mean":
        return [list(row) for row in reuse.matrix]
    if scale == "z":
        return [list(row) for row in reuse.zscore]
    out = []
    for row in reuse.matrix:
        top = max((v for v in row if not math.isnan(v)), default=0.0)
        out.append([v / top if top > 0 and not math.isnan(v) else v for v in row])
    return out


def to_json(blocks: list[BlockReuse]) -> dict:
    """Plain JSON types; NaN cells (no connection) become null."""
    return {"format": "densenets.reuse", "version": 1,
            "measure": "mean |w| of the target's first convolution (or classifier) over the "
                       "input channels produced by the source",
            "blocks": [b.to_dict() for b in blocks]}


def write_json(blocks: list[BlockReuse], path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_json(blocks), indent=2) + "\n")


def write_csv(blocks: list[BlockReuse], path: str | Path) -> None:
    """One row per connection: block, target, source, mean_abs_weight."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["block", "target", "source", "mean_abs_weight"])
        for b in blocks:
            for t, row in zip(b.targets, b.matrix, strict=True):
                for s, v in zip(b.sources, row, strict=True):
                    if not math.isnan(v):
                        w.writerow([b.block, t, s, repr(v)])


def plot(blocks: list[BlockReuse], path: str | Path | None = None, title: str | None = None,
         scale: str = "mean"):
    """One heatmap per block, target layer on x and source layer on y as in the paper;
    ``scale`` picks the cell values (see :func:`cell_values`).

    Saves to ``path`` (format from its suffix) when given; returns the matplotlib Figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(blocks)
    # Up to three blocks in a row (the paper's CIFAR nets); four ImageNet blocks as a 2x2 grid.
    cols = n if n <= 3 else math.ceil(n / 2)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols + 0.6, 4.2 * rows + 0.4),
                             squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    # z-scores are signed around chance: a diverging map centred on 0.
    cmap = matplotlib.colormaps["RdBu_r" if scale == "z" else "viridis"].with_extremes(
        bad="white")
    for ax, b in zip(axes.flat, blocks, strict=False):
        # Rows of the image are sources, columns targets: the transpose of matrix[t][s].
        img = np.array(cell_values(b, scale), dtype=float).T
        limits = {}
        if scale == "z":
            top = max(3.0, float(np.nanmax(np.abs(img))) if np.isfinite(img).any() else 3.0)
            limits = {"vmin": -top, "vmax": top}
        im = ax.imshow(np.ma.masked_invalid(img), cmap=cmap, origin="upper", aspect="equal",
                       interpolation="nearest", **limits)
        ax.set_title(f"Dense block {b.block} ({b.num_layers} layers)\n"
                     f"structure {b.structure:.2f} (1 = chance)", fontsize=10)
        ax.set_xlabel("target layer (l)")
        ax.set_ylabel("source layer (s)")
        _ticks(ax.set_xticks, ax.set_xticklabels, b.targets, start=0)
        _ticks(ax.set_yticks, ax.set_yticklabels, b.sources, start=0)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    label = {"mean": "mean |w| per source channel", "target": "mean |w|, max per target = 1",
             "z": "z-score against shuffled input channels"}[scale]
    fig.suptitle(f"{title or 'Feature reuse'}: {label}; last column: "
                 f"{'transition / ' if n > 1 else ''}classifier")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig


def _ticks(set_ticks, set_labels, labels: list[str], start: int) -> None:
    """Label at most ~13 ticks so deep blocks stay readable; always keep the first and last."""
    step = max(1, math.ceil(len(labels) / 13))
    idx = sorted(set(range(0, len(labels), step)) | {len(labels) - 1})
    short = {"input": "in", "transition": "T", "classifier": "C"}
    set_ticks([start + i for i in idx])
    set_labels([short.get(labels[i], labels[i]) for i in idx], fontsize=8)
