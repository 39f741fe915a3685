/* GGML's K-quant blocks (Q2_K to Q6_K) and IQ4_XS, as a .gguf file stores them, multiplied on the CPU at memory
 * speed: y = x @ W.T with W (N, K) kept as its blocks (reshard/ggml_quants.py), read once, never
 * expanded to floats. For runtime/lowbit.py (built and loaded by runtime/native.py with lowbit_cpu.c).
 *
 * The activations are quantized per block of 32 values, as for the int4 kernel (common.h), and
 * every product is an integer dot product (vpdpbusd: unsigned weight bytes times signed
 * activations). Each weight is exactly ggml's de-quantized value; the error is that of x alone.
 *
 * Q4_K, 256 values in 144 bytes: float16 d, float16 dmin, twelve bytes of eight 6-bit scales and
 * eight 6-bit mins, 128 bytes of nibbles. Block b of 32 values: w = d * sc_b * q - dmin * m_b, and
 * in each 32 bytes of nibbles the low ones are block 2j, the high ones block 2j + 1. So, per row,
 *   y = sum_b d * sc_b * xd_b * sum_{k in b} q[k] * xq[k]  -  dmin * sum_b m_b * xs_b
 * with xs_b = xd_b * sum_{k in b} xq[k], the quantized activations' sum (see lowbit_cpu.c for why
 * these sums rather than x's own).
 * Q5_K, 256 values in 176 bytes: Q4_K's d, dmin, scales and mins, then 32 bytes of fifth bits (bit b
 * of byte i above value i of block b), then Q4_K's 128 bytes of nibbles: q = 0..31, the same sums.
 * Q6_K, 256 values in 210 bytes: 128 bytes of low nibbles, 64 of 2-bit highs, sixteen int8 scales
 * (one per 16 values), float16 d. w = d * sc_g * (q - 32), q = 0..63 unsigned; per group g of 16
 *   sum = d * sc_g * xd_{b(g)} * (sum_{k in g} q[k] * xq[k] - 32 * sum_{k in g} xq[k]).
 * Q2_K, 256 values in 84 bytes: sixteen bytes of a 4-bit scale (low) and min (high) per 16 values, 64
 * bytes of 2-bit values, float16 d and dmin: w = d * sc * q - dmin * m, summed per group of 16 as Q6_K's
 * with the quantized activations' sums taken apart for the mins.
 * Q3_K, 256 values in 110 bytes: 32 bytes of third bits, 64 of 2-bit values, sixteen 6-bit scales in 12
 * bytes, float16 d: w = d * (scale - 32) * (q - 4), q = 0..7; summed per group of 16 as Q6_K's, with 4
 * for 32.
 * IQ4_XS, 256 values in 136 bytes: float16 d, eight 6-bit scales (2 bytes of high bits, 4 of low
 * nibbles), then eight blocks of 32 as 16 bytes each (low nibbles values 0-15, high 16-31), each an
 * index into ggml's 16 non-linear values v: w = d * (scale - 32) * v[q]. v is signed, so each
 * product is |v| times x with v's sign (vpdpbusd takes the unsigned operand first).
 * K % 256 == 0 (a K-quant row is whole blocks). x and y are float32 (io 0) or bfloat16 (io 2).
 * Results are deterministic, whatever the thread count.
 */
#include "common.h"

#if HAVE_BLOCKS

#define QK 256
#define Q4K_BYTES 144
#define Q5K_BYTES 176
#define Q6K_BYTES 210
#define IQ4XS_BYTES 136
#define Q3K_BYTES 110
#define Q2K_BYTES 84

