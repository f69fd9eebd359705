"""Memory-efficient dense blocks: linear memory in depth, and faster than the direct version.

A direct dense block concatenates all earlier maps before every layer and keeps each
concatenation and its BN output for backward, so activation memory grows with the square of
the depth. Here (see :mod:`densenets.efficient.algorithm` for the arithmetic):

- one buffer per block holds all of its channels; layer l writes its k new channels into its
  slice and reads the prefix as a view, so nothing is concatenated or copied twice;
- every channel's batch mean and variance are computed once, when it is produced, and shared by
  all the layers that read it (exact in training mode: they all normalise the same data);
- the prefix's BN-ReLU is recomputed in backward instead of stored: only O(L) tensors are kept;
- running statistics are updated once per step, with the plain model's values.

Only training-mode forwards with gradients come here; eval mode runs the plain path, so eval
outputs of the two modes are identical. Parameters, buffers and state_dict are the plain
model's: a checkpoint moves freely between the modes.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

# The custom operator's first call imports torch._dynamo (torch wraps every custom op's kernels
# in its compile guard): import it with this module, i.e. when a memory-efficient model is built,
# so that this code (some 70 MiB, once per process) is not charged to the first training step.
import torch._dynamo  # noqa: F401
from torch import nn

from . import cpu_kernels, ops  # ops registers the densenets:: custom operators
from .layout import is_channels_last, memory_first
from .triton_passes import TRITON_DTYPES
from .workspace import clear_workspaces

__all__ = ["backend", "clear_workspaces", "efficient_block_forward", "unsupported_reason"]

_warned: set[str] = set()


# The norms whose statistics a block can share, and the convolutions it fuses, per rank.
_BATCH_NORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_INSTANCE_NORMS = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def unsupported_reason(block: nn.Module) -> str | None:
    """Why ``block`` must run the plain path in training mode, or None if the efficient one works.

    The shared statistics need one kind of norm in training mode with one eps per position:
    affine batch norm (statistics per channel) or instance norm (per sample and channel; every
    layer reading a channel normalises it the same way too). Group norm's statistics span a
    group of channels that changes as the block grows, so nothing can be shared. The fused layout
    needs the paper's convolutions (1x1 and 3x3/pad 1, stride 1, no bias, no groups).
    """
    layers = block.layers
    rank = len(layers[0].conv1.kernel_size)
    norms1 = [layer.norm1 for layer in layers]
    norms2 = [layer.norm2 for layer in layers if layer.bottleneck]
    reason = _norm_problem(norms1 + norms2, rank)
    if reason is not None:
        return reason
    for group in (norms1, norms2):
        if len({bn.eps for bn in group}) > 1:
            return "the norm layers of one block use different eps"
    if len({(layer.bottleneck, layer.conv1.out_channels) for layer in layers}) > 1:
        return "the layers of one block differ in their bottleneck"
    for layer in layers:
        convs = [(layer.conv1, 1 if layer.bottleneck else 3)]
        if layer.bottleneck:
            convs.append((layer.conv2, 3))
        for conv, size in convs:
            if (type(conv) is not _CONVS[rank] or conv.bias is not None or conv.groups != 1
                    or conv.kernel_size != (size,) * rank or conv.stride != (1,) * rank
                    or conv.dilation != (1,) * rank or conv.padding != (size // 2,) * rank
                    or conv.padding_mode != "zeros"):
                return f"a convolution differs from the paper's {size}x{size} layout: {conv}"
    return None


def _norm_problem(norms: list[nn.Module], rank: int) -> str | None:
    kinds = {type(bn) for bn in norms}
    if len(kinds) > 1:
        return f"one block mixes norms ({', '.join(sorted(k.__name__ for k in kinds))})"
    kind = kinds.pop()
    if kind is nn.GroupNorm:
        return ("group norm's statistics span groups of channels that change as the block "
                "grows, so no layer can share them")
    if kind is _BATCH_NORMS[rank]:
        if not all(bn.affine for bn in norms):
            return f"{kind.__name__} (affine=False) is not a plain affine batch norm"
    elif kind is not _INSTANCE_NORMS[rank]:
        return f"{kind.__name__} is not a batch or instance norm of rank {rank}"
    if not all(bn.training for bn in norms):
        return "a norm layer is in eval mode (frozen statistics) inside a training block"
    return None


def _returns_buffer(x: torch.Tensor) -> bool:
    """Whether the block returns its buffer itself, channels-last: when the input is, and always
    for ranks that put memory first (a contiguous copy would be the block's size once more;
    what follows takes either layout)."""
    return is_channels_last(x) or memory_first(x.dim() - 2)


def _is_instance(block: nn.Module) -> bool:
    return isinstance(block.layers[0].norm1, nn.modules.instancenorm._InstanceNorm)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the block's activations and convolutions (autocast's, under autocast)."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _params(block: nn.Module) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for layer in block.layers:
        out += [*_affine(layer.norm1), layer.conv1.weight]
        if layer.bottleneck:
            out += [*_affine(layer.norm2), layer.conv2.weight]
    return out


def _affine(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A norm's scale and shift; a norm without them (instance norm's default) applies 1 and 0,
    passed as constants whose gradients are dropped."""
    if norm.weight is not None:
        return norm.weight, norm.bias
    ref = next(iter(norm.parameters()), None) or norm.running_mean
    kw = {"dtype": torch.get_default_dtype()} if ref is None else {"dtype": ref.dtype,
                                                                     "device": ref.device}
    return torch.ones(norm.num_features, **kw), torch.zeros(norm.num_features, **kw)


