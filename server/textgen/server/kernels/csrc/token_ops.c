/* Per-token operations of a decoder layer and the sampler, each in one call.
 *
 * At a few tokens per step, RMSNorm and the rotary embedding cost more in torch's
 * per-op dispatch (8 to 12 small ops each, about 20 and 40 us per layer) than in
 * arithmetic; at a prefill's thousands of tokens, torch's passes over memory (five for
 * RMSNorm, three for SiLU-and-multiply) cost more than one. These loops do the same work
 * in one pass, in float32, rounding to bf16 where the torch path rounds (a float32 model's
 * rows stay float32 throughout). ops.cpp spreads the tokens over torch's threads when a
 * step has enough of them to pay for waking the team. `row_stats` gives the sampler each
 * row's argmax and log-sum-exp in two passes over the logits, where log_softmax and
 * argmax took four (5.3 ms at 64 rows of 49152).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernel_api.h"
#include "vector_math.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

/* out[t] = weight * round(x[t] / sqrt(mean(x[t]^2) + eps)), as transformers' LlamaRMSNorm:
 * the variance in float32, the normalised row rounded to the row's precision, then the
 * weight applied. With a `residual` ([tokens, hidden] contiguous), x[t] is first replaced
 * by the sum x[t] + residual[t], rounded as torch's add rounds it and written to `sum`: a
 * decoder layer's residual connection and the next norm in one pass. */
static void rms_norm_f32(const RmsNormArgs *a, int64_t t) {
    const int64_t hidden = a->hidden;
    const float *row = (const float *)a->x + t * a->x_stride;
    if (a->residual != NULL) {
        float *added = (float *)a->sum + t * hidden;
        const float *r = (const float *)a->residual + t * hidden;
        for (int64_t i = 0; i < hidden; i++) added[i] = row[i] + r[i];
        row = added;
    }
    float sum = 0.0f;
    for (int64_t i = 0; i < hidden; i++) sum += row[i] * row[i];
    const float scale = 1.0f / sqrtf(sum / (float)hidden + a->eps);
    const float *weight = (const float *)a->weight;
    float *dst = (float *)a->out + t * hidden;
    for (int64_t i = 0; i < hidden; i++) {
        const float normed = row[i] * scale;
        dst[i] = weight[i] * normed;
    }
}

static void rms_norm_bf16(const RmsNormArgs *a, int64_t t) {
    const int64_t hidden = a->hidden;
    const uint16_t *row = (const uint16_t *)a->x + t * a->x_stride;
    if (a->residual != NULL) {
        uint16_t *added = (uint16_t *)a->sum + t * hidden;
        const uint16_t *r = (const uint16_t *)a->residual + t * hidden;
        for (int64_t i = 0; i < hidden; i++)
            added[i] = float_to_bf16(bf16_to_float(row[i]) + bf16_to_float(r[i]));
        row = added;
    }
    float sum = 0.0f;
    for (int64_t i = 0; i < hidden; i++) {
        const float v = bf16_to_float(row[i]);
        sum += v * v;
    }
    const float scale = 1.0f / sqrtf(sum / (float)hidden + a->eps);
    const uint16_t *weight = (const uint16_t *)a->weight;
    uint16_t *dst = (uint16_t *)a->out + t * hidden;
    for (int64_t i = 0; i < hidden; i++) {
        const float normed = round_bf16(bf16_to_float(row[i]) * scale);
        dst[i] = float_to_bf16(bf16_to_float(weight[i]) * normed);
    }
}

void KERNEL(rms_norm)(const RmsNormArgs *a, int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; t++) {
        if (a->kind == KIND_F32) rms_norm_f32(a, t);
        else rms_norm_bf16(a, t);
    }
}

/* Rotate heads in place, Llama's "rotate half" layout: for i < D/2,
 *   x[i]       = x[i] cos[i]       - x[i + D/2] sin[i]
 *   x[i + D/2] = x[i + D/2] cos[i + D/2] + x[i] sin[i + D/2]
 * x is [T, heads, D] with rows `token_stride` elements apart and heads D apart; cos and
 * sin are float32 [positions, D] tables. */