static const int8_t IQ4_VALUES[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

/* ---- the activations ------------------------------------------------------------------------ */
/* Per row m: xq in the layout each kernel pairs with its weight vectors, and per-chunk tables in the
 * order the chunk's sums come out of the horizontal adds (ORDER). */
typedef struct {
    int8_t *xq;   /* (M, K) */
    float *d;     /* Q4_K: (M, K/32) block scales in ORDER per 256; Q6_K: (M, K/16) per group's block, ORDER per 128 */
    float *xs;    /* Q4_K: (M, K/32) quantized sums per block, ORDER per 256 */
    int32_t *s16; /* Q6_K, Q3_K, Q2_K: (M, K/16) an offset (32, 4, 1) times the sum of xq per group of 16, ORDER per 128 */
} actk;

static void releasek(actk *a) { free(a->xq); free(a->d); free(a->xs); free(a->s16); }

/* Q4_K pairs each 64 values' nibbles, re-laid as [low 0-15 | high 0-15] and [low 16-31 | high 16-31]
 * (two cross-lane permutes), with xq as [x 0-15 | x 32-47] and [x 16-31 | x 48-63]: dot64 then puts
 * block 2j in lanes 0-3 and block 2j + 1 in lanes 4-7, as for the int4 kernel. */
static int preparek4(const float *x, int64_t M, int64_t K, actk *a) {
    memset(a, 0, sizeof *a);
    a->xq = aligned_alloc(64, ((M * K + 63) / 64) * 64);
    a->d = malloc(sizeof(float) * M * (K / BLOCK));
    a->xs = malloc(sizeof(float) * M * (K / BLOCK));
    int8_t *q = malloc(K);
    float *d = malloc(sizeof(float) * (K / BLOCK));
    if (!a->xq || !a->d || !a->xs || !q || !d) { free(q); free(d); return -1; }
    for (int64_t m = 0; m < M; m++) {
        quantize_row(x + m * K, K, q, d);
        int8_t *xq = a->xq + m * K;
        for (int64_t c = 0; c < K; c += 64) {  /* xe then xo, 32 each, per 64 values */
            memcpy(xq + c, q + c, 16);
            memcpy(xq + c + 16, q + c + 32, 16);
            memcpy(xq + c + 32, q + c + 16, 16);
            memcpy(xq + c + 48, q + c + 48, 16);
        }
        for (int64_t b = 0; b < K / BLOCK; b++) {
            int64_t src = b / 8 * 8 + ORDER[b % 8];
            int32_t sum = 0;
            for (int i = 0; i < BLOCK; i++) sum += q[src * BLOCK + i];
            a->d[m * (K / BLOCK) + b] = d[src];
            a->xs[m * (K / BLOCK) + b] = d[src] * (float)sum;
        }
    }
    free(q);
    free(d);
    return 0;
}

/* Q6_K pairs each 32 values of a half-block with the 32 activations they multiply, in order; a
 * half-block's 16-value groups come out of the adds as 0, 2, 4, 6, 1, 3, 5, 7 (ORDER). */
static int preparek6(const float *x, int64_t M, int64_t K, actk *a, int offset) {
    memset(a, 0, sizeof *a);
    a->xq = aligned_alloc(64, ((M * K + 63) / 64) * 64);
    a->d = malloc(sizeof(float) * M * (K / 16));
    a->s16 = malloc(sizeof(int32_t) * M * (K / 16));
    float *d = malloc(sizeof(float) * (K / BLOCK));
    if (!a->xq || !a->d || !a->s16 || !d) { free(d); return -1; }
    for (int64_t m = 0; m < M; m++) {
        int8_t *q = a->xq + m * K;
        quantize_row(x + m * K, K, q, d);
        for (int64_t g = 0; g < K / 16; g++) {
            int64_t src = g / 8 * 8 + ORDER[g % 8];  /* the group whose sum lands in slot g */
            int32_t sum = 0;
            for (int i = 0; i < 16; i++) sum += q[src * 16 + i];
            a->d[m * (K / 16) + g] = d[src / 2];
            a->s16[m * (K / 16) + g] = offset * sum;
        }
    }
    free(d);
    return 0;
}

/* eight 32-lane sums -> one per lane: lanes i of a, b, c, d summed in fours, in ORDER */
static inline __m256i sums8(__m256i a, __m256i b, __m256i c, __m256i d) {
    return _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
}

/* ---- Q4_K ----------------------------------------------------------------------------------- */

/* one block's d * sc and dmin * m, in ORDER (ggml's get_scale_min_k4) */
static inline void q4k_scales(const uint8_t *blk, __m256 *ws, __m256 *wm) {
    const float dd = _cvtsh_ss(*(const uint16_t *)blk), dmin = _cvtsh_ss(*(const uint16_t *)(blk + 2));
    const uint8_t *s = blk + 4;
    float sc[8], mn[8];
    for (int j = 0; j < 4; j++) {
        sc[j] = (float)(s[j] & 63);
        mn[j] = (float)(s[j + 4] & 63);
        sc[j + 4] = (float)((s[j + 8] & 0xF) | ((s[j] >> 6) << 4));
        mn[j + 4] = (float)((s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4));
    }
    *ws = _mm256_mul_ps(_mm256_set1_ps(dd), _mm256_setr_ps(sc[0], sc[2], sc[4], sc[6], sc[1], sc[3], sc[5], sc[7]));
    *wm = _mm256_mul_ps(_mm256_set1_ps(dmin), _mm256_setr_ps(mn[0], mn[2], mn[4], mn[6], mn[1], mn[3], mn[5], mn[7]));
}

/* chunk j's nibbles (and for Q5_K their fifth bits, bits 2j and 2j + 1 of `hb`) as unsigned bytes */
#define UNPACKQ4(j)                                                                             \
    __m256i p##j = _mm256_loadu_si256((const __m256i *)(qs + 32 * j));                         \
    __m256i l##j = _mm256_and_si256(p##j, low), h##j = _mm256_and_si256(_mm256_srli_epi16(p##j, 4), low); \
    if (five) {                                                                                 \
        l##j = _mm256_or_si256(l##j, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2 * j), one), 4)); \
        h##j = _mm256_or_si256(h##j, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2 * j + 1), one), 4)); \
    }                                                                                           \
    __m256i e##j = _mm256_permute2x128_si256(l##j, h##j, 0x20), o##j = _mm256_permute2x128_si256(l##j, h##j, 0x31);
#define ACTK(r)                                                                                 \
    const int8_t *xq##r = a->xq + (m + r) * K;                                                  \
    const float *d##r = a->d + (m + r) * NB, *xs##r = a->xs + (m + r) * NB;                     \
    __m256 acc##r = _mm256_setzero_ps(), accm##r = _mm256_setzero_ps();
#define STEPQ4(r)                                                                               \
    acc##r = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums8(                                          \
        dot64(e0, o0, xq##r + k, xq##r + k + 32), dot64(e1, o1, xq##r + k + 64, xq##r + k + 96),    \
        dot64(e2, o2, xq##r + k + 128, xq##r + k + 160), dot64(e3, o3, xq##r + k + 192, xq##r + k + 224))), \
        _mm256_mul_ps(_mm256_loadu_ps(d##r + k / BLOCK), ws), acc##r);                              \
    accm##r = _mm256_fmadd_ps(_mm256_loadu_ps(xs##r + k / BLOCK), wm, accm##r)
#define PUTK(r) put(y, (m + r) * N + n, hsum8(acc##r) - hsum8(accm##r), io)

#define WALKQ4(STEPS)                                                                           \
    for (int64_t k = 0; k < K; k += QK) {                                                       \
        const uint8_t *blk = wr + k / QK * bytes, *qs = blk + at;                               \
        const __m256i hb = five ? _mm256_loadu_si256((const __m256i *)(blk + 16)) : _mm256_setzero_si256(); \
        __m256 ws, wm;                                                                          \
        q4k_scales(blk, &ws, &wm);                                                              \
        UNPACKQ4(0) UNPACKQ4(1) UNPACKQ4(2) UNPACKQ4(3)                                         \
        STEPS(STEPQ4)                                                                           \
    }

/* Q4_K (five 0) or Q5_K (five 1): the same scales, mins and nibbles, Q5_K's fifth bits before the nibbles */
static inline void rowq4(const actk *a, int64_t M, int64_t K, const uint8_t *w, int64_t N, int64_t n, void *y,
                         int io, int five) {
    const int64_t NB = K / BLOCK, bytes = five ? Q5K_BYTES : Q4K_BYTES, at = five ? 48 : 16;
    const __m256i low = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(0x01);
    const uint8_t *wr = w + n * (K / QK * bytes);
    ROWS(ACTK, WALKQ4, PUTK)
}

/* ---- Q6_K ----------------------------------------------------------------------------------- */

/* a half-block's four 32-value vectors of q (0..63): low nibbles of ql[0:32], of ql[32:64], then the
 * high nibbles, each with its 2 bits of qh (bits 0-1, 2-3, 4-5, 6-7) above */
#define UNPACKQ6(hf)                                                                            \
    const uint8_t *ql = blk + 64 * hf, *qh = blk + 128 + 32 * hf;                              \
    __m256i a0 = _mm256_loadu_si256((const __m256i *)ql), a1 = _mm256_loadu_si256((const __m256i *)(ql + 32)); \
    __m256i hb = _mm256_loadu_si256((const __m256i *)qh);                                       \
    __m256i v0 = _mm256_or_si256(_mm256_and_si256(a0, low), _mm256_and_si256(_mm256_slli_epi16(hb, 4), two)); \
    __m256i v1 = _mm256_or_si256(_mm256_and_si256(a1, low), _mm256_and_si256(_mm256_slli_epi16(hb, 2), two)); \
    __m256i v2 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a0, 4), low), _mm256_and_si256(hb, two)); \
    __m256i v3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a1, 4), low),              \
                                 _mm256_and_si256(_mm256_srli_epi16(hb, 2), two));              \
    const int8_t *sc = (const int8_t *)(blk + 192) + 8 * hf;                                    \
    __m256 ws = _mm256_mul_ps(dd, _mm256_setr_ps(sc[0], sc[2], sc[4], sc[6], sc[1], sc[3], sc[5], sc[7]));
