"""The memory-efficient block's forward and backward through the Triton kernels.

Same arithmetic as :mod:`densenets.efficient.block` with one difference in what is kept: no
normalised copy of the block (``xhat`` [M, C]). The block buffer itself (the output) and each
channel's batch mean and invstd are enough, because every kernel that reads the prefix applies
BN1 + ReLU to its tiles as they are loaded. Per layer the raw bottleneck output (4k channels)
and its statistics are kept, as before. The 3x3 convolution stays a PyTorch (cuDNN) one.
"""

from __future__ import annotations

import torch

from . import triton_passes as tp
from .block import BlockSpec
from .passes import conv, conv_grads, dropout_noise, nchw, nhwc


def _rows(t: torch.Tensor) -> torch.Tensor:
    """An NHWC matrix view with unit column stride (a copy only when it has none)."""
    return t if t.stride(1) == 1 or t.shape[1] == 1 else t.contiguous()


def forward(spec: BlockSpec, x: torch.Tensor, params) -> tuple[torch.Tensor, dict]:
    """(block output, tensors for :func:`backward` and the running statistics)."""
    n, c0, h, w = x.shape
    m, c_out, k, b = n * h * w, spec.out_channels, spec.growth_rate, spec.inter_channels
    cdt, dev, f32 = spec.compute_dtype, x.device, torch.float32
    if m <= 1:
        raise ValueError("Expected more than 1 value per channel when training, got input "
                         f"size {tuple(x.shape)}")
    out4 = torch.empty((n, h, w, c_out), dtype=cdt, device=dev)
    out4[..., :c0].copy_(x.permute(0, 2, 3, 1))
    out = out4.view(m, c_out)
    mean, var, invstd = (torch.empty(c_out, dtype=f32, device=dev) for _ in range(3))
    tp.batch_stats(out[:, :c0], spec.eps1, mean[:c0], var[:c0], invstd[:c0])
    layers = spec.num_layers
    z_all = torch.empty((layers, m, b) if b else (0,), dtype=cdt, device=dev)
    mean2, var2, invstd2 = (torch.empty((layers, b) if b else (0,), dtype=f32, device=dev)
                            for _ in range(3))
    noises = []
    for i in range(layers):
        c = c0 + i * k
        p = spec.drop_rates[i]
        g1, b1, w1, *rest = spec.layer_params(params, i)
        if b:
            g2, b2, w2 = rest
            z = z_all[i]
            part = tp.gemm_bn_relu(out[:, :c], mean, invstd, g1, b1, w1.view(b, c), z,
                                   stats=p == 0)
            if p > 0:  # BN2 normalises the dropped-out values: statistics after the mask
                noises.append(dropout_noise((n, b, h, w), p, cdt, dev, spec.channels_last_input))
                z.mul_(noises[-1])
                part = tp.col_partials(z)
            tp.finalize(part, m, spec.eps2, mean2[i], var2[i], invstd2[i])
            hidden = tp.bn_relu(z, mean2[i], invstd2[i], g2, b2,
                                torch.empty((m, b), dtype=cdt, device=dev))
            new = conv(nchw(hidden, n, h, w), w2.to(cdt), 1)
        else:
            a = tp.bn_relu(out[:, :c], mean, invstd, g1, b1,
                           torch.empty((m, c), dtype=cdt, device=dev))
            new = conv(nchw(a, n, h, w), w1.to(cdt), 1)
        new = _rows(nhwc(new))
        if p > 0:
            noises.append(dropout_noise((n, k, h, w), p, cdt, dev, spec.channels_last_input))
            new = new * noises[-1]
        tp.batch_stats(new, spec.eps1, mean[c:c + k], var[c:c + k], invstd[c:c + k],
                       copy_to=out[:, c:c + k])
    result = nchw(out, n, h, w)
    if not spec.channels_last_input:
        result = result.contiguous()
    # channels-last callers get the buffer itself as the output; others a copy, so the buffer
    # is kept separately for backward
    buf = out if not spec.channels_last_input else torch.empty(0, dtype=cdt, device=dev)
    return result, {"mean": mean, "var": var, "invstd": invstd, "buf": buf, "z": z_all,
                    "mean2": mean2, "var2": var2, "invstd2": invstd2, "noises": noises}


