/* Float helpers shared by the kernels (included, so each library inlines them): bf16
 * conversions and a vectorizable exp. */
#ifndef TEXTGEN_VECTOR_MATH_H
#define TEXTGEN_VECTOR_MATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

/* Rounded to nearest even, as torch rounds; NaN stays NaN. */
static inline uint16_t float_to_bf16(float v) {
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

#ifdef __AVX512F__
#include <immintrin.h>

/* 16 bf16 at `src` widened to float32. */
static inline __m512 load16_bf16(const uint16_t *src) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)src));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

/* 16 floats to bf16 at `dst`, each as float_to_bf16 rounds it. (vcvtneps2bf16 would
 * flush denormals to zero, where torch keeps them.) */
static inline void store16_bf16(uint16_t *dst, __m512 x) {
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    const __m512i quiet = _mm512_or_si512(bits, _mm512_set1_epi32(0x400000));
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    const __m512i out = _mm512_mask_blend_epi32(nan, rounded, quiet);
    _mm256_storeu_si256((__m256i *)dst, _mm512_cvtepi32_epi16(_mm512_srli_epi32(out, 16)));
}
#endif

/* r - n c in one rounding where the CPU has FMA. NOTE: the kernels are built with
 * -fassociative-math, which may fold the two steps of exp's range reduction into one
 * product by a rounded ln 2 (17 ulps off at x = -18); an FMA is never reassociated. */
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
#define REDUCE(r, n, c) __builtin_fmaf(-(n), (c), (r))
#else
#define REDUCE(r, n, c) ((r) - (n) * (c))
#endif

/* exp(x) for x <= 0 (softmax after the max is taken), written so loops over it vectorize:
 * Cody-Waite range reduction and a degree-6 polynomial (about 1 ulp), 0 below -87. */
static inline float exp_nonpositive(float x) {
    const float clamped = x < -87.0f ? -87.0f : x;
    const float n = floorf(clamped * 1.44269504088896341f + 0.5f);
    float r = REDUCE(clamped, n, 0.693359375f);
    r = REDUCE(r, n, -2.12194440e-4f);
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < -87.0f ? 0.0f : p * scale;
}

static inline float round_bf16(float v) { return bf16_to_float(float_to_bf16(v)); }

/* silu(g) = g / (1 + exp(-g)) in float32, through exp(-|g|) so that the exp only sees
 * arguments <= 0. */
static inline float silu(float g) {
    const float e = exp_nonpositive(-fabsf(g));
    return g >= 0.0f ? g / (1.0f + e) : g * e / (1.0f + e);
}

/* bf16(bf16(silu(gate)) * up) for bf16 `gate` and `up`, as torch rounds `silu(gate) * up`
 * in bf16. Shared by the SiLU pass and the int8 product's gated output, which must agree
 * to the bit. */
static inline uint16_t silu_mul_bf16(float gate, float up) {
    return float_to_bf16(round_bf16(silu(gate)) * up);
}

#endif