#define ACTK6(r)                                                                                \
    const int8_t *xq##r = a->xq + (m + r) * K;                                                  \
    const float *d##r = a->d + (m + r) * (K / 16);                                              \
    const int32_t *s##r = a->s16 + (m + r) * (K / 16);                                          \
    __m256 acc##r = _mm256_setzero_ps();
#define DOT32(v, x) DPBUSD(_mm256_setzero_si256(), v, _mm256_loadu_si256((const __m256i *)(x)))
#define STEPQ6(r)                                                                               \
    acc##r = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(sums8(                         \
        DOT32(v0, xq##r + k), DOT32(v1, xq##r + k + 32), DOT32(v2, xq##r + k + 64), DOT32(v3, xq##r + k + 96)), \
        _mm256_loadu_si256((const __m256i *)(s##r + k / 16)))),                                 \
        _mm256_mul_ps(_mm256_loadu_ps(d##r + k / 16), ws), acc##r)
#define PUTK6(r) put(y, (m + r) * N + n, hsum8(acc##r), io)

#define WALKQ6(STEPS)                                                                           \
    for (int64_t kb = 0; kb < K; kb += QK) {                                                    \
        const uint8_t *blk = wr + kb / QK * Q6K_BYTES;                                          \
        const __m256 dd = _mm256_set1_ps(_cvtsh_ss(*(const uint16_t *)(blk + 208)));            \
        for (int hf = 0; hf < 2; hf++) {                                                        \
            const int64_t k = kb + 128 * hf;                                                    \
            UNPACKQ6(hf)                                                                        \
            STEPS(STEPQ6)                                                                       \
        }                                                                                       \
    }

static inline void rowq6(const actk *a, int64_t M, int64_t K, const uint8_t *w, int64_t N, int64_t n, void *y,
                         int io) {
    const __m256i low = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi8(0x30);
    const uint8_t *wr = w + n * (K / QK * Q6K_BYTES);
    ROWS(ACTK6, WALKQ6, PUTK6)
}

/* ---- Q3_K ----------------------------------------------------------------------------------- */

/* one block's sixteen d * (scale - 32), in the order of Q6_K's: per half, groups 0, 2, 4, 6, 1, 3, 5, 7 */
static inline void q3k_scales(const uint8_t *blk, __m256 ws[2]) {
    const uint8_t *s = blk + 96;
    const float dd = _cvtsh_ss(*(const uint16_t *)(blk + 108));
    float sc[16];
    for (int i = 0; i < 16; i++) {
        int low = i < 8 ? s[i] & 0xF : s[i - 8] >> 4;
        int high = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
        sc[i] = (float)((low | (high << 4)) - 32);
    }
    for (int hf = 0; hf < 2; hf++) {
        const float *c = sc + 8 * hf;
        ws[hf] = _mm256_mul_ps(_mm256_set1_ps(dd), _mm256_setr_ps(c[0], c[2], c[4], c[6], c[1], c[3], c[5], c[7]));
    }
}

/* a half-block's four 32-value vectors of q (0..7): 2-bit pairs of qs[32 hf:] (bits 2j, 2j + 1) with
 * third bit 4 hf + j of hmask above */
#define UNPACKQ3(hf)                                                                            \
    __m256i a0 = _mm256_loadu_si256((const __m256i *)(blk + 32 + 32 * hf));                    \
    __m256i hm = _mm256_loadu_si256((const __m256i *)blk);                                     \
    __m256i v0 = _mm256_or_si256(_mm256_and_si256(a0, three),                                  \
        _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hm, 4 * hf), one), 2));           \
    __m256i v1 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a0, 2), three),            \
        _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hm, 4 * hf + 1), one), 2));       \
    __m256i v2 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a0, 4), three),            \
        _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hm, 4 * hf + 2), one), 2));       \
    __m256i v3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a0, 6), three),            \
        _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hm, 4 * hf + 3), one), 2));       \
    __m256 ws = wsc[hf];

