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
 * Packed weight layout (`textgen_int8_pack`), for 16 output features n at a time:
 *   u:   [N / 16][K / 32][8][16][4] bytes: 4 consecutive k of 16 features, a vector each
 *   d_w, m_w: [N / 16][K / 32][16] float32
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gguf_blocks.h"
#include "vector_math.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define HAVE_VNNI 1
#endif

#define LANES 16 /* output features per vector */
#define ROWS 8   /* tokens per micro-tile */
#define ROW_CHUNK 128

/* 1 when this build has the VNNI kernel (the pack is of no use otherwise). */
int textgen_int8_available(void) {
#ifdef HAVE_VNNI
    return 1;
#else
    return 0;
#endif
}

/* GGUF blocks [n][k / 32 blocks] of `type` into the layout above. Returns 0, or -1 for an
 * unknown type or shapes that are not multiples of 16 (n) and 32 (k). */
int textgen_int8_pack(const uint8_t *blocks, int type, int64_t n, int64_t k, uint8_t *u,
                      float *d_w, float *m_w) {
    const int64_t stride = block_bytes(type);
    if (stride == 0 || n % LANES || k % BLOCK) return -1;
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
    return 0;
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

/* y [m][n] bf16 (row stride y_stride) = x [m][k] bf16 (row stride x_stride) W^T with W
 * packed by `textgen_int8_pack`, on `threads` threads. `scratch` holds (m + 8) * (k + 8 * k / 32)
 * bytes: the quantized rows and 8 rows of padding for the last micro-tile.
 *
 * `gated`: W holds a gated MLP's gate rows, then as many up rows (a fused projection), and
 * y [m][n / 2] is bf16(silu(gate)) * up, rounded as the SiLU pass rounds the two halves
 * of the plain product; the [m][n] product is never written.
 *
 * Returns 0, or -1 where this build has no VNNI kernel or the shapes do not fit it. */
int textgen_int8_linear(const uint16_t *x, int64_t x_stride, const uint8_t *u, const float *d_w,
                        const float *m_w, uint16_t *y, int64_t y_stride, int64_t m, int64_t n,
                        int64_t k, int gated, void *scratch, int threads) {
#ifdef HAVE_VNNI
    if (n % (gated ? 2 * LANES : LANES) || k % BLOCK || m <= 0) return -1;
    const int64_t kb = k / BLOCK, tiles = gated ? n / 2 / LANES : n / LANES;
    /* the up tile paired with gate tile t is tile t + tiles: this many bytes and floats on */
    const int64_t up = tiles * kb * 8 * LANES * 4, up_scales = tiles * kb * LANES;
    int8_t *q = (int8_t *)scratch;
    const int64_t padded = m + ROWS;
    float *d_x = (float *)(q + padded * k), *s_x = d_x + padded * kb;
    /* zero padding: the dropped rows compute on zeros, never on stale floats */
    memset(q + m * k, 0, ROWS * k);
    memset(d_x + m * kb, 0, ROWS * kb * sizeof(float));
    memset(s_x + m * kb, 0, ROWS * kb * sizeof(float));
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < m; t++)
            quantize_row(x + t * x_stride, k, q + t * k, d_x + t * kb, s_x + t * kb);
        /* implicit barrier: every row is quantized before any product reads it */
        const int64_t chunks = (m + ROW_CHUNK - 1) / ROW_CHUNK;
        /* dynamic: the router shares the cores, and a thread it preempts no longer
         * holds back a fixed half of the tiles (same rate as static when alone) */
#pragma omp for collapse(2) schedule(dynamic)
        for (int64_t c = 0; c < chunks; c++)
            for (int64_t tile = 0; tile < tiles; tile++) {
                const int64_t end = (c + 1) * ROW_CHUNK < m ? (c + 1) * ROW_CHUNK : m;
                const uint8_t *ut = u + tile * kb * 8 * LANES * 4;
                const float *dt = d_w + tile * kb * LANES, *mt = m_w + tile * kb * LANES;
                for (int64_t t = c * ROW_CHUNK; t < end; t += ROWS) {
                    const int rows = end - t < ROWS ? (int)(end - t) : ROWS;
                    uint16_t *yt = y + t * y_stride + tile * LANES;
                    if (gated)
                        micro_tile_gated(rows, kb, q + t * k, d_x + t * kb, s_x + t * kb, k, ut,
                                         dt, mt, up, up_scales, yt, y_stride);
                    else
                        micro_tile(rows, kb, q + t * k, d_x + t * kb, s_x + t * kb, k, ut, dt,
                                   mt, yt, y_stride);
                }
            }
    }
    return 0;
#else
    (void)x, (void)x_stride, (void)u, (void)d_w, (void)m_w, (void)y, (void)y_stride;
    (void)m, (void)n, (void)k, (void)gated, (void)scratch, (void)threads;
    return -1;
#endif
}