@torch.no_grad()
def _update_running_stats(bn: nn.Module, mean: torch.Tensor, var: torch.Tensor,
                          count: int) -> None:
    """What batch norm does in training mode: once per step, unbiased variance, momentum or
    (momentum=None) the cumulative average. Instance norm's statistics ([N, c], ``count``
    positions each) enter as their average over the samples, as instance norm averages them."""
    if not bn.track_running_stats or bn.running_mean is None:
        return
    if mean.dim() == 2:  # instance norm counts no batches and takes momentum None as 0
        mean, var, f = mean.mean(0), var.mean(0), bn.momentum or 0.0
    elif bn.momentum is not None:
        bn.num_batches_tracked.add_(1)
        f = bn.momentum
    elif torch.compiler.is_compiling():  # a tensor: no graph break on the count
        f = 1.0 / bn.num_batches_tracked.add_(1).to(bn.running_mean.dtype)
    else:
        f = 1.0 / float(bn.num_batches_tracked.add_(1))
    bn.running_mean.mul_(1 - f).add_(mean.to(bn.running_mean.dtype), alpha=f)
    unbiased = var * (count / (count - 1))
    bn.running_var.mul_(1 - f).add_(unbiased.to(bn.running_var.dtype), alpha=f)


KERNEL_CHOICES = ("auto", "triton", "torch")

# The default on CUDA is the path whose speed a GPU run has recorded. docs/benchmarks.md
# ("Results: GPU") records the PyTorch operations on an H100: 17/17 float64 parity checks, and
# their training speed and memory against torchvision. The Triton kernels have no GPU record yet,
# so they are opt-in (DENSENETS_KERNELS=triton) until a run of benchmarks/gpu_kernels.py, which
# prints the default its numbers support, records them faster and this line changes with it.
CUDA_DEFAULT = "torch"


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # not installed, or installed without a working build
        return False
    return True


def _triton_problem(device_type: str, dtype: torch.dtype) -> str | None:
    """Why the Triton kernels cannot run on ``device_type``/``dtype``, or None."""
    if not _triton_importable():
        return "Triton is not installed (pip install triton)"
    if dtype not in TRITON_DTYPES:
        return f"they take float32, bfloat16 or float16, not {dtype}"
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "on a CPU they run only through Triton's interpreter: set TRITON_INTERPRET=1"
    if device_type not in ("cpu", "cuda"):
        return f"they run on CUDA (or a CPU through the interpreter), not {device_type}"
    return None


