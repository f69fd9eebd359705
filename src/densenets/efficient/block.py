"""The memory-efficient dense block as one autograd Function with a hand-written backward.

Every activation of a block is held as an NHWC matrix [M, C] (M = N*H*W pixels, one column per
channel), so a 1x1 convolution is a plain matrix product and a layer's input, the prefix of the
block's channels, is a strided view with no copy:

- ``out`` [M, C]: the block output. Layer l writes its k new channels into its column slice.
- ``xhat`` [M, C]: every channel normalised by its batch mean and variance, computed once when
  the channel is produced. In training mode all the layers that read a channel normalise the
  same data, so the statistics are shared; each layer applies only its own affine.
- ``xhat2`` [L, M, 4k]: the normalised bottleneck outputs, the only per-layer tensors kept.

BN1-ReLU of the prefix (O(L^2) values over the block) is never stored: backward recomputes it.
BN1's backward is linear in the incoming gradient, so the terms of every layer reading a channel
are summed first (``g_sum``) and normalised once per channel, when its last reader is done.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .passes import (
    bn_backward,
    bn_input_grad,
    bn_relu,
    bn_relu_backward,
    conv,
    conv_grads,
    dropout_noise,
    nchw,
    nhwc,
    normalise,
    row_chunks,
    workspace,
)


@dataclass
class BlockSpec:
    """What the Function needs to know about a block beyond its tensors."""

    in_channels: int
    growth_rate: int
    num_layers: int
    bottleneck: bool
    inter_channels: int  # bn_size * k, 0 without a bottleneck
    drop_rates: list[float]
    eps1: float
    eps2: float
    compute_dtype: torch.dtype
    acc_dtype: torch.dtype  # statistics, parameter gradients and gradient sums
    channels_last_input: bool
    native: bool  # fused C kernels (CPU float32/float64) instead of PyTorch operations
    # filled by forward: batch statistics for the running-statistics update
    stats: dict = field(default_factory=dict)

    @property
    def out_channels(self) -> int:
        return self.in_channels + self.num_layers * self.growth_rate

    def layer_params(self, params: tuple, i: int) -> tuple:
        n = 6 if self.bottleneck else 3
        return params[n * i: n * (i + 1)]


class EfficientDenseBlock(torch.autograd.Function):
    """forward(spec, x, *params) -> block output; params are per layer
    (norm1.weight, norm1.bias, conv1.weight[, norm2.weight, norm2.bias, conv2.weight])."""

    @staticmethod
    def forward(ctx, spec: BlockSpec, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        result, saved, spec.stats = forward_passes(spec, x, params)
        ctx.spec, ctx.shape, ctx.n_params = spec, tuple(x.shape), len(params)
        # saved through autograd, which frees them after backward (unless retain_graph)
        ctx.save_for_backward(*params, *saved)
        return result

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        saved = ctx.saved_tensors
        params, rest = saved[:ctx.n_params], saved[ctx.n_params:]
        dx, grads = backward_passes(ctx.spec, ctx.shape, grad_out, params, rest)
        return (None, dx, *grads)


def forward_passes(spec: BlockSpec, x: torch.Tensor, params) -> tuple[torch.Tensor, list, dict]:
    """The block's forward with the C kernels or PyTorch operations: (output, tensors for
    :func:`backward_passes`, batch statistics for the running-statistics update)."""
    n, c0, h, w = x.shape
    m, c_out, k, b = n * h * w, spec.out_channels, spec.growth_rate, spec.inter_channels
    cdt, acc, dev, native = spec.compute_dtype, spec.acc_dtype, x.device, spec.native
    if m <= 1:
        raise ValueError("Expected more than 1 value per channel when training, got input "
                         f"size {tuple(x.shape)}")
    # Channels-last callers get this buffer itself; others a contiguous copy of it.
    shape = (n, h, w, c_out)
    out = (torch.empty(shape, dtype=cdt, device=dev) if spec.channels_last_input
           else workspace("out", shape, cdt, dev))
    out[..., :c0].copy_(x.permute(0, 2, 3, 1))
    out = out.view(m, c_out)
    xhat = torch.empty((m, c_out), dtype=cdt, device=dev)
    mean = torch.empty(c_out, dtype=acc, device=dev)
    var, invstd = torch.empty_like(mean), torch.empty_like(mean)
    mean[:c0], var[:c0], invstd[:c0] = normalise(out[:, :c0], xhat[:, :c0], spec.eps1, acc,
                                                 native)
    xhat2 = torch.empty((spec.num_layers, m, b), dtype=cdt, device=dev) if b else None
    stats2, noises = [], []
    for i in range(spec.num_layers):
        c = c0 + i * k
        p = spec.drop_rates[i]
        g1, b1, w1, *rest = spec.layer_params(params, i)
        if b:
            g2, b2, w2 = rest
            z = xhat2[i]
            w1t = w1.to(cdt).view(b, c).t()
            for r in row_chunks(m, c, dev):
                a = bn_relu(xhat[r, :c], g1, b1, workspace("a", (r.stop - r.start, c), cdt,
                                                            dev), native)
                torch.mm(a, w1t, out=z[r])
            if p > 0:
                noises.append(dropout_noise((n, b, h, w), p, cdt, dev,
                                            spec.channels_last_input))
                z.mul_(noises[-1])
            hidden = workspace("b", (m, b), cdt, dev)
            stats2.append(normalise(z, z, spec.eps2, acc, native, relu=(g2, b2, hidden)))
            new = conv(nchw(hidden, n, h, w), w2.to(cdt), 1)
        else:
            a = bn_relu(xhat[:, :c], g1, b1, workspace("a", (m, c), cdt, dev), native)
            new = conv(nchw(a, n, h, w), w1.to(cdt), 1)
        new = nhwc(new)
        if p > 0:
            noises.append(dropout_noise((n, k, h, w), p, cdt, dev, spec.channels_last_input))
            new = new * noises[-1]
        mean[c:c + k], var[c:c + k], invstd[c:c + k] = normalise(
            new, xhat[:, c:c + k], spec.eps1, acc, native, copy=out[:, c:c + k])
    stats = {"mean": mean, "var": var, "count": m,
             "mean2": [s[0] for s in stats2], "var2": [s[1] for s in stats2]}
    saved = [xhat, invstd, *([xhat2] if b else []), *(st[2] for st in stats2), *noises]
    result = nchw(out, n, h, w)
    return (result if spec.channels_last_input else result.contiguous()), saved, stats


def backward_passes(spec: BlockSpec, shape: tuple, grad_out: torch.Tensor, params, saved):
    """Backward of :func:`forward_passes` given its saved tensors: (dL/dx, parameter grads)."""
    xhat, invstd, *rest = saved
    xhat2, rest = (rest[0], rest[1:]) if spec.inter_channels else (None, rest)
    n_stats2 = spec.num_layers if spec.inter_channels else 0
    invstd2, noises = list(rest[:n_stats2]), list(rest[n_stats2:])
    n, c0, h, w = shape
    m, c_out, k, b = n * h * w, spec.out_channels, spec.growth_rate, spec.inter_channels
    cdt, acc, dev, native = spec.compute_dtype, spec.acc_dtype, grad_out.device, spec.native
    grad_out = nhwc(grad_out.to(cdt))
    if native and grad_out.stride(1) != 1:
        grad_out = grad_out.contiguous()
    # g_sum[:, j] = sum over readers l of gamma1_l[j] * dL/dy1_l[:, j] (y1 = BN1 output)
    g_sum = workspace("g_sum", (m, c_out), acc, dev)
    grads: list[torch.Tensor | None] = [None] * len(params)
    last = spec.num_layers - 1
    for i in reversed(range(spec.num_layers)):
        c = c0 + i * k
        p = spec.drop_rates[i]
        g1, b1, w1, *rest = spec.layer_params(params, i)
        if i == last:  # no reader: only the block output's gradient
            d_new = grad_out[:, c:c + k]
        else:
            d_new = bn_input_grad(g_sum[:, c:c + k], xhat[:, c:c + k], invstd[c:c + k],
                                  grad_out[:, c:c + k], workspace("d_new", (m, k), acc, dev),
                                  acc, native)
        if p > 0:
            d_new = d_new * noises.pop()
        d_new = nchw(d_new.to(cdt).contiguous(), n, h, w)
        if b:
            g2, b2, w2 = rest
            z = xhat2[i]
            hidden = bn_relu(z, g2, b2, workspace("b", (m, b), cdt, dev), native)
            d_hidden, dw2 = conv_grads(d_new, nchw(hidden, n, h, w), w2.to(cdt), 1)
            d_hidden = nhwc(d_hidden)
            dz, dg2, db2 = bn_backward(d_hidden, z, hidden, g2, b2, invstd2[i], acc,
                                       native)
            if p > 0:
                dz = dz * noises.pop()
            dw1, dg1, db1 = _conv1x1_backward(dz.to(cdt), w1.to(cdt).view(b, c), xhat[:, :c],
                                              g1, b1, g_sum[:, :c], i != last, acc, native)
            dw1 = dw1.view_as(w1)
            grads[6 * i + 3: 6 * i + 6] = [dg2.to(g2.dtype), db2.to(b2.dtype),
                                           dw2.to(w2.dtype)]
        else:
            a = bn_relu(xhat[:, :c], g1, b1, workspace("a", (m, c), cdt, dev), native)
            da, dw1 = conv_grads(d_new, nchw(a, n, h, w), w1.to(cdt), 1)
            # the last layer reads every earlier channel: it writes g_sum, others add to it
            dg1, db1 = bn_relu_backward(nhwc(da), a, xhat[:, :c], g1, b1, g_sum[:, :c],
                                        accumulate=i != last, acc=acc, native=native)
        j = (6 if b else 3) * i
        grads[j: j + 3] = [dg1.to(g1.dtype), db1.to(b1.dtype), dw1.to(w1.dtype)]
    dx = bn_input_grad(g_sum[:, :c0], xhat[:, :c0], invstd[:c0], grad_out[:, :c0],
                       torch.empty((m, c0), dtype=acc, device=dev), acc, native)
    dx = nchw(dx.to(cdt), n, h, w)
    if not spec.channels_last_input:
        dx = dx.contiguous()
    return dx, grads


def _conv1x1_backward(dz, w1, xhat, g1, b1, g_sum, accumulate: bool, acc, native: bool):
    """Backward of z = relu(xhat * g1 + b1) @ w1.t() for one bottleneck layer, in row chunks
    that stay in cache: recompute the BN-ReLU, then dw1 and the BN1 terms. Returns
    (dw1, dgamma1, dbeta1) and adds gamma1 * dL/dy1 into ``g_sum`` (writes it if not
    ``accumulate``)."""
    m, c = xhat.shape
    dev = xhat.device
    dw1 = torch.zeros((w1.shape[0], c), dtype=acc, device=dev)
    dg1 = torch.zeros(c, dtype=acc, device=dev)
    db1 = torch.zeros_like(dg1)
    for r in row_chunks(m, c, dev):
        rows = r.stop - r.start
        a = bn_relu(xhat[r], g1, b1, workspace("a", (rows, c), dz.dtype, dev), native)
        if dw1.dtype == a.dtype:
            dw1.addmm_(dz[r].t(), a)
        else:  # half precision: sum the chunks in float32
            dw1 += torch.mm(dz[r].t(), a)
        da = torch.mm(dz[r], w1, out=workspace("d", (rows, c), dz.dtype, dev))
        dg, db = bn_relu_backward(da, a, xhat[r], g1, b1, g_sum[r], accumulate, acc, native)
        dg1 += dg
        db1 += db
    return dw1, dg1, db1
