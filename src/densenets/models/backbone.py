"""Any family's model as a backbone: the maps at its taps, through ``forward_intermediates``.

``create_model(name, features_only=True)`` returns a :class:`FeatureExtractor` whose
``forward`` gives a list of maps and whose ``feature_info`` lists channels and reduction
(input size / map size) per map, as timm's ``features_only`` models do. The taps are the
family's ``features_only_info()``: a DenseNet's are the stem (after its max pool, as this
library has always given it), each dense block's raw output (their BN-ReLU belongs to the next
transition) and the map after the final BN-ReLU; an RDNet's are the ends of its stages.
``out_indices`` follows timm: a sequence picks maps, an int n the last n.
"""

# No ``from __future__ import annotations``: TorchScript resolves the annotations of the
# Python method that ``forward`` calls from the objects themselves.
from collections.abc import Sequence

import torch
from torch import nn

from .contract import Taps, take_indices


class FeatureInfo(list):
    """A list of ``{"module", "num_chs", "reduction"}`` dicts with timm's accessors."""

    def channels(self) -> list[int]:
        return [f["num_chs"] for f in self]

    def reduction(self) -> list[int]:
        return [f["reduction"] for f in self]

    def module_name(self) -> list[str]:
        return [f["module"] for f in self]


def _place(root: nn.Module, path: str, module: nn.Module) -> None:
    """Register ``module`` under its dotted ``path`` in ``root`` (containers as Sequentials),
    so that the wrapper's state-dict keys are the model's."""
    *parents, leaf = path.split(".")
    for p in parents:
        if p not in root._modules:
            root.add_module(p, nn.Sequential())
        root = root._modules[p]
    root.add_module(leaf, module)


class FeatureExtractor(Taps, nn.Module):
    """A model's body up to its last requested tap, returning the maps there (no head).

    Its state dict keeps the model's keys (``features.*`` for a DenseNet, ``stem.*`` and
    ``dense_stages.*`` for an RDNet), so the model's weights load into it directly.
    ``out_indices`` picks maps (None: all, an int n: the last n, negative: from the end).
    """

    def __init__(self, model: nn.Module, out_indices: int | Sequence[int] | None = None
                 ) -> None:
        super().__init__()
        info = model.features_only_info()
        try:
            taken, _ = take_indices(len(info), out_indices, model.tap_help)
        except ValueError as e:
            raise ValueError(f"out_indices: {e}") from None
        self.out_indices = tuple(taken)
        self.feature_info = FeatureInfo(info[i] for i in taken)
        self.config = model.config
        self.tap_help = model.tap_help
        self.min_input_size = model.min_input_size
        self.weights_meta = getattr(model, "weights_meta", None)
        # timm's features_only models keep the data config of the model they wrap
        self.pretrained_cfg = self.default_cfg = dict(model.pretrained_cfg)
        # Stop after the last requested map: later modules would only cost time and memory.
        names = []
        for name, module in model._trunk():
            _place(self, name, module)
            names.append(name)
            if name == self.feature_info[-1]["module"]:
                break
        self._trunk_names = names
        self._taps = [names.index(f["module"]) for f in self.feature_info]

    @torch.jit.ignore
    def _trunk(self) -> list[tuple[str, nn.Module]]:
        return [(n, self.get_submodule(n)) for n in self._trunk_names]

    @torch.jit.ignore
    def _tap_positions(self) -> list[int]:
        return self._taps

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self._maps(x)

    @torch.jit.ignore
    def _maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_intermediates(x, intermediates_only=True)
