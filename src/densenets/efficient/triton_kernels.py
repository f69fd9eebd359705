"""Triton kernels for the memory-efficient dense block (CUDA; on a CPU through TRITON_INTERPRET=1).

Every activation is an NHWC matrix [M, c] with unit column stride and any row stride, so a
layer's input is the prefix of the block buffer read in place. Statistics are per column, in
float32 whatever the data type. BN1 + ReLU of the prefix is applied to each tile as it is loaded
(``scale = gamma * invstd``, ``shift = beta - mean * scale``), so the normalised prefix never
exists in memory, in forward or in backward.

Column reductions are written as per-row-tile partials and combined afterwards (Chan's formula
for the variance): deterministic, no atomics, and no cancellation of sum-of-squares in float32.
Triton reads ``TRITON_INTERPRET`` when a kernel is decorated, i.e. when this module is imported:
:mod:`densenets.efficient.triton_ops` reloads it when the setting differs from its import.
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


@triton.jit
def _bn_relu_tile(x, cols, cmask, mean_ptr, invstd_ptr, g_ptr, b_ptr):
    """relu(gamma * (x - mean) * invstd + beta) in float32, as scale/shift per column."""
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
    inv = tl.load(invstd_ptr + cols, mask=cmask, other=0.0)
    g = tl.load(g_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    s = g * inv
    t = b - mean * s
    return tl.maximum(x.to(tl.float32) * s[None, :] + t[None, :], 0.0)


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


@triton.jit
def _gemm_bnrelu_fwd(x_ptr, ldx, mean_ptr, invstd_ptr, g_ptr, b_ptr, w_ptr, sw_n, sw_k,
                     z_ptr, ldz, psum_ptr, pm2_ptr, M, N, K,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     STATS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """z[M, N] = relu(BN1(x[M, K])) @ w[N, K]^T; with STATS, per-row-tile (sum, M2) of z."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mmask, nmask = rm < M, rn < N
    acc = tl.full((BM, BN), 0.0, tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        kmask = rk < K
        xmask = mmask[:, None] & kmask[None, :]
        x = tl.load(x_ptr + rm[:, None] * ldx + rk[None, :], mask=xmask, other=0.0)
        a = _bn_relu_tile(x, rk, kmask, mean_ptr, invstd_ptr, g_ptr, b_ptr)
        a = tl.where(xmask, a, 0.0).to(x_ptr.dtype.element_ty)
        w = tl.load(w_ptr + rk[:, None] * sw_k + rn[None, :] * sw_n,
                    mask=kmask[:, None] & nmask[None, :], other=0.0).to(x_ptr.dtype.element_ty)
        acc = _mma(acc, a, w, IEEE, UPCAST)
    zmask = mmask[:, None] & nmask[None, :]
    z = acc.to(z_ptr.dtype.element_ty)
    tl.store(z_ptr + rm[:, None] * ldz + rn[None, :], z, mask=zmask)
    if STATS:  # statistics of the stored (rounded) values, which BN2 normalises
        zf = tl.where(zmask, z.to(tl.float32), 0.0)
        cnt = tl.minimum(M - pid_m * BM, BM).to(tl.float32)
        s = _colsum(zf)
        d = tl.where(zmask, zf - (s / cnt)[None, :], 0.0)
        tl.store(psum_ptr + pid_m * N + rn, s, mask=nmask)
        tl.store(pm2_ptr + pid_m * N + rn, _colsum(d * d), mask=nmask)


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
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = pid_k * BK + tl.arange(0, BK)
    mmask, kmask = rm < M, rk < K
    tmask = mmask[:, None] & kmask[None, :]
    if GEMM:
        da = tl.full((BM, BK), 0.0, tl.float32)
        for n0 in range(0, N, BN):
            rn = n0 + tl.arange(0, BN)
            nmask = rn < N
            dz = tl.load(dz_ptr + rm[:, None] * lddz + rn[None, :],
                         mask=mmask[:, None] & nmask[None, :], other=0.0)
            w = tl.load(w_ptr + rn[:, None] * sw_n + rk[None, :] * sw_k,
                        mask=nmask[:, None] & kmask[None, :], other=0.0).to(dz.dtype)
            da = _mma(da, dz, w, IEEE, UPCAST)
    else:
        da = tl.load(da_ptr + rm[:, None] * ldda + rk[None, :], mask=tmask,
                     other=0.0).to(tl.float32)
    x = tl.load(x_ptr + rm[:, None] * ldx + rk[None, :], mask=tmask, other=0.0).to(tl.float32)
    a = _bn_relu_tile(x, rk, kmask, mean_ptr, invstd_ptr, g_ptr, b_ptr)
    dy = tl.where(tmask & (a > 0.0), da, 0.0)
    g = tl.load(g_ptr + rk, mask=kmask, other=0.0).to(tl.float32)
    gs_ptrs = gsum_ptr + rm[:, None] * ldg + rk[None, :]
    if ACCUMULATE:
        tl.store(gs_ptrs, tl.load(gs_ptrs, mask=tmask, other=0.0) + g[None, :] * dy, mask=tmask)
    else:
        tl.store(gs_ptrs, g[None, :] * dy, mask=tmask)
    mean = tl.load(mean_ptr + rk, mask=kmask, other=0.0)
    inv = tl.load(invstd_ptr + rk, mask=kmask, other=0.0)
    xhat = (x - mean[None, :]) * inv[None, :]
    tl.store(pdg_ptr + pid_m * K + rk, _colsum(dy * xhat), mask=kmask)
    tl.store(pdb_ptr + pid_m * K + rk, _colsum(dy), mask=kmask)


@triton.jit
def _gemm_bnrelu_wgrad(dz_ptr, lddz, x_ptr, ldx, mean_ptr, invstd_ptr, g_ptr, b_ptr, pdw_ptr,
                       M, N, K, rows_per_split,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr,
                       UPCAST: tl.constexpr):
    """Split-M partials of dw[N, K] = dz[M, N]^T @ relu(BN1(x[M, K])), float32 [S, N, K]."""
    pid_n, pid_k, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = pid_k * BK + tl.arange(0, BK)
    nmask, kmask = rn < N, rk < K
    acc = tl.full((BN, BK), 0.0, tl.float32)
    start = pid_s * rows_per_split
    for m0 in range(start, start + rows_per_split, BM):
        rm = m0 + tl.arange(0, BM)
        mmask = rm < M
        dz = tl.load(dz_ptr + rm[:, None] * lddz + rn[None, :],
                     mask=mmask[:, None] & nmask[None, :], other=0.0)
        xmask = mmask[:, None] & kmask[None, :]
        x = tl.load(x_ptr + rm[:, None] * ldx + rk[None, :], mask=xmask, other=0.0)
        a = _bn_relu_tile(x, rk, kmask, mean_ptr, invstd_ptr, g_ptr, b_ptr)
        a = tl.where(xmask, a, 0.0).to(dz.dtype)
        acc = _mma(acc, tl.trans(dz), a, IEEE, UPCAST)
    tl.store(pdw_ptr + pid_s * N * K + rn[:, None] * K + rk[None, :], acc,
             mask=nmask[:, None] & kmask[None, :])


@triton.jit
def _col_stats(src_ptr, lds, dst_ptr, ldd, psum_ptr, pm2_ptr, M, C,
               BM: tl.constexpr, BC: tl.constexpr, COPY: tl.constexpr):
    """Per-row-tile (sum, M2) of the columns of src [M, C]; with COPY also dst = src."""
    pid_m, pid_c = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rc = pid_c * BC + tl.arange(0, BC)
    cmask = rc < C
    tmask = (rm < M)[:, None] & cmask[None, :]
    v = tl.load(src_ptr + rm[:, None] * lds + rc[None, :], mask=tmask, other=0.0)
    if COPY:
        tl.store(dst_ptr + rm[:, None] * ldd + rc[None, :], v.to(dst_ptr.dtype.element_ty),
                 mask=tmask)
        v = v.to(dst_ptr.dtype.element_ty)
    vf = v.to(tl.float32)
    cnt = tl.minimum(M - pid_m * BM, BM).to(tl.float32)
    s = _colsum(vf)
    d = tl.where(tmask, vf - (s / cnt)[None, :], 0.0)
    tl.store(psum_ptr + pid_m * C + rc, s, mask=cmask)
    tl.store(pm2_ptr + pid_m * C + rc, _colsum(d * d), mask=cmask)


@triton.jit
def _stats_finalize(psum_ptr, pm2_ptr, mean_ptr, var_ptr, invstd_ptr, T, M, C, eps,
                    TILE: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """Combine T row-tile partials of TILE rows each into mean, biased var and invstd [C]."""
    rc = tl.program_id(0) * BC + tl.arange(0, BC)
    cmask = rc < C
    total = tl.full((BC,), 0.0, tl.float32)
    for t0 in range(0, T, BT):
        rt = t0 + tl.arange(0, BT)
        total += _colsum(tl.load(psum_ptr + rt[:, None] * C + rc[None, :],
                                mask=(rt < T)[:, None] & cmask[None, :], other=0.0))
    mean = total / M
    m2 = tl.full((BC,), 0.0, tl.float32)
    for t0 in range(0, T, BT):
        rt = t0 + tl.arange(0, BT)
        pmask = (rt < T)[:, None] & cmask[None, :]
        cnt = tl.minimum(M - rt * TILE, TILE).to(tl.float32)
        cnt = tl.where(rt < T, cnt, 1.0)
        s = tl.load(psum_ptr + rt[:, None] * C + rc[None, :], mask=pmask, other=0.0)
        q = tl.load(pm2_ptr + rt[:, None] * C + rc[None, :], mask=pmask, other=0.0)
        d = s / cnt[:, None] - mean[None, :]
        m2 += _colsum(tl.where(pmask, q + cnt[:, None] * d * d, 0.0))
    var = m2 / M
    tl.store(mean_ptr + rc, mean, mask=cmask)
    tl.store(var_ptr + rc, var, mask=cmask)
    tl.store(invstd_ptr + rc, 1.0 / tl.sqrt(var + eps), mask=cmask)


@triton.jit
def _bn_relu_apply(x_ptr, ldx, mean_ptr, invstd_ptr, g_ptr, b_ptr, out_ptr, ldo, M, C,
                   BM: tl.constexpr, BC: tl.constexpr):
    """out = relu(BN(x)) with the given statistics and affine."""
    pid_m, pid_c = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rc = pid_c * BC + tl.arange(0, BC)
    cmask = rc < C
    tmask = (rm < M)[:, None] & cmask[None, :]
    x = tl.load(x_ptr + rm[:, None] * ldx + rc[None, :], mask=tmask, other=0.0)
    a = _bn_relu_tile(x, rc, cmask, mean_ptr, invstd_ptr, g_ptr, b_ptr)
    tl.store(out_ptr + rm[:, None] * ldo + rc[None, :], a.to(out_ptr.dtype.element_ty),
             mask=tmask)


@triton.jit
def _bn_bwd_reduce(dy_ptr, lddy, x_ptr, ldx, mean_ptr, invstd_ptr, g_ptr, b_ptr,
                   pa_ptr, pb_ptr, M, C, BM: tl.constexpr, BC: tl.constexpr, MASK: tl.constexpr):
    """Per-row-tile partials of sum(dy) and sum(dy * xhat), xhat = (x - mean) * invstd; with
    MASK, dy is first masked by relu(BN(x)) > 0 (the ReLU after the BN)."""
    pid_m, pid_c = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rc = pid_c * BC + tl.arange(0, BC)
    cmask = rc < C
    tmask = (rm < M)[:, None] & cmask[None, :]
    dy = tl.load(dy_ptr + rm[:, None] * lddy + rc[None, :], mask=tmask, other=0.0)
    dy = dy.to(tl.float32)
    x = tl.load(x_ptr + rm[:, None] * ldx + rc[None, :], mask=tmask, other=0.0).to(tl.float32)
    if MASK:
        dy = tl.where(_bn_relu_tile(x, rc, cmask, mean_ptr, invstd_ptr, g_ptr, b_ptr) > 0.0,
                      dy, 0.0)
    mean = tl.load(mean_ptr + rc, mask=cmask, other=0.0)
    inv = tl.load(invstd_ptr + rc, mask=cmask, other=0.0)
    xhat = tl.where(tmask, (x - mean[None, :]) * inv[None, :], 0.0)
    tl.store(pa_ptr + pid_m * C + rc, _colsum(dy), mask=cmask)
    tl.store(pb_ptr + pid_m * C + rc, _colsum(dy * xhat), mask=cmask)


@triton.jit
def _bn_bwd_apply(dy_ptr, lddy, x_ptr, ldx, mean_ptr, invstd_ptr, g_ptr, b_ptr,
                  coef_ptr, sa_ptr, sb_ptr, direct_ptr, lddir, out_ptr, ldo, M, C,
                  BM: tl.constexpr, BC: tl.constexpr, MASK: tl.constexpr,
                  DIRECT: tl.constexpr):
    """out = [direct +] coef * (dy - sa - xhat * sb) per column (BN's input gradient)."""
    pid_m, pid_c = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rc = pid_c * BC + tl.arange(0, BC)
    cmask = rc < C
    tmask = (rm < M)[:, None] & cmask[None, :]
    dy = tl.load(dy_ptr + rm[:, None] * lddy + rc[None, :], mask=tmask, other=0.0)
    dy = dy.to(tl.float32)
    x = tl.load(x_ptr + rm[:, None] * ldx + rc[None, :], mask=tmask, other=0.0).to(tl.float32)
    if MASK:
        dy = tl.where(_bn_relu_tile(x, rc, cmask, mean_ptr, invstd_ptr, g_ptr, b_ptr) > 0.0,
                      dy, 0.0)
    mean = tl.load(mean_ptr + rc, mask=cmask, other=0.0)
    inv = tl.load(invstd_ptr + rc, mask=cmask, other=0.0)
    coef = tl.load(coef_ptr + rc, mask=cmask, other=0.0)
    sa = tl.load(sa_ptr + rc, mask=cmask, other=0.0)
    sb = tl.load(sb_ptr + rc, mask=cmask, other=0.0)
    xhat = (x - mean[None, :]) * inv[None, :]
    d = coef[None, :] * (dy - sa[None, :] - xhat * sb[None, :])
    if DIRECT:
        d += tl.load(direct_ptr + rm[:, None] * lddir + rc[None, :], mask=tmask,
                     other=0.0).to(tl.float32)
    tl.store(out_ptr + rm[:, None] * ldo + rc[None, :], d.to(out_ptr.dtype.element_ty),
             mask=tmask)
