/* Fused CPU kernels of the memory-efficient dense block (see passes.py).
 *
 * Every matrix is row-major [M, c] with a leading dimension (row stride) ld >= c: one row per
 * pixel, one column per channel. On CPU these passes are memory bound, so each kernel reads and
 * writes every element once where PyTorch would chain three to six elementwise operations.
 * Column sums run in the element type over blocks of ROWS rows, then in double per thread, and
 * the threads' sums are added in thread order (deterministic).
 * cpu_kernels.py compiles this file with -ffp-contract=off, so that the ReLU mask recomputed in
 * backward is bit-identical to the one forward used, and a channel normalised as it is read,
 * (x - mu) * sd, equals the copy col_normalise writes.
 * The kernels that read normalised channels take them stored (mu == NULL) or raw with their
 * mean mu and inverse standard deviation sd, normalised on load (the block keeps no copy). The file includes itself twice to define
 * every kernel for float (suffix _f32) and double (_f64).
 */
#ifndef REAL
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#else /* built without OpenMP: every kernel runs on the calling thread */
static int omp_get_thread_num(void) { return 0; }
#endif

typedef int64_t i64;
enum { ROWS = 64 };

/* Per-thread column accumulators: `width` doubles per thread, summed in thread order. */
static double *partials_new(int nt, i64 width) {
    return (double *)calloc((size_t)nt * (size_t)width, sizeof(double));
}

/* The threads' sums added in thread order into a new array; frees the partials. */
static double *partials_total(double *p, int nt, i64 width) {
    double *out = (double *)calloc((size_t)width, sizeof(double));
    for (int t = 0; t < nt; t++)
        for (i64 j = 0; j < width; j++) out[j] += p[(i64)t * width + j];
    free(p);
    return out;
}

#define REAL float
#define SUF(name) name##_f32
#include "cpu_kernels.c"
#undef REAL
#undef SUF
#define REAL double
#define SUF(name) name##_f64
#include "cpu_kernels.c"

#else /* the kernels, for one REAL type */
#define T REAL

/* A thread sums columns in the element type over blocks of ROWS rows (`blk`), then adds each
 * block into its double sums `s` and clears it: long columns keep double precision at the
 * element type's speed. */
static inline void SUF(add_block)(double *restrict s, T *restrict blk, i64 w) {
    for (i64 j = 0; j < w; j++) { s[j] += blk[j]; blk[j] = 0; }
}

/* Channel j of a row of normalised channels: stored, or normalised on load. */
#define XHAT(xr, j) (mu ? ((xr)[j] - mu[j]) * sd[j] : (xr)[j])

/* out = relu(x * g + b): a layer's BN affine and ReLU applied to normalised channels. */
void SUF(bn_relu)(i64 M, i64 c, const T *restrict x, i64 ldx, const T *restrict mu,
                  const T *restrict sd, const T *restrict g, const T *restrict b,
                  T *restrict out, i64 ldo, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 m = 0; m < M; m++) {
        const T *restrict xr = x + m * ldx;
        T *restrict orow = out + m * ldo;
        for (i64 j = 0; j < c; j++) {
            T y = XHAT(xr, j) * g[j] + b[j];
            orow[j] = y <= 0 ? (T)0 : y;
        }
    }
}

/* The column sums of a BN affine + ReLU's backward, a = relu(x * g + b): with dy = d where the
 * recomputed pre-activation is positive, dgamma = sum(dy * x) then dbeta = sum(dy), 2c doubles
 * (the caller frees them); with G != NULL, also G = (G +) g * dy. The compiler unswitches the
 * loop-invariant branches. */
