/* GGML's grid blocks (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S), the ternary TQ1_0 and TQ2_0 and the blocks
 * of 32 (IQ4_NL, MXFP4, Q5_0, Q5_1), as a .gguf file stores them, multiplied on the CPU: y = x @ W.T with
 * W (N, K) kept as its blocks (reshard/ggml_iquants.py, reshard/ggml_quants.py), read once, never expanded
 * to floats. For runtime/lowbit.py (built and loaded by runtime/native.py with lowbit_cpu.c and kquant_cpu.c).
 *
 * The activations are quantized per block of 32 values in their own order (common.h's quantize_row), and
 * every product is an integer dot product of bytes (DPBUSD: vpdpbusd, or AVX2's two-step form): a block's
 * 32 weight values v as |v| (unsigned) against the activations with v's signs (vpsignb). Where a type
 * adds an offset to each value (Q5_1's m, IQ1_S's +-1/8), its product with the block's activations is
 * summed apart, from their block sums. Each weight is exactly ggml's de-quantized value.
 *
 * IQ2_XXS, 256 values in 66 bytes: float16 d, then per block of 32 a uint32 of four grid indices (a
 * row of 8 values each in ggml's 256-row grid) and a uint32 of four 7-bit sign indices (into ggml's 128
 * eight-sign patterns) and a 4-bit scale s: w = d * (2 s + 1) / 8 * grid * sign.
 * IQ3_XXS, 256 values in 98 bytes: float16 d, 64 bytes of grid indices (a row of 4 values each in
 * ggml's 256-row grid), then per block of 32 a uint32 of four sign indices and a scale as IQ2_XXS's:
 * w = d * (2 s + 1) / 4 * grid * sign.
 * IQ3_S, 256 values in 110 bytes: float16 d, 64 bytes of grid indices' low 8 bits (rows of 4 values in a
 * 512-row grid), 8 bytes of their 9th bits, 32 bytes of signs (a bit per value), 4 bytes of a 4-bit scale
 * per block of 32: w = d * (1 + 2 s) * grid * sign.
 * IQ2_XS, 256 values in 74 bytes: float16 d, 32 uint16 (a 9-bit index into a 512-row grid of 8 values, a
 * 7-bit sign index), 8 bytes of two 4-bit scales (values 0-15, 16-31 of a block): w = d * (2 s + 1) / 8 *
 * grid * sign.
 * IQ2_S, 256 values in 82 bytes: float16 d, 32 bytes of grid indices' low 8 bits (a 1024-row grid of 8),
 * 32 bytes of signs (a bit per value), 8 bytes of the indices' 2 high bits, 8 bytes of scales as IQ2_XS's.
 * IQ1_S, IQ1_M, TQ1_0 and TQ2_0: at their walks below.
 * IQ4_NL, 32 values in 18 bytes: float16 d, 16 bytes of nibbles (low: values 0-15, high: 16-31) indexing
 * ggml's 16 non-linear int8 values: w = d * v. MXFP4, 32 in 17: an e8m0 exponent, the nibbles indexing
 * e2m1's values doubled: w = 2^(e - 128) * v. Q5_0, 32 in 22: float16 d, a uint32 of fifth bits, the
 * nibbles: w = d * (q - 16). Q5_1: at its walk.
 * The grids and the sign patterns are the gguf package's (runtime/native.py passes them): `grid` one row
 * per index (int8 values), `signs` rows of eight bytes, +1 or -1.
 * K is whole blocks (of 256, or of 32 for the blocks of 32). x and y are float32 (io 0) or bfloat16 (io 2).
 * Results are deterministic, whatever the thread count.
 */
#include "common.h"

#if HAVE_BLOCKS

#define QK 256
#define IQ2XXS_BYTES 66
#define IQ3XXS_BYTES 98
#define IQ3S_BYTES 110
#define IQ2XS_BYTES 74
#define IQ2S_BYTES 82
#define IQ4NL_BYTES 18
#define MXFP4_BYTES 17
#define Q50_BYTES 22
#define Q51_BYTES 24
#define TQ2_BYTES 66
#define IQ1S_BYTES 50
#define IQ1M_BYTES 56
#define TQ1_BYTES 54

