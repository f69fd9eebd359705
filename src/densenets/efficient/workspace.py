"""Scratch buffers of the memory-efficient blocks, kept between steps on CPU.

Fresh large allocations are slow on CPU (every page is faulted in again), so temporaries that
never leave a forward or a backward live in buffers kept between steps. CUDA's caching
allocator already recycles memory, so there a fresh tensor is as cheap and safer. Blocks that
put memory first (volumes: see :mod:`.layout`) run under :func:`fresh_scratch`, so their
scratch is freed as soon as a pass is done instead of staying for the rest of the step.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

_WORKSPACES: dict[tuple, torch.Tensor] = {}
_FRESH = contextvars.ContextVar("densenets_fresh_scratch", default=False)


@contextlib.contextmanager
def fresh_scratch(enabled: bool = True):
    """Within this context :func:`workspace` allocates afresh (nothing is kept)."""
    token = _FRESH.set(enabled)
    try:
        yield
    finally:
        _FRESH.reset(token)


def clear_workspaces() -> None:
    """Release the cached CPU workspaces of the memory-efficient blocks."""
    _WORKSPACES.clear()


def workspace(name: str, shape: tuple[int, ...], dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
    """A contiguous scratch tensor; on CPU a view of a buffer named ``name`` kept between calls
    (two live scratch tensors need two names)."""
    if device.type != "cpu" or _FRESH.get():
        return torch.empty(shape, dtype=dtype, device=device)
    numel = 1
    for s in shape:
        numel *= s
    key = (name, dtype, device)
    buf = _WORKSPACES.get(key)
    if buf is None or buf.numel() < numel:
        buf = _WORKSPACES[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(shape)


def ones(m: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A vector of m ones, kept between calls."""
    key = ("ones", dtype, device)
    buf = _WORKSPACES.get(key)
    if buf is None or buf.numel() < m:
        buf = _WORKSPACES[key] = torch.ones(m, dtype=dtype, device=device)
    return buf[:m]
