"""Triton kernels for the memory-efficient dense block (CUDA; on a CPU through TRITON_INTERPRET=1).

Every activation is an NHWC matrix [M, c] with unit column stride and any row stride, so a
layer's input is the prefix of the block buffer read in place; offsets into these matrices are
int64 (:func:`_offsets`), while a 1x1 weight [N, K] and the per-column vectors, far below 2^31
elements, keep int32 offsets. Statistics are per column, in float32 whatever the data type.
BN1 + ReLU of the prefix is applied to each tile as it is loaded (``scale = gamma * invstd``,
``shift = beta - mean * scale``), so the normalised prefix never exists in memory, in forward or
in backward.

Column reductions are written as per-row-tile partials and combined afterwards (Chan's formula
for the variance): deterministic, no atomics, and no cancellation of sum-of-squares in float32.
Triton reads ``TRITON_INTERPRET`` when a kernel is decorated, i.e. when this module is imported:
:func:`densenets.efficient.triton_passes.kernels` reloads it when the setting differs from its
import.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

try:  # triton.knobs from Triton 3.4; before it the environment variable itself
    INTERPRETED = bool(triton.knobs.runtime.interpret)
except AttributeError:
    INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _colsum(x):
    """Sum over axis 0: tl.sum's own reduction, called through tl.reduce. The interpreter runs
    only jit functions decorated while TRITON_INTERPRET=1 was set, and tl.sum is decorated when
    triton is first imported (by torch, often before any setting of ours); tl.reduce is patched
    at launch and sums with numpy when it sees tl.sum's combine function. For the same reason
    tiles are made with tl.full, not tl.zeros."""
    return tl.reduce(x, 0, tl.standard._sum_combine)


# --- tiles: the shared indexing, loads and stores --------------------------------------------
@triton.jit
def _tile(pid_m, pid_c, M, C, BM: tl.constexpr, BC: tl.constexpr):
    """Rows and columns of tile (pid_m, pid_c) of an [M, C] matrix: (rows, cols, column mask,
    tile mask)."""
    rm = pid_m * BM + tl.arange(0, BM)
    rc = pid_c * BC + tl.arange(0, BC)
    cmask = rc < C
    return rm, rc, cmask, (rm < M)[:, None] & cmask[None, :]


@triton.jit
def _wide(row, ld):
    """row * ld in int64, ``row`` a program index or a vector of rows (int32). A block buffer or
    a gradient sum passes 2^31 elements (DenseNet-121's first block at batch 512 holds 411M, a
    3D volume 4.3G) long before its row count does: rows and columns stay int32 and only their
    product with the row stride is widened, one multiply per row."""
    return row.to(tl.int64) * ld


@triton.jit
def _offsets(rm, ld, rc):
    """Element offsets (int64) of rows ``rm``, columns ``rc`` of a matrix with row stride ``ld``."""
    return _wide(rm, ld)[:, None] + rc[None, :]


@triton.jit
def _load(ptr, ld, rm, rc, mask):
    """A tile of a row-major matrix view with row stride ``ld``, zero outside ``mask``."""
    return tl.load(ptr + _offsets(rm, ld, rc), mask=mask, other=0.0)


@triton.jit
def _store(ptr, ld, rm, rc, v, mask):
    tl.store(ptr + _offsets(rm, ld, rc), v.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row(ptr, pid_m, ld, rc, v, cmask):
    """Store ``v`` as row ``pid_m`` of a per-row-tile partials matrix [T, ld]."""
    tl.store(ptr + _wide(pid_m, ld) + rc, v, mask=cmask)


@triton.jit
def _col(ptr, rc, cmask):
    """Per-column values (a statistic, an affine parameter) as float32."""
    return tl.load(ptr + rc, mask=cmask, other=0.0).to(tl.float32)


@triton.jit
def _normalised(x, rc, cmask, mean_ptr, invstd_ptr):
    """(x - mean) * invstd per column."""
    return (x - _col(mean_ptr, rc, cmask)[None, :]) * _col(invstd_ptr, rc, cmask)[None, :]


@triton.jit
def _bn_relu_tile(x, cols, cmask, mean_ptr, invstd_ptr, g_ptr, b_ptr):
    """relu(gamma * (x - mean) * invstd + beta) in float32, as scale/shift per column."""
    s = _col(g_ptr, cols, cmask) * _col(invstd_ptr, cols, cmask)
    t = _col(b_ptr, cols, cmask) - _col(mean_ptr, cols, cmask) * s
    return tl.maximum(x.to(tl.float32) * s[None, :] + t[None, :], 0.0)


@triton.jit
def _partials(v, tmask, pid_m, M, C, rc, cmask, psum_ptr, pm2_ptr, BM: tl.constexpr):
    """This row tile's (sum, M2) of the columns of v (float32, zero outside ``tmask``), for
    :func:`_stats_finalize` to combine."""
    cnt = tl.minimum(M - pid_m * BM, BM).to(tl.float32)
    s = _colsum(v)
    d = tl.where(tmask, v - (s / cnt)[None, :], 0.0)
    _row(psum_ptr, pid_m, C, rc, s, cmask)
    _row(pm2_ptr, pid_m, C, rc, _colsum(d * d), cmask)


@triton.jit
def _mma(acc, a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST (the interpreter, whose numpy dot cannot multiply 16-bit floats):
    the same products in float32, exact for bfloat16/float16 inputs."""
    if UPCAST:
        return acc + tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return acc + tl.dot(a, b, input_precision="ieee")
    else:
        return acc + tl.dot(a, b)


