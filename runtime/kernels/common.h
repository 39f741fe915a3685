/* What the project's CPU kernels share (lowbit_cpu.c: int8/int4; kquant_cpu.c: GGML K-quants):
 * the activations' quantization per block of 32, float conversions and horizontal sums. */
#ifndef RESHARD_KERNELS_COMMON_H
#define RESHARD_KERNELS_COMMON_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define HAVE_VNNI 1
#else
#define HAVE_VNNI 0
#endif
/* the GGML block kernels (kquant_cpu.c, iquant_cpu.c) also run on AVX2 alone (most desktop CPUs without
 * AVX512: Intel since Haswell, AMD before Zen 4), their byte products in 16 then 32 bits (DPBUSD) */
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define HAVE_AVX2 1
#else
#define HAVE_AVX2 0
#endif
#define HAVE_BLOCKS (HAVE_VNNI || HAVE_AVX2)

#define BLOCK 32

/* Every row function's frame: y[m, n] for every activation row m, four rows at a time (each weight
 * vector loaded once for the four: batches and prompts, M > 1), then one at a time. ACT(r) declares
 * row m + r's pointers and accumulators; WALK(STEPS) walks weight row n and runs STEPS(STEP) where a
 * vector of weights is ready (FOUR or ONE: STEP(r) for each row); PUT(r) writes y[m + r, n]. One
 * weight row at a time: four rows interleaved (sharing the activations' loads) ran at half the speed
 * on an AMD EPYC core, 12 against 23 GB/s (the prefetcher follows one stream per core better). */
#define FOUR(S) S(0); S(1); S(2); S(3);
#define ONE(S) S(0);
#define ROWS(ACT, WALK, PUT)                                                                    \
    int64_t m = 0;                                                                              \
    for (; m + 4 <= M; m += 4) { ACT(0) ACT(1) ACT(2) ACT(3) WALK(FOUR) FOUR(PUT) }             \
    for (; m < M; m++) { ACT(0) WALK(ONE) ONE(PUT) }

#if HAVE_BLOCKS

/* acc + the sums of four products u * s per 32-bit lane (u unsigned bytes, s signed). AVX2 forms each
 * pair's sum in 16 bits first: exact where |u| <= 127, as in every caller (weights of at most 7 bits
 * unsigned, or |v| of a signed one; the activations are within [-127, 127]). */
#if HAVE_VNNI
#define DPBUSD(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#elif defined(__AVXVNNI__)  /* AVX-VNNI (Intel since Alder Lake, AMD Zen 5): the same instruction without AVX512 */
#define DPBUSD(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#else
#define DPBUSD(acc, u, s) _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)))
#endif

/* scale/zero storage: 0 float32, 1 float16, 2 bfloat16 */
static inline float load_half(const void *p, int64_t i, int kind) {
    if (kind == 0) return ((const float *)p)[i];
    uint16_t h = ((const uint16_t *)p)[i];
    if (kind == 1) return _cvtsh_ss(h);
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* y[i] = v, as float32 (io 0) or bfloat16 (io 2, rounded to nearest even as torch rounds) */
static inline void put(void *y, int64_t i, float v, int io) {
    if (io == 0) { ((float *)y)[i] = v; return; }
    uint32_t u;
    memcpy(&u, &v, 4);
    ((uint16_t *)y)[i] = (v != v) ? 0x7FC0 : (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

/* x as float32: itself (io 0), or a new buffer of its bfloat16 values widened (io 2; free it) */
static const float *floats(const void *x, int64_t count, int io, float **owned) {
    *owned = NULL;
    if (io == 0) return (const float *)x;
    float *f = malloc(sizeof(float) * count);
    if (!f) return NULL;
    for (int64_t i = 0; i < count; i++) {
        uint32_t u = (uint32_t)((const uint16_t *)x)[i] << 16;
        memcpy(f + i, &u, 4);
    }
    *owned = f;
    return f;
}

/* One row of x (K values) -> xq (K int8), d (K/32 scales), in the layout each kernel reads. */
#if HAVE_VNNI
static void quantize_row(const float *x, int64_t K, int8_t *xq, float *d) {
    for (int64_t b = 0; b < K / BLOCK; b++) {  /* x * (127 / max) rounded to nearest even, as lrintf would */
        __m512 v0 = _mm512_loadu_ps(x + b * BLOCK), v1 = _mm512_loadu_ps(x + b * BLOCK + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        float inv = amax > 0.f ? 127.f / amax : 0.f;
        d[b] = amax / 127.f;
        __m512 iv = _mm512_set1_ps(inv);
        _mm_storeu_si128((__m128i *)(xq + b * BLOCK), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v0, iv))));
        _mm_storeu_si128((__m128i *)(xq + b * BLOCK + 16),
                         _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v1, iv))));
    }
}
#else  /* AVX2: the same numbers (the same multiply and rounding, the maximum exact) */
static void quantize_row(const float *x, int64_t K, int8_t *xq, float *d) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t b = 0; b < K / BLOCK; b++) {
        __m256 v[4], m = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(x + b * BLOCK + 8 * i);
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i]));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4);
        const float inv = amax > 0.f ? 127.f / amax : 0.f;
        d[b] = amax / 127.f;
        const __m256 iv = _mm256_set1_ps(inv);
        __m256i q[4];
        for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], iv));
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));  /* the packs' lane order undone */
        _mm256_storeu_si256((__m256i *)(xq + b * BLOCK), p);
    }
}
#endif

/* An empty product (M, N or K zero), where the buffers below would be empty: y is M x N zeros, as
 * torch gives. 1 if it was one (y written), else 0. */
static int empty(int64_t M, int64_t K, int64_t N, void *y, int io) {
    if (M && N && K) return 0;
    for (int64_t i = 0; i < M * N; i++) put(y, i, 0.f, io);
    return 1;
}

#if HAVE_VNNI
static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
#endif

static inline float hsum8(__m256 v) {
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s4 = _mm_hadd_ps(s4, s4);
    s4 = _mm_hadd_ps(s4, s4);
    return _mm_cvtss_f32(s4);
}

/* the order in which a chunk of eight blocks' sums comes out of the horizontal adds of four dot64 results */
static const int ORDER[8] = {0, 2, 4, 6, 1, 3, 5, 7};

/* eight consecutive values of `kind` (0 float32, 1 float16, 2 bfloat16) as floats */
static inline __m256 load8(const void *p, int64_t i, int kind) {
    if (kind == 0) return _mm256_loadu_ps((const float *)p + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    if (kind == 1) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* the integer dot products of 64 values: the weights' low and high nibbles (the values at even and
 * odd positions) against the activations' even and odd values; lanes 0-3 the first block's, 4-7 the second's */
static inline __m256i dot64(__m256i lo, __m256i hi, const int8_t *xe, const int8_t *xo) {
    __m256i dp = DPBUSD(_mm256_setzero_si256(), lo, _mm256_loadu_si256((const __m256i *)xe));
    return DPBUSD(dp, hi, _mm256_loadu_si256((const __m256i *)xo));
}

/* 32 bits -> 32 bytes: byte i 0xFF where bit i is set, else 0 */
static inline __m256i bytes_of_bits(uint32_t bits) {
#if HAVE_VNNI
    return _mm256_movm_epi8(bits);
#else
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201);
    return _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
#endif
}

#endif  /* HAVE_BLOCKS */
#endif