typedef struct {
    int8_t *xq; /* (M, K), in order */
    float *d;   /* (M, K/32): each block's activation scale */
    float *xs;  /* (M, K/32): each block's quantized activations summed, times its scale (for offsets) */
} acti;

static int preparei(const float *x, int64_t M, int64_t K, acti *a) {
    a->xq = aligned_alloc(64, ((M * K + 63) / 64) * 64);
    a->d = malloc(sizeof(float) * M * (K / BLOCK));
    a->xs = malloc(sizeof(float) * M * (K / BLOCK));
    if (!a->xq || !a->d || !a->xs) return -1;
    for (int64_t m = 0; m < M; m++) {
        quantize_row(x + m * K, K, a->xq + m * K, a->d + m * (K / BLOCK));
        for (int64_t b = 0; b < K / BLOCK; b++) {
            int32_t sum = 0;
            for (int i = 0; i < BLOCK; i++) sum += a->xq[m * K + b * BLOCK + i];
            a->xs[m * (K / BLOCK) + b] = a->d[m * (K / BLOCK) + b] * (float)sum;
        }
    }
    return 0;
}

#define ACTI(r)                                                                                 \
    const int8_t *xq##r = a->xq + (m + r) * K;                                                  \
    const float *d##r = a->d + (m + r) * (K / BLOCK);                                           \
    __m256 acc##r = _mm256_setzero_ps();
/* block b (32 values at k) of row r: the grid bytes g, the signs s, the weights' scales ws per lane
 * (lanes 0-3 hold values 0-15, lanes 4-7 values 16-31: a scale per 16 is two halves) */
