"""2D weights for a 3D DenseNet: I3D's inflation (Carreira and Zisserman, CVPR 2017).

Each k x k kernel becomes a k x k x k kernel: the 2D kernel repeated over k depth slices and
divided by k. On a volume that is constant along depth, an inflated convolution then gives, at
every output slice whose depth window lies inside the volume, exactly what the 2D convolution
gives on one slice (and at the slices that reach into the zero padding, that times the share of
its k taps inside the volume). Normalisations and the classifier act per channel and are copied.
A stem trained on RGB is adapted to the model's input channels first, by the rule 2D loading
uses (:func:`densenets.weights.keymap.adapt_input_conv`); the two steps commute.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .keymap import FIRST_CONV, adapt_input_conv


def rank_shown(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """The spatial dimensions a canonical DenseNet state dict was trained with: its stem
    kernel's rank minus the two channel axes (None without a stem kernel)."""
    w = state_dict.get(FIRST_CONV)
    return None if w is None else w.dim() - 2


def inflate_kernel(weight: torch.Tensor) -> torch.Tensor:
    """[out, in, k, k] -> [out, in, k, k, k]: repeated over k depth slices, divided by k.

    A constant along depth then sums to the 2D response: k taps of w / k each."""
    if weight.dim() != 4 or weight.shape[-1] != weight.shape[-2]:
        raise ValueError(f"inflation takes square 2D kernels [out, in, k, k], got "
                         f"{list(weight.shape)}")
    k = weight.shape[-1]
    return weight.unsqueeze(2).repeat(1, 1, k, 1, 1) / k


def inflate_state_dict(state_dict: Mapping[str, torch.Tensor], from_dims: int, to_dims: int,
                       in_channels: int | None = None
                       ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A canonical 2D DenseNet state dict for a 3D model of ``in_channels`` inputs (None: the
    checkpoint's), and notes saying what was done. Only 2D -> 3D is defined; any other change
    of rank raises ValueError saying so."""
    if (from_dims, to_dims) != (2, 3):
        raise ValueError(f"the weights are {from_dims}D and the model {to_dims}D: only 2D "
                         "weights inflate (into a 3D model); build the model with "
                         f"spatial_dims={from_dims} for these weights")
    sd = dict(state_dict)
    notes = []
    w = sd.get(FIRST_CONV)
    if w is not None and in_channels is not None and in_channels != w.shape[1]:
        notes.append(f"adapted features.conv0 from {w.shape[1]} to {in_channels} input "
                     "channels (summed over RGB for 1, repeated and rescaled otherwise)")
        sd[FIRST_CONV] = adapt_input_conv(w, in_channels)
    # Every 4-D tensor of a DenseNet state dict is a convolution kernel (norms, classifier
    # and counters are 0-, 1- or 2-D).
    kernels = [k for k, v in sd.items() if v.dim() == 4]
    for k in kernels:
        sd[k] = inflate_kernel(sd[k])
    notes.append(f"inflated the 2D weights into the 3D model: each of the {len(kernels)} "
                 "k x k kernels repeated over k depth slices and divided by k (I3D), "
                 "normalisations and classifier copied")
    return sd, notes


__all__ = ["inflate_kernel", "inflate_state_dict", "rank_shown"]