static void rotate(void *x, int64_t token_stride, int64_t t, int64_t heads, int64_t dim,
                   const float *c, const float *s, int kind) {
    const int64_t half = dim / 2;
    for (int64_t h = 0; h < heads; h++) {
        if (kind == KIND_F32) {
            float *v = (float *)x + t * token_stride + h * dim;
            for (int64_t i = 0; i < half; i++) {
                const float a = v[i], b = v[i + half];
                v[i] = a * c[i] - b * s[i];
                v[i + half] = b * c[i + half] + a * s[i + half];
            }
        } else {
            uint16_t *v = (uint16_t *)x + t * token_stride + h * dim;
            for (int64_t i = 0; i < half; i++) {
                const float a = bf16_to_float(v[i]), b = bf16_to_float(v[i + half]);
                v[i] = float_to_bf16(a * c[i] - b * s[i]);
                v[i + half] = float_to_bf16(b * c[i + half] + a * s[i + half]);
            }
        }
    }
}

void KERNEL(rotary)(const RotaryArgs *a, int64_t begin, int64_t end) {
    const int64_t dim = a->head_dim;
    for (int64_t t = begin; t < end; t++) {
        const float *c = a->cos + a->positions[t] * dim;
        const float *s = a->sin + a->positions[t] * dim;
        rotate(a->q, a->q_stride, t, a->q_heads, dim, c, s, a->kind);
        rotate(a->k, a->k_stride, t, a->k_heads, dim, c, s, a->kind);
    }
}

/* out[t] = silu(gate[t]) * up[t], rounded as torch rounds `silu(gate) * up`. Each row of
 * x holds gate then up, `inter` elements each, one fused projection's output; out is
 * [T, inter]. */
void KERNEL(silu_mul)(const SiluMulArgs *a, int64_t begin, int64_t end) {
    const int64_t inter = a->inter;
    for (int64_t t = begin; t < end; t++) {
        if (a->kind == KIND_F32) {
            const float *gate = (const float *)a->x + t * a->x_stride;
            const float *up = gate + inter;
            float *dst = (float *)a->out + t * inter;
            for (int64_t i = 0; i < inter; i++) dst[i] = silu(gate[i]) * up[i];
        } else {
            const uint16_t *gate = (const uint16_t *)a->x + t * a->x_stride;
            const uint16_t *up = gate + inter;
            uint16_t *dst = (uint16_t *)a->out + t * inter;
            for (int64_t i = 0; i < inter; i++)
                dst[i] = silu_mul_bf16(bf16_to_float(gate[i]), bf16_to_float(up[i]));
        }
    }
}

static float row_max(const float *row, int64_t cols) {
    float top = -INFINITY;
    int64_t i = 0;
    /* NOTE: written out: the compiler does not vectorize a max that must respect NaN. */
#if defined(__AVX512F__)
    __m512 tops = _mm512_set1_ps(-INFINITY);
    for (; i + 16 <= cols; i += 16) tops = _mm512_max_ps(tops, _mm512_loadu_ps(row + i));
    top = _mm512_reduce_max_ps(tops);
#elif defined(__AVX2__)
    __m256 tops = _mm256_set1_ps(-INFINITY);
    for (; i + 8 <= cols; i += 8) tops = _mm256_max_ps(tops, _mm256_loadu_ps(row + i));
    float lanes[8];
    _mm256_storeu_ps(lanes, tops);
    for (int j = 0; j < 8; j++) top = lanes[j] > top ? lanes[j] : top;
#endif
    for (; i < cols; i++) top = row[i] > top ? row[i] : top;
    return top;
}

/* For each float32 row of `cols` logits: the index of its first maximum and
 * log(sum(exp(row))), computed as max + log(sum(exp(row - max))). A row of -inf only
 * gives -inf. */
void KERNEL(row_stats)(const RowStatsArgs *a, int64_t begin, int64_t end) {
    const int64_t cols = a->cols;
    for (int64_t r = begin; r < end; r++) {
        const float *row = a->logits + r * cols;
        const float top = row_max(row, cols);
        int64_t at = 0;
        while (at < cols - 1 && row[at] != top) at++; /* its first occurrence */
        float sum = 0.0f;
        if (top != -INFINITY)
            for (int64_t i = 0; i < cols; i++) sum += exp_nonpositive(row[i] - top);
        a->argmax[r] = at;
        a->lse[r] = top == -INFINITY ? -INFINITY : top + logf(sum);
    }
}
