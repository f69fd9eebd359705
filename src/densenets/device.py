"""Which device a computation runs on: one spelling rule and one resolver for every verb.

A flat leaf module (it imports only torch) because the layers that resolve a device, training,
analysis, deploy and the command line, must not import each other to share it.
"""

from __future__ import annotations

import torch

AUTO = "auto"  # the first CUDA device when torch sees one, else the CPU
HELP = "auto (a GPU when there is one), cpu, cuda, cuda:1, ..."


def check_device(name: str) -> str:
    """``name`` when it is ``auto`` or a device torch can parse; ValueError naming the flag
    otherwise. Used as the ``type`` of every ``--device`` flag and by the config checks."""
    if name == AUTO:
        return name
    try:
        torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    return name


def resolve_device(name: str | torch.device = AUTO) -> torch.device:
    """The device ``name`` means here; ``cuda`` on a machine without one is a ValueError that
    says what to use instead (instead of torch's assertion deep inside the first copy)."""
    if isinstance(name, torch.device):
        device = name
    elif check_device(name) == AUTO:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but this torch sees no CUDA device; use "
                         "--device cpu")
    return device
