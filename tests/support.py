"""Helpers shared by the test modules: one copy of each, imported as ``from support import ...``.

``pyproject.toml`` puts ``tests/`` on ``sys.path`` (``pythonpath``), so the import works under
``pytest`` from the repository root, under ``make test`` and under any import mode.
"""

from __future__ import annotations

import torch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative max error: ``max |a - b|`` over the smaller of ``max |a|`` and ``max |b|``.

    Computed in float64 and symmetric, so no caller has to remember which argument is the
    reference; dividing by the smaller scale makes it at least as strict as measuring against
    either tensor alone. Two all-zero tensors agree (0); zero against non-zero is a huge error.
    """
    a, b = a.detach().double(), b.detach().double()
    scale = torch.minimum(a.abs().max(), b.abs().max()).clamp_min(1e-300)
    return float((a - b).abs().max() / scale)
