"""The passes of the memory-efficient block through the Triton kernels: torch tensors in, kernel
launches out.

Unlike :mod:`densenets.efficient.passes` they keep no normalised copy of the block: the block
buffer itself and each channel's batch mean and invstd are enough, because every kernel that
reads the prefix applies BN1 + ReLU to its tiles as they are loaded. Per layer the raw
bottleneck output (4k channels) and its statistics are kept.

Every matrix argument is an NHWC matrix [M, c] with unit column stride (a column slice of the
block buffer is fine); vectors are contiguous float32. Statistics and gradient sums are float32;
data is float32, bfloat16 or float16. :func:`kernels` loads the kernel module, for Triton's
interpreter when the tensors live on a CPU.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import ClassVar

import torch

from .algorithm import BlockSpec, LayerParams, Saved

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_STAT_ROWS = 256  # rows per partial of the column reductions
_module: ModuleType | None = None


def kernels(device: torch.device) -> ModuleType:
    """The kernel module, decorated for Triton's interpreter when ``device`` is a CPU.

    Triton reads TRITON_INTERPRET when a kernel is decorated, so the module is reloaded when a
    CPU needs the interpreter and the module was imported without it. (CUDA tensors run either
    way: the interpreter copies them to the host.)
    """
    global _module
    interpret = device.type == "cpu"
    if interpret and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("densenets: the Triton kernels run on a CPU only through Triton's "
                           "interpreter: set TRITON_INTERPRET=1, or DENSENETS_KERNELS=torch")
    if _module is None:
        from . import triton_kernels
        _module = triton_kernels
    if interpret and not _module.INTERPRETED:  # imported before TRITON_INTERPRET=1 was set
        _module = importlib.reload(_module)
        if not _module.INTERPRETED:
            raise RuntimeError("densenets: TRITON_INTERPRET=1 is set but triton.knobs.runtime."
                               "interpret is overridden to False: the kernels cannot run on a "
                               "CPU")
    return _module


def _ld(t: torch.Tensor) -> int:
    """Row stride of a matrix view with unit column stride."""
    if t.dim() != 2 or (t.stride(1) != 1 and t.shape[1] > 1):
        raise ValueError(f"expected a row-major matrix view, got strides {t.stride()}")
    return t.stride(0)


def _pow2(n: int, lo: int, hi: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return max(lo, min(hi, p))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _ieee(t: torch.Tensor) -> bool:
    """float32 products in full precision unless the caller allows TF32 for matmuls."""
    return t.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32


def _upcast(t: torch.Tensor) -> bool:
    """16-bit products through float32 under the interpreter (see ``_mma``)."""
    return t.dtype != torch.float32 and kernels(t.device).INTERPRETED


def _tiles(m: int, n: int, k: int, dtype: torch.dtype) -> tuple[int, int, int]:
    bk = 32 if dtype == torch.float32 else 64
    return _pow2(m, 16, 128), _pow2(n, 16, 128), _pow2(k, 16, bk)


def _warps(*block: int) -> int:
    size = 1
    for b in block:
        size *= b
    return 8 if size >= 128 * 128 else 4


# --- statistics --------------------------------------------------------------------------------
def col_partials(src: torch.Tensor, copy_to: torch.Tensor | None = None):
    """Per-row-tile (sum, M2) of the columns of ``src``; optionally also copy it to ``copy_to``."""
    m, c = src.shape
    bm, bc = _STAT_ROWS, _pow2(c, 16, 64)
    t = _cdiv(m, bm)
    psum = torch.empty((t, c), dtype=torch.float32, device=src.device)
    pm2 = torch.empty_like(psum)
    dst = copy_to if copy_to is not None else src
    kernels(src.device)._col_stats[(t, _cdiv(c, bc))](
        src, _ld(src), dst, _ld(dst), psum, pm2, m, c, BM=bm, BC=bc,
        COPY=copy_to is not None)
    return psum, pm2, bm


def finalize(partials, m: int, eps: float, mean: torch.Tensor, var: torch.Tensor,
             invstd: torch.Tensor) -> None:
    """Combine (psum, pm2, rows per tile) into mean, biased var and invstd (written in place)."""
    psum, pm2, rows = partials
    t, c = psum.shape
    bc = _pow2(c, 16, 64)
    kernels(psum.device)._stats_finalize[(_cdiv(c, bc),)](
        psum, pm2, mean, var, invstd, t, m, c, float(eps), TILE=rows, BT=_pow2(t, 1, 64), BC=bc)


def batch_stats(src: torch.Tensor, eps: float, mean, var, invstd,
                copy_to: torch.Tensor | None = None) -> None:
    """Batch statistics of the columns of ``src`` (float32, written in place)."""
    finalize(col_partials(src, copy_to), src.shape[0], eps, mean, var, invstd)


# --- BN-ReLU and the BatchNorm backward --------------------------------------------------------
def bn_relu(x: torch.Tensor, mean, invstd, gamma, beta, out: torch.Tensor) -> torch.Tensor:
    """out = relu(gamma * (x - mean) * invstd + beta)."""
    m, c = x.shape
    bm, bc = 64, _pow2(c, 16, 64)
    kernels(x.device)._bn_relu_apply[(_cdiv(m, bm), _cdiv(c, bc))](
        x, _ld(x), mean, invstd, gamma, beta, out, _ld(out), m, c, BM=bm, BC=bc)
    return out


def _reduce_apply(dy, x, mean, invstd, gamma, beta, mask: bool, coef_fn, direct, out):
    m, c = x.shape
    bm, bc = _STAT_ROWS, _pow2(c, 16, 64)
    t = _cdiv(m, bm)
    k = kernels(x.device)
    pa = torch.empty((t, c), dtype=torch.float32, device=x.device)
    pb = torch.empty_like(pa)
    g = gamma if gamma is not None else mean  # unread without the ReLU mask
    b = beta if beta is not None else mean
    grid = (t, _cdiv(c, bc))
    k._bn_bwd_reduce[grid](dy, _ld(dy), x, _ld(x), mean, invstd, g, b, pa, pb, m, c,
                           BM=bm, BC=bc, MASK=mask)
    sum_dy, sum_dyx = pa.sum(0), pb.sum(0)
    coef = coef_fn()
    d = direct if direct is not None else out
    bm2 = 64
    k._bn_bwd_apply[(_cdiv(m, bm2), _cdiv(c, bc))](
        dy, _ld(dy), x, _ld(x), mean, invstd, g, b, coef, sum_dy / m, sum_dyx / m,
        d, _ld(d), out, _ld(out), m, c, BM=bm2, BC=bc, MASK=mask, DIRECT=direct is not None)
    return sum_dyx, sum_dy


def bn_relu_backward_full(dh, z, mean, invstd, gamma, beta, out: torch.Tensor):
    """Backward of relu(BN(z)) with batch statistics: writes dL/dz into ``out``, returns
    (dgamma, dbeta) in float32."""
    return _reduce_apply(dh, z, mean, invstd, gamma, beta, True,
                         lambda: gamma.float() * invstd, None, out)


def input_grad(g_sum, x, mean, invstd, direct, out: torch.Tensor) -> torch.Tensor:
    """out = direct + invstd * (G - mean(G) - xhat * mean(G * xhat)) for one channel group, G
    the accumulated gamma-weighted BN1 gradients of all its readers."""
    _reduce_apply(g_sum, x, mean, invstd, None, None, False, lambda: invstd, direct, out)
    return out


# --- the bottleneck GEMMs with the BN1-ReLU prologue -------------------------------------------
def gemm_bn_relu(x: torch.Tensor, mean, invstd, gamma, beta, w: torch.Tensor, z: torch.Tensor,
                 stats: bool):
    """z = relu(BN1(x)) @ w.t() (x [M, K] a prefix view, w [N, K]); with ``stats``, the column
    partials of z for :func:`finalize`."""
    m, k = x.shape
    n = w.shape[0]
    bm, bn, bk = _tiles(m, n, k, x.dtype)
    t = _cdiv(m, bm)
    psum = torch.empty((t, n) if stats else (1, 1), dtype=torch.float32, device=x.device)
    pm2 = torch.empty_like(psum)
    kernels(x.device)._gemm_bnrelu_fwd[(t, _cdiv(n, bn))](
        x, _ld(x), mean, invstd, gamma, beta, w, w.stride(0), w.stride(1), z, _ld(z),
        psum, pm2, m, n, k, BM=bm, BN=bn, BK=bk, STATS=stats, IEEE=_ieee(x), UPCAST=_upcast(x),
        num_warps=_warps(bm, bn), num_stages=3)
    return (psum, pm2, bm) if stats else None


def gemm_bn_relu_dgrad(dz, w, da, x, mean, invstd, gamma, beta, g_sum, accumulate: bool):
    """Backward of relu(BN1(x)) for one reader: da = dz @ w (or the given ``da``), masked by the
    recomputed ReLU; g_sum (+)= gamma * dy; returns (dgamma, dbeta) in float32."""
    m, k = x.shape
    gemm = dz is not None
    n = w.shape[0] if gemm else 1
    bm, bn, bk = _tiles(m, n, k, x.dtype)
    bm = min(bm, 64)
    if not gemm:
        bk = _pow2(k, 16, 64)
    t = _cdiv(m, bm)
    pdg = torch.empty((t, k), dtype=torch.float32, device=x.device)
    pdb = torch.empty_like(pdg)
    dz_ = dz if gemm else da
    w_ = w if gemm else da
    kernels(x.device)._gemm_bnrelu_dgrad[(t, _cdiv(k, bk))](
        dz_, _ld(dz_), w_, w_.stride(0), w_.stride(1), da if da is not None else dz_,
        _ld(da) if da is not None else 0, x, _ld(x), mean, invstd, gamma, beta,
        g_sum, _ld(g_sum), pdg, pdb, m, n, k, BM=bm, BN=bn, BK=bk, GEMM=gemm,
        ACCUMULATE=accumulate, IEEE=_ieee(x), UPCAST=_upcast(x), num_warps=_warps(bm, bk),
        num_stages=3)
    return pdg.sum(0), pdb.sum(0)


def gemm_bn_relu_wgrad(dz, x, mean, invstd, gamma, beta, split: int | None = None):
    """dw = dz.t() @ relu(BN1(x)) in float32 [N, K], split over M (in ``split`` parts; by
    default enough to fill the GPU, one on a CPU) so a tall M fills the GPU."""
    m, k = x.shape
    n = dz.shape[1]
    bm, bn, bk = _tiles(m, n, k, x.dtype)
    bm = min(bm, 64)
    if split is None:
        tiles = _cdiv(n, bn) * _cdiv(k, bk)
        target = 1 if x.device.type == "cpu" else 4 * _sm_count(x.device)
        split = _cdiv(target, tiles)
    split = max(1, min(_cdiv(m, bm), split))
    rows = _cdiv(_cdiv(m, split), bm) * bm
    split = _cdiv(m, rows)
    pdw = torch.empty((split, n, k), dtype=torch.float32, device=x.device)
    kernels(x.device)._gemm_bnrelu_wgrad[(_cdiv(n, bn), _cdiv(k, bk), split)](
        dz, _ld(dz), x, _ld(x), mean, invstd, gamma, beta, pdw, m, n, k, rows,
        BM=bm, BN=bn, BK=bk, IEEE=_ieee(x), UPCAST=_upcast(x), num_warps=_warps(bn, bk),
        num_stages=3)
    return pdw[0] if split == 1 else pdw.sum(0)


_SMS: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


class TritonPasses:
    """The passes as Triton kernel launches (see
    :class:`~densenets.efficient.algorithm.Passes`)."""

    normalises_on_load: ClassVar[bool] = True

    def __init__(self, spec: BlockSpec, saved: Saved, block: torch.Tensor) -> None:
        self.spec, self.s, self.block = spec, saved, block
        self.m, self.cdt = block.shape[0], spec.compute_dtype

    def _empty(self, c: int) -> torch.Tensor:
        return torch.empty((self.m, c), dtype=self.cdt, device=self.block.device)

    def add_channels(self, c: int, new: torch.Tensor | None) -> None:
        s = self.s
        src = self.block[:, :self.spec.in_channels] if new is None else new
        cols = slice(c, c + src.shape[1])
        batch_stats(src, self.spec.eps1, s.mean[cols], s.var[cols], s.invstd[cols],
                    copy_to=None if new is None else self.block[:, cols])

    def _bn1_relu(self, c: int, p: LayerParams) -> torch.Tensor:
        s = self.s
        return bn_relu(self.block[:, :c], s.mean, s.invstd, p.gamma1, p.beta1, self._empty(c))

    def _bn2_relu(self, i: int, p: LayerParams) -> torch.Tensor:
        s = self.s
        return bn_relu(s.z[i], s.mean2[i], s.invstd2[i], p.gamma2, p.beta2,
                       self._empty(self.spec.inter_channels))

    def conv_input(self, i: int, c: int, p: LayerParams, noise) -> torch.Tensor:
        if not self.spec.bottleneck:
            return self._bn1_relu(c, p)
        s, b, z = self.s, self.spec.inter_channels, self.s.z[i]
        part = gemm_bn_relu(self.block[:, :c], s.mean, s.invstd, p.gamma1, p.beta1,
                            p.w1.view(b, c), z, stats=noise is None)
        if noise is not None:  # BN2 normalises the dropped-out values: statistics after the mask
            z.mul_(noise)
            part = col_partials(z)
        finalize(part, self.m, self.spec.eps2, s.mean2[i], s.var2[i], s.invstd2[i])
        return self._bn2_relu(i, p)

    def recompute_conv_input(self, i: int, c: int, p: LayerParams, noise) -> torch.Tensor:
        return self._bn2_relu(i, p) if self.spec.bottleneck else self._bn1_relu(c, p)

    def conv_input_backward(self, i: int, c: int, p: LayerParams, dh, h, g_sum,
                            accumulate: bool, noise) -> LayerParams:
        s, x = self.s, self.block[:, :c]
        if not self.spec.bottleneck:
            dg1, db1 = gemm_bn_relu_dgrad(None, None, dh, x, s.mean, s.invstd, p.gamma1, p.beta1,
                                          g_sum[:, :c], accumulate)
            return LayerParams(dg1, db1, None, None, None, None)
        b = self.spec.inter_channels
        dz = self._empty(b)
        dg2, db2 = bn_relu_backward_full(dh, s.z[i], s.mean2[i], s.invstd2[i], p.gamma2,
                                         p.beta2, dz)
        if noise is not None:
            dz = dz * noise
        w1 = p.w1.view(b, c)
        dg1, db1 = gemm_bn_relu_dgrad(dz, w1, None, x, s.mean, s.invstd, p.gamma1, p.beta1,
                                      g_sum[:, :c], accumulate)
        dw1 = gemm_bn_relu_wgrad(dz, x, s.mean, s.invstd, p.gamma1, p.beta1)
        return LayerParams(dg1, db1, dw1.view_as(p.w1), dg2, db2, None)

    def channel_grad(self, c: int, g_sum, direct, scratch: bool) -> torch.Tensor:
        k, s = direct.shape[1], self.s
        cols = slice(c, c + k)
        return input_grad(g_sum, self.block[:, cols], s.mean[cols], s.invstd[cols], direct,
                          self._empty(k))
