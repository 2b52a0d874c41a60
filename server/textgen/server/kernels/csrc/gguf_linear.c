/* y = x W^T with W kept in GGUF's quantized blocks (Q4_0, Q4_1, Q8_0).
 *
 * A decode step at small batch reads every weight once per token it produces, so its
 * speed is the speed at which weights stream from memory. GGUF blocks hold 4.5 to 8.5
 * bits per weight against bf16's 16, so reading them directly, dequantizing in
 * registers, moves 2 to 3.5 times fewer bytes per step.
 *
 * Layout: W is [N rows][K/32 blocks]; a block holds 32 consecutive input features:
 *   Q4_0: f16 d;          u8 qs[16];  w[j] = (lo(qs[j]) - 8) d,  w[j+16] = (hi(qs[j]) - 8) d
 *   Q4_1: f16 d, f16 m;   u8 qs[16];  w[j] = lo(qs[j]) d + m,    w[j+16] = hi(qs[j]) d + m
 *   Q8_0: f16 d;          i8 qs[32];  w[j] = qs[j] d
 * The products q d are exact in float32 (at most 8 + 11 significant bits), so each
 * dequantized weight equals the float32 value GGUF readers produce, to the bit.
 *
 * Each call computes a range of rows (output features) for every token; a row is
 * dequantized once and dotted with every token of x. x and y are float32 (ops.cpp widens
 * bf16 inputs and rounds bf16 outputs); sums are float32.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gguf_blocks.h"
#include "kernel_api.h"
#include "vector_math.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define HAVE_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define HAVE_AVX2 1
#endif

#if defined(HAVE_AVX2) || defined(HAVE_AVX512)
/* The sum of the 8 lanes of v. */
static inline float sum8(__m256 v) {
    const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 two = _mm_add_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));
}
#endif

#define TOKEN_TILE 4

#if !defined(HAVE_AVX512) && !defined(HAVE_AVX2) /* portable: a row at a time via a buffer */
/* One row of W (K / 32 blocks at `row`) into `w` [K] float32. */
static void dequantize_row(const uint8_t *row, int type, int64_t blocks, float *restrict w) {
    const int64_t stride = block_bytes(type);
    for (int64_t b = 0; b < blocks; b++, row += stride, w += BLOCK) {
        uint16_t raw;
        memcpy(&raw, row, 2);
        const float d = half_to_float(raw);
        if (type == TYPE_Q8_0) {
            const int8_t *qs = (const int8_t *)(row + 2);
            for (int j = 0; j < BLOCK; j++) w[j] = (float)qs[j] * d;
        } else if (type == TYPE_Q4_1) {
            memcpy(&raw, row + 2, 2);
            const float m = half_to_float(raw);
            const uint8_t *qs = row + 4;
            for (int j = 0; j < BLOCK / 2; j++) {
                w[j] = (float)(qs[j] & 15) * d + m;
                w[j + BLOCK / 2] = (float)(qs[j] >> 4) * d + m;
            }
        } else {
            const uint8_t *qs = row + 2;
            for (int j = 0; j < BLOCK / 2; j++) {
                w[j] = (float)((int)(qs[j] & 15) - 8) * d;
                w[j + BLOCK / 2] = (float)((int)(qs[j] >> 4) - 8) * d;
            }
        }
    }
}

