/* y = x W^T in integer arithmetic: W as a GGUF model's blocks, x quantized to int8 on the fly.
 *
 * This is the arithmetic llama.cpp uses for GGUF models on CPUs: every 32 input features
 * of a token are rounded to int8 with one float scale (ggml's Q8_1), and each 32-feature
 * block is dotted with the weight block in integers (AVX-512 VNNI: 64 multiply-adds per
 * instruction, twice bf16's dot-product rate). Per block of 32 features k:
 *
 *   W[n, k] = d_w[n, b] u[n, k] + m_w[n, b]       u in 0..255 (Q4_0, Q4_1 and Q8_0 all fit)
 *   x[t, k] ~ d_x[t, b] q[t, k]                    q in -127..127, d_x = max |x| / 127
 *   y[t, n] = sum_b d_w d_x (sum_k u q) + m_w (d_x sum_k q)
 *
 * The integer sums are exact; the only rounding beyond float32 accumulation is x's.
 * Q4_0's signed nibbles and Q8_0's signed bytes become unsigned with the offset folded
 * into m_w (Q4_0: u = q + 8, m_w = -8 d; Q8_0: u = q + 128, m_w = -128 d), so one kernel
 * serves all three. u q fits vpdpbusd's unsigned-by-signed bytes.
 *
 * Without VNNI (AVX2, and float32 activations everywhere) the products are vpmaddubsw's,
 * llama.cpp's AVX2 arithmetic: pairs of u q summed into int16, which is exact for the
 * 4-bit types (2 x 15 x 127 per pair, at most 8 x 3810 < 2^15 over a block's eight
 * pairs of pairs), then into int32 by vpmaddwd, so the block sums equal VNNI's to the bit.
 * Q8_0's bytes are taken back as signed (u ^ 0x80 = q) and multiplied with the sign
 * trick, |q| times x signed as q, whose pairs stay within 2 x 128 x 127 < 2^15; the
 * m_w term, which only undid the offset, is then left out.
 *
 * Packed weight layout (`int8_pack`), for 16 output features n at a time:
 *   u:   [N / 16][K / 32][8][16][4] bytes: 4 consecutive k of 16 features, a vector each
 *   d_w, m_w: [N / 16][K / 32][16] float32
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gguf_blocks.h"
#include "kernel_api.h"
#include "vector_math.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define HAVE_VNNI 1 /* bf16 activations */
#endif
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_AVX2 1 /* float32 and bf16 activations */
#endif

#define LANES INT8_LANES /* output features per vector */
#define ROWS INT8_ROWS   /* tokens per micro-tile */
#define ROW_CHUNK INT8_ROW_CHUNK

int KERNEL(int8_available)(void) {
#if defined(HAVE_VNNI) || defined(HAVE_AVX2)
    return 1;
#else
    return 0;
#endif
}

/* GGUF blocks [n][k / 32 blocks] of `type` into the layout above (n a multiple of 16, k
 * of 32). */
void KERNEL(int8_pack)(const uint8_t *blocks, int type, int64_t n, int64_t k, uint8_t *u,
                       float *d_w, float *m_w) {
    const int64_t stride = block_bytes(type);
    const int64_t kb = k / BLOCK;
    for (int64_t row = 0; row < n; row++) {
        const int64_t tile = row / LANES, lane = row % LANES;
        for (int64_t b = 0; b < kb; b++) {
            const uint8_t *block = blocks + (row * kb + b) * stride;
            uint16_t raw;
            memcpy(&raw, block, 2);
            const float d = half_to_float(raw);
            uint8_t values[BLOCK];
            float m;
            if (type == TYPE_Q8_0) {
                for (int j = 0; j < BLOCK; j++) values[j] = (uint8_t)((int)(int8_t)block[2 + j] + 128);
                m = -128.0f * d;
            } else {
                const uint8_t *qs = block + (type == TYPE_Q4_1 ? 4 : 2);
                for (int j = 0; j < BLOCK / 2; j++) {
                    values[j] = qs[j] & 15;
                    values[j + BLOCK / 2] = qs[j] >> 4;
                }
                if (type == TYPE_Q4_1) {
                    memcpy(&raw, block + 2, 2);
                    m = half_to_float(raw);
                } else {
                    m = -8.0f * d;
                }
            }
            uint8_t *dst = u + ((tile * kb + b) * 8) * LANES * 4;
            for (int g = 0; g < 8; g++)
                for (int j = 0; j < 4; j++) dst[(g * LANES + lane) * 4 + j] = values[g * 4 + j];
            d_w[(tile * kb + b) * LANES + lane] = d;
            m_w[(tile * kb + b) * LANES + lane] = m;
        }
    }
}

