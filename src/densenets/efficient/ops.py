"""The memory-efficient dense block as two PyTorch custom operators, so torch.compile traces
through a model with no graph break: ``densenets::dense_block`` (forward) and
``densenets::dense_block_backward``, tied together with ``register_autograd``.

Both have fake (meta) implementations that give every output's shape, dtype and strides, so
dynamo and AOTAutograd trace them without running them; inductor calls them as opaque kernels.
The ``kernels`` argument picks the implementation inside: "native" (C kernels, CPU),
"torch" (PyTorch operations) or "triton". Outputs, in order:

``[output, mean, var, mean2, var2, big, invstd, z, invstd2, *dropout masks]``

mean/var [C] are BN1's batch statistics of every channel of the block, mean2/var2 [L, 4k]
BN2's (empty without a bottleneck); the rest is what backward reads: ``big`` is the normalised
block ``xhat`` [M, C] (C kernels, PyTorch) or, for Triton, the raw block buffer when the output
is a copy of it (empty otherwise: the output is the buffer); ``z`` the bottleneck outputs
[L, M, 4k] (normalised, or raw for Triton).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import block as block_impl
from .block import BlockSpec

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _spec(x_shape, dtype: torch.dtype, growth_rate: int, inter_channels: int,
          drop_rates: list[float], eps1: float, eps2: float, channels_last: bool,
          kernels: str) -> BlockSpec:
    return BlockSpec(
        in_channels=x_shape[1], growth_rate=growth_rate, num_layers=len(drop_rates),
        bottleneck=inter_channels > 0, inter_channels=inter_channels,
        drop_rates=list(drop_rates), eps1=eps1, eps2=eps2, compute_dtype=dtype,
        acc_dtype=torch.float32 if dtype in _LOW_PRECISION else dtype,
        channels_last_input=channels_last, native=kernels == "native")


@torch.library.custom_op("densenets::dense_block", mutates_args=())
def dense_block(x: Tensor, params: list[Tensor], growth_rate: int, inter_channels: int,
                drop_rates: list[float], eps1: float, eps2: float, channels_last: bool,
                kernels: str) -> list[Tensor]:
    """Training-mode forward of one dense block (see the module docstring for the outputs)."""
    spec = _spec(x.shape, x.dtype, growth_rate, inter_channels, drop_rates, eps1, eps2,
                 channels_last, kernels)
    with torch.no_grad():
        if kernels == "triton":
            from . import triton_block

            result, s = triton_block.forward(spec, x, params)
            return [result, s["mean"], s["var"], s["mean2"], s["var2"], s["buf"], s["invstd"],
                    s["z"], s["invstd2"], *s["noises"]]
        result, saved, stats = block_impl.forward_passes(spec, x, params)
        xhat, invstd, *rest = saved
        b, layers = spec.inter_channels, spec.num_layers
        empty = x.new_empty(0, dtype=spec.acc_dtype)
        z = rest[0] if b else x.new_empty(0)
        invstd2 = torch.stack(rest[1:1 + layers]) if b else empty
        noises = rest[1 + layers:] if b else rest
        mean2 = torch.stack(stats["mean2"]) if b else empty.clone()
        var2 = torch.stack(stats["var2"]) if b else empty.clone()
        return [result, stats["mean"], stats["var"], mean2, var2, xhat, invstd, z, invstd2,
                *noises]


def _noise_shapes(m: int, k: int, b: int, drop_rates) -> list[tuple[int, int]]:
    shapes = []
    for p in drop_rates:
        if p > 0:
            shapes += [(m, b), (m, k)] if b else [(m, k)]
    return shapes


@dense_block.register_fake
def _(x, params, growth_rate, inter_channels, drop_rates, eps1, eps2, channels_last, kernels):
    n, c0, h, w = x.shape
    layers, b, m = len(drop_rates), inter_channels, n * h * w
    c_out = c0 + layers * growth_rate
    acc = torch.float32 if x.dtype in _LOW_PRECISION else x.dtype
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    result = torch.empty((n, c_out, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)

    def new(*shape, dtype=acc):
        return torch.empty(shape, dtype=dtype, device=x.device)

    stats2 = (layers, b) if b else (0,)
    big = (0,) if kernels == "triton" and channels_last else (m, c_out)
    return [result, new(c_out), new(c_out), new(*stats2), new(*stats2), new(*big, dtype=x.dtype),
            new(c_out), new(*((layers, m, b) if b else (0,)), dtype=x.dtype), new(*stats2),
            *(new(*s, dtype=x.dtype) for s in _noise_shapes(m, growth_rate, b, drop_rates))]


@torch.library.custom_op("densenets::dense_block_backward", mutates_args=())
def dense_block_backward(grad_out: Tensor, result: Tensor, params: list[Tensor],
                         saved: list[Tensor], growth_rate: int, inter_channels: int,
                         drop_rates: list[float], eps1: float, eps2: float, channels_last: bool,
                         kernels: str) -> list[Tensor]:
    """[dL/dx, *parameter gradients] of :func:`dense_block`; ``saved`` is its outputs after
    the first."""
    layers = len(drop_rates)
    n, c_out, h, w = result.shape
    shape = (n, c_out - layers * growth_rate, h, w)
    spec = _spec(shape, result.dtype, growth_rate, inter_channels, drop_rates, eps1, eps2,
                 channels_last, kernels)
    mean, var, mean2, var2, big, invstd, z, invstd2, *noises = saved
    with torch.no_grad():
        if kernels == "triton":
            from . import triton_block

            tensors = {"mean": mean, "invstd": invstd, "buf": big, "z": z, "mean2": mean2,
                       "invstd2": invstd2, "noises": noises}
            dx, grads = triton_block.backward(spec, shape, grad_out, result, params, tensors)
        else:
            b = spec.inter_channels
            rest = [z, *invstd2.unbind(0)] if b else []
            dx, grads = block_impl.backward_passes(spec, shape, grad_out, params,
                                                   [big, invstd, *rest, *noises])
    # weight gradients of channels-last convolutions come channels-last: one layout, as faked
    return [dx, *(g.contiguous() for g in grads)]


@dense_block_backward.register_fake
def _(grad_out, result, params, saved, growth_rate, inter_channels, drop_rates, eps1, eps2,
      channels_last, kernels):
    n, c_out, h, w = result.shape
    c0 = c_out - len(drop_rates) * growth_rate
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dx = torch.empty((n, c0, h, w), dtype=result.dtype, device=result.device, memory_format=fmt)
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
    return (out[0], list(out[1:]), *([None] * len(ctx.args)))


dense_block.register_autograd(_backward, setup_context=_setup_context)