static float dot(const float *restrict a, const float *restrict b, int64_t n) {
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* Four tokens against one row: the row is read once for all four. */
static void dot4(const float *restrict w, const float *restrict x, int64_t k, float out[4]) {
    const float *x0 = x, *x1 = x + k, *x2 = x + 2 * k, *x3 = x + 3 * k;
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
    for (int64_t i = 0; i < k; i++) {
        const float v = w[i];
        s0 += v * x0[i];
        s1 += v * x1[i];
        s2 += v * x2[i];
        s3 += v * x3[i];
    }
    out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
}

#endif

#ifdef HAVE_AVX512
#define AVX_TILE 4

static inline float load_half(const uint8_t *p) {
    uint16_t raw;
    memcpy(&raw, p, 2);
#ifdef __F16C__
    return _cvtsh_ss(raw);
#else
    return half_to_float(raw);
#endif
}

/* One block's 32 weights as two vectors of 16 floats, exactly as `dequantize_row`. */
static inline void dequantize_block(const uint8_t *block, int type, __m512 *lo, __m512 *hi) {
    const __m512 d = _mm512_set1_ps(load_half(block));
    if (type == TYPE_Q8_0) {
        const __m128i a = _mm_loadu_si128((const __m128i *)(block + 2));
        const __m128i b = _mm_loadu_si128((const __m128i *)(block + 18));
        *lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(a)), d);
        *hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), d);
        return;
    }
    const int offset = type == TYPE_Q4_1 ? 4 : 2;
    const __m128i packed = _mm_loadu_si128((const __m128i *)(block + offset));
    const __m128i mask = _mm_set1_epi8(15);
    __m512i qlo = _mm512_cvtepu8_epi32(_mm_and_si128(packed, mask));
    __m512i qhi = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(packed, 4), mask));
    if (type == TYPE_Q4_1) {
        const __m512 m = _mm512_set1_ps(load_half(block + 2));
        *lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(qlo), d, m);
        *hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(qhi), d, m);
    } else {
        const __m512i eight = _mm512_set1_epi32(8);
        *lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(qlo, eight)), d);
        *hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(qhi, eight)), d);
    }
}

/* Rows [r0, r1) of W against `count` (<= AVX_TILE) tokens of xf: out[t * out_stride + r].
 * NOTE: four accumulators per token (low and high halves, even and odd blocks) keep four
 * independent FMA chains going, which a single token needs to hide the FMA latency. */
static inline __attribute__((always_inline)) void rows_tile(
    const uint8_t *weight, int type, int64_t blocks, const float *xf, int64_t k, const int count,
    int64_t r0, int64_t r1, float *out, int64_t out_stride) {
    const int64_t stride = block_bytes(type);
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = weight + r * blocks * stride;
        __m512 acc[4][AVX_TILE];
        for (int i = 0; i < 4; i++)
            for (int t = 0; t < count; t++) acc[i][t] = _mm512_setzero_ps();
        int64_t b = 0;
        for (; b + 2 <= blocks; b += 2) {
            __m512 lo0, hi0, lo1, hi1;
            dequantize_block(row + b * stride, type, &lo0, &hi0);
            dequantize_block(row + (b + 1) * stride, type, &lo1, &hi1);
            const float *xb = xf + b * BLOCK;
            for (int t = 0; t < count; t++) {
                const float *xt = xb + t * k;
                acc[0][t] = _mm512_fmadd_ps(lo0, _mm512_loadu_ps(xt), acc[0][t]);
                acc[1][t] = _mm512_fmadd_ps(hi0, _mm512_loadu_ps(xt + 16), acc[1][t]);
                acc[2][t] = _mm512_fmadd_ps(lo1, _mm512_loadu_ps(xt + 32), acc[2][t]);
                acc[3][t] = _mm512_fmadd_ps(hi1, _mm512_loadu_ps(xt + 48), acc[3][t]);
            }
        }
        if (b < blocks) {
            __m512 lo, hi;
            dequantize_block(row + b * stride, type, &lo, &hi);
            const float *xb = xf + b * BLOCK;
            for (int t = 0; t < count; t++) {
                acc[0][t] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xb + t * k), acc[0][t]);
                acc[1][t] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb + t * k + 16), acc[1][t]);
            }
        }
        for (int t = 0; t < count; t++) {
            const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0][t], acc[1][t]),
                                             _mm512_add_ps(acc[2][t], acc[3][t]));
            out[t * out_stride + r] = _mm512_reduce_add_ps(sum);
        }
    }
}