#define STEPI(r)                                                                                \
    acc##r = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DPBUSD(_mm256_setzero_si256(), g,  \
        _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(xq##r + k)), s))),                 \
        _mm256_mul_ps(_mm256_set1_ps(d##r[k / BLOCK]), ws), acc##r)
#define PUTI(r) put(y, (m + r) * N + n, hsum8(acc##r), io)
/* types with an offset per block (w = scale * q + offset): its product with the block's activations apart */
#define ACTO(r) ACTI(r) const float *xs##r = a->xs + (m + r) * (K / BLOCK); float accm##r = 0.f;
#define STEPO(r) STEPI(r); accm##r += wo * xs##r[k / BLOCK]
#define PUTO(r) put(y, (m + r) * N + n, hsum8(acc##r) + accm##r, io)

/* the eight signs of four sign indices (7 bits each, from bit 0 of aux) */
#define SIGNS4(aux) _mm256_set_epi64x(signs[((aux) >> 21) & 127], signs[((aux) >> 14) & 127],      \
                                      signs[((aux) >> 7) & 127], signs[(aux) & 127])

#define HALF(p) _cvtsh_ss(*(const uint16_t *)(p))  /* a float16 at p */

/* One weight row's products, y[:, n], for every type: the same signature (a type reads the tables it
 * has: `grid` or `grid3` rows, `values`, `signs`), its bytes at wr; the rest declares its constants. */
typedef void (*rowfn)(const acti *a, int64_t M, int64_t K, const uint8_t *w, const void *tables,
                      const void *patterns, int64_t N, int64_t n, void *y, int io);
#define ROWFN(name, SIZE, BYTES, ACT, WALK, PUT, ...)                                            \
    static void name(const acti *a, int64_t M, int64_t K, const uint8_t *w, const void *tables,  \
                     const void *patterns, int64_t N, int64_t n, void *y, int io) {              \
        const uint64_t *grid = tables, *signs = patterns;                                       \
        const uint32_t *grid3 = tables;                                                         \
        const int8_t *values = tables;                                                          \
        (void)grid; (void)grid3; (void)values; (void)signs;                                     \
        const uint8_t *wr = w + n * (K / (SIZE) * (BYTES));                                     \
        __VA_ARGS__                                                                             \
        ROWS(ACT, WALK, PUT)                                                                    \
    }

/* every block of 256 of weight row `wr` (BYTES each; dd: D, an expression of its bytes blk) and in it every
 * block of 32 (j; k its first value), where BODY makes the block's g, s and ws (and wo, for STEPO) */
#define WALK256(STEPS, STEP, BYTES, D, BODY)                                                    \
    for (int64_t kb = 0; kb < K; kb += QK) {                                                    \
        const uint8_t *blk = wr + kb / QK * (BYTES);                                            \
        const float dd = (D);                                                                   \
        for (int j = 0; j < 8; j++) {                                                           \
            const int64_t k = kb + 32 * j;                                                      \
            BODY                                                                                \
            STEPS(STEP)                                                                         \
        }                                                                                       \
    }

#define IQ2XXS                                                                              \
    const uint8_t *idx = blk + 2 + 8 * j;                                                   \
    uint32_t aux;                                                                           \
    memcpy(&aux, idx + 4, 4);                                                               \
    const __m256i g = _mm256_set_epi64x(grid[idx[3]], grid[idx[2]], grid[idx[1]], grid[idx[0]]);\
    const __m256i s = SIGNS4(aux);                                                          \
    const __m256 ws = _mm256_set1_ps(dd * (float)(2 * (aux >> 28) + 1));
#define WALKIQ2(STEPS) WALK256(STEPS, STEPI, IQ2XXS_BYTES, HALF(blk) * 0.125f, IQ2XXS)

ROWFN(rowiq2xxs, QK, IQ2XXS_BYTES, ACTI, WALKIQ2, PUTI, )

#define IQ3XXS                                                                              \
    const uint8_t *idx = blk + 2 + 8 * j;                                                   \
    uint32_t aux;                                                                           \
    memcpy(&aux, blk + 66 + 4 * j, 4);                                                      \
    const __m256i g = _mm256_set_epi32(grid3[idx[7]], grid3[idx[6]], grid3[idx[5]], grid3[idx[4]],\
                                       grid3[idx[3]], grid3[idx[2]], grid3[idx[1]], grid3[idx[0]]);\
    const __m256i s = SIGNS4(aux);                                                          \
    const __m256 ws = _mm256_set1_ps(dd * (float)(2 * (aux >> 28) + 1));
#define WALKIQ3(STEPS) WALK256(STEPS, STEPI, IQ3XXS_BYTES, HALF(blk) * 0.25f, IQ3XXS)

ROWFN(rowiq3xxs, QK, IQ3XXS_BYTES, ACTI, WALKIQ3, PUTI, )

/* four sign bytes (bit i: value i negative) -> their 32 signs */
#define SIGNBYTES(p) _mm256_set_epi64x(signs[(p)[3]], signs[(p)[2]], signs[(p)[1]], signs[(p)[0]])
/* a block's two 4-bit scales (values 0-15, 16-31) -> d * (2 s + 1) per lane */
#define HALVES(byte, dd) _mm256_setr_m128(_mm_set1_ps((dd) * (float)(2 * ((byte) & 15) + 1)),   \
                                          _mm_set1_ps((dd) * (float)(2 * ((byte) >> 4) + 1)))

#define IQ3S                                                                                \
    const uint8_t *idx = blk + 2 + 8 * j;                                                   \
    const int h = blk[66 + j];                                                              \
    const __m256i at = _mm256_or_si256(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)idx)),       \
        _mm256_slli_epi32(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(h), bit), one32), 8));  \
    const __m256i g = _mm256_i32gather_epi32((const int *)grid3, at, 4); /* faster here than 8 inserts */ \
    const __m256i s = SIGNBYTES(blk + 74 + 4 * j);                                          \
    const int sc = (blk[106 + j / 2] >> (4 * (j % 2))) & 15;                                \
    const __m256 ws = _mm256_set1_ps(dd * (float)(1 + 2 * sc));
#define WALKIQ3S(STEPS) WALK256(STEPS, STEPI, IQ3S_BYTES, HALF(blk), IQ3S)

ROWFN(rowiq3s, QK, IQ3S_BYTES, ACTI, WALKIQ3S, PUTI, const __m256i bit = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), one32 = _mm256_set1_epi32(1);)