def backend(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> str:
    """Which implementation of the block's passes trains on ``device``/``dtype``: "triton"
    (fused GPU kernels), "native" (fused C kernels, CPU float32/float64) or "torch" (PyTorch
    operations).

    ``DENSENETS_KERNELS`` overrides the default (auto: :data:`CUDA_DEFAULT` on CUDA, the C
    kernels on CPU, PyTorch operations otherwise): ``triton`` selects the Triton kernels anywhere
    and raises if they cannot run; ``torch`` forces PyTorch operations.
    """
    device_type = torch.device(device).type
    choice = (os.environ.get("DENSENETS_KERNELS") or "auto").strip().lower()
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"DENSENETS_KERNELS={choice!r}: expected one of "
                         f"{', '.join(KERNEL_CHOICES)}")
    if choice == "torch":
        return "torch"
    if choice == "triton":
        problem = _triton_problem(device_type, dtype)
        if problem is not None:
            raise RuntimeError(f"DENSENETS_KERNELS=triton, but the Triton kernels cannot run: "
                               f"{problem}")
        return "triton"
    if device_type == "cuda":
        return _cuda_default(dtype)
    if device_type != "cpu":
        return "torch"
    probe = torch.empty(0, device=device, dtype=dtype)
    return "native" if cpu_kernels.usable(probe) else "torch"


def _cuda_default(dtype: torch.dtype) -> str:
    if CUDA_DEFAULT != "triton" or dtype not in TRITON_DTYPES:
        return "torch"
    if _triton_importable():
        return "triton"
    _warn_once("Triton is not installed: the memory-efficient blocks run as PyTorch "
               "operations on CUDA (slower; pip install triton)")
    return "torch"


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(f"densenets: {message}", stacklevel=3)


def _constant_for_compile(fn):
    """``torch.compiler.assume_constant_result`` without its import of torch._dynamo (some 70
    MiB of code in every process that trains eagerly, charged to its first step): the marker
    torch.compile reads is the attribute that function sets, as torch sets it on its own
    functions. test_compile checks that compiled training still sees a constant here."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_for_compile
def _kernels_for(device_type: str, dtype: torch.dtype, params_match: bool) -> str:
    """:func:`backend`, constant for torch.compile (it reads the environment and may build the
    C kernels: nothing to trace); the C kernels also need the parameters in the compute
    dtype."""
    choice = backend(device_type, dtype)
    return "torch" if choice == "native" and not params_match else choice


def efficient_block_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Training-mode forward of a :class:`~densenets.models.densenet.DenseBlock` through the shared
    buffer; same outputs, gradients and running statistics as the plain forward.

    Falls back to the plain forward (with a one-time warning) for blocks the fused path does
    not cover; :func:`unsupported_reason` says why. The block runs as the custom operator
    ``densenets::dense_block`` (:mod:`densenets.efficient.ops`), so torch.compile traces
    through it.
    """
    reason = unsupported_reason(block)
    if reason is not None:
        if reason not in _warned:
            _warned.add(reason)
            warnings.warn(f"memory_efficient: running the plain dense block because {reason}",
                          stacklevel=2)
        return block.plain_forward(x)
    layers = block.layers
    cdt = _compute_dtype(x)
    params = _params(block)
    bottleneck = layers[0].bottleneck
    kernels = _kernels_for(x.device.type, cdt, all(p.dtype == cdt for p in params))
    instance = _is_instance(block)
    if instance and kernels == "triton":  # their reductions span all rows: batch norm only
        kernels = "torch"
    with torch.autocast(x.device.type, enabled=False):
        outs = torch.ops.densenets.dense_block(
            x.to(cdt), params, block.growth_rate,
            layers[0].conv1.out_channels if bottleneck else 0,
            [layer.drop_rate if layer.training else 0.0 for layer in layers],
            layers[0].norm1.eps, layers[0].norm2.eps if bottleneck else 0.0,
            _returns_buffer(x), kernels, instance)
    out, saved = ops.outputs(outs)
    count = x.numel() // x.shape[1] // (x.shape[0] if instance else 1)
    for i, layer in enumerate(layers):
        c = x.shape[1] + i * block.growth_rate
        _update_running_stats(layer.norm1, saved.mean[..., :c], saved.var[..., :c], count)
        if bottleneck:
            _update_running_stats(layer.norm2, saved.mean2[i], saved.var2[i], count)
    return out