static void rows_avx512(const uint8_t *weight, int type, int64_t blocks, const float *xf,
                        int64_t k, int count, int64_t r0, int64_t r1, float *out,
                        int64_t out_stride) {
    switch (count) { /* a constant count lets the accumulators live in registers */
        case 1: rows_tile(weight, type, blocks, xf, k, 1, r0, r1, out, out_stride); break;
        case 2: rows_tile(weight, type, blocks, xf, k, 2, r0, r1, out, out_stride); break;
        case 3: rows_tile(weight, type, blocks, xf, k, 3, r0, r1, out, out_stride); break;
        default: rows_tile(weight, type, blocks, xf, k, 4, r0, r1, out, out_stride); break;
    }
}
#endif

#ifdef HAVE_AVX2
#define AVX2_TILE 4

/* One block's 32 weights as four vectors of 8 floats, exactly as `dequantize_row`: q d is
 * exact in float32, so fma(q, d, m) rounds q d + m once, as the two-step form does. */
static inline void dequantize_block8(const uint8_t *block, int type, __m256 w[4]) {
    uint16_t raw;
    memcpy(&raw, block, 2);
    const __m256 d = _mm256_set1_ps(_cvtsh_ss(raw));
    if (type == TYPE_Q8_0) {
        for (int i = 0; i < 4; i++) {
            const __m128i q = _mm_loadl_epi64((const __m128i *)(block + 2 + 8 * i));
            w[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d);
        }
        return;
    }
    const __m128i packed = _mm_loadu_si128((const __m128i *)(block + (type == TYPE_Q4_1 ? 4 : 2)));
    const __m128i mask = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(packed, mask);                     /* weights 0..15 */
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);  /* weights 16..31 */
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    if (type == TYPE_Q4_1) {
        memcpy(&raw, block + 2, 2);
        const __m256 m = _mm256_set1_ps(_cvtsh_ss(raw));
        for (int i = 0; i < 4; i++)
            w[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i])), d, m);
    } else {
        const __m256i eight = _mm256_set1_epi32(8);
        for (int i = 0; i < 4; i++) {
            const __m256i q = _mm256_sub_epi32(_mm256_cvtepu8_epi32(parts[i]), eight);
            w[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(q), d);
        }
    }
}

/* Row r of W against `count` (<= AVX2_TILE) tokens of xf: out[t * out_stride + r].
 * NOTE: one token needs four independent FMA chains to hide the FMA latency (four
 * accumulators); with more tokens, two per token keep the 16 registers enough. */
static inline __attribute__((always_inline)) void row_tile8(
    const uint8_t *row, int type, int64_t blocks, const float *xf, int64_t k, const int count,
    float *out, int64_t out_stride) {
    const int chains = count == 1 ? 4 : 2;
    const int64_t stride = block_bytes(type);
    __m256 acc[4][AVX2_TILE];
    for (int c = 0; c < chains; c++)
        for (int t = 0; t < count; t++) acc[c][t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        __m256 w[4];
        dequantize_block8(row + b * stride, type, w);
        const float *xb = xf + b * BLOCK;
        for (int t = 0; t < count; t++)
            for (int i = 0; i < 4; i++)
                acc[i % chains][t] =
                    _mm256_fmadd_ps(w[i], _mm256_loadu_ps(xb + t * k + 8 * i), acc[i % chains][t]);
    }
    for (int t = 0; t < count; t++) {
        __m256 sum = acc[0][t];
        for (int c = 1; c < chains; c++) sum = _mm256_add_ps(sum, acc[c][t]);
        out[t * out_stride] = sum8(sum);
    }
}