static double *SUF(relu_sums)(i64 M, i64 c, const T *restrict d, i64 ldd, const T *restrict x,
                              i64 ldx, const T *restrict mu, const T *restrict sd,
                              const T *restrict g, const T *restrict b,
                              T *restrict G, i64 ldg, int accumulate, int nt) {
    double *part = partials_new(nt, 2 * c);
#pragma omp parallel num_threads(nt)
    {
        double *s = part + (i64)omp_get_thread_num() * 2 * c;
        T *restrict bg = (T *)calloc(2 * c, sizeof(T)), *restrict bb = bg + c;
        i64 rows = 0;
#pragma omp for schedule(static)
        for (i64 m = 0; m < M; m++) {
            const T *restrict dr = d + m * ldd, *restrict xr = x + m * ldx;
            T *restrict gr = G ? G + m * ldg : NULL;
            for (i64 j = 0; j < c; j++) {
                T xv = XHAT(xr, j);
                T y = xv * g[j] + b[j];
                T dy = y <= 0 ? (T)0 : dr[j];
                bb[j] += dy;
                bg[j] += dy * xv;
                if (gr) gr[j] = (accumulate ? gr[j] : (T)0) + g[j] * dy;
            }
            if (++rows == ROWS) { SUF(add_block)(s, bg, 2 * c); rows = 0; }
        }
        SUF(add_block)(s, bg, 2 * c);
        free(bg);
    }
    return partials_total(part, nt, 2 * c);
}

/* Backward of a = relu(x * g + b) for one reader of the prefix: dgamma, dbeta, and G = (G +)
 * g * dL/d(x * g + b). */
void SUF(bn_relu_backward)(i64 M, i64 c, const T *restrict da, i64 ldd, const T *restrict x,
                           i64 ldx, const T *restrict mu, const T *restrict sd,
                           const T *restrict g, const T *restrict b, T *restrict G,
                           i64 ldg, int accumulate, T *dgamma, T *dbeta, int nt) {
    double *tot = SUF(relu_sums)(M, c, da, ldd, x, ldx, mu, sd, g, b, G, ldg, accumulate, nt);
    for (i64 j = 0; j < c; j++) { dgamma[j] = (T)tot[j]; dbeta[j] = (T)tot[c + j]; }
    free(tot);
}

/* Column sums of src (or of (src - shift)^2 when shift is given) into out[k], in double. */
static void SUF(col_sums)(i64 M, i64 k, const T *restrict src, i64 lds,
                          const T *restrict shift, double *out, int nt) {
    double *part = partials_new(nt, k);
#pragma omp parallel num_threads(nt)
    {
        double *s = part + (i64)omp_get_thread_num() * k;
        T *restrict blk = (T *)calloc(k, sizeof(T));
        i64 rows = 0;
#pragma omp for schedule(static)
        for (i64 m = 0; m < M; m++) {
            const T *restrict r = src + m * lds;
            if (shift) {
                for (i64 j = 0; j < k; j++) { T d = r[j] - shift[j]; blk[j] += d * d; }
            } else {
                for (i64 j = 0; j < k; j++) blk[j] += r[j];
            }
            if (++rows == ROWS) { SUF(add_block)(s, blk, k); rows = 0; }
        }
        SUF(add_block)(s, blk, k);
        free(blk);
    }
    double *tot = partials_total(part, nt, k);
    memcpy(out, tot, (size_t)k * sizeof(double));
    free(tot);
}

/* Batch statistics of k channels: dst = (src - mean) * invstd with the biased variance
 * (two-pass); dst may be src, or NULL (statistics only: the channels are normalised on load). The final pass can also write a copy of src (copy != NULL) and
 * relu(dst * g + b) (relu_out != NULL), saving a pass over the data for each. */
void SUF(col_normalise)(i64 M, i64 k, const T *src, i64 lds, T *dst, i64 ldd, double eps,
                        T *mean_out, T *var_out, T *invstd_out, T *copy, i64 ldc,
                        const T *g, const T *b, T *relu_out, i64 ldr, int nt) {
    double *acc = (double *)malloc(k * sizeof(double));
    SUF(col_sums)(M, k, src, lds, NULL, acc, nt);
    for (i64 j = 0; j < k; j++) mean_out[j] = (T)(acc[j] / (double)M);
    SUF(col_sums)(M, k, src, lds, mean_out, acc, nt);
    for (i64 j = 0; j < k; j++) {
        double v = acc[j] / (double)M;
        var_out[j] = (T)v;
        invstd_out[j] = (T)(1.0 / sqrt(v + eps));
    }
    free(acc);
    const T *restrict mean = mean_out, *restrict inv = invstd_out;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 m = 0; m < M; m++) {
        const T *r = src + m * lds;
        T *o = dst ? dst + m * ldd : NULL;
        if (copy) {
            T *restrict cr = copy + m * ldc;
            for (i64 j = 0; j < k; j++) cr[j] = r[j];
        }
        T *rr = relu_out ? relu_out + m * ldr : NULL;
        for (i64 j = 0; j < k; j++) {  /* r[j] is read before o[j] (maybe r[j]) is written */
            T v = (r[j] - mean[j]) * inv[j];
            if (o) o[j] = v;
            if (rr) {
                T y = v * g[j] + b[j];
                rr[j] = y <= 0 ? (T)0 : y;
            }
        }
    }
}

