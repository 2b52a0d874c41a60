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
 * Each thread takes a contiguous range of rows; a row is dequantized once into a buffer
 * that stays in L1 and then dotted with every token of x. Sums are float32; x and y are
 * float32 or bf16 (rounded to nearest even on output).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gguf_blocks.h"
#include "vector_math.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define HAVE_AVX512 1
#endif

#define TOKEN_TILE 4

enum { KIND_F32 = 0, KIND_BF16 = 1 };

#ifndef HAVE_AVX512 /* the portable path: a row at a time through a float32 buffer */
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

/* Returns 0, or -1 for an unknown type or kind, K not a multiple of 32, or no memory. */
int textgen_gguf_linear(
    const void *x, /* [M, K] float32 or bf16, rows x_stride elements apart */
    int64_t x_stride,
    const uint8_t *weight, /* [N, K / 32] blocks */
    int type,
    void *y, /* [M, N] same kind as x, rows y_stride elements apart */
    int64_t y_stride,
    int64_t m,
    int64_t n,
    int64_t k,
    int kind,
    int threads) {
    if (block_bytes(type) == 0 || k % BLOCK != 0 || (kind != KIND_F32 && kind != KIND_BF16)) return -1;
    if (m == 0 || n == 0) return 0;
    const int64_t blocks = k / BLOCK;

    /* x as contiguous float32 [M, K]; y as float32 [M, N] before the bf16 rounding. */
    float *xf = malloc(sizeof(float) * m * k);
    float *yf = kind == KIND_BF16 ? malloc(sizeof(float) * m * n) : NULL;
    if (xf == NULL || (kind == KIND_BF16 && yf == NULL)) {
        free(xf);
        free(yf);
        return -1;
    }
    for (int64_t t = 0; t < m; t++) {
        if (kind == KIND_BF16) {
            const uint16_t *row = (const uint16_t *)x + t * x_stride;
            for (int64_t i = 0; i < k; i++) xf[t * k + i] = bf16_to_float(row[i]);
        } else {
            memcpy(xf + t * k, (const float *)x + t * x_stride, sizeof(float) * k);
        }
    }
    float *out = kind == KIND_BF16 ? yf : (float *)y;
    const int64_t out_stride = kind == KIND_BF16 ? n : y_stride;

    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
#ifdef HAVE_AVX512
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) {
            for (int64_t t = 0; t < m; t += AVX_TILE) {
                const int count = m - t < AVX_TILE ? (int)(m - t) : AVX_TILE;
                rows_avx512(weight, type, blocks, xf + t * k, k, count, r, r + 1,
                            out + t * out_stride, out_stride);
            }
        }
#else
        float *w = malloc(sizeof(float) * k); /* one dequantized row, stays in L1 */
        failed = w == NULL;
        /* NOTE: every thread must reach the worksharing loop, even one without a buffer. */
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) {
            if (w == NULL) continue;
            dequantize_row(weight + r * blocks * block_bytes(type), type, blocks, w);
            int64_t t = 0;
            for (; t + TOKEN_TILE <= m; t += TOKEN_TILE) {
                float sums[TOKEN_TILE];
                dot4(w, xf + t * k, k, sums);
                for (int i = 0; i < TOKEN_TILE; i++) out[(t + i) * out_stride + r] = sums[i];
            }
            for (; t < m; t++) out[t * out_stride + r] = dot(w, xf + t * k, k);
        }
        free(w);
#endif
    }
    if (kind == KIND_BF16) {
        for (int64_t t = 0; t < m; t++) {
            uint16_t *row = (uint16_t *)y + t * y_stride;
            for (int64_t r = 0; r < n; r++) row[r] = float_to_bf16(yf[t * n + r]);
        }
    }
    free(xf);
    free(yf);
    return failed ? -1 : 0;
}
