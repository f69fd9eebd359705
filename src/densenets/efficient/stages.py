"""The stem and the transitions in memory-efficient training: recomputed in backward.

Between the dense blocks the plain model keeps, for backward, every map its BN-ReLU-conv-pool
stages make: the stem's convolution and BN-ReLU outputs and the pool's indices (at the input's
half resolution: in 3D the largest maps of the whole network), each transition's BN-ReLU output
(the block's size again) and its convolution's output. Here a stage keeps only its input (a
transition's is the block output, kept by the block anyway) and runs again in backward to get
its gradients, as ``torch.utils.checkpoint`` would, with one difference that keeps the plain
model's training exact: the norm's running statistics are updated in forward only (the
recomputation normalises with batch statistics and leaves the running ones alone).

A stage with dropout draws its masks in forward as the plain model does; backward replays the
random generator's state from then, so the recomputation drops the same units. A stage with hooks
on its modules (they would not see the stage run) runs plainly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .layout import draws_channels_last, dropout

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_STEM = ("conv0", "norm0", "relu0", "pool0")


def _autocast_state(x: torch.Tensor) -> tuple[str, bool, torch.dtype]:
    device = x.device.type
    return device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)


def _autocast(state: tuple[str, bool, torch.dtype]):
    """Backward recomputes under forward's autocast (backward itself runs outside it)."""
    device, enabled, dtype = state
    return torch.autocast(device, dtype=dtype, enabled=enabled)


class _Recomputed(torch.autograd.Function):
    """out = run(x, True) without a graph; backward builds it again with run(x, False)."""

    @staticmethod
    def forward(ctx, run: Callable, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.run, ctx.autocast = run, _autocast_state(x)
        ctx.rng = _rng_state(x.device)  # the draws forward is about to make, for backward
        ctx.save_for_backward(x, *params)
        with torch.no_grad():
            return run(x, True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, *params = ctx.saved_tensors
        wants_x = ctx.needs_input_grad[1]
        wanted = [p for p, need in zip(params, ctx.needs_input_grad[2:], strict=True) if need]
        with torch.random.fork_rng(_rng_devices(x.device)), torch.enable_grad(), \
                _autocast(ctx.autocast):
            _set_rng_state(x.device, ctx.rng)
            xd = x.detach().requires_grad_(wants_x)
            out = ctx.run(xd, False)
            grads = iter(torch.autograd.grad(out, ([xd] if wants_x else []) + wanted, grad))
        dx = next(grads) if wants_x else None
        return (None, dx, *(next(grads) if need else None
                            for need in ctx.needs_input_grad[2:]))


def _rng_devices(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda"
                                   else None)


def _set_rng_state(device: torch.device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _normalise(norm: nn.Module, x: torch.Tensor, update: bool) -> torch.Tensor:
    """The norm in training mode; without ``update`` its running statistics stay untouched
    (the same batch statistics, so the same output)."""
    if update:
        return norm(x)
    if isinstance(norm, _BATCH_NORMS):
        return F.batch_norm(x, None, None, norm.weight, norm.bias, True, 0.0, norm.eps)
    if isinstance(norm, _INSTANCE_NORMS):
        return F.instance_norm(x, None, None, norm.weight, norm.bias, True, 0.0, norm.eps)
    return norm(x)  # group norm keeps no running statistics


def _hooked(modules: list[nn.Module]) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
               or m._backward_pre_hooks for m in modules)


def _recomputable_norm(norm: nn.Module) -> bool:
    return isinstance(norm, (*_BATCH_NORMS, *_INSTANCE_NORMS, nn.GroupNorm)) and norm.training


def _stem(modules: dict[str, nn.Module]) -> Callable | None:
    conv, norm, relu, pool = (modules.get(n) for n in _STEM)
    if not (isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and norm is not None
            and _recomputable_norm(norm) and isinstance(relu, nn.ReLU)
            and isinstance(pool, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d))):
        return None

    def run(x: torch.Tensor, update: bool) -> torch.Tensor:
        return pool(F.relu(_normalise(norm, conv(x), update), inplace=True))

    return run


def _transition(t: nn.Module, channels_last: bool) -> Callable | None:
    """The transition's run; its dropout draws as a tensor of that layout would (the plain
    model's, fixed when forward runs: backward's replay must draw the same units)."""
    if not _recomputable_norm(t.norm):
        return None

    pool, conv = t.pool, t.conv
    # Averaging 2x2 windows and the 1x1 convolution commute (both linear, one over positions,
    # one over channels): pooling first gives the convolution 2^rank times fewer positions
    commute = (isinstance(pool, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d))
               and _tuple(pool.kernel_size, 1) == _tuple(pool.stride, 1) and not any(
                   _tuple(pool.padding, 1)) and not pool.ceil_mode and conv.bias is None
               and set(conv.kernel_size) == {1} and set(conv.stride) == {1}
               and not hasattr(t, "drop"))  # dropout sits between them
    drop = getattr(t, "drop", None)

    def run(x: torch.Tensor, update: bool) -> torch.Tensor:
        y = F.relu(_normalise(t.norm, x, update), inplace=True)
        if commute:
            return conv(_average(pool, y))
        y = conv(y)
        if type(drop) is nn.Dropout and drop.training:
            y = dropout(y, drop.p, channels_last)
        elif drop is not None:
            y = drop(y)
        return pool(y)

    return run