#define WALKQ3(STEPS)                                                                           \
    for (int64_t kb = 0; kb < K; kb += QK) {                                                    \
        const uint8_t *blk = wr + kb / QK * Q3K_BYTES;                                          \
        __m256 wsc[2];                                                                          \
        q3k_scales(blk, wsc);                                                                   \
        for (int hf = 0; hf < 2; hf++) {                                                        \
            const int64_t k = kb + 128 * hf;                                                    \
            UNPACKQ3(hf)                                                                        \
            STEPS(STEPQ6)                                                                       \
        }                                                                                       \
    }

static inline void rowq3(const actk *a, int64_t M, int64_t K, const uint8_t *w, int64_t N, int64_t n, void *y,
                         int io) {
    const __m256i three = _mm256_set1_epi8(0x03), one = _mm256_set1_epi8(0x01);
    const uint8_t *wr = w + n * (K / QK * Q3K_BYTES);
    ROWS(ACTK6, WALKQ3, PUTK6)
}

/* ---- Q2_K ----------------------------------------------------------------------------------- */

/* one block's d * sc and dmin * m per group of 16, per half in Q6_K's order (0, 2, 4, 6, 1, 3, 5, 7) */
static inline void q2k_scales(const uint8_t *blk, __m256 ws[2], __m256 wm[2]) {
    const float dd = _cvtsh_ss(*(const uint16_t *)(blk + 80)), dmin = _cvtsh_ss(*(const uint16_t *)(blk + 82));
    for (int hf = 0; hf < 2; hf++) {
        const uint8_t *s = blk + 8 * hf;
        ws[hf] = _mm256_mul_ps(_mm256_set1_ps(dd), _mm256_setr_ps(s[0] & 0xF, s[2] & 0xF, s[4] & 0xF, s[6] & 0xF,
                                                                  s[1] & 0xF, s[3] & 0xF, s[5] & 0xF, s[7] & 0xF));
        wm[hf] = _mm256_mul_ps(_mm256_set1_ps(dmin), _mm256_setr_ps(s[0] >> 4, s[2] >> 4, s[4] >> 4, s[6] >> 4,
                                                                    s[1] >> 4, s[3] >> 4, s[5] >> 4, s[7] >> 4));
    }
}