def backward(spec: BlockSpec, shape: tuple, grad_out: torch.Tensor, result: torch.Tensor,
             params, saved: dict) -> tuple[torch.Tensor, list]:
    """(dL/dx, parameter gradients) from the output's gradient and :func:`forward`'s tensors."""
    n, c0, h, w = shape
    m, c_out, k, b = n * h * w, spec.out_channels, spec.growth_rate, spec.inter_channels
    cdt, dev = spec.compute_dtype, grad_out.device
    mean, invstd, z_all = saved["mean"], saved["invstd"], saved["z"]
    mean2, invstd2, noises = saved["mean2"], saved["invstd2"], list(saved["noises"])
    out = saved["buf"] if saved["buf"].numel() else _rows(nhwc(result))
    grad_out = _rows(nhwc(grad_out.to(cdt)))
    # g_sum[:, j] = sum over readers l of gamma1_l[j] * dL/dy1_l[:, j] (y1 = BN1 output)
    g_sum = torch.empty((m, c_out), dtype=torch.float32, device=dev)
    grads: list[torch.Tensor | None] = [None] * len(params)
    last = spec.num_layers - 1
    for i in reversed(range(spec.num_layers)):
        c = c0 + i * k
        p = spec.drop_rates[i]
        g1, b1, w1, *rest = spec.layer_params(params, i)
        if i == last:  # no reader: only the block output's gradient
            d_new = grad_out[:, c:c + k]
        else:
            d_new = tp.input_grad(g_sum[:, c:c + k], out[:, c:c + k], mean[c:c + k],
                                  invstd[c:c + k], grad_out[:, c:c + k],
                                  torch.empty((m, k), dtype=cdt, device=dev))
        if p > 0:
            d_new = d_new * noises.pop()
        d_new = nchw(d_new.contiguous(), n, h, w)
        if b:
            g2, b2, w2 = rest
            z = z_all[i]
            hidden = tp.bn_relu(z, mean2[i], invstd2[i], g2, b2,
                                torch.empty((m, b), dtype=cdt, device=dev))
            d_hidden, dw2 = conv_grads(d_new, nchw(hidden, n, h, w), w2.to(cdt), 1)
            dz = torch.empty((m, b), dtype=cdt, device=dev)
            dg2, db2 = tp.bn_relu_backward_full(_rows(nhwc(d_hidden)), z, mean2[i], invstd2[i],
                                                g2, b2, dz)
            if p > 0:
                dz = dz * noises.pop()
            x = out[:, :c]
            dg1, db1 = tp.gemm_bn_relu_dgrad(dz, w1.view(b, c), None, x, mean, invstd, g1, b1,
                                             g_sum[:, :c], accumulate=i != last)
            dw1 = tp.gemm_bn_relu_wgrad(dz, x, mean, invstd, g1, b1).view_as(w1)
            grads[6 * i + 3: 6 * i + 6] = [dg2.to(g2.dtype), db2.to(b2.dtype),
                                           dw2.to(w2.dtype)]
        else:
            a = tp.bn_relu(out[:, :c], mean, invstd, g1, b1,
                           torch.empty((m, c), dtype=cdt, device=dev))
            da, dw1 = conv_grads(d_new, nchw(a, n, h, w), w1.to(cdt), 1)
            # the last layer reads every earlier channel: it writes g_sum, others add to it
            dg1, db1 = tp.gemm_bn_relu_dgrad(None, None, _rows(nhwc(da)), out[:, :c], mean,
                                             invstd, g1, b1, g_sum[:, :c],
                                             accumulate=i != last)
        j = (6 if b else 3) * i
        grads[j: j + 3] = [dg1.to(g1.dtype), db1.to(b1.dtype), dw1.to(w1.dtype)]
    dx = tp.input_grad(g_sum[:, :c0], out[:, :c0], mean, invstd, grad_out[:, :c0],
                       torch.empty((m, c0), dtype=cdt, device=dev))
    dx = nchw(dx, n, h, w)
    if not spec.channels_last_input:
        dx = dx.contiguous()
    return dx, grads