_POOL_BACKWARD = {2: torch.ops.aten.max_pool2d_with_indices_backward.default,
                  3: torch.ops.aten.max_pool3d_with_indices_backward.default}
_POOL_FORWARD = {2: torch.ops.aten.max_pool2d_with_indices.default,
                 3: torch.ops.aten.max_pool3d_with_indices.default}
_conv_backward = torch.ops.aten.convolution_backward.default


class _BatchNormStem(torch.autograd.Function):
    """conv - batch norm - ReLU - max pool (the ImageNet stem, 2D and 3D) keeping only its
    input, the pool's indices and the batch statistics; backward recomputes the convolution and
    works in place, so it holds two maps of the stem's size where autograd would hold four (the
    convolution output, the BN-ReLU output and their two gradients): in 3D the stem's backward
    is the step's peak."""

    @staticmethod
    def forward(ctx, x, weight, gamma, beta, conv, norm, pool):
        with torch.no_grad():
            y, mean, invstd = torch.native_batch_norm(conv(x), gamma, beta, *_running(norm),
                                                      True, _momentum(norm), norm.eps)
            F.relu(y, inplace=True)
            r = x.dim() - 2
            out, indices = _POOL_FORWARD[r](y, _tuple(pool.kernel_size, r),
                                            _tuple(pool.stride, r), _tuple(pool.padding, r),
                                            _tuple(pool.dilation, r), pool.ceil_mode)
        ctx.conv, ctx.pool, ctx.eps = conv, pool, norm.eps
        ctx.save_for_backward(x, weight, gamma, beta, indices, mean, invstd, out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, gamma, beta, indices, mean, invstd, out = ctx.saved_tensors
        conv, pool, r = ctx.conv, ctx.pool, x.dim() - 2
        shape = (1, -1) + (1,) * r
        with torch.no_grad():
            xhat = conv(x).sub_(mean.view(shape)).mul_(invstd.view(shape))  # normalised, in place
            # ReLU's mask matters only where the pool took a value, and there the value is the
            # pool's output: mask the small gradient before the pool spreads it
            grad_out = grad_out.masked_fill(out <= 0, 0)
            g = _POOL_BACKWARD[r](grad_out, xhat, _tuple(pool.kernel_size, r),
                                  _tuple(pool.stride, r), _tuple(pool.padding, r),
                                  _tuple(pool.dilation, r), pool.ceil_mode, indices)
            dims = [d for d in range(g.dim()) if d != 1]
            dbeta = g.sum(dims)
            inner = list(range(1, g.dim() - 1))  # a sample's spatial axes
            dgamma = torch.stack([(g[n] * xhat[n]).sum(inner) for n in range(x.shape[0])]).sum(0)
            count = g.numel() // g.shape[1]
            # dL/dz = gamma * invstd * (g - mean(g) - xhat * mean(g * xhat)), into g
            g.sub_((dbeta / count).view(shape))
            g.addcmul_(xhat, (-dgamma / count).view(shape))
            g.mul_((gamma * invstd).view(shape))
            del xhat
            dx, dw, _ = _conv_backward(g, x, weight, None, _tuple(conv.stride, r),
                                       _tuple(conv.padding, r), _tuple(conv.dilation, r), False,
                                       [0] * r, conv.groups,
                                       [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False])
        return dx, dw, dgamma, dbeta, None, None, None


def _running(norm: nn.Module) -> tuple:
    """The running statistics batch norm updates in training mode (None when it keeps none)."""
    return (norm.running_mean, norm.running_var) if norm.track_running_stats else (None, None)


def _momentum(norm: nn.Module) -> float:
    """The running-statistics factor of this step, counted as batch norm counts it."""
    if not norm.track_running_stats or norm.num_batches_tracked is None:
        return 0.0
    norm.num_batches_tracked.add_(1)
    return norm.momentum if norm.momentum is not None else 1.0 / float(norm.num_batches_tracked)


def _tuple(v, r: int) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [v] * r


def _bn_stem(named: dict[str, nn.Module]) -> tuple[nn.Module, ...] | None:
    """(conv, norm, pool) when the stem is the plain ImageNet one with an affine batch norm of
    rank 2 or 3 (the in-place backward's case), else None."""
    conv, norm, pool = named["conv0"], named["norm0"], named["pool0"]
    if torch.is_autocast_enabled(conv.weight.device.type):  # its in-place arithmetic is fp32's
        return None
    if not (isinstance(norm, (nn.BatchNorm2d, nn.BatchNorm3d)) and norm.affine
            and isinstance(pool, (nn.MaxPool2d, nn.MaxPool3d)) and conv.bias is None
            and conv.padding_mode == "zeros"):
        return None
    return conv, norm, pool


def _is_transition(m: nn.Module) -> bool:
    """A DenseNet transition (norm, relu, conv, [drop,] pool), known by its parts: this package
    sits below the models and does not import them."""
    return isinstance(m, nn.Sequential) and [n for n in m._modules if n != "drop"] == [
        "norm", "relu", "conv", "pool"]


def _average(pool: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """``pool(y)`` for a k x k x k / k average pool; a channels-last volume is averaged as a
    depthwise convolution with weights 1/k^3, the same sums, which the CPU's convolution library
    runs some 30x faster than its average pool on that layout (forward and backward)."""
    if y.dim() != 5 or not y.is_contiguous(memory_format=torch.channels_last_3d) \
            or pool.divisor_override is not None:
        return pool(y)
    k = _tuple(pool.kernel_size, 3)
    w = torch.full((y.shape[1], 1, *k), 1.0 / (k[0] * k[1] * k[2]), dtype=y.dtype,
                   device=y.device)
    return F.conv3d(y, w, stride=k, groups=y.shape[1])


def _params(modules: list[nn.Module]) -> list[torch.Tensor]:
    return [p for m in modules for p in m.parameters()]


def transition(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for a transition (norm, relu, conv, [drop,] pool) in training, recomputed
    in backward where it allows it."""
    run = _transition(module, draws_channels_last(x)) if _is_transition(module) else None
    if run is None or _hooked([module, *module.children()]):
        return module(x)
    return _Recomputed.apply(run, x, *_params([module]))


def run_features(features: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``features(x)`` in training mode, with the stem and the transitions recomputed in
    backward where they allow it (see the module docstring)."""
    children = list(features.named_children())
    named = dict(children)
    stem = _stem(named) if [n for n, _ in children[:4]] == list(_STEM) else None
    stem_modules = [named[n] for n in _STEM if n in named]
    i = 0
    while i < len(children):
        name, module = children[i]
        if name == "conv0" and stem is not None and not _hooked([features, *stem_modules]):
            bn_stem = _bn_stem(named)
            if bn_stem is not None:
                conv, norm, pool = bn_stem
                x = _BatchNormStem.apply(x, conv.weight, norm.weight, norm.bias, *bn_stem)
            else:
                x = _Recomputed.apply(stem, x, *_params(stem_modules))
            i += len(_STEM)
            continue
        x = transition(module, x) if _is_transition(module) else module(x)
        i += 1
    return x
