"""DenseNet as a backbone: the feature maps after the stem and after each dense block.

``create_model(name, features_only=True)`` returns a :class:`FeatureExtractor` whose
``forward`` gives a list of maps and whose ``feature_info`` lists channels and reduction
(input size / map size) per map, as timm's ``features_only`` models do. The last map is taken
after the final BN-ReLU, like ``forward_features``; the others are the raw dense block outputs
(their BN-ReLU belongs to the next transition).

The stem map here is the stem's output after its max pool (reduction 4 for ImageNet stems),
as this library has always given it; the DenseNet's own ``feature_info`` and
``forward_intermediates`` tap the stem where timm does, before the pool (reduction 2).
``out_indices`` follows timm: a sequence picks maps, an int n the last n.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .contract import is_eager, take_indices
from .densenet import DenseNet


class FeatureInfo(list):
    """A list of ``{"module", "num_chs", "reduction"}`` dicts with timm's accessors."""

    def channels(self) -> list[int]:
        return [f["num_chs"] for f in self]

    def reduction(self) -> list[int]:
        return [f["reduction"] for f in self]

    def module_name(self) -> list[str]:
        return [f["module"] for f in self]


class FeatureExtractor(nn.Module):
    """The stem and dense blocks of a DenseNet returning intermediate maps (no classifier).

    Its state dict keeps the ``features.*`` keys of the full model, so DenseNet weights load
    into it directly. ``out_indices`` picks maps: 0 is the stem, i the i-th dense block.
    """

    def __init__(self, model: DenseNet, out_indices: int | Sequence[int] | None = None
                 ) -> None:
        super().__init__()
        info = [dict(f) for f in model.feature_info]
        info[-1]["module"] = "features.relu5"
        if model.config.stem == "imagenet":
            info[0].update(module="features.pool0", reduction=4)
        n = len(info)
        if out_indices is None or isinstance(out_indices, int):
            self.out_indices = tuple(take_indices(n, out_indices)[0])
        else:
            indices = tuple(out_indices)
            bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int)
                   or not -n <= i < n]
            if bad or not indices:
                raise ValueError(f"out_indices {list(indices)} must pick from 0..{n - 1} (0 = "
                                 f"stem, i = dense block i) for this {n - 1}-block DenseNet")
            self.out_indices = tuple(sorted({i % n for i in indices}))
        self.feature_info = FeatureInfo(info[i] for i in self.out_indices)
        self.config = model.config
        self.weights_meta = getattr(model, "weights_meta", None)
        # timm's features_only models keep the data config of the model they wrap
        self.pretrained_cfg = self.default_cfg = dict(model.pretrained_cfg)
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
        if is_eager(x):
            self.check_input(x)
        out = []
        for name, module in self.features.named_children():
            x = module(x)
            if name in self._taps:
                out.append(x)
        return out
