"""The passes of the memory-efficient block as fused C kernels
(:mod:`densenets.efficient.cpu_kernels`, CPU float32/float64, where the passes are bound by
memory bandwidth) or PyTorch operations (everywhere else: GPU, half precision, no C compiler).

Each channel is normalised once, when it is produced: into ``xhat`` [M, C] (and each bottleneck
output in place, into ``zhat``); a layer then applies only its own affine and ReLU. Blocks that
put memory first (volumes, see :mod:`.layout`) keep no ``xhat``: they read the raw block (their
output, kept anyway) with its statistics and normalise each value as they load it, to the same
value (:class:`Normed`). Every elementary pass below has both implementations with the same
results; ``native`` picks one, once per block and step, so forward and backward agree.

The passes that take statistics run once per set of them: once over all M rows (batch norm), or
once per sample's rows (instance norm, whose rows of one sample are contiguous).
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch

from . import cpu_kernels
from .algorithm import BlockSpec, LayerParams, Saved
from .workspace import ones, workspace

_threshold_backward = torch.ops.aten.threshold_backward.grad_input


def row_chunks(m: int, c: int, device: torch.device, cache_bytes: int = 1 << 20):
    """Row ranges of an [m, c] pass small enough (on CPU) that the BN-ReLU output a matrix
    product reads next is still in cache; one range on GPU."""
    rows = m if device.type != "cpu" else max(256, cache_bytes // (4 * max(c, 1)))
    return [slice(r, min(m, r + rows)) for r in range(0, m, rows)]


def colsum(t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """Sum over the rows of ``t`` [M, c]: a matrix-vector product, faster than sum(0) on CPU."""
    if t.dtype != acc:
        return t.sum(0, dtype=acc)
    return torch.mv(t.t(), ones(t.shape[0], acc, t.device))


class Normed(NamedTuple):
    """Normalised channels [rows, c] as a pass reads them: a stored copy (``mean`` None), or
    the raw block with its statistics (each [c]), normalised as they are read, to the values
    the stored copy would hold (the same arithmetic: (x - mean) * invstd)."""

    x: torch.Tensor
    mean: torch.Tensor | None = None
    invstd: torch.Tensor | None = None

    def rows(self, r: slice) -> Normed:
        return self._replace(x=self.x[r])

    def value(self) -> torch.Tensor:
        """The normalised channels as a tensor (PyTorch operations: raw ones into scratch)."""
        if self.mean is None:
            return self.x
        out = workspace("xhat", tuple(self.x.shape), self.x.dtype, self.x.device)
        torch.sub(self.x, self.mean, out=out)
        return out.mul_(self.invstd)


class TorchPasses:
    """The passes as PyTorch operations (see :class:`~densenets.efficient.algorithm.Passes`).

    Blocks that keep a normalised copy of their channels (``spec.keep_xhat``) read it; blocks
    that put memory first keep only the raw block and normalise each channel as they read it.
    """

    normalises_on_load: ClassVar[bool] = False
    native: ClassVar[bool] = False

    def __init__(self, spec: BlockSpec, saved: Saved, block: torch.Tensor) -> None:
        self.spec, self.s, self.block = spec, saved, block
        self.stored = spec.keep_xhat
        self.m = saved.xhat.shape[0] if self.stored else block.shape[0]
        self.cdt, self.acc, self.dev = spec.compute_dtype, spec.acc_dtype, saved.mean.device
        groups = saved.mean.shape[0] if saved.mean.dim() == 2 else 1
        step = self.m // groups
        # the rows each set of statistics covers: all of them, or one sample's
        self.groups = [slice(g * step, (g + 1) * step) for g in range(groups)]

    @staticmethod
    def _sets(t: torch.Tensor) -> torch.Tensor:
        """Statistics as [sets, c]: one row for batch norm, one per sample for instance norm."""
        return t.view(1, -1) if t.dim() == 1 else t

    def _normed(self, cols: slice) -> list[tuple[slice, Normed]]:
        """Channels ``cols`` normalised, per set of statistics: (its rows, the channels)."""
        if self.stored:
            return [(r, Normed(self.s.xhat[r, cols])) for r in self.groups]
        mean, invstd = self._sets(self.s.mean), self._sets(self.s.invstd)
        return [(r, Normed(self.block[r, cols], mean[g, cols], invstd[g, cols]))
                for g, r in enumerate(self.groups)]

    def _chunks(self, c: int):
        """(rows, the first c channels normalised) in row chunks that stay in cache."""
        for rows, x in self._normed(slice(0, c)):
            for r in row_chunks(rows.stop - rows.start, c, self.dev):
                yield slice(rows.start + r.start, rows.start + r.stop), x.rows(r)

    def add_channels(self, c: int, new: torch.Tensor | None) -> None:
        s = self.s
        if new is None:
            src, copy = self.block[:, :self.spec.in_channels], None
        else:
            src, copy = new, self.block[:, c:c + new.shape[1]]
        cols = slice(c, c + src.shape[1])
        mean, var, invstd = (self._sets(t) for t in (s.mean, s.var, s.invstd))
        for g, r in enumerate(self.groups):
            normalise(src[r], s.xhat[r, cols] if self.stored else None, self.spec.eps1,
                      self.acc, self.native, (mean[g, cols], var[g, cols], invstd[g, cols]),
                      copy=None if copy is None else copy[r])

    def _bn1_relu(self, c: int, p: LayerParams) -> torch.Tensor:
        a = workspace("a", (self.m, c), self.cdt, self.dev)
        for r, x in self._normed(slice(0, c)):
            bn_relu(x, p.gamma1, p.beta1, a[r], self.native)
        return a

    def _zhat(self, i: int) -> torch.Tensor:
        """Layer i's bottleneck output [M, 4k]: kept, or the one last (re)computed."""
        return self.s.zhat[i] if self.spec.keep_bottleneck else self._z

    def _bottleneck(self, i: int, c: int, p: LayerParams, noise) -> torch.Tensor:
        """z = conv1x1(relu(BN1(prefix))) [* dropout mask], unnormalised, into :meth:`_zhat`."""
        b, cdt = self.spec.inter_channels, self.cdt
        if not self.spec.keep_bottleneck:
            self._z = workspace("z", (self.m, b), cdt, self.dev)
        z = self._zhat(i)
        w1t = p.w1.to(cdt).view(b, c).t()
        for r, x in self._chunks(c):
            a = workspace("a", (r.stop - r.start, c), cdt, self.dev)
            torch.mm(bn_relu(x, p.gamma1, p.beta1, a, self.native), w1t, out=z[r])
        if noise is not None:
            z.mul_(noise)
        return z
    def conv_input(self, i: int, c: int, p: LayerParams, noise) -> torch.Tensor:
        if not self.spec.bottleneck:
            return self._bn1_relu(c, p)
        s = self.s
        z = self._bottleneck(i, c, p, noise)
        hidden = workspace("b", (self.m, self.spec.inter_channels), self.cdt, self.dev)
        mean, var, invstd = (self._sets(t[i]) for t in (s.mean2, s.var2, s.invstd2))
        for g, r in enumerate(self.groups):
            normalise(z[r], z[r], self.spec.eps2, self.acc, self.native,
                      (mean[g], var[g], invstd[g]), relu=(p.gamma2, p.beta2, hidden[r]))
        return hidden

    def recompute_conv_input(self, i: int, c: int, p: LayerParams, noise) -> torch.Tensor:
        if not self.spec.bottleneck:
            return self._bn1_relu(c, p)
        if not self.spec.keep_bottleneck:  # normalise with the statistics forward computed
            z = self._bottleneck(i, c, p, noise)
            mean, invstd = self._sets(self.s.mean2[i]), self._sets(self.s.invstd2[i])
            for g, r in enumerate(self.groups):
                z[r].sub_(mean[g].to(z.dtype)).mul_(invstd[g].to(z.dtype))
        hidden = workspace("b", (self.m, self.spec.inter_channels), self.cdt, self.dev)
        return bn_relu(Normed(self._zhat(i)), p.gamma2, p.beta2, hidden, self.native)

    def conv_input_backward(self, i: int, c: int, p: LayerParams, dh, h, g_sum,
                            accumulate: bool, noise) -> LayerParams:
        acc = self.acc
        if not self.spec.bottleneck:
            dg1 = db1 = 0
            for r, x in self._normed(slice(0, c)):
                dg, db = bn_relu_backward(dh[r], h[r], x, p.gamma1, p.beta1, g_sum[r, :c],
                                          accumulate, acc, self.native)
                dg1, db1 = dg1 + dg, db1 + db
            return LayerParams(dg1, db1, None, None, None, None)
        dz, dg2, db2 = self._bn2_backward(i, p, dh, h)
        if noise is not None:
            dz = dz * noise
        w1 = p.w1.to(self.cdt).view(self.spec.inter_channels, c)
        dw1, dg1, db1 = self._conv1x1_backward(dz.to(self.cdt), w1, c, p, g_sum[:, :c],
                                               accumulate)
        return LayerParams(dg1, db1, dw1.view_as(p.w1), dg2, db2, None)

    def _bn2_backward(self, i: int, p: LayerParams, dh, h):
        """(dL/dz_raw, dgamma2, dbeta2) of layer i's BN2-ReLU, one set of statistics at a time
        (dL/dz_raw lands in ``dh``'s rows where there is more than one set)."""
        zhat, invstd = self._zhat(i), self._sets(self.s.invstd2[i])
        if len(self.groups) == 1:
            return bn_backward(dh, zhat, h, p.gamma2, p.beta2, invstd[0], self.acc, self.native)
        dg2 = db2 = 0
        for g, r in enumerate(self.groups):
            dz, dg, db = bn_backward(dh[r], zhat[r], h[r], p.gamma2, p.beta2, invstd[g],
                                     self.acc, self.native)
            if dz.data_ptr() != dh[r].data_ptr():
                dh[r].copy_(dz)
            dg2, db2 = dg2 + dg, db2 + db
        return dh, dg2, db2

    def _conv1x1_backward(self, dz, w1, c: int, p: LayerParams, g_sum, accumulate: bool):
        """Backward of z = relu(xhat * g1 + b1) @ w1.t(), in row chunks that stay in cache:
        recompute the BN-ReLU, then dw1 and the BN1 terms. Returns (dw1, dgamma1, dbeta1)."""
        acc, dev = self.acc, self.dev
        dw1 = torch.zeros((w1.shape[0], c), dtype=acc, device=dev)
        dg1 = torch.zeros(c, dtype=acc, device=dev)
        db1 = torch.zeros_like(dg1)
        for r, x in self._chunks(c):
            rows = r.stop - r.start
            a = bn_relu(x, p.gamma1, p.beta1, workspace("a", (rows, c), dz.dtype, dev),
                        self.native)
            if dw1.dtype == a.dtype:
                dw1.addmm_(dz[r].t(), a)
            else:  # half precision: sum the chunks in float32
                dw1 += torch.mm(dz[r].t(), a)
            da = torch.mm(dz[r], w1, out=workspace("d", (rows, c), dz.dtype, dev))
            dg, db = bn_relu_backward(da, a, x, p.gamma1, p.beta1, g_sum[r], accumulate, acc,
                                      self.native)
            dg1 += dg
            db1 += db
        return dw1, dg1, db1

    def channel_grad(self, c: int, g_sum, direct, scratch: bool) -> torch.Tensor:
        k = direct.shape[1]
        shape = (self.m, k)
        out = (workspace("d_new", shape, self.acc, self.dev) if scratch
               else torch.empty(shape, dtype=self.acc, device=self.dev))
        invstd = self._sets(self.s.invstd)[:, c:c + k]
        parts = self._normed(slice(c, c + k))
        if len(parts) == 1:
            return bn_input_grad(g_sum, parts[0][1], invstd[0], direct, out, self.acc,
                                 self.native)
        for g, (r, x) in enumerate(parts):
            d = bn_input_grad(g_sum[r], x, invstd[g], direct[r], out[r], self.acc,
                              self.native)
            if d.data_ptr() != out[r].data_ptr():
                out[r].copy_(d)
        return out


