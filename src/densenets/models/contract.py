"""timm's model contract, written once for every family: taps, head, intermediates, pruning.

What timm's own model tests and tools read off a model (``timm.data.resolve_data_config``,
layer-wise learning-rate decay, ``forward_intermediates``-based feature wrappers). A family's
model mixes in :class:`TimmContract` and supplies

- ``_trunk()``: its body as (qualified name, module) pairs in forward order; the
  ``feature_info`` entries name their taps among them;
- ``_build_head(num_classes, pool)``: a head for ``num_features`` inputs;
- ``config`` (``in_channels``, ``num_classes``, ``global_pool``), ``min_input_size``,
  ``get_classifier``, ``group_matcher`` and its scriptable ``forward_features`` /
  ``forward_head``.

:class:`Taps`, the body and its taps alone, is what the backbone wrapper
(:class:`densenets.models.backbone.FeatureExtractor`) shares with the models.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

# timm's marker for "this parameter group joins the one before it" (timm.models._manipulate).
MATCH_PREV_GROUP = (99999,)


def is_eager(x: torch.Tensor) -> bool:
    """Whether ``x`` is a real tensor in a plain Python forward (not traced, compiled or FX).

    Input checks branch on shapes; under tracing those are symbolic and the checks must step
    aside (the traced graph then has no Python-side branches).
    """
    if isinstance(x, torch.fx.Proxy):
        return False
    return not (torch.jit.is_tracing() or torch.compiler.is_compiling())


def take_indices(num: int, indices: int | Sequence[int] | None,
                 taps: str = "0 = stem, i = dense block i") -> tuple[list[int], int]:
    """timm's index rule, the one every family and the backbone wrapper follow: None = all
    ``num`` taps, an int n = the last n, a sequence = those (negative from the end). A bool is
    refused (it would pass for 0 or 1). ``taps`` says what the indices mean, for the errors.
    Returns the sorted absolute indices and the largest."""
    if indices is None:
        indices = num
    if isinstance(indices, bool):
        raise ValueError(f"indices must be None, an int or a sequence of ints, got {indices!r}")
    if isinstance(indices, int):
        if not 0 < indices <= num:
            raise ValueError(f"indices={indices} asks for the last {indices} feature maps; "
                             f"this model has {num} ({taps}): use 1..{num}")
        taken = list(range(num - indices, num))
    else:
        taken = []
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, int) or not -num <= i < num:
                raise ValueError(f"feature index {i!r} is out of range: pick from 0..{num - 1} "
                                 f"({taps}) or -{num}..-1")
            taken.append(i % num)
        taken = sorted(set(taken))
        if not taken:
            raise ValueError("indices is empty: pick at least one feature map")
    return taken, max(taken)


def check_config(c: Any, counts: Sequence[str], rates: Sequence[str],
                 pools: Sequence[str]) -> None:
    """The checks every family's config shares, raising ValueError naming the bad field:
    ``counts`` are integers >= 1, ``num_classes`` an integer >= 0 (0 removes the classifier),
    ``rates`` lie in [0, 1), ``compression`` (theta) in (0, 1], ``global_pool`` is one of
    ``pools`` ("" = no pooling, which needs num_classes=0)."""
    for name in (*counts, "num_classes"):
        v, least = getattr(c, name), 0 if name == "num_classes" else 1
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} must be an integer, got {v!r}")
        if v < least:
            why = " (0 removes the classifier)" if name == "num_classes" else ""
            raise ValueError(f"{name} must be >= {least}{why}, got {v}")
    for name in rates:
        if not 0.0 <= float(getattr(c, name)) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {getattr(c, name)}")
    if not 0.0 < float(c.compression) <= 1.0:
        raise ValueError(f"compression (theta) must be in (0, 1], got {c.compression}; "
                         "the paper uses 0.5 (-C) or 1")
    if c.global_pool not in pools:
        raise ValueError(f"global_pool must be one of {tuple(pools)} ('' = no pooling), got "
                         f"{c.global_pool!r}")
    check_head(c.num_classes, c.global_pool)


def check_head(num_classes: int, pool: str) -> None:
    """Raise ValueError for a classifier size or pooling no head can take."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be an integer >= 0 (0 removes the classifier, "
                         f"so forward returns pooled features), got {num_classes!r}")
    if pool == "" and num_classes:
        raise ValueError("global_pool='' (no pooling) leaves a feature map that a linear "
                         "classifier cannot take: pass num_classes=0 with it")