#define IQ2XS                                                                               \
    uint16_t q[4];                                                                          \
    memcpy(q, blk + 2 + 8 * j, 8);                                                          \
    const __m256i g = _mm256_set_epi64x(grid[q[3] & 511], grid[q[2] & 511], grid[q[1] & 511], grid[q[0] & 511]);\
    const __m256i s = _mm256_set_epi64x(signs[q[3] >> 9], signs[q[2] >> 9], signs[q[1] >> 9], signs[q[0] >> 9]);\
    const __m256 ws = HALVES(blk[66 + j], dd);
#define WALKIQ2XS(STEPS) WALK256(STEPS, STEPI, IQ2XS_BYTES, HALF(blk) * 0.125f, IQ2XS)

ROWFN(rowiq2xs, QK, IQ2XS_BYTES, ACTI, WALKIQ2XS, PUTI, )

#define IQ2S                                                                                \
    const uint8_t *idx = blk + 2 + 4 * j;                                                   \
    const int h = blk[66 + j];                                                              \
    const __m256i g = _mm256_set_epi64x(grid[idx[3] | ((h >> 6) & 3) << 8], grid[idx[2] | ((h >> 4) & 3) << 8],\
                                        grid[idx[1] | ((h >> 2) & 3) << 8], grid[idx[0] | (h & 3) << 8]);\
    const __m256i s = SIGNBYTES(blk + 34 + 4 * j);                                          \
    const __m256 ws = HALVES(blk[74 + j], dd);
#define WALKIQ2S(STEPS) WALK256(STEPS, STEPI, IQ2S_BYTES, HALF(blk) * 0.125f, IQ2S)

ROWFN(rowiq2s, QK, IQ2S_BYTES, ACTI, WALKIQ2S, PUTI, )

/* ---- blocks of 32 values: IQ4_NL, MXFP4, Q5_0 (K % 32 == 0: these are what a GGUF uses where rows
 * are not whole blocks of 256) ------------------------------------------------------------------ */

/* a block's 32 values from 16 bytes of nibbles: low nibbles values 0-15, high nibbles 16-31 */
static inline __m256i nibbles32(const uint8_t *p) {
    const __m128i b = _mm_loadu_si128((const __m128i *)p), low4 = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), low4), _mm_and_si128(b, low4));
}

/* a little-endian uint32 of 32 bits: bit i for byte i */
static inline uint32_t bits32(const uint8_t *p) {
    uint32_t u;
    memcpy(&u, p, 4);
    return u;
}

/* ggml's e8m0_to_fp32_half: 2^(e - 128), as MXFP4's values are doubled */
static inline float e8m0_half(uint8_t e) {
    const uint32_t bits = e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* v: the block's 32 signed values; the product takes |v| (unsigned) and x with v's sign */
#define WALK32(STEPS, BYTES, VALUES, SCALE)                                                     \
    for (int64_t k = 0; k < K; k += BLOCK) {                                                    \
        const uint8_t *blk = wr + k / BLOCK * (BYTES);                                          \
        const __m256i v = VALUES, g = _mm256_abs_epi8(v), s = v;                                \
        const __m256 ws = _mm256_set1_ps(SCALE);                                                \
        STEPS(STEPI)                                                                            \
    }
#define WALKIQ4NL(STEPS) WALK32(STEPS, IQ4NL_BYTES, _mm256_shuffle_epi8(table, nibbles32(blk + 2)), \
                                _cvtsh_ss(*(const uint16_t *)blk))
#define WALKMXFP4(STEPS) WALK32(STEPS, MXFP4_BYTES, _mm256_shuffle_epi8(table, nibbles32(blk + 1)), e8m0_half(blk[0]))
/* Q5_0: the nibbles with their fifth bits (a uint32: bit i above value i), minus 16 */
#define WALKQ50(STEPS) WALK32(STEPS, Q50_BYTES, _mm256_sub_epi8(_mm256_or_si256(nibbles32(blk + 6),            \
                                  _mm256_and_si256(bytes_of_bits(bits32(blk + 2)), sixteen)), sixteen), \
                              _cvtsh_ss(*(const uint16_t *)blk))

