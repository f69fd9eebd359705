"""The elementary passes of the memory-efficient dense block, over NHWC matrices [M, c].

Each pass has two implementations with the same results: fused C kernels
(:mod:`densenets.efficient.cpu_kernels`) for float32/float64 on CPU, where the passes are bound
by memory bandwidth, and PyTorch operations everywhere else (GPU, half precision, no C compiler).
The ``native`` argument picks one; a block decides once per step so forward and backward agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_kernels

_threshold_backward = torch.ops.aten.threshold_backward.grad_input
_conv_backward = torch.ops.aten.convolution_backward.default

# --- workspaces --------------------------------------------------------------------------------
# Fresh large allocations are slow on CPU (every page is faulted in again), so temporaries that
# never leave a forward or a backward live in buffers kept between steps. CUDA's caching
# allocator already recycles memory, so there a fresh tensor is as cheap and safer.
_WORKSPACES: dict[tuple, torch.Tensor] = {}


def clear_workspaces() -> None:
    """Release the cached CPU workspaces of the memory-efficient blocks."""
    _WORKSPACES.clear()


def workspace(name: str, shape: tuple[int, ...], dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
    """A contiguous scratch tensor; on CPU a view of a buffer named ``name`` kept between calls
    (two live scratch tensors need two names)."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    numel = 1
    for s in shape:
        numel *= s
    key = (name, dtype, device)
    buf = _WORKSPACES.get(key)
    if buf is None or buf.numel() < numel:
        buf = _WORKSPACES[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(shape)


def row_chunks(m: int, c: int, device: torch.device, cache_bytes: int = 1 << 20):
    """Row ranges of an [m, c] pass small enough (on CPU) that the BN-ReLU output a matrix
    product reads next is still in cache; one range on GPU."""
    rows = m if device.type != "cpu" else max(256, cache_bytes // (4 * max(c, 1)))
    return [slice(r, min(m, r + rows)) for r in range(0, m, rows)]


def _ones(m: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = ("ones", dtype, device)
    buf = _WORKSPACES.get(key)
    if buf is None or buf.numel() < m:
        buf = _WORKSPACES[key] = torch.ones(m, dtype=dtype, device=device)
    return buf[:m]


def colsum(t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """Sum over the rows of ``t`` [M, c]: a matrix-vector product, faster than sum(0) on CPU."""
    if t.dtype != acc:
        return t.sum(0, dtype=acc)
    return torch.mv(t.t(), _ones(t.shape[0], acc, t.device))


# --- layout ------------------------------------------------------------------------------------
def nchw(t: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """View an NHWC matrix [M, c] as an (N, c, H, W) channels-last tensor, without a copy."""
    return t.view(n, h, w, t.shape[1]).permute(0, 3, 1, 2)


def nhwc(t: torch.Tensor) -> torch.Tensor:
    """An (N, c, H, W) tensor as an NHWC matrix [M, c] (a view when it is channels-last)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def conv(x: torch.Tensor, w: torch.Tensor, padding: int) -> torch.Tensor:
    return F.conv2d(x, w, None, 1, padding)


def conv_grads(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, padding: int):
    """(dL/dx, dL/dw) of a bias-free stride-1 convolution."""
    gi, gw, _ = _conv_backward(grad, x, w, None, [1, 1], [padding, padding], [1, 1], False,
                               [0, 0], 1, [True, True, False])
    return gi, gw


def dropout_noise(shape: tuple[int, ...], p: float, dtype: torch.dtype, device: torch.device,
                  channels_last: bool) -> torch.Tensor:
    """The scaled mask (0 or 1 / (1 - p)) that F.dropout applies, as an NHWC matrix.

    F.dropout is called on ones laid out like the plain model's tensor, so both modes consume
    the random generator identically (on CPU and on CUDA's fused kernel) and drop the same
    units; multiplying by the result is then exactly what F.dropout computes.
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ones = torch.ones(shape, dtype=dtype, device=device).contiguous(memory_format=fmt)
    return nhwc(F.dropout(ones, p, training=True))


# --- passes ------------------------------------------------------------------------------------
def normalise(src: torch.Tensor, dst: torch.Tensor, eps: float, acc: torch.dtype, native: bool,
              copy: torch.Tensor | None = None, relu: tuple | None = None):
    """Write (src - mean) * invstd into ``dst`` (may be ``src``); return the biased batch
    statistics (mean, var, invstd), each [c] in ``acc``. Optionally also copy ``src`` into
    ``copy`` and, with relu = (gamma, beta, out), write out = relu(dst * gamma + beta): the
    fused kernel does both in its last pass."""
    if native:
        return cpu_kernels.col_normalise(src, dst, eps, copy, relu)
    if copy is not None:
        copy.copy_(src)
    m = src.shape[0]
    mean = colsum(src, acc) / m
    torch.sub(src, mean, out=dst)
    var = colsum(dst * dst, acc) / m
    invstd = torch.rsqrt(var + eps)
    dst.mul_(invstd)
    if relu is not None:
        bn_relu(dst, *relu, native=False)
    return mean, var, invstd


def bn_relu(xhat: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, out: torch.Tensor,
            native: bool) -> torch.Tensor:
    """out = relu(xhat * gamma + beta): one layer's BN affine and ReLU on normalised channels."""
    if native:
        return cpu_kernels.bn_relu(xhat, gamma, beta, out)
    torch.addcmul(beta, xhat, gamma, out=out)
    return out.clamp_min_(0)


def bn_relu_backward(da: torch.Tensor, a: torch.Tensor, xhat: torch.Tensor, gamma, beta,
                     g_sum: torch.Tensor, accumulate: bool, acc: torch.dtype, native: bool):
    """Backward of a = relu(xhat * gamma + beta) for one reader of the prefix.

    Returns (dgamma, dbeta) and adds gamma * dL/dy into ``g_sum`` (writes it if not
    ``accumulate``). ``da`` and ``a`` are scratch afterwards.
    """
    if native:
        return cpu_kernels.bn_relu_backward(da, xhat, gamma, beta, g_sum, accumulate)
    dy = _threshold_backward(da, a, 0, grad_input=da)
    dbeta = colsum(dy, acc)
    dgamma = colsum(torch.mul(dy, xhat, out=a), acc)
    if accumulate:
        g_sum.addcmul_(dy, gamma)
    else:
        torch.mul(dy, gamma, out=g_sum)
    return dgamma, dbeta


def bn_backward(dh: torch.Tensor, z: torch.Tensor, hidden: torch.Tensor, gamma, beta, invstd,
                acc: torch.dtype, native: bool):
    """Backward of hidden = relu(BN(z_raw)) with z = normalised z_raw stored, batch statistics.

    Returns (dL/dz_raw, dgamma, dbeta); dz = gamma*invstd*(dy - mean(dy) - z*mean(dy*z)).
    ``dh`` is overwritten.
    """
    if native:
        dgamma, dbeta = cpu_kernels.bn_backward(dh, z, gamma, beta, invstd)
        return dh, dgamma, dbeta
    m = z.shape[0]
    dy = _threshold_backward(dh, hidden, 0, grad_input=dh)
    dbeta = colsum(dy, acc)
    dgamma = colsum(dy * z, acc)
    dz = torch.addcmul(dy, z, -(dgamma / m))
    dz.sub_(dbeta / m).mul_(gamma * invstd)
    return dz, dgamma, dbeta


def bn_input_grad(g_sum, xhat, invstd, grad_direct, out: torch.Tensor, acc: torch.dtype,
                  native: bool) -> torch.Tensor:
    """dL/dx of one channel group: its direct gradient plus the BN1 backward of all readers,
    invstd * (G - mean(G) - xhat * mean(G * xhat)), where G sums gamma_l * dL/dy_l over the
    readers l. The means are taken over G itself (not summed from the readers' dbeta and
    dgamma), so each column keeps BN's exact zero-mean structure despite G's rounding. The
    fused kernel writes ``out``; the PyTorch version returns a new tensor."""
    if native:
        return cpu_kernels.bn_input_grad(g_sum, xhat, invstd, grad_direct, out)
    m = g_sum.shape[0]
    mean_g = colsum(g_sum, acc) / m
    mean_gx = colsum(g_sum * xhat, acc) / m
    d = torch.addcmul(grad_direct, g_sum, invstd)
    d.addcmul_(xhat, -(invstd * mean_gx))
    return d.sub_(invstd * mean_g)