#ifdef HAVE_VNNI

/* One token's k bf16 features into int8 q [k], d_x and d_x * sum q per block. */
static inline void quantize_row(const uint16_t *x, int64_t k, int8_t *q, float *d, float *s) {
    for (int64_t b = 0; b < k / BLOCK; b++) {
        const __m512 lo = load16_bf16(x + b * BLOCK), hi = load16_bf16(x + b * BLOCK + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
        const float scale = amax / 127.0f;
        const __m512 inverse = _mm512_set1_ps(scale > 0.0f ? 1.0f / scale : 0.0f);
        /* rounded to nearest even; |x| / scale <= 127 so nothing saturates */
        const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inverse));
        const __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inverse));
        _mm_storeu_si128((__m128i *)(q + b * BLOCK), _mm512_cvtsepi32_epi8(qlo));
        _mm_storeu_si128((__m128i *)(q + b * BLOCK + 16), _mm512_cvtsepi32_epi8(qhi));
        d[b] = scale;
        s[b] = scale * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
    }
}

/* ROWS tokens (q, d_x, s_x rows at strides k and kb) against 16 output features: acc.
 * Rows past the caller's count read the scratch's padding; the caller drops them. */
static inline __attribute__((always_inline)) void tile_product(
    int64_t kb, const int8_t *q, const float *d_x, const float *s_x, int64_t k, const uint8_t *u,
    const float *d_w, const float *m_w, __m512 acc[ROWS]) {
    for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < kb; b++) {
        __m512i sums[ROWS];
        for (int r = 0; r < ROWS; r++) sums[r] = _mm512_setzero_si512();
        const uint8_t *ub = u + b * 8 * LANES * 4;
        for (int g = 0; g < 8; g++) {
            const __m512i w = _mm512_loadu_si512(ub + g * LANES * 4);
            for (int r = 0; r < ROWS; r++) {
                int32_t four;
                memcpy(&four, q + r * k + b * BLOCK + g * 4, 4);
                sums[r] = _mm512_dpbusd_epi32(sums[r], w, _mm512_set1_epi32(four));
            }
        }
        const __m512 dw = _mm512_loadu_ps(d_w + b * LANES);
        const __m512 mw = _mm512_loadu_ps(m_w + b * LANES);
        for (int r = 0; r < ROWS; r++) {
            const __m512 scale = _mm512_mul_ps(dw, _mm512_set1_ps(d_x[r * kb + b]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[r]), scale, acc[r]);
            acc[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(s_x[r * kb + b]), acc[r]);
        }
    }
}

/* The first `rows` of ROWS tokens' products with one 16-feature tile, as bf16 into y. */
static void micro_tile(int rows, int64_t kb, const int8_t *q, const float *d_x, const float *s_x,
                       int64_t k, const uint8_t *u, const float *d_w, const float *m_w,
                       uint16_t *y, int64_t y_stride) {
    __m512 acc[ROWS];
    tile_product(kb, q, d_x, s_x, k, u, d_w, m_w, acc);
    for (int r = 0; r < rows; r++) store16_bf16(y + r * y_stride, acc[r]);
}

/* out[i] = bf16(silu(bf16(gate[i]))) * bf16(up[i]) for `count` floats (a loop of run-time
 * length, which the compiler vectorizes where it would not a fixed 16). */
static void silu_mul(const float *gate, const float *up, uint16_t *out, int64_t count) {
    for (int64_t i = 0; i < count; i++) out[i] = silu_mul_bf16(round_bf16(gate[i]), round_bf16(up[i]));
}

/* As `micro_tile` for a gate tile and its up tile (`up` bytes and `up_scales` floats
 * further on in the packed weight): bf16(silu(gate)) * up into y, each product rounded
 * to bf16 first, so that the output equals the SiLU pass over the two tiles' outputs. */
