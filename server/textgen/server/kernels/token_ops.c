/* Per-token operations of a decoder layer and the sampler, each in one call.
 *
 * At a few tokens per step, RMSNorm and the rotary embedding cost more in torch's
 * per-op dispatch (8 to 12 small ops each, about 20 and 40 us per layer) than in
 * arithmetic; at a prefill's thousands of tokens, torch's passes over memory (five for
 * RMSNorm, three for SiLU-and-multiply) cost more than one. These loops do the same work
 * in one pass, in float32, rounding to bf16 where the torch path rounds, spread over
 * `threads` OpenMP threads when a step has enough tokens to pay for the team.
 * `textgen_row_stats` gives the sampler each row's argmax and log-sum-exp in two passes
 * over the logits, where log_softmax and argmax took four (5.3 ms at 64 rows of 49152).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "vector_math.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

/* Below this many tokens a step runs on the calling thread: waking the team costs more. */
#define PARALLEL_MIN_TOKENS 32

/* out[t] = weight * bf16(x[t] / sqrt(mean(x[t]^2) + eps)), as transformers' LlamaRMSNorm:
 * the variance in float32, the normalised row rounded to bf16, then the weight applied.
 * With a `residual` ([tokens, hidden] contiguous), x[t] is first replaced by the bf16 sum
 * x[t] + residual[t], written to `sum` (as torch's bf16 add rounds it): a decoder layer's
 * residual connection and the next norm in one pass. */
int textgen_rms_norm(const uint16_t *x, int64_t x_stride, const uint16_t *residual,
                     uint16_t *sum, const uint16_t *weight, uint16_t *out, int64_t tokens,
                     int64_t hidden, float eps, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (tokens >= PARALLEL_MIN_TOKENS)
    for (int64_t t = 0; t < tokens; t++) {
        const uint16_t *row = x + t * x_stride;
        if (residual != NULL) {
            uint16_t *added = sum + t * hidden;
            const uint16_t *r = residual + t * hidden;
            for (int64_t i = 0; i < hidden; i++)
                added[i] = float_to_bf16(bf16_to_float(row[i]) + bf16_to_float(r[i]));
            row = added;
        }
        float sum = 0.0f;
        for (int64_t i = 0; i < hidden; i++) {
            const float v = bf16_to_float(row[i]);
            sum += v * v;
        }
        const float scale = 1.0f / sqrtf(sum / (float)hidden + eps);
        uint16_t *dst = out + t * hidden;
        for (int64_t i = 0; i < hidden; i++) {
            const float normed = round_bf16(bf16_to_float(row[i]) * scale);
            dst[i] = float_to_bf16(bf16_to_float(weight[i]) * normed);
        }
    }
    return 0;
}

/* Rotate heads in place, Llama's "rotate half" layout: for i < D/2,
 *   x[i]       = x[i] cos[i]       - x[i + D/2] sin[i]
 *   x[i + D/2] = x[i + D/2] cos[i + D/2] + x[i] sin[i + D/2]
 * x is [T, heads, D] with rows `token_stride` elements apart and heads D apart; cos and
 * sin are float32 [positions, D] tables. */
static void rotate(uint16_t *x, int64_t token_stride, int64_t tokens, int64_t heads, int64_t dim,
                   const int64_t *positions, const float *cos, const float *sin, int threads) {
    const int64_t half = dim / 2;
#pragma omp parallel for schedule(static) num_threads(threads) if (tokens >= PARALLEL_MIN_TOKENS)
    for (int64_t t = 0; t < tokens; t++) {
        const float *c = cos + positions[t] * dim;
        const float *s = sin + positions[t] * dim;
        for (int64_t h = 0; h < heads; h++) {
            uint16_t *v = x + t * token_stride + h * dim;
            for (int64_t i = 0; i < half; i++) {
                const float a = bf16_to_float(v[i]), b = bf16_to_float(v[i + half]);
                v[i] = float_to_bf16(a * c[i] - b * s[i]);
                v[i + half] = float_to_bf16(b * c[i + half] + a * s[i + half]);
            }
        }
    }
}

/* Returns -1, having rotated nothing, if a position is outside the [num_positions, D]
 * tables. */
int textgen_rotary(uint16_t *q, int64_t q_stride, int64_t q_heads, uint16_t *k, int64_t k_stride,
                   int64_t k_heads, int64_t tokens, int64_t dim, const int64_t *positions,
                   const float *cos, const float *sin, int64_t num_positions, int threads) {
    for (int64_t t = 0; t < tokens; t++)
        if (positions[t] < 0 || positions[t] >= num_positions) return -1;
    rotate(q, q_stride, tokens, q_heads, dim, positions, cos, sin, threads);
    rotate(k, k_stride, tokens, k_heads, dim, positions, cos, sin, threads);
    return 0;
}

/* out[t] = bf16(silu(gate[t])) * up[t], rounded as torch rounds `silu(gate) * up` in bf16.
 * Each row of x holds gate then up, `inter` elements each, one fused projection's output;
 * out is [T, inter]. */
int textgen_silu_and_mul(const uint16_t *x, int64_t x_stride, uint16_t *out, int64_t tokens,
                         int64_t inter, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (tokens >= PARALLEL_MIN_TOKENS)
    for (int64_t t = 0; t < tokens; t++) {
        const uint16_t *gate = x + t * x_stride;
        const uint16_t *up = gate + inter;
        uint16_t *dst = out + t * inter;
        for (int64_t i = 0; i < inter; i++)
            dst[i] = silu_mul_bf16(bf16_to_float(gate[i]), bf16_to_float(up[i]));
    }
    return 0;
}

static float row_max(const float *row, int64_t cols) {
    float top = -INFINITY;
    int64_t i = 0;
#ifdef __AVX512F__
    /* NOTE: written out: the compiler does not vectorize a max that must respect NaN. */
    __m512 tops = _mm512_set1_ps(-INFINITY);
    for (; i + 16 <= cols; i += 16) tops = _mm512_max_ps(tops, _mm512_loadu_ps(row + i));
    top = _mm512_reduce_max_ps(tops);
#endif
    for (; i < cols; i++) top = row[i] > top ? row[i] : top;
    return top;
}

/* For each of `rows` float32 rows of `cols` logits: the index of its first maximum and
 * log(sum(exp(row))), computed as max + log(sum(exp(row - max))). A row of -inf only
 * gives -inf. Rows are spread over `threads` OpenMP threads. */
int textgen_row_stats(const float *logits, int64_t rows, int64_t cols, int64_t *argmax,
                      float *lse, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const float *row = logits + r * cols;
        const float top = row_max(row, cols);
        int64_t at = 0;
        while (at < cols - 1 && row[at] != top) at++; /* its first occurrence */
        float sum = 0.0f;
        if (top != -INFINITY)
            for (int64_t i = 0; i < cols; i++) sum += exp_nonpositive(row[i] - top);
        argmax[r] = at;
        lse[r] = top == -INFINITY ? -INFINITY : top + logf(sum);
    }
    return 0;
}
