"""Where the spatial rank matters: the row view of a block, its memory format, the growth
convolution.

The memory-efficient block works on matrices [M, C]: one row per position (M = N x the spatial
positions), one column per channel. That view, the batch statistics and the bottleneck's 1x1
convolution (a matrix product) are the same for any number of spatial dimensions; only the
functions below look at the rank.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F

# The spatial ranks the blocks run at, each with the memory format a channels-last tensor of
# that rank has. A rank enters here; the rest of the package follows.
# Signals (rank 1) have no channels-last format: their row view is always a copy.
MEMORY_FORMATS: dict[int, torch.memory_format] = {
    1: torch.contiguous_format, 2: torch.channels_last, 3: torch.channels_last_3d}

# Volumes put memory first: each layer's bottleneck output (its 1x1 convolution) is recomputed
# in backward rather than kept, and scratch buffers are freed after each pass rather than kept
# for the next step. At 128^3 the kept bottleneck outputs of DenseNet-121's first block alone
# take 200 MiB per two volumes, and memory is what stops 3D training, while one more 1x1
# convolution per layer costs little next to the 3x3x3 growth convolution (27x its
# multiply-adds per output channel), and a fresh allocation little next to a 3D pass. Signals
# and images keep both: there the step is bound by time, not memory.
MEMORY_FIRST_RANKS = frozenset({3})

_conv_backward = torch.ops.aten.convolution_backward.default


def spatial_rank(shape) -> int:
    """The number of spatial dimensions of a block input (N, C, *spatial), checked."""
    rank = len(shape) - 2
    if rank not in MEMORY_FORMATS:
        raise ValueError(f"memory-efficient blocks take inputs with spatial rank "
                         f"{sorted(MEMORY_FORMATS)}, got shape {tuple(shape)}")
    return rank


def memory_first(rank: int) -> bool:
    """Whether blocks of this rank trade a little speed for memory (see MEMORY_FIRST_RANKS)."""
    return rank in MEMORY_FIRST_RANKS


def memory_format(rank: int, channels_last: bool) -> torch.memory_format:
    return MEMORY_FORMATS[rank] if channels_last else torch.contiguous_format


def is_channels_last(x: torch.Tensor) -> bool:
    """True when ``x`` is laid out channels-last (and not also contiguous, as 1x1 maps are)."""
    fmt = MEMORY_FORMATS.get(x.dim() - 2)
    return fmt is not None and x.is_contiguous(memory_format=fmt) and not x.is_contiguous()


def rows(t: torch.Tensor) -> torch.Tensor:
    """(N, c, *spatial) as a matrix [M, c] with unit column stride: a view when ``t`` is
    channels-last, a copy otherwise."""
    m = t.movedim(1, -1).reshape(-1, t.shape[1])
    return m if m.stride(1) == 1 or m.shape[1] == 1 else m.contiguous()


def unrows(t: torch.Tensor, n: int, spatial: tuple[int, ...]) -> torch.Tensor:
    """A matrix [M, c] viewed as a channels-last (N, c, *spatial) tensor, without a copy."""
    return t.view(n, *spatial, t.shape[1]).movedim(-1, 1)


def growth_conv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The layer's growth convolution (3x3, padding 1, stride 1, no bias)."""
    r = x.dim() - 2
    return torch.convolution(x, w, None, [1] * r, [w.shape[2] // 2] * r, [1] * r, False,
                             [0] * r, 1)


def growth_conv_grads(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor):
    """(dL/dx, dL/dw) of :func:`growth_conv`."""
    r = x.dim() - 2
    gi, gw, _ = _conv_backward(grad, x, w, None, [1] * r, [w.shape[2] // 2] * r, [1] * r,
                               False, [0] * r, 1, [True, True, False])
    return gi, gw


# The layout of the plain model's tensors, while a memory-efficient model runs in another one
# (None: each tensor's own). Dropout draws its units in memory order, so a mask drawn on a
# channels-last tensor drops other units than the plain model's mask on a contiguous one.
_PLAIN_CHANNELS_LAST: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "densenets_plain_channels_last", default=None)


@contextlib.contextmanager
def plain_layout(x: torch.Tensor) -> Iterator[None]:
    """Within: dropout draws as the plain model given ``x`` (the model's input) would, whatever
    layout the memory-efficient model's own tensors take (it keeps the input's layout
    throughout)."""
    token = _PLAIN_CHANNELS_LAST.set(is_channels_last(x))
    try:
        yield
    finally:
        _PLAIN_CHANNELS_LAST.reset(token)


def draws_channels_last(x: torch.Tensor) -> bool:
    """Whether dropout on ``x`` draws its mask channels-last: as the plain model's tensor would
    be laid out (see :func:`plain_layout`), else as ``x`` is."""
    plain = _PLAIN_CHANNELS_LAST.get()
    return is_channels_last(x) if plain is None else plain


def dropout(y: torch.Tensor, p: float, channels_last: bool) -> torch.Tensor:
    """F.dropout(y, p) in training, with the mask drawn in the given layout (the plain model's:
    :func:`draws_channels_last`, read when forward runs); the same values as F.dropout on a
    tensor so laid out."""
    if p == 0 or is_channels_last(y) == channels_last:
        return F.dropout(y, p, training=True)
    fmt = memory_format(y.dim() - 2, channels_last)
    return y * F.dropout(torch.ones_like(y, memory_format=fmt), p, training=True)


def dropout_noise(shape: tuple[int, ...], p: float, dtype: torch.dtype, device: torch.device,
                  channels_last: bool) -> torch.Tensor:
    """The scaled mask (0 or 1 / (1 - p)) that F.dropout applies, as a matrix [M, c].

    F.dropout is called on ones laid out like the plain model's tensor (N, c, *spatial), so both
    modes consume the random generator identically (on CPU and on CUDA's fused kernel) and drop
    the same units; multiplying by the result is then exactly what F.dropout computes.
    """
    fmt = memory_format(len(shape) - 2, channels_last)
    ones = torch.ones(shape, dtype=dtype, device=device).contiguous(memory_format=fmt)
    return rows(F.dropout(ones, p, training=True))
