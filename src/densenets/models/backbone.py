"""DenseNet as a backbone: the feature maps after the stem and after each dense block.

``create_model(name, features_only=True)`` returns a :class:`FeatureExtractor` whose
``forward`` gives a list of maps and whose ``feature_info`` lists channels and reduction
(input size / map size) per map, as timm's ``features_only`` models do. The last map is taken
after the final BN-ReLU, like ``forward_features``; the others are the raw dense block outputs
(their BN-ReLU belongs to the next transition).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .densenet import DenseNet


class FeatureInfo(list):
    """A list of ``{"module", "num_chs", "reduction"}`` dicts with timm's accessors."""

    def channels(self) -> list[int]:
        return [f["num_chs"] for f in self]

    def reduction(self) -> list[int]:
        return [f["reduction"] for f in self]


class FeatureExtractor(nn.Module):
    """The stem and dense blocks of a DenseNet returning intermediate maps (no classifier).

    Its state dict keeps the ``features.*`` keys of the full model, so DenseNet weights load
    into it directly. ``out_indices`` picks maps: 0 is the stem, i the i-th dense block.
    """

    def __init__(self, model: DenseNet, out_indices: Sequence[int] | None = None) -> None:
        super().__init__()
        info = [dict(f) for f in model.feature_info]
        info[-1]["module"] = "features.relu5"
        n = len(info)
        indices = tuple(range(n)) if out_indices is None else tuple(out_indices)
        bad = [i for i in indices if not -n <= i < n]
        if bad or not indices:
            raise ValueError(f"out_indices {list(indices)} must pick from 0..{n - 1} (0 = stem, "
                             f"i = dense block i) for this {n - 1}-block DenseNet")
        self.out_indices = tuple(sorted({i % n for i in indices}))
        self.feature_info = FeatureInfo(info[i] for i in self.out_indices)
        self.config = model.config
        self.weights_meta = getattr(model, "weights_meta", None)
        # Stop after the last requested map: later modules would only cost time and memory.
        taps = {info[i]["module"].split(".", 1)[1] for i in self.out_indices}
        last = info[self.out_indices[-1]]["module"].split(".", 1)[1]
        self.features = nn.Sequential()
        for name, module in model.features.named_children():
            self.features.add_module(name, module)
            if name == last:
                break
        self._taps = taps

    # The input checks read only ``config``, so the DenseNet's own serve here too.
    check_input = DenseNet.check_input
    min_input_size = DenseNet.min_input_size

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            self.check_input(x)
        out = []
        for name, module in self.features.named_children():
            x = module(x)
            if name in self._taps:
                out.append(x)
        return out