static void micro_tile_gated(int rows, int64_t kb, const int8_t *q, const float *d_x,
                             const float *s_x, int64_t k, const uint8_t *u, const float *d_w,
                             const float *m_w, int64_t up, int64_t up_scales, uint16_t *y,
                             int64_t y_stride) {
    __m512 acc[ROWS];
    float gate[ROWS * LANES], upper[ROWS * LANES];
    uint16_t out[ROWS * LANES];
    tile_product(kb, q, d_x, s_x, k, u, d_w, m_w, acc);
    for (int r = 0; r < ROWS; r++) _mm512_storeu_ps(gate + r * LANES, acc[r]);
    tile_product(kb, q, d_x, s_x, k, u + up, d_w + up_scales, m_w + up_scales, acc);
    for (int r = 0; r < ROWS; r++) _mm512_storeu_ps(upper + r * LANES, acc[r]);
    silu_mul(gate, upper, out, (int64_t)rows * LANES);
    for (int r = 0; r < rows; r++) memcpy(y + r * y_stride, out + r * LANES, sizeof out[0] * LANES);
}

#endif

#ifdef HAVE_AVX2
#define AVX2_ROWS 4 /* tokens per AVX2 micro-tile: 4 x (int16 and float accumulators) */

/* 8 elements of a float32 or bf16 row as floats. */
static inline __m256 load8(const void *row, int64_t i, int kind) {
    if (kind == KIND_F32) return _mm256_loadu_ps((const float *)row + i);
    const __m128i half = _mm_loadu_si128((const __m128i *)((const uint16_t *)row + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

/* One token's k features into int8 q [k], d_x and d_x * sum q per block: the VNNI path's
 * arithmetic (scale max|x| / 127, x times its inverse rounded to nearest even). */
static inline void quantize_row8(const void *x, int kind, int64_t k, int8_t *q, float *d,
                                 float *s) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t b = 0; b < k / BLOCK; b++) {
        __m256 v[4];
        __m256 top = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = load8(x, b * BLOCK + 8 * i, kind);
            top = _mm256_max_ps(top, _mm256_andnot_ps(sign, v[i]));
        }
        float lanes[8], amax = 0.0f;
        _mm256_storeu_ps(lanes, top);
        for (int i = 0; i < 8; i++) amax = lanes[i] > amax ? lanes[i] : amax;
        const float scale = amax / 127.0f;
        const __m256 inverse = _mm256_set1_ps(scale > 0.0f ? 1.0f / scale : 0.0f);
        __m256i iv[4];
        for (int i = 0; i < 4; i++) iv[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inverse));
        /* |x| / scale <= 127: the saturating packs never clip; the permute undoes their
         * interleaving of 128-bit lanes */
        const __m256i words = _mm256_packs_epi32(iv[0], iv[1]), words2 = _mm256_packs_epi32(iv[2], iv[3]);
        const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(words, words2), order);
        _mm256_storeu_si256((__m256i *)(q + b * BLOCK), bytes);
        const __m256i total = _mm256_add_epi32(_mm256_add_epi32(iv[0], iv[1]), _mm256_add_epi32(iv[2], iv[3]));
        int32_t parts[8], sum = 0;
        _mm256_storeu_si256((__m256i *)parts, total);
        for (int i = 0; i < 8; i++) sum += parts[i];
        d[b] = scale;
        s[b] = scale * (float)sum;
    }
}

/* The 4 bytes at `src` in every 32-bit lane (one load: vbroadcastss). */
static inline __m256i broadcast4(const int8_t *src) {
    return _mm256_castps_si256(_mm256_broadcast_ss((const float *)src));
}

/* AVX2_ROWS tokens (q, d_x, s_x rows at strides k and kb) against the 8 output features of
 * half `h` of a 16-feature tile: acc. Rows past the caller's count read the scratch's
 * zero padding. */