ROWFN(rowiq4nl, BLOCK, IQ4NL_BYTES, ACTI, WALKIQ4NL, PUTI, const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)values));)

ROWFN(rowmxfp4, BLOCK, MXFP4_BYTES, ACTI, WALKMXFP4, PUTI, const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)values));)

/* Q5_1, 32 values in 24 bytes: float16 d and m, a uint32 of fifth bits, the nibbles: w = d * q + m, q
 * unsigned (x's own signs) */
#define WALKQ51(STEPS)                                                                          \
    for (int64_t k = 0; k < K; k += BLOCK) {                                                    \
        const uint8_t *blk = wr + k / BLOCK * Q51_BYTES;                                        \
        const __m256i g = _mm256_or_si256(nibbles32(blk + 8), _mm256_and_si256(bytes_of_bits(bits32(blk + 4)), sixteen)); \
        const __m256i s = ones;                                                                 \
        const __m256 ws = _mm256_set1_ps(_cvtsh_ss(*(const uint16_t *)blk));                    \
        const float wo = _cvtsh_ss(*(const uint16_t *)(blk + 2));                               \
        STEPS(STEPO)                                                                            \
    }

ROWFN(rowq51, BLOCK, Q51_BYTES, ACTO, WALKQ51, PUTO, const __m256i sixteen = _mm256_set1_epi8(16), ones = _mm256_set1_epi8(1);)

/* TQ2_0, 256 values in 66 bytes: 64 bytes of 2-bit values (value 32 j + i of each half of 128: bits 2 j
 * of byte i), float16 d: w = d * (q - 1) */
#define TQ2                                                                                 \
    const __m256i q = _mm256_and_si256(_mm256_srli_epi16(_mm256_loadu_si256((const __m256i *)(blk + 32 * (j / 4))),\
                                                         2 * (j % 4)), three);              \
    const __m256i s = _mm256_sub_epi8(q, one), g = _mm256_abs_epi8(s);                      \
    const __m256 ws = _mm256_set1_ps(dd);
#define WALKTQ2(STEPS) WALK256(STEPS, STEPI, TQ2_BYTES, HALF(blk + 64), TQ2)

ROWFN(rowtq2, QK, TQ2_BYTES, ACTI, WALKTQ2, PUTI, const __m256i three = _mm256_set1_epi8(3), one = _mm256_set1_epi8(1);)

/* IQ1_S, 256 values in 50 bytes: float16 d, 32 bytes of grid indices' low 8 bits (rows of 8 values -1, 0,
 * 1 in a 2048-row grid), per block of 32 a uint16: four 3-bit high parts, a 3-bit scale s, the sign of a
 * shift: w = d * (2 s + 1) * (grid +- 1/8) */
#define IQ1S                                                                                \
    const uint8_t *idx = blk + 2 + 4 * j;                                                   \
    uint16_t h;                                                                             \
    memcpy(&h, blk + 34 + 2 * j, 2);                                                        \
    const __m256i s = _mm256_set_epi64x(grid[idx[3] | ((h >> 9) & 7) << 8], grid[idx[2] | ((h >> 6) & 7) << 8],\
                                        grid[idx[1] | ((h >> 3) & 7) << 8], grid[idx[0] | (h & 7) << 8]);\
    const __m256i g = _mm256_abs_epi8(s);                                                   \
    const float dl = dd * (float)(2 * ((h >> 12) & 7) + 1);                                 \
    const __m256 ws = _mm256_set1_ps(dl);                                                   \
    const float wo = 0.125f * dl * (float)(1 - 2 * (h >> 15)); /* no branch: random signs */
#define WALKIQ1S(STEPS) WALK256(STEPS, STEPO, IQ1S_BYTES, HALF(blk), IQ1S)

ROWFN(rowiq1s, QK, IQ1S_BYTES, ACTO, WALKIQ1S, PUTO, )

