"""Any family's model as a backbone: the maps at its taps, in the forms timm's ``features_only``
gives them.

``create_model(name, features_only=True)`` returns a :class:`FeatureExtractor` whose
``forward`` gives a list of maps and whose ``feature_info`` lists channels and reduction
(input size / map size) per map, as timm's ``features_only`` models do. The taps are the
family's ``features_only_info()``: a DenseNet's are the stem (after its max pool, as this
library has always given it), each dense block's raw output (their BN-ReLU belongs to the next
transition) and the map after the final BN-ReLU; an RDNet's are the ends of its stages.
``out_indices`` follows timm: a sequence picks maps, an int n the last n. Every kind works in
each spatial rank the model has (``spatial_dims=1`` or ``3``): the maps are (N, C, L) or
(N, C, D, H, W), and a map's ``reduction`` holds on every side.

timm's ``feature_cls`` (or ``feature_cfg={"feature_cls": ...}``) picks how the maps are taken
and returned; every kind taps the same maps and keeps the model's state-dict keys:

- ``"getter"`` and ``"list"`` (the default): a list, through ``forward_intermediates``;
- ``"dict"``: a dict keyed by the feature index as a string (or ``out_map``'s names);
- ``"hook"``: forward hooks on the tap modules collect the maps while the kept body runs; a
  list, or with ``return_dict=True`` a dict keyed by module name (or ``out_map``'s names);
- ``"fx"``: a torch.fx graph of the model returning the maps
  (:mod:`densenets.models.backbone_fx`), which TorchScript can compile; a list, or a dict
  keyed as ``"dict"``'s with ``return_dict=True``.
"""

# No ``from __future__ import annotations``: TorchScript resolves the annotations of the
# Python method that ``forward`` calls from the objects themselves.
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from .contract import Taps, is_eager, take_indices

# timm's feature_cls names -> the options each kind takes besides out_indices
FEATURE_KINDS: dict[str, tuple[str, ...]] = {
    "getter": (), "list": (), "dict": ("out_map",),
    "hook": ("out_map", "return_dict", "default_hook_type"),
    "fx": ("out_map", "return_dict"),
}


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


def taps_of(model: nn.Module, out_indices: int | Sequence[int] | None
            ) -> tuple[list[int], list[dict[str, Any]]]:
    """The feature indices ``out_indices`` picks among the model's backbone taps, and the taps."""
    info = model.features_only_info()
    try:
        taken, _ = take_indices(len(info), out_indices, model.tap_help)
    except ValueError as e:
        raise ValueError(f"out_indices: {e}") from None
    return taken, info


def describe(wrapper: nn.Module, model: nn.Module, taken: list[int],
             info: list[dict[str, Any]]) -> None:
    """What every backbone kind carries over from its model: the picked taps as
    ``feature_info`` and ``out_indices``, the config and the data config (timm's
    ``features_only`` models keep the ``pretrained_cfg`` of the model they wrap)."""
    wrapper.out_indices = tuple(taken)
    wrapper.feature_info = FeatureInfo(info[i] for i in taken)
    wrapper.config = model.config
    wrapper.tap_help = model.tap_help
    wrapper.min_input_size = model.min_input_size
    wrapper.weights_meta = getattr(model, "weights_meta", None)
    wrapper.pretrained_cfg = wrapper.default_cfg = dict(model.pretrained_cfg)


def out_keys(names: Sequence[Any], out_map: Sequence[Any] | None) -> list[str]:
    """A dict output's keys: ``out_map``'s names if given (one per map), else ``names``."""
    if out_map is None:
        return [str(n) for n in names]
    if len(out_map) != len(names):
        raise ValueError(f"out_map names {len(out_map)} maps but {len(names)} are taken: "
                         "give one name per map")
    return [str(n) for n in out_map]