class Taps:
    """A body run module by module, tapped at ``feature_info``: ``forward_intermediates`` and
    the input checks. (No class-level attribute annotations here: TorchScript would read them
    as the module's attribute types.)"""

    # what the feature indices mean, for error messages
    tap_help = "0 = stem, i = dense block i"

    @torch.jit.ignore
    def _trunk(self) -> list[tuple[str, nn.Module]]:
        """The body's modules in forward order, by their qualified names."""
        raise NotImplementedError

    @torch.jit.ignore
    def _run_trunk(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One module of the body (a family may recompute it in backward instead)."""
        return module(x)

    @torch.jit.ignore
    def _tap_positions(self) -> list[int]:
        """Positions in ``_trunk()`` after which each ``feature_info`` map is taken."""
        names = [n for n, _ in self._trunk()]
        return [names.index(f["module"]) for f in self.feature_info]  # type: ignore[attr-defined]

    def features_only_info(self) -> list[dict[str, Any]]:
        """The taps of ``features_only`` backbones (a family may tap elsewhere than timm)."""
        return [dict(f) for f in self.feature_info]  # type: ignore[attr-defined]

    @torch.jit.unused
    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError for an input this network cannot take, saying what would work."""
        noun = type(self.config).__name__.removesuffix("Config")  # type: ignore[attr-defined]
        dims = getattr(self.config, "spatial_dims", 2)  # type: ignore[attr-defined]
        layout = {1: "(N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}[dims]
        rank = "" if dims == 2 else f" (this {noun} has spatial_dims={dims})"
        if x.dim() == dims + 1:
            raise ValueError(f"expected a batch {layout} but got one image of shape "
                             f"{tuple(x.shape)}; add the batch dimension: x.unsqueeze(0){rank}")
        if x.dim() != dims + 2:
            raise ValueError(f"expected a {dims + 2}-D batch {layout}, got shape "
                             f"{tuple(x.shape)} (this {noun} has spatial_dims={dims}; build it "
                             f"with spatial_dims={x.dim() - 2} for such inputs)"
                             if 3 <= x.dim() <= 5 else
                             f"expected a {dims + 2}-D batch {layout}, got shape "
                             f"{tuple(x.shape)}{rank}")
        weight = next(self.parameters(), None)  # type: ignore[attr-defined]
        held = torch.float32 if weight is None else weight.dtype
        # Under autocast the convolutions cast any floating input themselves.
        if x.dtype != held and not (x.is_floating_point()
                                    and torch.is_autocast_enabled(x.device.type)):
            kind = str(held).removeprefix("torch.")
            fix = (f"x.to(torch.{kind}) / 255 for 0-255 pixels, then normalise as in training"
                   if not x.is_floating_point() else
                   f"x.to(torch.{kind}), or convert the model with model.to({x.dtype})")
            raise ValueError(f"the input is {str(x.dtype).removeprefix('torch.')} but this "
                             f"{noun} holds {kind} weights; convert it: {fix}")
        c = self.config.in_channels  # type: ignore[attr-defined]
        if x.shape[1] != c:
            raise ValueError(
                f"this {noun} takes {c}-channel images but the input has {x.shape[1]} channels "
                f"(shape {tuple(x.shape)}); build the model with in_channels={x.shape[1]} or "
                f"convert the images to {c} channels")
        sides, m = [int(s) for s in x.shape[2:]], self.min_input_size  # type: ignore
        if min(sides) < m:
            raise ValueError(f"input {'x'.join(map(str, sides))} is too small for this {noun}: "
                             f"the minimum is {'x'.join([str(m)] * len(sides))}")

    @torch.jit.ignore
    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The final feature map and the maps at ``feature_info``'s taps, as timm gives them.

        ``indices``: None = all, an int n = the last n, a sequence = those. ``stop_early``
        skips the modules after the last requested tap (the returned final map is then that
        tap's). ``norm`` is accepted for timm's signature: the last tap is the body's output.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW' (the maps are channels-first), "
                             f"got {output_fmt!r}")
        taps = self._tap_positions()
        taken, last = take_indices(len(taps), indices, self.tap_help)
        wanted = {taps[i] for i in taken}
        if is_eager(x):
            self.check_input(x)
        out = []
        for pos, (_, module) in enumerate(self._trunk()):
            if stop_early and pos > taps[last]:
                break
            x = self._run_trunk(module, x)
            if pos in wanted:
                out.append(x)
        return out if intermediates_only else (x, out)


class TimmContract(Taps):
    """timm's model methods over the family's ``_trunk`` and ``_build_head``."""

    @property
    def num_classes(self) -> int:
        """Classifier outputs; 0 when the classifier is removed (forward gives features)."""
        return int(self.config.num_classes)  # type: ignore[attr-defined]

    @property
    def default_cfg(self) -> dict[str, Any]:
        """timm's older name for ``pretrained_cfg``."""
        return self.pretrained_cfg  # type: ignore[attr-defined]

    def _build_head(self, num_classes: int, pool: str) -> None:
        """Pooling and classifier for ``num_classes`` outputs (0 = none) on ``num_features``."""
        raise NotImplementedError

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh classifier with ``num_classes`` outputs; 0 removes it (forward then returns
        the pooled features). ``global_pool`` ("" = no pooling, which needs ``num_classes=0``;
        the family's config lists the others) replaces the pooling; None keeps it."""
        pool = self.config.global_pool if global_pool is None else global_pool  # type: ignore
        check_head(num_classes, pool)
        self._build_head(num_classes, pool)
        self.config.num_classes = num_classes  # type: ignore[attr-defined]
        self.config.global_pool = pool  # type: ignore[attr-defined]

    @torch.jit.ignore
    def prune_intermediate_layers(
        self,
        indices: int | Sequence[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the modules after the last tap in ``indices`` and, with ``prune_head`` or when
        the final map is cut, the head (``reset_classifier(0, "")``). Returns the kept indices.

        ``prune_norm`` is accepted for timm's signature; the last tap is the body's output.
        """
        taps = self._tap_positions()
        taken, last = take_indices(len(taps), indices, self.tap_help)
        for name, _ in self._trunk()[taps[last] + 1:]:
            parent, _, child = name.rpartition(".")
            delattr(self.get_submodule(parent), child)  # type: ignore[attr-defined]
        cut = last < len(taps) - 1
        self.feature_info = self.feature_info[:last + 1]  # type: ignore[has-type]
        if cut:  # the head was sized for the final map, which is gone
            self.num_features = self.feature_info[last]["num_chs"]
        if prune_head or cut:
            self.reset_classifier(0, "")
        return taken