/* IQ1_M, 256 values in 56 bytes: 32 bytes of grid indices' low 8 bits (IQ1_S's grid), 16 bytes of two
 * nibbles per block of 16 (3 high bits of an index, the sign of its 8 values' shift), four uint16 of 3-bit
 * scales (one per 16 values) whose top nibbles make the float16 d: w = d * (2 s + 1) * (grid +- 1/8). Here
 * each value is 8 grid +- 1 (exact, -9..9) and the scale d (2 s + 1) / 8. */
static inline float iq1m_d(const uint8_t *blk) {
    uint16_t sc[4];
    memcpy(sc, blk + 48, 8);
    const uint16_t h = (sc[0] >> 12) | ((sc[1] >> 8) & 0x00F0) | ((sc[2] >> 4) & 0x0F00) | (sc[3] & 0xF000);
    return _cvtsh_ss(h) * 0.125f;
}

#define IQ1M                                                                                    \
    const uint8_t *idx = blk + 4 * j, h0 = blk[32 + 2 * j], h1 = blk[33 + 2 * j];               \
    const int hi[4] = {h0 & 15, h0 >> 4, h1 & 15, h1 >> 4};                                     \
    int64_t sh[4];                                                                              \
    for (int i = 0; i < 4; i++) sh[i] = (hi[i] & 8) ? -1 : 0x0101010101010101;                  \
    const __m256i grid8 = _mm256_sign_epi8(eight, _mm256_set_epi64x(grid[idx[3] | (hi[3] & 7) << 8],  \
        grid[idx[2] | (hi[2] & 7) << 8], grid[idx[1] | (hi[1] & 7) << 8], grid[idx[0] | (hi[0] & 7) << 8])); \
    const __m256i s = _mm256_add_epi8(grid8, _mm256_set_epi64x(sh[3], sh[2], sh[1], sh[0]));   \
    const __m256i g = _mm256_abs_epi8(s);                                                       \
    uint16_t u;                                                                                 \
    memcpy(&u, blk + 48 + 2 * (j / 2), 2);                                                      \
    const int t = 6 * (j % 2);                                                                  \
    const __m256 ws = _mm256_setr_m128(_mm_set1_ps(dd * (float)(2 * ((u >> t) & 7) + 1)),      \
                                       _mm_set1_ps(dd * (float)(2 * ((u >> (t + 3)) & 7) + 1)));
#define WALKIQ1M(STEPS) WALK256(STEPS, STEPI, IQ1M_BYTES, iq1m_d(blk), IQ1M)

ROWFN(rowiq1m, QK, IQ1M_BYTES, ACTI, WALKIQ1M, PUTI, const __m256i eight = _mm256_set1_epi8(8);)

/* TQ1_0, 256 values in 54 bytes: 48 bytes of five base-3 digits each, 4 bytes of four, float16 d:
 * w = d * (t - 1). Digit t of a byte q is the top trit of q * 3^t modulo 256: ((q 3^t mod 256) * 3) >> 8.
 * Values 32 t + i: digit t of byte i of the first 32; 160 + 16 t + i: of the next 16; 240 + 4 t + i: of
 * the last 4. */
static inline __m256i top_trits(__m256i q, __m256i pw) {  /* q's bytes times pw (per 16-bit lane) mod 256 -> 0..2 */
    const __m256i lo = _mm256_and_si256(_mm256_mullo_epi16(q, pw), _mm256_set1_epi16(0x00FF));
    const __m256i hi = _mm256_slli_epi16(_mm256_mullo_epi16(_mm256_srli_epi16(q, 8), pw), 8);
    const __m256i v = _mm256_or_si256(lo, hi);
    const __m256i one = _mm256_cmpeq_epi8(_mm256_max_epu8(v, _mm256_set1_epi8(86)), v);   /* v >= 86 */
    const __m256i two = _mm256_cmpeq_epi8(_mm256_max_epu8(v, _mm256_set1_epi8((char)171)), v);  /* v >= 171 */
    return _mm256_sub_epi8(_mm256_setzero_si256(), _mm256_add_epi8(one, two));
}

static const int16_t POW3[5] = {1, 3, 9, 27, 81};