static void rows_avx2(const uint8_t *weight, int type, int64_t blocks, const float *xf, int64_t k,
                      int count, int64_t r, float *out, int64_t out_stride) {
    const uint8_t *row = weight + r * blocks * block_bytes(type);
    switch (count) { /* a constant count lets the accumulators live in registers */
        case 1: row_tile8(row, type, blocks, xf, k, 1, out + r, out_stride); break;
        case 2: row_tile8(row, type, blocks, xf, k, 2, out + r, out_stride); break;
        case 3: row_tile8(row, type, blocks, xf, k, 3, out + r, out_stride); break;
        default: row_tile8(row, type, blocks, xf, k, 4, out + r, out_stride); break;
    }
}
#endif

void KERNEL(gguf_linear)(const GgufLinearArgs *a, int64_t begin, int64_t end) {
    const int64_t m = a->m, k = a->k, blocks = a->k / BLOCK;
    const float *xf = a->x;
    float *out = a->y;
    const int64_t out_stride = a->y_stride;
#ifdef HAVE_AVX512
    for (int64_t r = begin; r < end; r++) {
        for (int64_t t = 0; t < m; t += AVX_TILE) {
            const int count = m - t < AVX_TILE ? (int)(m - t) : AVX_TILE;
            rows_avx512(a->weight, a->type, blocks, xf + t * k, k, count, r, r + 1,
                        out + t * out_stride, out_stride);
        }
    }
#elif defined(HAVE_AVX2)
    for (int64_t r = begin; r < end; r++) {
        for (int64_t t = 0; t < m; t += AVX2_TILE) {
            const int count = m - t < AVX2_TILE ? (int)(m - t) : AVX2_TILE;
            rows_avx2(a->weight, a->type, blocks, xf + t * k, k, count, r, out + t * out_stride,
                      out_stride);
        }
    }
#else
    float w[k]; /* one dequantized row, stays in L1 */
    for (int64_t r = begin; r < end; r++) {
        dequantize_row(a->weight + r * blocks * block_bytes(a->type), a->type, blocks, w);
        int64_t t = 0;
        for (; t + TOKEN_TILE <= m; t += TOKEN_TILE) {
            float sums[TOKEN_TILE];
            dot4(w, xf + t * k, k, sums);
            for (int i = 0; i < TOKEN_TILE; i++) out[(t + i) * out_stride + r] = sums[i];
        }
        for (; t < m; t++) out[t * out_stride + r] = dot(w, xf + t * k, k);
    }
#endif
}

/* y = x W^T for small steps with x rounded to int8 per 32 features (llama.cpp's vector
 * dot of Q4_0 / Q4_1 / Q8_0 blocks with Q8 activations): each block's 32 weights are
 * read as bytes (nibbles unpacked, 0..15; Q8_0's signed bytes by the sign trick) and
 * multiplied with the token's 32 int8 values in integers (vpmaddubsw, vpmaddwd; exact),
 * then scaled by d_w d_x; Q4_1's and Q4_0's offset m (Q4_0: -8 d) adds m s_x, s_x = d_x
 * sum q. The weights are read straight from the blocks, at 4.5 to 8.5 bits each. */
#if defined(HAVE_AVX2) || defined(HAVE_AVX512)
/* Block `b` of a row against a token's int8 values `x`: sum_k u q as 8 int32 partial sums,
 * as floats. */
static inline __attribute__((always_inline)) __m256 block_sums(const uint8_t *block,
                                                               const int type, __m256i q) {
    __m256i pairs;
    if (type == TYPE_Q8_0) {
        const __m256i w = _mm256_loadu_si256((const __m256i *)(block + 2));
        pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(q, w));
    } else {
        const __m128i low = _mm_set1_epi8(15);
        const __m128i packed =
            _mm_loadu_si128((const __m128i *)(block + (type == TYPE_Q4_1 ? 4 : 2)));
        const __m256i u = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), low),
                                           _mm_and_si128(packed, low));
        pairs = _mm256_maddubs_epi16(u, q); /* u <= 15: no pair saturates */
    }
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