static inline __attribute__((always_inline)) void half_product(
    int64_t kb, const int8_t *q, const float *d_x, const float *s_x, int64_t k, const uint8_t *u,
    const float *d_w, const float *m_w, int h, int type, __m256 acc[AVX2_ROWS]) {
    const __m256i ones = _mm256_set1_epi16(1);
    for (int r = 0; r < AVX2_ROWS; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < kb; b++) {
        const uint8_t *ub = u + b * 8 * LANES * 4 + h * 32;
        __m256i sums[AVX2_ROWS];
        if (type != TYPE_Q8_0) { /* u <= 15: the block's pairs sum exactly in int16 */
            __m256i pairs[AVX2_ROWS];
            for (int r = 0; r < AVX2_ROWS; r++) pairs[r] = _mm256_setzero_si256();
            /* NOTE: not unrolled further: a full unroll computes every product first and
             * spills them to the stack */
#pragma GCC unroll 2
            for (int g = 0; g < 8; g++) {
                const __m256i w = _mm256_loadu_si256((const __m256i *)(ub + g * LANES * 4));
                for (int r = 0; r < AVX2_ROWS; r++)
                    pairs[r] = _mm256_add_epi16(
                        pairs[r], _mm256_maddubs_epi16(w, broadcast4(q + r * k + b * BLOCK + g * 4)));
            }
            for (int r = 0; r < AVX2_ROWS; r++) sums[r] = _mm256_madd_epi16(pairs[r], ones);
        } else { /* signed q = u ^ 0x80, by the sign trick; int32 per group */
            const __m256i flip = _mm256_set1_epi8((char)0x80);
            for (int r = 0; r < AVX2_ROWS; r++) sums[r] = _mm256_setzero_si256();
#pragma GCC unroll 2
            for (int g = 0; g < 8; g++) {
                const __m256i w = _mm256_xor_si256(
                    _mm256_loadu_si256((const __m256i *)(ub + g * LANES * 4)), flip);
                const __m256i magnitude = _mm256_sign_epi8(w, w);
                for (int r = 0; r < AVX2_ROWS; r++) {
                    const __m256i x = _mm256_sign_epi8(broadcast4(q + r * k + b * BLOCK + g * 4), w);
                    sums[r] = _mm256_add_epi32(
                        sums[r], _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, x), ones));
                }
            }
        }
        const __m256 dw = _mm256_loadu_ps(d_w + b * LANES + h * 8);
        const __m256 mw = _mm256_loadu_ps(m_w + b * LANES + h * 8);
        for (int r = 0; r < AVX2_ROWS; r++) {
            const __m256 scale = _mm256_mul_ps(dw, _mm256_set1_ps(d_x[r * kb + b]));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r]), scale, acc[r]);
            if (type != TYPE_Q8_0)
                acc[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(s_x[r * kb + b]), acc[r]);
        }
    }
}

/* 8 floats into row `y` of `kind`, bf16 rounded as float_to_bf16 rounds. */
static inline void store8(void *y, int64_t at, __m256 v, int kind) {
    if (kind == KIND_F32) {
        _mm256_storeu_ps((float *)y + at, v);
        return;
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, v);
    for (int i = 0; i < 8; i++) ((uint16_t *)y)[at + i] = float_to_bf16(lanes[i]);
}

/* Tokens t .. t + rows - 1 (rows <= AVX2_ROWS) of one 16-feature tile (gated: the tile's
 * gate half and its up half, silu(gate) * up rounded as the SiLU pass rounds). */
static void micro_tile_avx2(const Int8LinearArgs *a, int64_t t, int rows, int64_t tile,
                            int64_t tiles) {
    const int64_t kb = a->k / BLOCK;
    const int8_t *q = a->q + t * a->k;
    const float *d_x = a->d_x + t * kb, *s_x = a->s_x + t * kb;
    for (int h = 0; h < 2; h++) {
        const int64_t at = tile * LANES + h * 8;
        __m256 acc[AVX2_ROWS];
        half_product(kb, q, d_x, s_x, a->k, a->u + tile * kb * 8 * LANES * 4,
                     a->d_w + tile * kb * LANES, a->m_w + tile * kb * LANES, h, a->type, acc);
        if (a->gated) {
            const int64_t up = tile + tiles; /* the up tile paired with this gate tile */
            __m256 upper[AVX2_ROWS];
            half_product(kb, q, d_x, s_x, a->k, a->u + up * kb * 8 * LANES * 4,
                         a->d_w + up * kb * LANES, a->m_w + up * kb * LANES, h, a->type, upper);
            for (int r = 0; r < rows; r++) {
                float gate[8], value[8];
                _mm256_storeu_ps(gate, acc[r]);
                _mm256_storeu_ps(value, upper[r]);
                if (a->y_kind == KIND_F32) {
                    float *dst = (float *)a->y + (t + r) * a->y_stride + at;
                    for (int i = 0; i < 8; i++) dst[i] = silu(gate[i]) * value[i];
                } else {
                    uint16_t *dst = (uint16_t *)a->y + (t + r) * a->y_stride + at;
                    for (int i = 0; i < 8; i++)
                        dst[i] = silu_mul_bf16(round_bf16(gate[i]), round_bf16(value[i]));
                }
            }
        } else {
            for (int r = 0; r < rows; r++)
                store8(a->y, (t + r) * a->y_stride + at, acc[r], a->y_kind);
        }
    }
}
#endif

