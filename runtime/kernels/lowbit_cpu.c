/* Quantized linear layers on the CPU at memory speed: y = x @ W.T with W int8 (one scale per
 * output row) or int4 (asymmetric groups), for runtime/lowbit.py (built and loaded by
 * runtime/native.py; see there for why and when).
 *
 * Like llama.cpp's Q8_0 dot products, the activations are quantized too, per block of 32 values
 * (scale = max |x| / 127, round to nearest even), so that the inner loop is an integer dot product
 * (AVX512-VNNI's vpdpbusd: 64 byte products per instruction) and the weights are read once, as
 * stored: the loop is bound by the memory, not by expanding weights to floats.
 *
 * int8, row n:  y = wscale[n] * sum_b d_b * sum_{k in b} w[n,k] * xq[k]
 *   (with a scale per block of 32 instead, a GGUF's Q8_0: reshard_int8g_gemm below)
 *   vpdpbusd multiplies unsigned by signed bytes: it takes (w ^ 0x80) = w + 128 as the unsigned
 *   operand, which adds 128 * sum_b d_b * sum_{k in b} xq[k] to the row's sum: the same for every
 *   row, so it is computed once per activation row and taken off at the end.
 * int4, row n:  y = sum_g scale[n,g] * sum_{b in g} d_b * sum_{k in b} q[n,k] * xq[k] + zero[n,g] * xsum_g
 *   (each block's scale and each group's zero in `sz`, in the folder's float type: see below)
 *   q (0..15) is unsigned already; a stored byte holds values 2j (low nibble) and 2j+1 (high), so
 *   the activations are split into even and odd positions once per call. xsum_g is the sum of the
 *   quantized activations over group g (sum_{b in g} d_b * sum_{k in b} xq[k]), so that y is exactly
 *   the product of the quantized x with the weights w = q * scale + zero, whose error is that of x
 *   times w. With x's exact sums instead, the error of quantizing x is multiplied by q * scale
 *   alone, which is not centered (0 to 15 scales where w is about -7.5 to 7.5): SmolLM2's int4
 *   perplexity in float32 rose +0.83% with it and -0.04% with this (benchmarks/RESULTS.md).
 * x and y are float32 (io 0) or bfloat16 (io 2). Results are deterministic: the same inputs give
 * the same bits whatever the thread count.
 */
#include "common.h"

/* 1: every kernel (AVX512-VNNI); 2: the GGML block kernels only (AVX2); 0: none */
int reshard_lowbit_isa(void) { return HAVE_VNNI ? 1 : HAVE_AVX2 ? 2 : 0; }

#if HAVE_VNNI

/* ---- int8 ---------------------------------------------------------------------------------- */

typedef struct {
    int8_t *xq;     /* (M, K) */
    float *corr;    /* (M): 128 * sum_b d_b * sum_{k in b} xq[k], what (w + 128) adds over w */
    float *cb;      /* (M, K/32): that correction's term of each block (int8 with block scales weighs them) */
    float *dl;      /* (M, K/4): d of the block each 4 values belong to, one per lane */
} act8;

static int prepare8(const float *x, int64_t M, int64_t K, act8 *a) {
    a->xq = aligned_alloc(64, ((M * K + 63) / 64) * 64);
    a->corr = malloc(sizeof(float) * M);
    a->cb = malloc(sizeof(float) * M * (K / BLOCK));
    a->dl = aligned_alloc(64, ((M * K + 63) / 64) * 64);
    float *d = malloc(sizeof(float) * (K / BLOCK));
    if (!a->xq || !a->corr || !a->cb || !a->dl || !d) { free(d); return -1; }
    for (int64_t m = 0; m < M; m++) {
        int8_t *q = a->xq + m * K;
        quantize_row(x + m * K, K, q, d);
        for (int64_t l = 0; l < K / 4; l++) a->dl[m * (K / 4) + l] = d[(4 * l) / BLOCK];
        float corr = 0.f, *cb = a->cb + m * (K / BLOCK);
        for (int64_t b = 0; b < K / BLOCK; b++) {
            int32_t sum = 0;
            for (int i = 0; i < BLOCK; i++) sum += q[b * BLOCK + i];
            cb[b] = d[b] * (float)(128 * sum);
            corr += cb[b];
        }
        a->corr[m] = corr;
    }
    free(d);
    return 0;
}

static void release8(act8 *a) { free(a->xq); free(a->corr); free(a->cb); free(a->dl); }

/* Row n of y for every m (common.h's ROWS frame). */
#define ACT8(j)                                                                                 \
    const int8_t *xq##j = a->xq + (m + j) * K;                                                  \
    const float *dl##j = a->dl + (m + j) * (K / 4);                                             \
    __m512 acc##j = _mm512_setzero_ps();