class FeatureExtractor(Taps, nn.Module):
    """A model's body up to its last requested tap, returning the maps there (no head).

    Its state dict keeps the model's keys (``features.*`` for a DenseNet, ``stem.*`` and
    ``dense_stages.*`` for an RDNet), so the model's weights load into it directly.
    ``out_indices`` picks maps (None: all, an int n: the last n, negative: from the end).
    """

    def __init__(self, model: nn.Module, out_indices: int | Sequence[int] | None = None
                 ) -> None:
        super().__init__()
        taken, info = taps_of(model, out_indices)
        describe(self, model, taken, info)
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


class FeatureDict(FeatureExtractor):
    """``feature_cls="dict"``: the maps keyed by their feature index as a string ("0", "1",
    ...), or by ``out_map``'s names, as timm's ``FeatureDictNet``."""

    def __init__(self, model: nn.Module, out_indices: int | Sequence[int] | None = None,
                 out_map: Sequence[Any] | None = None) -> None:
        super().__init__(model, out_indices)
        self.out_keys = out_keys(self.out_indices, out_map)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        maps = self._maps(x)  # (indexed, not zipped: TorchScript compiles this loop)
        return {k: maps[i] for i, k in enumerate(self.out_keys)}


class FeatureHooks(FeatureExtractor):
    """``feature_cls="hook"``: forward hooks on the tap modules collect the maps while the kept
    body runs module by module, as timm's ``FeatureHookNet``. A list, or with ``return_dict``
    a dict keyed by the tap modules' names (or ``out_map``'s). TorchScript cannot run hooks;
    the ``"fx"`` kind compiles."""

    def __init__(self, model: nn.Module, out_indices: int | Sequence[int] | None = None,
                 out_map: Sequence[Any] | None = None, return_dict: bool = False,
                 default_hook_type: str = "forward") -> None:
        super().__init__(model, out_indices)
        if default_hook_type != "forward":  # a pre-hook would see a map before its in-place ReLU
            raise ValueError(f"default_hook_type must be 'forward' (the maps are module outputs), "
                             f"got {default_hook_type!r}")
        self.return_dict = return_dict
        self.out_keys = out_keys(self.feature_info.module_name(), out_map)
        self._hooked: dict[str, torch.Tensor] = {}
        for key, f in zip(self.out_keys, self.feature_info, strict=True):
            self.get_submodule(f["module"]).register_forward_hook(partial(self._keep, key))

    def _keep(self, key: str, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self._hooked[key] = output

    @torch.jit.unused
    def forward(self, x: torch.Tensor) -> Any:
        if is_eager(x):
            self.check_input(x)
        for _, module in self._trunk():
            x = self._run_trunk(module, x)
        maps = [self._hooked.pop(k) for k in self.out_keys]
        return dict(zip(self.out_keys, maps, strict=True)) if self.return_dict else maps


def backbone_options(feature_cls: str | None, feature_cfg: Mapping[str, Any] | None,
                     out_indices: int | Sequence[int] | None) -> tuple[str, dict[str, Any]]:
    """The backbone kind timm's ``feature_cls`` names and its constructor options.
    ``feature_cfg`` may carry both; the explicit ``feature_cls`` and ``out_indices`` win, as
    in timm. Raises ValueError for an unknown kind or an option the kind does not take."""
    cfg = dict(feature_cfg or {})
    if feature_cls is not None:
        cfg["feature_cls"] = feature_cls
    if out_indices is not None:
        cfg["out_indices"] = out_indices
    kind = str(cfg.pop("feature_cls", "getter")).lower()
    if kind not in FEATURE_KINDS:
        raise ValueError(f"feature_cls must be one of {', '.join(map(repr, FEATURE_KINDS))}, "
                         f"got {kind!r}")
    unknown = sorted(set(cfg) - {"out_indices", *FEATURE_KINDS[kind]})
    if unknown:
        takes = ", ".join(("out_indices", *FEATURE_KINDS[kind]))
        raise ValueError(f"feature_cls={kind!r} takes no {', '.join(unknown)}; its options: "
                         f"{takes}")
    return kind, cfg