#ifdef HAVE_VNNI
/* The VNNI kernel's share of int8_tiles (bf16 in and out). */
static void vnni_tiles(const Int8LinearArgs *a, int64_t begin, int64_t end) {
    const int64_t k = a->k, kb = k / BLOCK, m = a->m;
    const int64_t tiles = a->gated ? a->n / 2 / LANES : a->n / LANES;
    /* the up tile paired with gate tile t is tile t + tiles: this many bytes and floats on */
    const int64_t up = tiles * kb * 8 * LANES * 4, up_scales = tiles * kb * LANES;
    uint16_t *y = (uint16_t *)a->y;
    for (int64_t item = begin; item < end; item++) {
        const int64_t c = item / tiles, tile = item % tiles;
        const int64_t stop = (c + 1) * ROW_CHUNK < m ? (c + 1) * ROW_CHUNK : m;
        const uint8_t *ut = a->u + tile * kb * 8 * LANES * 4;
        const float *dt = a->d_w + tile * kb * LANES, *mt = a->m_w + tile * kb * LANES;
        for (int64_t t = c * ROW_CHUNK; t < stop; t += ROWS) {
            const int rows = stop - t < ROWS ? (int)(stop - t) : ROWS;
            uint16_t *yt = y + t * a->y_stride + tile * LANES;
            const int8_t *q = a->q + t * k;
            const float *d_x = a->d_x + t * kb, *s_x = a->s_x + t * kb;
            if (a->gated)
                micro_tile_gated(rows, kb, q, d_x, s_x, k, ut, dt, mt, up, up_scales, yt,
                                 a->y_stride);
            else
                micro_tile(rows, kb, q, d_x, s_x, k, ut, dt, mt, yt, a->y_stride);
        }
    }
}
#endif

/* Tokens [begin, end) of x into int8 rows q, their scales d_x and d_x * sum q. */
void KERNEL(int8_quantize)(const Int8LinearArgs *a, int64_t begin, int64_t end) {
    const int64_t k = a->k, kb = k / BLOCK;
#ifdef HAVE_VNNI
    if (a->x_kind == KIND_BF16) {
        for (int64_t t = begin; t < end; t++)
            quantize_row((const uint16_t *)a->x + t * a->x_stride, k, a->q + t * k,
                         a->d_x + t * kb, a->s_x + t * kb);
        return;
    }
#endif
#ifdef HAVE_AVX2
    const size_t size = a->x_kind == KIND_F32 ? sizeof(float) : sizeof(uint16_t);
    for (int64_t t = begin; t < end; t++)
        quantize_row8((const char *)a->x + (size_t)(t * a->x_stride) * size, a->x_kind, k,
                      a->q + t * k, a->d_x + t * kb, a->s_x + t * kb);
#else
    (void)a, (void)begin, (void)end, (void)k, (void)kb;
#endif
}

/* y [m][n] = the quantized x times W, for work items [begin, end) (see kernel_api.h); the
 * scratch's 8 rows past m are zeros, which the last micro-tile of a chunk reads.
 *
 * `gated`: W holds a gated MLP's gate rows, then as many up rows (a fused projection), and
 * y [m][n / 2] is silu(gate) * up, rounded as the SiLU pass rounds the two halves of the
 * plain product (bf16: each to bf16 first); the [m][n] product is never written. */
void KERNEL(int8_tiles)(const Int8LinearArgs *a, int64_t begin, int64_t end) {
#ifdef HAVE_VNNI
    if (a->x_kind == KIND_BF16 && a->y_kind == KIND_BF16) {
        vnni_tiles(a, begin, end);
        return;
    }
#endif
#ifdef HAVE_AVX2
    const int64_t tiles = a->gated ? a->n / 2 / LANES : a->n / LANES;
    for (int64_t item = begin; item < end; item++) {
        const int64_t c = item / tiles, tile = item % tiles;
        const int64_t stop = (c + 1) * ROW_CHUNK < a->m ? (c + 1) * ROW_CHUNK : a->m;
        for (int64_t t = c * ROW_CHUNK; t < stop; t += AVX2_ROWS) {
            const int rows = stop - t < AVX2_ROWS ? (int)(stop - t) : AVX2_ROWS;
            micro_tile_avx2(a, t, rows, tile, tiles);
        }
    }
#else
    (void)a, (void)begin, (void)end;
#endif
}