#define TQ1                                                                                     \
    __m256i q, pw;                                                                              \
    if (j < 5) {                                                                                \
        q = _mm256_loadu_si256((const __m256i *)blk);                                           \
        pw = _mm256_set1_epi16(POW3[j]);                                                        \
    } else if (j < 7) {  /* digits 2 j - 10 and 2 j - 9 of the next 16 bytes */                  \
        q = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(blk + 32)));          \
        pw = _mm256_set_m128i(_mm_set1_epi16(POW3[2 * j - 9]), _mm_set1_epi16(POW3[2 * j - 10])); \
    } else {  /* digit 4 of the next 16 bytes, then the last 4 bytes' four digits */              \
        q = _mm256_set_m128i(_mm_set1_epi32((int)bits32(blk + 48)), _mm_loadu_si128((const __m128i *)(blk + 32))); \
        pw = _mm256_set_m128i(_mm_setr_epi16(1, 1, 3, 3, 9, 9, 27, 27), _mm_set1_epi16(81));     \
    }                                                                                           \
    const __m256i s = _mm256_sub_epi8(top_trits(q, pw), one), g = _mm256_abs_epi8(s);           \
    const __m256 ws = _mm256_set1_ps(dd);
#define WALKTQ1(STEPS) WALK256(STEPS, STEPI, TQ1_BYTES, HALF(blk + 52), TQ1)

ROWFN(rowtq1, QK, TQ1_BYTES, ACTI, WALKTQ1, PUTI, const __m256i one = _mm256_set1_epi8(1);)

ROWFN(rowq50, BLOCK, Q50_BYTES, ACTI, WALKQ50, PUTI, const __m256i sixteen = _mm256_set1_epi8(16);)

/* kind: 0 IQ2_XXS (grid: 256 rows of 8 bytes), 1 IQ3_XXS (256 rows of 4), 2 IQ3_S (512 rows of 4), 3 IQ2_XS
 * (512 rows of 8), 4 IQ2_S (1024 rows of 8); signs: 8 bytes per sign index (IQ2_XXS, IQ3_XXS, IQ2_XS: 128
 * patterns) or per sign byte (IQ3_S, IQ2_S: 256); K % 256 == 0. Blocks of 32 (K % 32 == 0): 5 IQ4_NL and
 * 6 MXFP4 (grid: their 16 int8 values), 7 Q5_0, 8 Q5_1 (no tables). 9 TQ2_0 (no tables), 10 IQ1_S and
 * 11 IQ1_M (grid: 2048 rows of 8 int8), 12 TQ1_0 (no tables). w: (N, K / block * block bytes) as the file stores it. */
int reshard_iquant_gemm(const void *xin, int io, int64_t M, int64_t K, const uint8_t *w, int kind,
                        const void *grid, const void *signs, int64_t N, void *y, int threads) {
    if (kind < 0 || kind > 12 || K % (kind >= 5 && kind <= 8 ? BLOCK : QK)) return -2;
    if (empty(M, K, N, y, io)) return 0;
    float *owned;
    const float *x = floats(xin, M * K, io, &owned);
    acti a = {0};
    int failed = x == NULL || preparei(x, M, K, &a);
    free(owned);
    if (failed) { free(a.xq); free(a.d); free(a.xs); return -1; }
    static const rowfn ROW[] = {rowiq2xxs, rowiq3xxs, rowiq3s, rowiq2xs, rowiq2s, rowiq4nl, rowmxfp4, rowq50,
                                rowq51, rowtq2, rowiq1s, rowiq1m, rowtq1};  /* by kind */
    const rowfn row = ROW[kind];
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) row(&a, M, K, w, grid, signs, N, n, y, io);
    free(a.xq);
    free(a.d);
    free(a.xs);
    return 0;
}

#else  /* neither AVX512-VNNI nor AVX2: runtime/native.py sees reshard_lowbit_isa() == 0 and these layers expand */

int reshard_iquant_gemm(const void *x, int io, int64_t M, int64_t K, const uint8_t *w, int kind,
                        const void *grid, const void *signs, int64_t N, void *y, int threads) { return -3; }

#endif