#define STEP8(j)                                                                                \
    acc##j = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(                            \
        _mm512_setzero_si512(), wv, _mm512_loadu_si512(xq##j + k))),                             \
        _mm512_loadu_ps(dl##j + k / 4), acc##j)

#define WALK8(STEPS)                                                                            \
    for (int64_t k = 0; k < K; k += 64) {                                                       \
        __m512i wv = _mm512_xor_si512(_mm512_loadu_si512(wr + k), flip);                        \
        STEPS(STEP8)                                                                            \
    }
#define PUT8(j) put(y, (m + j) * N + n, wscale[n] * (hsum(acc##j) - a->corr[m + j]), io)

static inline void row8(const act8 *a, int64_t M, int64_t K, const int8_t *w, const float *wscale,
                        int64_t N, int64_t n, void *y, int io) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const int8_t *wr = w + n * K;
    ROWS(ACT8, WALK8, PUT8)
}

/* ---- int8 with a scale per block of 32 -------------------------------------------------------- */
/* A GGUF's Q8_0 re-packed (reshard/ggml_repack.py): wscale is (N, K/32), row n:
 *   y = sum_b wscale[n,b] * d_b * sum_{k in b} w[n,k] * xq[k]
 * Each 64-value step holds two blocks (lanes 0-7 the first, 8-15 the second), so each lane's
 * d_b is multiplied by its block's weight scale. The (w + 128) correction is per block as well:
 * per row, sum_b wscale[n,b] * cb[b], cb[b] = 128 * d_b * sum_{k in b} xq[k] (prepare8's, once per
 * activation row). */
#define ACT8G(j)                                                                                \
    const int8_t *xq##j = a->xq + (m + j) * K;                                                  \
    const float *dl##j = a->dl + (m + j) * (K / 4), *cb##j = a->cb + (m + j) * (K / BLOCK);      \
    __m512 acc##j = _mm512_setzero_ps();                                                        \
    float c##j = 0.f;
#define STEP8G(j)                                                                               \
    acc##j = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(                            \
        _mm512_setzero_si512(), wv, _mm512_loadu_si512(xq##j + k))),                             \
        _mm512_mul_ps(_mm512_loadu_ps(dl##j + k / 4), ws), acc##j)
#define CORR8G(j) c##j += sr[b] * cb##j[b]

#define WALK8G(STEPS)                                                                           \
    for (int64_t k = 0; k < K; k += 64) {                                                       \
        __m512i wv = _mm512_xor_si512(_mm512_loadu_si512(wr + k), flip);                        \
        __m512 ws = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(sr[k / BLOCK]), _mm512_set1_ps(sr[k / BLOCK + 1])); \
        STEPS(STEP8G)                                                                           \
    }                                                                                           \
    for (int64_t b = 0; b < K / BLOCK; b++) { STEPS(CORR8G) }
#define PUT8G(j) put(y, (m + j) * N + n, hsum(acc##j) - c##j, io)

static inline void row8g(const act8 *a, int64_t M, int64_t K, const int8_t *w,
                         const float *wscale, int64_t N, int64_t n, void *y, int io) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const int8_t *wr = w + n * K;
    const float *sr = wscale + n * (K / BLOCK);
    ROWS(ACT8G, WALK8G, PUT8G)
}

/* The int8 kernels' shared body: `grouped` picks row8g (wscale (N, K/32)) over row8 (wscale (N,)). */
static int gemm8(const void *xin, int io, int64_t M, int64_t K, const int8_t *w, const float *wscale,
                 int64_t N, void *y, int threads, int grouped) {
    if (K % 64) return -2;  /* the loops read 64 values at a time */
    if (empty(M, K, N, y, io)) return 0;
    float *owned;
    const float *x = floats(xin, M * K, io, &owned);
    act8 a;
    int failed = x == NULL || prepare8(x, M, K, &a);
    free(owned);
    if (failed) { if (x) release8(&a); return -1; }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        if (grouped) row8g(&a, M, K, w, wscale, N, n, y, io);
        else row8(&a, M, K, w, wscale, N, n, y, io);
    }
    release8(&a);
    return 0;
}

/* wscale (N,) float32, one scale per row */
int reshard_int8_gemm(const void *xin, int io, int64_t M, int64_t K, const int8_t *w, const float *wscale,
                      int64_t N, void *y, int threads) {
    return gemm8(xin, io, M, K, w, wscale, N, y, threads, 0);
}

/* wscale (N, K/32) float32, one scale per block of 32 */
int reshard_int8g_gemm(const void *xin, int io, int64_t M, int64_t K, const int8_t *w, const float *wscale,
                       int64_t N, void *y, int threads) {
    return gemm8(xin, io, M, K, w, wscale, N, y, threads, 1);
}

/* ---- int4 ---------------------------------------------------------------------------------- */
/* Per row, `sz` holds K/32 block scales (each block's group scale: runtime/lowbit.py writes them
 * at load), then K/group zeros, in the folder's float type. Within every full chunk of 256 values
 * the eight block scales are in the order the chunk's sums come out of the horizontal adds below:
 * blocks 0, 2, 4, 6, 1, 3, 5, 7 (a tail shorter than 256 values keeps its blocks in order). */

typedef struct {
    int8_t *xe, *xo;  /* (M, K/2): per 64 values, the 32 at even positions, then the 32 at odd ones */
    float *d;         /* (M, K/32): block scales, ordered as the weight's block scales */
    float *xs;        /* (M, K/group): sums of the quantized x per group */
} act4;

static int prepare4(const float *x, int64_t M, int64_t K, int64_t group, act4 *a) {
    a->xe = aligned_alloc(64, ((M * K / 2 + 63) / 64) * 64);
    a->xo = aligned_alloc(64, ((M * K / 2 + 63) / 64) * 64);
    a->d = malloc(sizeof(float) * M * (K / BLOCK));
    a->xs = malloc(sizeof(float) * M * (K / group));
    int8_t *q = malloc(K);
    float *d = malloc(sizeof(float) * (K / BLOCK));
    if (!a->xe || !a->xo || !a->d || !a->xs || !q || !d) { free(q); free(d); return -1; }
    const int64_t full = K / 256 * 8;  /* blocks in full chunks of 256 values */
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * K;
        quantize_row(xm, K, q, d);
        float *dm = a->d + m * (K / BLOCK);
        for (int64_t b = 0; b < K / BLOCK; b++) dm[b] = b < full ? d[b / 8 * 8 + ORDER[b % 8]] : d[b];
        for (int64_t j = 0; j < K / 2; j++) {
            a->xe[m * (K / 2) + j] = q[2 * j];
            a->xo[m * (K / 2) + j] = q[2 * j + 1];
        }
        for (int64_t g = 0; g < K / group; g++) {  /* the quantized values' sum, as the products see x */
            float s = 0.f;
            for (int64_t b = g * group / BLOCK; b < (g + 1) * group / BLOCK; b++) {
                int32_t sum = 0;
                for (int i = 0; i < BLOCK; i++) sum += q[b * BLOCK + i];
                s += d[b] * (float)sum;
            }
            a->xs[m * (K / group) + g] = s;
        }
    }
    free(q);
    free(d);
    return 0;
}