/* a half-block's four 32-value vectors of q (0..3): bits 2j, 2j + 1 of qs[32 hf:] */
#define UNPACKQ2(hf)                                                                            \
    __m256i a0 = _mm256_loadu_si256((const __m256i *)(blk + 16 + 32 * hf));                    \
    __m256i v0 = _mm256_and_si256(a0, three), v1 = _mm256_and_si256(_mm256_srli_epi16(a0, 2), three); \
    __m256i v2 = _mm256_and_si256(_mm256_srli_epi16(a0, 4), three), v3 = _mm256_and_si256(_mm256_srli_epi16(a0, 6), three); \
    __m256 ws = wsc[hf], wmin = wmc[hf];
#define ACTK2(r) ACTK6(r) __m256 accm##r = _mm256_setzero_ps();
#define STEPQ2(r)                                                                               \
    acc##r = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums8(                                          \
        DOT32(v0, xq##r + k), DOT32(v1, xq##r + k + 32), DOT32(v2, xq##r + k + 64), DOT32(v3, xq##r + k + 96))), \
        _mm256_mul_ps(_mm256_loadu_ps(d##r + k / 16), ws), acc##r);                              \
    accm##r = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(s##r + k / 16))), \
        _mm256_mul_ps(_mm256_loadu_ps(d##r + k / 16), wmin), accm##r)
#define PUTQ2(r) put(y, (m + r) * N + n, hsum8(acc##r) - hsum8(accm##r), io)

#define WALKQ2(STEPS)                                                                           \
    for (int64_t kb = 0; kb < K; kb += QK) {                                                    \
        const uint8_t *blk = wr + kb / QK * Q2K_BYTES;                                          \
        __m256 wsc[2], wmc[2];                                                                  \
        q2k_scales(blk, wsc, wmc);                                                              \
        for (int hf = 0; hf < 2; hf++) {                                                        \
            const int64_t k = kb + 128 * hf;                                                    \
            UNPACKQ2(hf)                                                                        \
            STEPS(STEPQ2)                                                                       \
        }                                                                                       \
    }

static inline void rowq2(const actk *a, int64_t M, int64_t K, const uint8_t *w, int64_t N, int64_t n, void *y,
                         int io) {
    const __m256i three = _mm256_set1_epi8(0x03);
    const uint8_t *wr = w + n * (K / QK * Q2K_BYTES);
    ROWS(ACTK2, WALKQ2, PUTQ2)
}

/* ---- IQ4_XS --------------------------------------------------------------------------------- */

/* one block's d * (scale - 32) for its eight blocks of 32, in ORDER */
static inline __m256 iq4xs_scales(const uint8_t *blk) {
    const float d = _cvtsh_ss(*(const uint16_t *)blk);
    const int h = blk[2] | (blk[3] << 8);
    float s[8];
    for (int j = 0; j < 8; j++)
        s[j] = (float)((((blk[4 + j / 2] >> (4 * (j % 2))) & 0xF) | (((h >> (2 * j)) & 3) << 4)) - 32);
    return _mm256_mul_ps(_mm256_set1_ps(d), _mm256_setr_ps(s[0], s[2], s[4], s[6], s[1], s[3], s[5], s[7]));
}

/* blocks 2j and 2j + 1: their values (signed) for the first and the last 16 positions of each, paired
 * with xq as Q4_K's are (preparek4): lanes 0-3 block 2j, 4-7 block 2j + 1 */
#define DOTIQ4(j, xe, xo)                                                                       \
    DPBUSD(DPBUSD(_mm256_setzero_si256(), _mm256_abs_epi8(v##j),         \
                                            _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(xe)), v##j)), \
                        _mm256_abs_epi8(u##j), _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(xo)), u##j))
#define UNPACKIQ4(j)                                                                            \
    __m256i p##j = _mm256_loadu_si256((const __m256i *)(qs + 32 * j));                         \
    __m256i v##j = _mm256_shuffle_epi8(table, _mm256_and_si256(p##j, low));                    \
    __m256i u##j = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(p##j, 4), low));
#define STEPIQ4(r)                                                                              \
    acc##r = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums8(                                          \
        DOTIQ4(0, xq##r + k, xq##r + k + 32), DOTIQ4(1, xq##r + k + 64, xq##r + k + 96),             \
        DOTIQ4(2, xq##r + k + 128, xq##r + k + 160), DOTIQ4(3, xq##r + k + 192, xq##r + k + 224))), \
        _mm256_mul_ps(_mm256_loadu_ps(d##r + k / BLOCK), ws), acc##r)
#define PUTIQ4(r) put(y, (m + r) * N + n, hsum8(acc##r), io)
#define ACTIQ4(r)  /* Q4_K's activations, without its mins' sums */                              \
    const int8_t *xq##r = a->xq + (m + r) * K;                                                  \
    const float *d##r = a->d + (m + r) * NB;                                                    \
    __m256 acc##r = _mm256_setzero_ps();

#define WALKIQ4(STEPS)                                                                          \
    for (int64_t k = 0; k < K; k += QK) {                                                       \
        const uint8_t *blk = wr + k / QK * IQ4XS_BYTES, *qs = blk + 8;                          \
        const __m256 ws = iq4xs_scales(blk);                                                    \
        UNPACKIQ4(0) UNPACKIQ4(1) UNPACKIQ4(2) UNPACKIQ4(3)                                     \
        STEPS(STEPIQ4)                                                                          \
    }

static inline void rowiq4(const actk *a, int64_t M, int64_t K, const uint8_t *w, int64_t N, int64_t n, void *y,
                          int io) {
    const int64_t NB = K / BLOCK;
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)IQ4_VALUES));
    const uint8_t *wr = w + n * (K / QK * IQ4XS_BYTES);
    ROWS(ACTIQ4, WALKIQ4, PUTIQ4)
}

/* kind: 0 Q4_K, 1 Q6_K, 2 Q5_K, 3 IQ4_XS, 4 Q3_K, 5 Q2_K; w: (N, K / 256 * block bytes) as the file stores it; K % 256 == 0 */
int reshard_kquant_gemm(const void *xin, int io, int64_t M, int64_t K, const uint8_t *w, int kind, int64_t N,
                        void *y, int threads) {
    if (K % QK || kind < 0 || kind > 5) return -2;
    if (empty(M, K, N, y, io)) return 0;
    float *owned;
    const float *x = floats(xin, M * K, io, &owned);
    actk a;
    memset(&a, 0, sizeof a);
    const int offset = kind == 1 ? 32 : kind == 4 ? 4 : kind == 5 ? 1 : 0;  /* the per-16 kernels' */
    int failed = x == NULL || (offset ? preparek6(x, M, K, &a, offset) : preparek4(x, M, K, &a));
    free(owned);
    if (failed) { releasek(&a); return -1; }
    if (kind == 5) {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t n = 0; n < N; n++) rowq2(&a, M, K, w, N, n, y, io);
    } else if (kind == 4) {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t n = 0; n < N; n++) rowq3(&a, M, K, w, N, n, y, io);
    } else if (kind == 3) {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t n = 0; n < N; n++) rowiq4(&a, M, K, w, N, n, y, io);
    } else if (kind != 1) {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t n = 0; n < N; n++) rowq4(&a, M, K, w, N, n, y, io, kind == 2);
    } else {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t n = 0; n < N; n++) rowq6(&a, M, K, w, N, n, y, io);
    }
    releasek(&a);
    return 0;
}

#else  /* neither AVX512-VNNI nor AVX2: runtime/native.py sees reshard_lowbit_isa() == 0 and these layers expand */

int reshard_kquant_gemm(const void *x, int io, int64_t M, int64_t K, const uint8_t *w, int kind, int64_t N,
                        void *y, int threads) { return -3; }

#endif
