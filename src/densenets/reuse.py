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
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

NORMALISATIONS = ("none", "target")

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
                "matrix": [[None if math.isnan(v) else v for v in row] for row in self.matrix]}


def _state_dict(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> Mapping:
    if isinstance(model_or_state, nn.Module):
        return model_or_state.state_dict()
    return model_or_state


def _source_means(weight: torch.Tensor, bounds: Sequence[range]) -> list[float]:
    """Mean |w| over each slice of input channels (dim 1), in float64."""
    w = weight.detach().to("cpu", torch.float64).abs()
    return [float(w[:, r.start:r.stop].mean()) for r in bounds]


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
            means = _source_means(w, [reuse.source_channels(s) for s in range(t)])
            reuse.matrix.append(means + [math.nan] * (L + 1 - t))
        result.append(reuse)
    return result


def _growth_rate(sd: Mapping, block: int, convs: list[torch.Tensor]) -> int:
    """k: the channels each layer adds, read from consecutive layers or the last conv's width."""
    if len(convs) > 1:
        return int(convs[1].shape[1] - convs[0].shape[1])
    prefix = f"features.denseblock{block}.denselayer1."
    last = sd.get(prefix + "conv2.weight", sd[prefix + "conv1.weight"])
    return int(last.shape[0])


def normalise(reuse: BlockReuse, how: str = "none") -> list[list[float]]:
    """The matrix as drawn: raw (``none``) or each target row scaled to a maximum of 1
    (``target``), which compares sources within a layer when layers differ in scale."""
    if how not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {how!r}")
    if how == "none":
        return [list(row) for row in reuse.matrix]
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
         normalisation: str = "none"):
    """One heatmap per block, target layer on x and source layer on y as in the paper.

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
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    for ax, b in zip(axes.flat, blocks, strict=False):
        # Rows of the image are sources, columns targets: the transpose of matrix[t][s].
        img = np.array(normalise(b, normalisation), dtype=float).T
        im = ax.imshow(np.ma.masked_invalid(img), cmap=cmap, origin="upper", aspect="equal",
                       interpolation="nearest")
        ax.set_title(f"Dense block {b.block} ({b.num_layers} layers)")
        ax.set_xlabel("target layer (l)")
        ax.set_ylabel("source layer (s)")
        _ticks(ax.set_xticks, ax.set_xticklabels, b.targets, start=0)
        _ticks(ax.set_yticks, ax.set_yticklabels, b.sources, start=0)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    label = "max-normalised per target" if normalisation == "target" else "mean |w|"
    fig.suptitle(title or f"Feature reuse ({label}; last column: "
                 f"{'transition / ' if n > 1 else ''}classifier)")
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