/* An f16 field of a block as float32, through the table of every f16 value. */
static inline float half_at(const uint8_t *p, const float *half_table) {
    uint16_t raw;
    memcpy(&raw, p, 2);
    return half_table[raw];
}

/* Rows r and r + 1 of W (`second`: whether r + 1 is one) against one token: the token's
 * block values are loaded once for both, whose sums are independent FMA chains; the
 * offset terms m s_x are summed apart. A constant `type` per copy: no branch per block. */
static inline __attribute__((always_inline)) void row_pair_int8(
    const GgufLinearArgs *a, const int type, int64_t r, int second, int64_t t) {
    const int64_t k = a->k, blocks = k / BLOCK, stride = block_bytes(type);
    const uint8_t *row0 = a->weight + r * blocks * stride;
    const uint8_t *row1 = second ? row0 + blocks * stride : row0;
    const int8_t *q = a->q + t * k;
    const float *d_x = a->d_x + t * blocks, *s_x = a->s_x + t * blocks;
    const float *table = a->half_table;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    float offsets0 = 0.0f, offsets1 = 0.0f;
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *block0 = row0 + b * stride, *block1 = row1 + b * stride;
        const __m256i x = _mm256_loadu_si256((const __m256i *)(q + b * BLOCK));
        const float dx = d_x[b];
        const float d0 = half_at(block0, table), d1 = half_at(block1, table);
        acc0 = _mm256_fmadd_ps(block_sums(block0, type, x), _mm256_set1_ps(d0 * dx), acc0);
        acc1 = _mm256_fmadd_ps(block_sums(block1, type, x), _mm256_set1_ps(d1 * dx), acc1);
        if (type == TYPE_Q4_1) {
            offsets0 += half_at(block0 + 2, table) * s_x[b];
            offsets1 += half_at(block1 + 2, table) * s_x[b];
        } else if (type == TYPE_Q4_0) {
            offsets0 += -8.0f * d0 * s_x[b];
            offsets1 += -8.0f * d1 * s_x[b];
        }
    }
    a->y[t * a->y_stride + r] = sum8(acc0) + offsets0;
    if (second) a->y[t * a->y_stride + r + 1] = sum8(acc1) + offsets1;
}
#endif

/* y = x W^T for small steps with x rounded to int8 per 32 features (llama.cpp's vector
 * dot of Q4_0 / Q4_1 / Q8_0 blocks with Q8 activations): each block's 32 weights are
 * read as bytes (nibbles unpacked, 0..15; Q8_0's signed bytes by the sign trick) and
 * multiplied with the token's 32 int8 values in integers (vpmaddubsw, vpmaddwd; exact),
 * then scaled by d_w d_x; Q4_1's and Q4_0's offset m (Q4_0: -8 d) adds m s_x, s_x = d_x
 * sum q. The weights are read straight from the blocks, at 4.5 to 8.5 bits each. */
void KERNEL(gguf_linear_int8)(const GgufLinearArgs *a, int64_t begin, int64_t end) {
#if defined(HAVE_AVX2) || defined(HAVE_AVX512)
    for (int64_t r = begin; r < end; r += 2) {
        const int second = r + 1 < end;
        for (int64_t t = 0; t < a->m; t++) {
            switch (a->type) {
                case TYPE_Q4_1: row_pair_int8(a, TYPE_Q4_1, r, second, t); break;
                case TYPE_Q4_0: row_pair_int8(a, TYPE_Q4_0, r, second, t); break;
                default: row_pair_int8(a, TYPE_Q8_0, r, second, t); break;
            }
        }
    }
#else
    (void)a, (void)begin, (void)end;
#endif
}