class NativePasses(TorchPasses):
    """The same passes through the fused C kernels (CPU, float32/float64)."""

    native: ClassVar[bool] = True


# --- the elementary passes, each in C and in PyTorch operations ---------------------------------
def normalise(src: torch.Tensor, dst: torch.Tensor | None, eps: float, acc: torch.dtype,
              native: bool, stats: tuple, copy: torch.Tensor | None = None,
              relu: tuple | None = None) -> None:
    """Write (src - mean) * invstd into ``dst`` (may be ``src``; None: nothing kept) and the
    biased batch statistics into stats = (mean, var, invstd), each [c] in ``acc``. Optionally
    also copy ``src`` into ``copy`` and, with relu = (gamma, beta, out), write out =
    relu(dst * gamma + beta): the fused kernel does both in its last pass."""
    if native:
        cpu_kernels.col_normalise(src, dst, eps, *stats, copy, relu)
        return
    if copy is not None:
        copy.copy_(src)
    if dst is None:
        dst = workspace("xhat", tuple(src.shape), src.dtype, src.device)
    m = src.shape[0]
    mean = colsum(src, acc) / m
    torch.sub(src, mean, out=dst)
    var = colsum(dst * dst, acc) / m
    invstd = torch.rsqrt(var + eps)
    dst.mul_(invstd)
    for out, value in zip(stats, (mean, var, invstd), strict=True):
        out.copy_(value)
    if relu is not None:
        bn_relu(Normed(dst), *relu, native=False)


