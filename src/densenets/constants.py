"""Numbers that several layers read: each is written here once.

The lowest module of the package (it imports only torch), so models, weights, training, analysis
and the efficient kernels can all read it without an upward import.
"""

from __future__ import annotations

import torch

# ImageNet's per-channel mean and standard deviation of RGB pixels in [0, 1]: the normalisation
# every published ImageNet checkpoint of the families here was trained with.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Floating-point types computed in 16 bits, whose statistics and gradient sums are kept in float32.
LOW_PRECISION: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype that sums and statistics over tensors of ``dtype`` are kept in."""
    return torch.float32 if dtype in LOW_PRECISION else dtype