# --- the bottleneck GEMMs with the BN1-ReLU prologue -----------------------------------------
@triton.jit
def _gemm_bnrelu_fwd(x_ptr, ldx, mean_ptr, invstd_ptr, g_ptr, b_ptr, w_ptr, sw_n, sw_k,
                     z_ptr, ldz, psum_ptr, pm2_ptr, M, N, K,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     STATS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """z[M, N] = relu(BN1(x[M, K])) @ w[N, K]^T; with STATS, per-row-tile (sum, M2) of z."""
    pid_m = tl.program_id(0)
    rm, rn, nmask, zmask = _tile(pid_m, tl.program_id(1), M, N, BM, BN)
    mmask = rm < M
    acc = tl.full((BM, BN), 0.0, tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        kmask = rk < K
        xmask = mmask[:, None] & kmask[None, :]
        x = _load(x_ptr, ldx, rm, rk, xmask)
        a = _bn_relu_tile(x, rk, kmask, mean_ptr, invstd_ptr, g_ptr, b_ptr)
        a = tl.where(xmask, a, 0.0).to(x_ptr.dtype.element_ty)
        w = tl.load(w_ptr + rk[:, None] * sw_k + rn[None, :] * sw_n,
                    mask=kmask[:, None] & nmask[None, :], other=0.0).to(x_ptr.dtype.element_ty)
        acc = _mma(acc, a, w, IEEE, UPCAST)
    z = acc.to(z_ptr.dtype.element_ty)
    _store(z_ptr, ldz, rm, rn, z, zmask)
    if STATS:  # statistics of the stored (rounded) values, which BN2 normalises
        zf = tl.where(zmask, z.to(tl.float32), 0.0)
        _partials(zf, zmask, pid_m, M, N, rn, nmask, psum_ptr, pm2_ptr, BM)


@triton.jit
def _gemm_bnrelu_dgrad(dz_ptr, lddz, w_ptr, sw_n, sw_k, da_ptr, ldda,
                       x_ptr, ldx, mean_ptr, invstd_ptr, g_ptr, b_ptr,
                       gsum_ptr, ldg, pdg_ptr, pdb_ptr, M, N, K,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                       GEMM: tl.constexpr, ACCUMULATE: tl.constexpr, IEEE: tl.constexpr,
                       UPCAST: tl.constexpr):
    """Backward of a = relu(BN1(x)) for one reader of the prefix [M, K].

    da = dz[M, N] @ w[N, K] (GEMM) or read from ``da_ptr``; then dy = da * (a > 0),
    g_sum (+)= gamma * dy, and per-row-tile partials of dgamma = sum(dy * xhat), dbeta = sum(dy).
    """
    pid_m = tl.program_id(0)
    rm, rk, kmask, tmask = _tile(pid_m, tl.program_id(1), M, K, BM, BK)
    mmask = rm < M
    if GEMM:
        da = tl.full((BM, BK), 0.0, tl.float32)
        for n0 in range(0, N, BN):
            rn = n0 + tl.arange(0, BN)
            nmask = rn < N
            dz = _load(dz_ptr, lddz, rm, rn, mmask[:, None] & nmask[None, :])
            w = tl.load(w_ptr + rn[:, None] * sw_n + rk[None, :] * sw_k,
                        mask=nmask[:, None] & kmask[None, :], other=0.0).to(dz.dtype)
            da = _mma(da, dz, w, IEEE, UPCAST)
    else:
        da = _load(da_ptr, ldda, rm, rk, tmask).to(tl.float32)
    x = _load(x_ptr, ldx, rm, rk, tmask).to(tl.float32)
    a = _bn_relu_tile(x, rk, kmask, mean_ptr, invstd_ptr, g_ptr, b_ptr)
    dy = tl.where(tmask & (a > 0.0), da, 0.0)
    gdy = _col(g_ptr, rk, kmask)[None, :] * dy
    if ACCUMULATE:
        gdy += _load(gsum_ptr, ldg, rm, rk, tmask)
    _store(gsum_ptr, ldg, rm, rk, gdy, tmask)
    xhat = _normalised(x, rk, kmask, mean_ptr, invstd_ptr)
    _row(pdg_ptr, pid_m, K, rk, _colsum(dy * xhat), kmask)
    _row(pdb_ptr, pid_m, K, rk, _colsum(dy), kmask)


@triton.jit
def _gemm_bnrelu_wgrad(dz_ptr, lddz, x_ptr, ldx, mean_ptr, invstd_ptr, g_ptr, b_ptr, pdw_ptr,
                       M, N, K, rows_per_split,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr,
                       UPCAST: tl.constexpr):
    """Split-M partials of dw[N, K] = dz[M, N]^T @ relu(BN1(x[M, K])), float32 [S, N, K]."""
    pid_s = tl.program_id(2)
    rn, rk, kmask, wmask = _tile(tl.program_id(0), tl.program_id(1), N, K, BN, BK)
    nmask = rn < N
    acc = tl.full((BN, BK), 0.0, tl.float32)
    start = pid_s * rows_per_split
    for m0 in range(start, start + rows_per_split, BM):
        rm = m0 + tl.arange(0, BM)
        mmask = rm < M
        dz = _load(dz_ptr, lddz, rm, rn, mmask[:, None] & nmask[None, :])
        xmask = mmask[:, None] & kmask[None, :]
        x = _load(x_ptr, ldx, rm, rk, xmask)
        a = _bn_relu_tile(x, rk, kmask, mean_ptr, invstd_ptr, g_ptr, b_ptr)
        a = tl.where(xmask, a, 0.0).to(dz.dtype)
        acc = _mma(acc, tl.trans(dz), a, IEEE, UPCAST)
    _store(pdw_ptr + _wide(pid_s, N * K), K, rn, rk, acc, wmask)


# --- statistics and the elementwise passes ----------------------------------------------------
@triton.jit
def _col_stats(src_ptr, lds, dst_ptr, ldd, psum_ptr, pm2_ptr, M, C,
               BM: tl.constexpr, BC: tl.constexpr, COPY: tl.constexpr):
    """Per-row-tile (sum, M2) of the columns of src [M, C]; with COPY also dst = src."""
    pid_m = tl.program_id(0)
    rm, rc, cmask, tmask = _tile(pid_m, tl.program_id(1), M, C, BM, BC)
    v = _load(src_ptr, lds, rm, rc, tmask)
    if COPY:
        _store(dst_ptr, ldd, rm, rc, v, tmask)
        v = v.to(dst_ptr.dtype.element_ty)
    _partials(v.to(tl.float32), tmask, pid_m, M, C, rc, cmask, psum_ptr, pm2_ptr, BM)


@triton.jit
def _stats_finalize(psum_ptr, pm2_ptr, mean_ptr, var_ptr, invstd_ptr, T, M, C, eps,
                    TILE: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """Combine T row-tile partials of TILE rows each into mean, biased var and invstd [C]."""
    rc = tl.program_id(0) * BC + tl.arange(0, BC)
    cmask = rc < C
    total = tl.full((BC,), 0.0, tl.float32)
    for t0 in range(0, T, BT):
        rt = t0 + tl.arange(0, BT)
        total += _colsum(_load(psum_ptr, C, rt, rc, (rt < T)[:, None] & cmask[None, :]))
    mean = total / M
    m2 = tl.full((BC,), 0.0, tl.float32)
    for t0 in range(0, T, BT):
        rt = t0 + tl.arange(0, BT)
        pmask = (rt < T)[:, None] & cmask[None, :]
        cnt = tl.minimum(M - rt * TILE, TILE).to(tl.float32)
        cnt = tl.where(rt < T, cnt, 1.0)
        d = _load(psum_ptr, C, rt, rc, pmask) / cnt[:, None] - mean[None, :]
        q = _load(pm2_ptr, C, rt, rc, pmask)
        m2 += _colsum(tl.where(pmask, q + cnt[:, None] * d * d, 0.0))
    var = m2 / M
    tl.store(mean_ptr + rc, mean, mask=cmask)
    tl.store(var_ptr + rc, var, mask=cmask)
    tl.store(invstd_ptr + rc, 1.0 / tl.sqrt(var + eps), mask=cmask)


@triton.jit
def _bn_relu_apply(x_ptr, ldx, mean_ptr, invstd_ptr, g_ptr, b_ptr, out_ptr, ldo, M, C,
                   BM: tl.constexpr, BC: tl.constexpr):
    """out = relu(BN(x)) with the given statistics and affine."""
    rm, rc, cmask, tmask = _tile(tl.program_id(0), tl.program_id(1), M, C, BM, BC)
    x = _load(x_ptr, ldx, rm, rc, tmask)
    _store(out_ptr, ldo, rm, rc, _bn_relu_tile(x, rc, cmask, mean_ptr, invstd_ptr, g_ptr, b_ptr),
           tmask)


@triton.jit
def _bn_bwd_tile(dy_ptr, lddy, x_ptr, ldx, mean_ptr, invstd_ptr, g_ptr, b_ptr, M, C,
                 BM: tl.constexpr, BC: tl.constexpr, MASK: tl.constexpr):
    """What both passes of BN's backward read: this program's tile, dy (masked by
    relu(BN(x)) > 0 with MASK, for a ReLU after the BN) and xhat = (x - mean) * invstd."""
    rm, rc, cmask, tmask = _tile(tl.program_id(0), tl.program_id(1), M, C, BM, BC)
    dy = _load(dy_ptr, lddy, rm, rc, tmask).to(tl.float32)
    x = _load(x_ptr, ldx, rm, rc, tmask).to(tl.float32)
    if MASK:
        dy = tl.where(_bn_relu_tile(x, rc, cmask, mean_ptr, invstd_ptr, g_ptr, b_ptr) > 0.0,
                      dy, 0.0)
    xhat = tl.where(tmask, _normalised(x, rc, cmask, mean_ptr, invstd_ptr), 0.0)
    return rm, rc, cmask, tmask, dy, xhat


@triton.jit
def _bn_bwd_reduce(dy_ptr, lddy, x_ptr, ldx, mean_ptr, invstd_ptr, g_ptr, b_ptr,
                   pa_ptr, pb_ptr, M, C, BM: tl.constexpr, BC: tl.constexpr, MASK: tl.constexpr):
    """Per-row-tile partials of sum(dy) and sum(dy * xhat) (see :func:`_bn_bwd_tile`)."""
    _, rc, cmask, _, dy, xhat = _bn_bwd_tile(dy_ptr, lddy, x_ptr, ldx, mean_ptr, invstd_ptr,
                                             g_ptr, b_ptr, M, C, BM, BC, MASK)
    pid_m = tl.program_id(0)
    _row(pa_ptr, pid_m, C, rc, _colsum(dy), cmask)
    _row(pb_ptr, pid_m, C, rc, _colsum(dy * xhat), cmask)


@triton.jit
def _bn_bwd_apply(dy_ptr, lddy, x_ptr, ldx, mean_ptr, invstd_ptr, g_ptr, b_ptr,
                  coef_ptr, sa_ptr, sb_ptr, direct_ptr, lddir, out_ptr, ldo, M, C,
                  BM: tl.constexpr, BC: tl.constexpr, MASK: tl.constexpr,
                  DIRECT: tl.constexpr):
    """out = [direct +] coef * (dy - sa - xhat * sb) per column (BN's input gradient)."""
    rm, rc, cmask, tmask, dy, xhat = _bn_bwd_tile(dy_ptr, lddy, x_ptr, ldx, mean_ptr,
                                                  invstd_ptr, g_ptr, b_ptr, M, C, BM, BC, MASK)
    d = _col(coef_ptr, rc, cmask)[None, :] * (dy - _col(sa_ptr, rc, cmask)[None, :]
                                              - xhat * _col(sb_ptr, rc, cmask)[None, :])
    if DIRECT:
        d += _load(direct_ptr, lddir, rm, rc, tmask).to(tl.float32)
    _store(out_ptr, ldo, rm, rc, d, tmask)