/* Backward of relu(z * g + b) followed by the batch normalisation that produced z, with z
 * stored normalised: dh (in) becomes dL/dz_raw (out, in place),
 * g * invstd * (dy - mean(dy) - z * mean(dy * z)); dy is recomputed in both passes. */
void SUF(bn_backward)(i64 M, i64 c, T *dh, i64 ldh, const T *z, i64 ldz, const T *g,
                      const T *b, const T *invstd, T *dgamma, T *dbeta, int nt) {
    double *tot = SUF(relu_sums)(M, c, dh, ldh, z, ldz, NULL, NULL, g, b, NULL, 0, 0, nt);
    T *coef = (T *)malloc(3 * c * sizeof(T)), *mg = coef + c, *mb = mg + c;
    for (i64 j = 0; j < c; j++) {
        dgamma[j] = (T)tot[j];
        dbeta[j] = (T)tot[c + j];
        mg[j] = (T)(tot[j] / (double)M);
        mb[j] = (T)(tot[c + j] / (double)M);
        coef[j] = g[j] * invstd[j];
    }
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 m = 0; m < M; m++) {
        T *restrict hr = dh + m * ldh;
        const T *restrict zr = z + m * ldz;
        for (i64 j = 0; j < c; j++) {
            T y = zr[j] * g[j] + b[j];
            T dy = y <= 0 ? (T)0 : hr[j];
            hr[j] = coef[j] * (dy - mb[j] - zr[j] * mg[j]);
        }
    }
    free(coef);
    free(tot);
}

/* dL/dx of a channel group from its direct gradient and the summed BN backward of all its
 * readers: out = go + invstd * (G - mean(G) - x * mean(G * x)), x normalised (stored, or raw
 * with its mean mu: normalised on load with invstd). The means are taken over the
 * accumulated G itself, so each output column has exactly the zero-mean structure of BN's
 * backward (sums of the readers' own terms would differ from it by G's rounding). */
void SUF(bn_input_grad)(i64 M, i64 k, const T *G, i64 ldg, const T *x, i64 ldx,
                        const T *restrict mu, const T *invstd, const T *go, i64 ldgo, T *out,
                        i64 ldo, int nt) {
    const T *restrict sd = invstd;
    double *part = partials_new(nt, 2 * k);
#pragma omp parallel num_threads(nt)
    {
        double *s = part + (i64)omp_get_thread_num() * 2 * k;
        T *restrict bp = (T *)calloc(2 * k, sizeof(T)), *restrict bq = bp + k;
        i64 rows = 0;
#pragma omp for schedule(static)
        for (i64 m = 0; m < M; m++) {
            const T *restrict gr = G + m * ldg, *restrict xr = x + m * ldx;
            for (i64 j = 0; j < k; j++) { bp[j] += gr[j]; bq[j] += gr[j] * XHAT(xr, j); }
            if (++rows == ROWS) { SUF(add_block)(s, bp, 2 * k); rows = 0; }
        }
        SUF(add_block)(s, bp, 2 * k);
        free(bp);
    }
    double *tot = partials_total(part, nt, 2 * k);
    T *coef = (T *)malloc(2 * k * sizeof(T)), *pm = coef + k;
    for (i64 j = 0; j < k; j++) {
        pm[j] = (T)(tot[j] / (double)M);
        coef[j] = (T)(tot[k + j] / (double)M);
    }
    free(tot);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 m = 0; m < M; m++) {
        const T *restrict gr = G + m * ldg, *restrict xr = x + m * ldx;
        const T *restrict dr = go + m * ldgo;
        T *restrict o = out + m * ldo;
        for (i64 j = 0; j < k; j++)
            o[j] = dr[j] + invstd[j] * (gr[j] - pm[j] - XHAT(xr, j) * coef[j]);
    }
    free(coef);
}
#undef XHAT
#undef T
#endif