static void release4(act4 *a) { free(a->xe); free(a->xo); free(a->d); free(a->xs); }

/* y[m, n] from the full chunks' sums in `acc`: plus the tail shorter than 256 values (blocks in
 * order), plus the zeros' term */
static inline float finish4(const act4 *a, int64_t m, __m256 acc, const uint8_t *wr, const void *sz, int kind,
                            int64_t K, int64_t group, int64_t srow) {
    const int64_t G = K / group, NB = K / BLOCK;
    const __m256i low = _mm256_set1_epi8(0x0F);
    const int8_t *xe = a->xe + m * (K / 2), *xo = a->xo + m * (K / 2);
    const float *d = a->d + m * NB;
    float total = hsum8(acc);
    for (int64_t k = K / 256 * 256; k < K; k += 64) {
        int32_t lanes[8];
        __m256i p = _mm256_loadu_si256((const __m256i *)(wr + k / 2));
        __m256i dp = dot64(_mm256_and_si256(p, low), _mm256_and_si256(_mm256_srli_epi16(p, 4), low), xe + k / 2, xo + k / 2);
        _mm256_storeu_si256((__m256i *)lanes, dp);
        float s0 = load_half(sz, srow + k / BLOCK, kind), s1 = load_half(sz, srow + k / BLOCK + 1, kind);
        total += (float)(lanes[0] + lanes[1] + lanes[2] + lanes[3]) * d[k / BLOCK] * s0
               + (float)(lanes[4] + lanes[5] + lanes[6] + lanes[7]) * d[k / BLOCK + 1] * s1;
    }
    const float *xs = a->xs + m * G;
    __m256 zacc = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= G; g += 8) zacc = _mm256_fmadd_ps(load8(sz, srow + NB + g, kind), _mm256_loadu_ps(xs + g), zacc);
    total += hsum8(zacc);
    for (; g < G; g++) total += load_half(sz, srow + NB + g, kind) * xs[g];
    return total;
}

/* a chunk of 256 values (eight blocks) for activation row j: the four 64-value dot products,
 * one sum per block (lanes in the order 0, 2, 4, 6, 1, 3, 5, 7), then one multiply-add */
