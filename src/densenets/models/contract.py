"""timm's model contract on a DenseNet: head, intermediates, pruning, parameter groups.

What timm's own model tests and tools read off a model (``timm.data.resolve_data_config``,
layer-wise learning-rate decay, ``forward_intermediates``-based feature wrappers), written for
this library's module layout. :class:`TimmContract` is mixed into
:class:`densenets.models.densenet.DenseNet`; it reads ``features``, ``feature_info``,
``config`` and ``num_features`` and replaces ``global_pool``, ``head_drop`` and ``classifier``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .layers import global_pool as make_global_pool

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


def take_indices(num: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """timm's index rule: None = all ``num`` taps, an int n = the last n, a sequence = those
    (negative from the end). Returns the sorted absolute indices and the largest."""
    if indices is None:
        indices = num
    if isinstance(indices, bool):
        raise ValueError(f"indices must be None, an int or a sequence of ints, got {indices!r}")
    if isinstance(indices, int):
        if not 0 < indices <= num:
            raise ValueError(f"indices={indices} asks for the last {indices} feature maps; "
                             f"this model has {num} (0 = stem, i = dense block i): use 1..{num}")
        taken = list(range(num - indices, num))
    else:
        taken = []
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, int) or not -num <= i < num:
                raise ValueError(f"feature index {i!r} is out of range: pick from 0..{num - 1} "
                                 f"(0 = stem, i = dense block i) or -{num}..-1")
            taken.append(i % num)
        taken = sorted(set(taken))
        if not taken:
            raise ValueError("indices is empty: pick at least one feature map")
    return taken, max(taken)


class TimmContract:
    """timm's model methods, for a DenseNet whose head is ``global_pool``, ``head_drop`` and
    ``classifier`` and whose body is the ``features`` sequence tapped at ``feature_info``.

    (No class-level attribute annotations here: TorchScript would read them as the module's
    attribute types.)
    """

    @property
    def num_classes(self) -> int:
        """Classifier outputs; 0 when the classifier is removed (forward gives features)."""
        return int(self.config.num_classes)  # type: ignore[attr-defined]

    @property
    def default_cfg(self) -> dict[str, Any]:
        """timm's older name for ``pretrained_cfg``."""
        return self.pretrained_cfg  # type: ignore[attr-defined]

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The final linear layer (an ``nn.Identity`` once removed)."""
        return self.classifier

    def _build_head(self, num_classes: int, pool_type: str) -> None:
        """Pooling and classifier for ``num_classes`` outputs (0 = none) on ``device``/dtype."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0 (0 removes the classifier, "
                             f"so forward returns pooled features), got {num_classes!r}")
        if pool_type == "" and num_classes:
            raise ValueError("global_pool='' (no pooling) leaves a feature map that a linear "
                             "classifier cannot take: pass num_classes=0 with it")
        pool = make_global_pool(pool_type)
        ref = next(iter(self.features.parameters()), None)  # type: ignore[attr-defined]
        kw = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        hidden = self.num_features * (2 if pool_type == "catavgmax" else 1)
        if num_classes:
            classifier: nn.Module = nn.Linear(hidden, num_classes, **kw)
            nn.init.zeros_(classifier.bias)
        else:
            classifier = nn.Identity()
        self.global_pool, self.classifier = pool, classifier
        self.head_hidden_size = hidden
        # forward_head flattens only what was pooled (TorchScript reads this as a bool)
        self.pooled = pool_type != ""
        self.config.num_classes = num_classes  # type: ignore[attr-defined]
        self.config.global_pool = pool_type  # type: ignore[attr-defined]
        pool.train(self.training)
        classifier.train(self.training)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh classifier with ``num_classes`` outputs; 0 removes it (forward then returns
        the pooled features). ``global_pool`` ("avg", "max", "avgmax", "catavgmax", or ""
        for none, which needs ``num_classes=0``) replaces the pooling; None keeps it."""
        pool = self.config.global_pool if global_pool is None else global_pool  # type: ignore
        self._build_head(num_classes, pool)

    def _tap_positions(self) -> list[int]:
        """Positions in ``features`` after which each ``feature_info`` map is taken."""
        names = [n for n, _ in self.features.named_children()]
        return [names.index(f["module"].split(".", 1)[1]) for f in self.feature_info]

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

        Index 0 is the stem (before its pooling in ImageNet stems, as timm taps it), 1..n-1
        the dense blocks' outputs before their transitions, the last one the map after the
        final BN-ReLU (so ``norm`` has nothing left to do). ``indices``: None = all, an int n
        = the last n, a sequence = those. ``stop_early`` skips the modules after the last
        requested tap (the returned final map is then that tap's).
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW' (DenseNet maps are channels-first), "
                             f"got {output_fmt!r}")
        taps = self._tap_positions()
        taken, last = take_indices(len(taps), indices)
        wanted = {taps[i] for i in taken}
        if is_eager(x):
            self.check_input(x)  # type: ignore[attr-defined]
        out = []
        for pos, module in enumerate(self.features):
            if stop_early and pos > taps[last]:
                break
            x = module(x)
            if pos in wanted:
                out.append(x)
        return out if intermediates_only else (x, out)

    @torch.jit.ignore
    def prune_intermediate_layers(
        self,
        indices: int | Sequence[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the modules after the last tap in ``indices`` and, with ``prune_head`` or when
        the final map is cut, the head (``reset_classifier(0, "")``). Returns the kept indices.

        ``prune_norm`` is accepted for timm's signature; the final BN-ReLU is the last tap.
        """
        taps = self._tap_positions()
        taken, last = take_indices(len(taps), indices)
        cut = last < len(taps) - 1
        kept = list(self.features.named_children())[:taps[last] + 1]
        self.features = nn.Sequential()
        for name, module in kept:
            self.features.add_module(name, module)
        self.feature_info = self.feature_info[:last + 1]
        if cut:
            # the head was sized for the final map, which is gone
            self.num_features = self.feature_info[last]["num_chs"]
        if prune_head or cut:
            self.reset_classifier(0, "")
        return taken

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade compute for activation memory in training: here the memory-efficient dense
        blocks (``set_memory_efficient``), which recompute each block's BN-ReLU in backward
        and keep memory linear in depth, with the plain model's outputs and gradients."""
        self.set_memory_efficient(enable)  # type: ignore[attr-defined]

    @property
    def grad_checkpointing(self) -> bool:
        return bool(self.config.memory_efficient)  # type: ignore[attr-defined]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay, in timm's format.

        The stem is one group; then each dense block (``coarse``) or each dense layer, with
        each transition joining the layer before it. The final norm and the classifier match
        nothing and so form the last group.
        """
        stem = r"^features\.conv[012]|features\.norm[012]|features\.pool[012]"
        if coarse:
            return {"stem": stem, "blocks": r"^features\.(?:denseblock|transition)(\d+)"}
        return {"stem": stem, "blocks": [(r"^features\.denseblock(\d+)\.denselayer(\d+)", None),
                                         (r"^features\.transition(\d+)", MATCH_PREV_GROUP)]}