void KERNEL(gemv_pack)(const uint8_t *blocks, int type, int64_t n, int64_t k, uint8_t *rows) {
    const int64_t kb = k / BLOCK, kp = (kb + 1) / 2, stride = block_bytes(type);
    const int64_t kb8 = (kb + GEMV_GROUP - 1) / GEMV_GROUP * GEMV_GROUP;
    const int64_t qs = type == TYPE_Q4_1 ? 4 : 2; /* where a block's nibbles start */
    for (int64_t r = 0; r < n; r++) {
        uint8_t *row = rows + r * gemv_row_bytes(k);
        uint16_t *d = (uint16_t *)(row + kp * 32), *m = d + kb8;
        memset(row, 0, (size_t)gemv_row_bytes(k));
        for (int64_t b = 0; b < kb; b++) {
            const uint8_t *block = blocks + (r * kb + b) * stride;
            memcpy(row + b * 16, block + qs, 16); /* pair b / 2, half b % 2 */
            memcpy(d + b, block, 2);
            if (type == TYPE_Q4_1) memcpy(m + b, block + 2, 2);
            else m[b] = float_to_half(-8.0f * half_to_float(d[b])); /* exact: a power of 2 */
        }
    }
}

/* y = x W^T for steps of a few tokens from gemv_pack's rows: per pair of blocks, one
 * 32-byte load of their nibbles gives both blocks' 32 values as two 32-byte vectors (low
 * and high nibbles), each multiplied with the matching int8 activations (vpmaddubsw, pairs
 * of at most 2 x 15 x 127, summed in int16 at most twice: exact), summed into 8 int32 lanes,
 * lanes 0-3 the first block's, 4-7 the second's, and scaled by d_w d_x at once. The
 * offsets m d_x sum q add 8 blocks at a time. About 7 instructions a block where
 * gguf_linear_int8 takes 17, on nibbles laid out in the order they are read. */
void KERNEL(gemv_int8)(const GemvArgs *a, int64_t begin, int64_t end) {
#if defined(HAVE_AVX2) || defined(HAVE_AVX512)
    const int64_t kb = a->k / BLOCK, kp = (kb + 1) / 2;
    const int64_t kb8 = (kb + GEMV_GROUP - 1) / GEMV_GROUP * GEMV_GROUP;
    const int64_t row_bytes = gemv_row_bytes(a->k);
    const __m256i low = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    /* pair j of a group of 4: its two blocks' scales, each in four lanes */
    const __m256i spread[4] = {
        _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3),
        _mm256_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5), _mm256_setr_epi32(6, 6, 6, 6, 7, 7, 7, 7),
    };
    for (int64_t r = begin; r < end; r++) {
        const uint8_t *row = a->rows + r * row_bytes;
        const uint16_t *d = (const uint16_t *)(row + kp * 32), *m = d + kb8;
        for (int64_t t = 0; t < a->m; t++) {
            const int8_t *x2 = a->x2 + t * kp * 64;
            const float *dx2 = a->dx2 + t * kp * 8, *s_x = a->s_x + t * kb8;
            __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
            __m256 offsets = _mm256_setzero_ps();
            for (int64_t g = 0; g < kb8; g += GEMV_GROUP) {
                const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d + g)));
                offsets = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(m + g))),
                                          _mm256_loadu_ps(s_x + g), offsets);
                const int64_t first = g / 2, stop = first + 4 < kp ? first + 4 : kp;
                for (int64_t p = first; p < stop; p++) {
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(row + p * 32));
                    const __m256i lo = _mm256_and_si256(v, low);
                    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                    const __m256i pairs = _mm256_add_epi16(
                        _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)(x2 + p * 64))),
                        _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(x2 + p * 64 + 32))));
                    const __m256 sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
                    const __m256 scale = _mm256_mul_ps(_mm256_permutevar8x32_ps(dw, spread[p - first]),
                                                       _mm256_loadu_ps(dx2 + p * 8));
                    acc[p & 1] = _mm256_fmadd_ps(sums, scale, acc[p & 1]);
                }
            }
            a->y[t * a->y_stride + r] = sum8(_mm256_add_ps(acc[0], acc[1])) + sum8(offsets);
        }
    }
#else
    (void)a, (void)begin, (void)end;
#endif
}