#define ACT4(j)                                                                                 \
    const int8_t *xe##j = a->xe + (m + j) * (K / 2), *xo##j = a->xo + (m + j) * (K / 2);       \
    const float *d##j = a->d + (m + j) * NB;                                                    \
    __m256 acc##j = _mm256_setzero_ps();
#define CHUNK4(j)                                                                               \
    acc##j = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_hadd_epi32(                              \
        _mm256_hadd_epi32(dot64(lo0, hi0, xe##j + k / 2, xo##j + k / 2),                          \
                          dot64(lo1, hi1, xe##j + k / 2 + 32, xo##j + k / 2 + 32)),               \
        _mm256_hadd_epi32(dot64(lo2, hi2, xe##j + k / 2 + 64, xo##j + k / 2 + 64),                \
                          dot64(lo3, hi3, xe##j + k / 2 + 96, xo##j + k / 2 + 96)))),             \
        _mm256_mul_ps(_mm256_loadu_ps(d##j + k / BLOCK), ws), acc##j)
#define UNPACK4                                                                                 \
    __m256i p0 = _mm256_loadu_si256((const __m256i *)(wr + k / 2)),                             \
            p1 = _mm256_loadu_si256((const __m256i *)(wr + k / 2 + 32)),                        \
            p2 = _mm256_loadu_si256((const __m256i *)(wr + k / 2 + 64)),                        \
            p3 = _mm256_loadu_si256((const __m256i *)(wr + k / 2 + 96));                        \
    __m256i lo0 = _mm256_and_si256(p0, low), hi0 = _mm256_and_si256(_mm256_srli_epi16(p0, 4), low); \
    __m256i lo1 = _mm256_and_si256(p1, low), hi1 = _mm256_and_si256(_mm256_srli_epi16(p1, 4), low); \
    __m256i lo2 = _mm256_and_si256(p2, low), hi2 = _mm256_and_si256(_mm256_srli_epi16(p2, 4), low); \
    __m256i lo3 = _mm256_and_si256(p3, low), hi3 = _mm256_and_si256(_mm256_srli_epi16(p3, 4), low); \
    __m256 ws = load8(sz, srow + k / BLOCK, kind);

/* row n of y for every m; activation rows four at a time, as in row8 */
#define WALK4(STEPS)                                                                            \
    for (int64_t k = 0; k < full; k += 256) {                                                   \
        UNPACK4                                                                                 \
        STEPS(CHUNK4)                                                                           \
    }
#define PUT4(j) put(y, (m + j) * N + n, finish4(a, m + j, acc##j, wr, sz, kind, K, group, srow), io)

static inline void row4(const act4 *a, int64_t M, int64_t K, const uint8_t *w, const void *sz, int kind,
                        int64_t group, int64_t N, int64_t n, void *y, int io) {
    const int64_t G = K / group, NB = K / BLOCK, full = K / 256 * 256;
    const __m256i low = _mm256_set1_epi8(0x0F);
    const uint8_t *wr = w + n * (K / 2);
    const int64_t srow = n * (NB + G);  /* this row's block scales, then its zeros, in `sz` */
    ROWS(ACT4, WALK4, PUT4)
}

/* w: (N, K/2) bytes; sz: (N, K/32 + K/group) of `kind` (see above); K % 64 == 0, group % 32 == 0, K % group == 0 */
int reshard_int4_gemm(const void *xin, int io, int64_t M, int64_t K, const uint8_t *w, const void *sz, int kind,
                      int64_t group, int64_t N, void *y, int threads) {
    if (K % 64 || group <= 0 || group % BLOCK || K % group) return -2;
    if (empty(M, K, N, y, io)) return 0;
    float *owned;
    const float *x = floats(xin, M * K, io, &owned);
    act4 a;
    int failed = x == NULL || prepare4(x, M, K, group, &a);
    free(owned);
    if (failed) { if (x) release4(&a); return -1; }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) row4(&a, M, K, w, sz, kind, group, N, n, y, io);
    release4(&a);
    return 0;
}

#else  /* no AVX512-VNNI: runtime/native.py sees reshard_lowbit_isa() == 0 and uses torch's kernels */

int reshard_int8_gemm(const void *x, int io, int64_t M, int64_t K, const int8_t *w, const float *wscale,
                      int64_t N, void *y, int threads) { return -3; }
int reshard_int8g_gemm(const void *x, int io, int64_t M, int64_t K, const int8_t *w, const float *wscale,
                       int64_t N, void *y, int threads) { return -3; }
int reshard_int4_gemm(const void *x, int io, int64_t M, int64_t K, const uint8_t *w, const void *sz, int kind,
                      int64_t group, int64_t N, void *y, int threads) { return -3; }

#endif
