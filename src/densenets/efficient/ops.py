"""The memory-efficient dense block as two PyTorch custom operators, so torch.compile traces
through a model with no graph break: ``densenets::dense_block`` (forward) and
``densenets::dense_block_backward``, tied together with ``register_autograd``.

Both have fake (meta) implementations that give every output's shape, dtype and strides, so
dynamo and AOTAutograd trace them without running them; inductor calls them as opaque kernels.
The ``kernels`` argument names the backend whose passes run inside (:data:`BACKENDS`).
The forward returns the block output, then the fields of :class:`~.algorithm.Saved` in their
declared order, the dropout masks last: :func:`outputs` reads them back by name.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from . import algorithm
from .algorithm import BlockSpec, Saved
from .layout import memory_first, memory_format
from .passes import NativePasses, TorchPasses
from .triton_passes import TritonPasses

# "native": fused C kernels (CPU); "torch": PyTorch operations; "triton": Triton kernels.
BACKENDS: dict[str, type[algorithm.Passes]] = {
    "native": NativePasses, "torch": TorchPasses, "triton": TritonPasses}
_TENSORS = tuple(f.name for f in dataclasses.fields(Saved) if f.name != "noises")


def _flatten(result: Tensor, saved: Saved) -> list[Tensor]:
    return [result, *(getattr(saved, name) for name in _TENSORS), *saved.noises]


def _unflatten(tensors) -> Saved:
    n = len(_TENSORS)
    return Saved(**dict(zip(_TENSORS, tensors[:n], strict=True)), noises=list(tensors[n:]))


def outputs(outs: list[Tensor]) -> tuple[Tensor, Saved]:
    """(block output, the saved record) from the outputs of ``densenets::dense_block``."""
    return outs[0], _unflatten(outs[1:])


def _spec(x: Tensor, c0: int, growth_rate: int, inter_channels: int,
          drop_rates: list[float], eps1: float, eps2: float, channels_last: bool,
          instance: bool) -> BlockSpec:
    """The spec of a block whose input or output is ``x`` (``c0`` input channels)."""
    return BlockSpec(in_channels=c0, growth_rate=growth_rate, inter_channels=inter_channels,
                     drop_rates=tuple(drop_rates), eps1=eps1, eps2=eps2, compute_dtype=x.dtype,
                     channels_last=channels_last, instance=instance,
                     memory_first=memory_first(x.dim() - 2))


@torch.library.custom_op("densenets::dense_block", mutates_args=())
def dense_block(x: Tensor, params: list[Tensor], growth_rate: int, inter_channels: int,
                drop_rates: list[float], eps1: float, eps2: float, channels_last: bool,
                kernels: str, instance: bool = False) -> list[Tensor]:
    """Training-mode forward of one dense block (see the module docstring for the outputs);
    ``instance``: instance norm's statistics (per sample and channel) instead of batch norm's."""
    spec = _spec(x, x.shape[1], growth_rate, inter_channels, drop_rates, eps1, eps2,
                 channels_last, instance)
    with torch.no_grad():
        return _flatten(*algorithm.forward(BACKENDS[kernels], spec, x, params))


@dense_block.register_fake
def _(x, params, growth_rate, inter_channels, drop_rates, eps1, eps2, channels_last, kernels,
      instance=False):
    spec = _spec(x, x.shape[1], growth_rate, inter_channels, drop_rates, eps1, eps2,
                 channels_last, instance)
    return _flatten(*algorithm.fake_forward(BACKENDS[kernels], spec, x))


@torch.library.custom_op("densenets::dense_block_backward", mutates_args=())
def dense_block_backward(grad_out: Tensor, result: Tensor, params: list[Tensor],
                         saved: list[Tensor], growth_rate: int, inter_channels: int,
                         drop_rates: list[float], eps1: float, eps2: float, channels_last: bool,
                         kernels: str, instance: bool = False) -> list[Tensor]:
    """[dL/dx, *parameter gradients] of :func:`dense_block`; ``saved`` is its outputs after
    the first."""
    c0 = result.shape[1] - len(drop_rates) * growth_rate
    spec = _spec(result, c0, growth_rate, inter_channels, drop_rates, eps1, eps2,
                 channels_last, instance)
    with torch.no_grad():
        dx, grads = algorithm.backward(BACKENDS[kernels], spec, grad_out, result, params,
                                       _unflatten(saved))
    # weight gradients of channels-last convolutions come channels-last: one layout, as faked
    return [dx, *(g.contiguous() for g in grads)]


@dense_block_backward.register_fake
def _(grad_out, result, params, saved, growth_rate, inter_channels, drop_rates, eps1, eps2,
      channels_last, kernels, instance=False):
    n, c_out, *spatial = result.shape
    c0 = c_out - len(drop_rates) * growth_rate
    fmt = memory_format(len(spatial), channels_last)
    dx = torch.empty((n, c0, *spatial), dtype=result.dtype, device=result.device,
                     memory_format=fmt)
    return [dx, *(torch.empty(p.shape, dtype=p.dtype, device=p.device) for p in params)]


def _setup_context(ctx, inputs, output) -> None:
    _, params, *args = inputs
    ctx.args, ctx.n_params = tuple(args), len(params)
    ctx.save_for_backward(output[0], *params, *output[1:])
    # Only the block's output carries a gradient. Without this, autograd would hand backward a
    # zero gradient the size of every other output (the saved normalised block, the bottleneck
    # maps): transient memory of the whole block once more, in every block's backward.
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _backward(ctx, grads):
    saved = ctx.saved_tensors
    result, params, rest = saved[0], saved[1:1 + ctx.n_params], saved[1 + ctx.n_params:]
    grad_out = grads[0] if grads[0] is not None else torch.zeros_like(result)
    out = dense_block_backward(grad_out, result, list(params), list(rest), *ctx.args)
    # one None per argument after x and params, as many as autograd counts (older torch leaves
    # out the trailing arguments given at their defaults, such as ``instance``)
    return (out[0], list(out[1:]), *([None] * (len(ctx.needs_input_grad) - 2)))


dense_block.register_autograd(_backward, setup_context=_setup_context)