def bn_relu(xhat: Normed, gamma: torch.Tensor, beta: torch.Tensor, out: torch.Tensor,
            native: bool) -> torch.Tensor:
    """out = relu(xhat * gamma + beta): one layer's BN affine and ReLU on normalised channels."""
    if native:
        return cpu_kernels.bn_relu(xhat.x, gamma, beta, out, xhat.mean, xhat.invstd)
    torch.addcmul(beta, xhat.value(), gamma, out=out)
    return out.clamp_min_(0)


def bn_relu_backward(da: torch.Tensor, a: torch.Tensor, xhat: Normed, gamma, beta,
                     g_sum: torch.Tensor, accumulate: bool, acc: torch.dtype, native: bool):
    """Backward of a = relu(xhat * gamma + beta) for one reader of the prefix.

    Returns (dgamma, dbeta) and adds gamma * dL/dy into ``g_sum`` (writes it if not
    ``accumulate``). ``da`` and ``a`` are scratch afterwards.
    """
    if native:
        return cpu_kernels.bn_relu_backward(da, xhat.x, gamma, beta, g_sum, accumulate,
                                            xhat.mean, xhat.invstd)
    dy = _threshold_backward(da, a, 0, grad_input=da)
    dbeta = colsum(dy, acc)
    dgamma = colsum(torch.mul(dy, xhat.value(), out=a), acc)
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


def bn_input_grad(g_sum, x: Normed, invstd, grad_direct, out: torch.Tensor, acc: torch.dtype,
                  native: bool) -> torch.Tensor:
    """dL/dx of one channel group: its direct gradient plus the BN1 backward of all readers,
    invstd * (G - mean(G) - xhat * mean(G * xhat)), where G sums gamma_l * dL/dy_l over the
    readers l. The means are taken over G itself (not summed from the readers' dbeta and
    dgamma), so each column keeps BN's exact zero-mean structure despite G's rounding. The
    fused kernel writes ``out``; the PyTorch version returns a new tensor."""
    if native:
        return cpu_kernels.bn_input_grad(g_sum, x.x, invstd, grad_direct, out, x.mean)
    xhat, m = x.value(), g_sum.shape[0]
    mean_g = colsum(g_sum, acc) / m
    mean_gx = colsum(g_sum * xhat, acc) / m
    d = torch.addcmul(grad_direct, g_sum, invstd)
    d.addcmul_(xhat, -(invstd * mean_gx))
    return d.sub_(invstd * mean_g)
