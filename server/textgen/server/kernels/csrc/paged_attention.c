/*
 * Decode attention straight over the paged KV cache: one query token per sequence.
 *
 * The torch path gathers every sequence's context out of the cache into a fresh
 * [B, L, Hkv, D] tensor before two matmuls; at batch 64 that copy costs more than
 * the layer's projections. Here each (sequence, KV head) pair walks its block table
 * and reads keys and values where they lie, once, in float32:
 *
 *     scores[g][t] = scale * q[g] . k[t]          for the G query heads of the group
 *     out[g]       = sum_t softmax(scores[g])[t] * v[t]
 *
 * Layouts (element strides, so any dense layout of the cache works):
 *     q             [B, Hq, D], rows `q_stride` elements apart, heads contiguous
 *     out           [B, Hq, D] contiguous; query head h*G + g reads KV head h
 *     key, value    [num_blocks, block_size, Hkv, D] with the given block/token/head strides
 *     block_tables  [B, table_stride] int64; context_lens [B] int64
 *
 * Element types of q and out (`kind`) and of the cache (`cache_kind`): 0 = float32,
 * 1 = bfloat16 (rounded to nearest even on the way out, as torch does), and for the cache
 * only 2 = int8, each row of head_dim values stored with one float32 scale (see
 * `kv_store_int8`):
 *     key_scale, value_scale  [num_blocks, Hkv, block_size] float32, contiguous
 * so that a block's scales of one head lie side by side. An int8 cache is read as its
 * dequantized values, int8 * scale, in float32. The arguments are a PagedDecodeArgs
 * (kernel_api.h), checked by ops.cpp; each call computes one sequence in float32 working
 * space `scratch` of paged_decode_scratch(...) floats.
 *
 * With AVX-512, bf16 caches whose head_dim is a multiple of 64 and which have at most 4
 * query heads per KV head take `decode_sequence_bf16`, which walks the block table block
 * by block, prefetching ahead, and keeps query chunks and output rows in vector
 * registers. Where the CPU has AVX512_BF16 its products are vdpbf16ps: q . k exact
 * products summed in float32 as before, and the probabilities rounded to bf16 for the
 * weighted sum of values (the rounding a bf16 attention matmul makes), summed in
 * float32. int8 caches of the same shapes take `decode_sequence_int8` (with AVX512BW):
 * exact products of 8-bit keys and values with 16-bit queries and probabilities, summed
 * in int32. Other shapes take the portable `decode_sequence`.
 */

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernel_api.h"
#include "vector_math.h"

#if defined(__SSE__)
#include <xmmintrin.h>
/* Flush-to-zero and denormals-are-zero: the tail of a peaked softmax is full of
 * denormal probabilities, and each one costs a microcode assist. */
#define DENORMALS_OFF(saved) \
    unsigned int saved = _mm_getcsr(); \
    _mm_setcsr(saved | 0x8040u)
#define DENORMALS_RESTORE(saved) _mm_setcsr(saved)
#else
#define DENORMALS_OFF(saved) (void)0
#define DENORMALS_RESTORE(saved) (void)0
#endif

/* Row `src` of `n` elements of the given kind, widened into `dst`; an int8 row times
 * its `scale`. */
static inline void load_row(float *dst, const void *src, int64_t offset, int n, int kind,
                            float scale) {
    if (kind == 0) {
        memcpy(dst, (const float *)src + offset, (size_t)n * sizeof(float));
    } else if (kind == 1) {
        const uint16_t *row = (const uint16_t *)src + offset;
        for (int d = 0; d < n; d++) dst[d] = bf16_to_float(row[d]);
    } else {
        const int8_t *row = (const int8_t *)src + offset;
        for (int d = 0; d < n; d++) dst[d] = (float)row[d] * scale;
    }
}

/* The scales of an int8 cache, [num_blocks, Hkv, block_size]: where token `t` of KV head
 * `h` finds its scale. */
static inline float row_scale(const float *scales, const int64_t *table, int64_t t, int64_t h,
                              int64_t block_size, int64_t num_kv_heads) {
    if (scales == NULL) return 1.0f;
    return scales[(table[t / block_size] * num_kv_heads + h) * block_size + t % block_size];
}

/* Built with -fassociative-math, so this reduction vectorizes (a tree of vector adds). */
static inline float dot(const float *a, const float *b, int n) {
    float sum = 0.0f;
    for (int d = 0; d < n; d++) sum += a[d] * b[d];
    return sum;
}

/* Where token `t`'s row of KV head 0 starts: tokens lie block by block per the table. */
static inline int64_t token_offset(const int64_t *table, int64_t t, int64_t block_size,
                                   int64_t block_stride, int64_t token_stride) {
    return table[t / block_size] * block_stride + (t % block_size) * token_stride;
}

/* One sequence (`q` and `out` at its rows): all its query heads over its whole context.
 * `scratch` holds Hq * (2 * D + context) floats. */
static void decode_sequence(
    const void *q, const void *key, const void *value, void *out, const int64_t *table,
    int64_t context, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
    int64_t block_size, int64_t block_stride, int64_t token_stride, int64_t head_stride,
    float scale, int kind, int cache_kind, const float *key_scale, const float *value_scale,
    float *scratch) {
    const int64_t group = num_heads / num_kv_heads;
    float row[MAX_HEAD_DIM];
    float *query = scratch;                        /* [Hq, D] */
    float *acc = query + num_heads * head_dim;     /* [Hq, D] */
    float *scores = acc + num_heads * head_dim;    /* [Hq, context] */
    for (int64_t head = 0; head < num_heads; head++) {
        float *qrow = query + head * head_dim;
        load_row(qrow, q, head * head_dim, head_dim, kind, 1.0f);
        for (int64_t d = 0; d < head_dim; d++) qrow[d] *= scale;
    }
    /* Pass 1: scores. Token by token, all KV heads of a token at once: the cache is
     * then read in address order, which is what keeps this memory-bound loop fed. */
    for (int64_t t = 0; t < context; t++) {
        const int64_t at = token_offset(table, t, block_size, block_stride, token_stride);
        for (int64_t h = 0; h < num_kv_heads; h++) {
            load_row(row, key, at + h * head_stride, head_dim, cache_kind,
                     row_scale(key_scale, table, t, h, block_size, num_kv_heads));
            for (int64_t g = 0; g < group; g++) {
                const int64_t head = h * group + g;
                scores[head * context + t] = dot(query + head * head_dim, row, head_dim);
            }
        }
    }
    /* Pass 2: probabilities, per query head. */
    for (int64_t head = 0; head < num_heads; head++) {
        float *s = scores + head * context;
        float top = -INFINITY;
        for (int64_t t = 0; t < context; t++) top = s[t] > top ? s[t] : top;
        float sum = 0.0f;
        for (int64_t t = 0; t < context; t++) s[t] = exp_nonpositive(s[t] - top);
        for (int64_t t = 0; t < context; t++) sum += s[t];
        const float inv = 1.0f / sum;
        for (int64_t t = 0; t < context; t++) s[t] *= inv;
    }
    /* Pass 3: the probability-weighted sum of values, again in address order. */
    memset(acc, 0, (size_t)(num_heads * head_dim) * sizeof(float));
    for (int64_t t = 0; t < context; t++) {
        const int64_t at = token_offset(table, t, block_size, block_stride, token_stride);
        for (int64_t h = 0; h < num_kv_heads; h++) {
            load_row(row, value, at + h * head_stride, head_dim, cache_kind,
                     row_scale(value_scale, table, t, h, block_size, num_kv_heads));
            for (int64_t g = 0; g < group; g++) {
                const int64_t head = h * group + g;
                const float p = scores[head * context + t];
                float *a = acc + head * head_dim;
                for (int64_t d = 0; d < head_dim; d++) a[d] += p * row[d];
            }
        }
    }
    for (int64_t i = 0; i < num_heads * head_dim; i++) {
        if (kind == 0) ((float *)out)[i] = acc[i];
        else ((uint16_t *)out)[i] = float_to_bf16(acc[i]);
    }
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_AVX2 1

/* 8 elements of a row of `kind` as floats (int8 as they are, without their scale). */
static inline __m256 load8_kind(const void *row, int64_t i, int kind) {
    if (kind == 0) return _mm256_loadu_ps((const float *)row + i);
    if (kind == 1) {
        const __m128i half = _mm_loadu_si128((const __m128i *)((const uint16_t *)row + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
    }
    const __m128i bytes = _mm_loadl_epi64((const __m128i *)((const int8_t *)row + i));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
}

/* The sums of v[0], ..., v[7], in that order: a transposing tree of horizontal adds. */
static inline __m256 sum8x8(const __m256 v[8]) {
    const __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    const __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
}

/* Blocks ahead whose keys and values are prefetched to L2. */
#define AVX2_PREFETCH_BLOCKS 2

/* Scores of tokens [0, n) (n <= 8) of a block against one query row `qrow`: keys at `key`
 * + at, rows `token_stride` apart, each sum times its token's key scale. */
static inline __attribute__((always_inline)) void scores8(
    const float *qrow, const void *key, int64_t at, int64_t token_stride, int64_t chunks, int n,
    const float *token_scales, const int cache_kind, float *out) {
    __m256 part[8];
    for (int i = 0; i < 8; i++) part[i] = _mm256_setzero_ps();
    if (n == 8) { /* a constant count: the eight chains stay in registers */
        for (int64_t c = 0; c < chunks; c++) {
            const __m256 qv = _mm256_loadu_ps(qrow + 8 * c);
            for (int i = 0; i < 8; i++)
                part[i] = _mm256_fmadd_ps(
                    qv, load8_kind(key, at + i * token_stride + 8 * c, cache_kind), part[i]);
        }
    } else {
        for (int i = 0; i < n; i++)
            for (int64_t c = 0; c < chunks; c++)
                part[i] = _mm256_fmadd_ps(_mm256_loadu_ps(qrow + 8 * c),
                                          load8_kind(key, at + i * token_stride + 8 * c, cache_kind),
                                          part[i]);
    }
    float sums[8];
    _mm256_storeu_ps(sums, _mm256_mul_ps(sum8x8(part), _mm256_loadu_ps(token_scales)));
    memcpy(out, sums, (size_t)n * sizeof(float));
}

/* `width` chunks of 8 dimensions of one query head's output row, `acc` (float32 in
 * memory): acc = acc * correction + sum over tokens [0, n) of weight[t] * value row t, the
 * rows at `value` + at, `token_stride` apart. */
static inline __attribute__((always_inline)) void accumulate_values(
    float *acc, float correction, const float *weight, const void *value, int64_t at,
    int64_t token_stride, int64_t n, const int cache_kind, const int width) {
    __m256 sum[8];
    const __m256 scale = _mm256_set1_ps(correction);
    for (int c = 0; c < width; c++) sum[c] = _mm256_mul_ps(_mm256_loadu_ps(acc + 8 * c), scale);
    for (int64_t t = 0; t < n; t++) {
        const __m256 w = _mm256_set1_ps(weight[t]);
        for (int c = 0; c < width; c++)
            sum[c] = _mm256_fmadd_ps(w, load8_kind(value, at + t * token_stride + 8 * c, cache_kind),
                                     sum[c]);
    }
    for (int c = 0; c < width; c++) _mm256_storeu_ps(acc + 8 * c, sum[c]);
}

/* decode_sequence with 8-float vectors, for head_dim a multiple of 8 and any cache kind,
 * in one pass over the context (an online softmax): for each cache block, and each KV
 * head and query head of its group, the block's scores (8 tokens at a time, their partial
 * sums reduced together by sum8x8, an int8 cache's key scales applied), the running max
 * and sum of exponentials updated, and the output row rescaled and given the block's
 * values weighted by exp(score - max) (an int8 cache's value scales folded into the
 * weights). Each key and value is read once from memory, while its block is hot; blocks
 * ahead are prefetched. The row is divided by the sum at the end. */
static inline __attribute__((always_inline)) void decode_sequence_avx2(
    const void *q, const void *key, const void *value, void *out, const int64_t *table,
    int64_t context, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
    int64_t block_size, int64_t block_stride, int64_t token_stride, int64_t head_stride,
    float scale, int kind, const int cache_kind, const float *key_scale,
    const float *value_scale, float *scratch) {
    const int64_t group = num_heads / num_kv_heads;
    const int64_t num_blocks = (context + block_size - 1) / block_size;
    const int64_t chunks = head_dim / 8;
    float *query = scratch;                        /* [Hq, D], scaled */
    float *acc = query + num_heads * head_dim;     /* [Hq, D] */
    float *weights = acc + num_heads * head_dim;   /* [block_size] */
    float running_max[num_heads], running_sum[num_heads];
    for (int64_t head = 0; head < num_heads; head++) {
        float *qrow = query + head * head_dim;
        load_row(qrow, q, head * head_dim, (int)head_dim, kind, 1.0f);
        for (int64_t d = 0; d < head_dim; d++) qrow[d] *= scale;
        running_max[head] = -INFINITY;
        running_sum[head] = 0.0f;
    }
    memset(acc, 0, (size_t)(num_heads * head_dim) * sizeof(float));
    const int64_t element = cache_kind == 0 ? 4 : cache_kind == 1 ? 2 : 1;
    const int64_t block_bytes = block_size * token_stride * element;
    for (int64_t blk = 0; blk < num_blocks; blk++) {
        const int64_t first = blk * block_size;
        const int64_t n = context - first < block_size ? context - first : block_size;
        if (blk + AVX2_PREFETCH_BLOCKS < num_blocks && block_stride == block_size * token_stride) {
            const int64_t ahead = table[blk + AVX2_PREFETCH_BLOCKS] * block_stride * element;
            for (int64_t line = 0; line < block_bytes; line += 64) {
                _mm_prefetch((const char *)key + ahead + line, _MM_HINT_T1);
                _mm_prefetch((const char *)value + ahead + line, _MM_HINT_T1);
            }
        }
        for (int64_t h = 0; h < num_kv_heads; h++) {
            const int64_t base = table[blk] * block_stride + h * head_stride;
            const int64_t scales_at = (table[blk] * num_kv_heads + h) * block_size;
            for (int64_t g = 0; g < group; g++) {
                const int64_t head = h * group + g;
                for (int64_t t0 = 0; t0 < n; t0 += 8) {
                    const int count = n - t0 < 8 ? (int)(n - t0) : 8;
                    float token_scales[8] = {1, 1, 1, 1, 1, 1, 1, 1};
                    for (int i = 0; i < count && key_scale != NULL; i++)
                        token_scales[i] = key_scale[scales_at + t0 + i];
                    scores8(query + head * head_dim, key, base + t0 * token_stride, token_stride,
                            chunks, count, token_scales, cache_kind, weights + t0);
                }
                float top = running_max[head];
                for (int64_t t = 0; t < n; t++) top = weights[t] > top ? weights[t] : top;
                const float correction = exp_nonpositive(running_max[head] - top);
                float sum = 0.0f;
                for (int64_t t = 0; t < n; t++) weights[t] = exp_nonpositive(weights[t] - top);
                for (int64_t t = 0; t < n; t++) sum += weights[t];
                running_sum[head] = running_sum[head] * correction + sum;
                running_max[head] = top;
                if (value_scale != NULL)
                    for (int64_t t = 0; t < n; t++) weights[t] *= value_scale[scales_at + t];
                float *row = acc + head * head_dim;
                for (int64_t c = 0; c < chunks;) {
                    const int64_t left = chunks - c;
                    const int width = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
#define VALUES(width)                                                                       \
    accumulate_values(row + 8 * c, correction, weights, value, base + 8 * c, token_stride, n, \
                      cache_kind, width)
                    /* a constant width per copy: the sums stay in registers */
                    if (width == 8) VALUES(8);
                    else if (width == 4) VALUES(4);
                    else if (width == 2) VALUES(2);
                    else VALUES(1);
#undef VALUES
                    c += width;
                }
            }
        }
    }
    for (int64_t head = 0; head < num_heads; head++) {
        const float inv = 1.0f / running_sum[head];
        for (int64_t d = 0; d < head_dim; d++) {
            const float v = acc[head * head_dim + d] * inv;
            if (kind == 0) ((float *)out)[head * head_dim + d] = v;
            else ((uint16_t *)out)[head * head_dim + d] = float_to_bf16(v);
        }
    }
}
#endif

#if defined(__AVX512F__)
#include <immintrin.h>
#define HAVE_AVX512 1

/* sums[i] = the sum of the 16 lanes of v[i]: a transposing tree of adds, about three
 * instructions per vector instead of a full horizontal reduction each. Lane order of
 * the result: v[0], v[1], ..., v[15]. */
static inline __m512 sum16(const __m512 v[16]) {
    __m512 w[8], x[4];
    for (int i = 0; i < 8; i++) /* per 128-bit block: (a0+a2, b0+b2, a1+a3, b1+b3) */
        w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                             _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) { /* per block: vectors 4i..4i+3, over that block's lanes */
        const __m512d a = _mm512_castps_pd(w[2 * i]), b = _mm512_castps_pd(w[2 * i + 1]);
        x[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    const int even = _MM_SHUFFLE(2, 0, 2, 0), odd = _MM_SHUFFLE(3, 1, 3, 1);
    const __m512 y0 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], even),
                                    _mm512_shuffle_f32x4(x[0], x[1], odd));
    const __m512 y1 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], even),
                                    _mm512_shuffle_f32x4(x[2], x[3], odd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(y0, y1, even), _mm512_shuffle_f32x4(y0, y1, odd));
}

/* Two tokens' rows of 64 16-bit values (a0 a1 and b0 b1, 32 each) interleaved as pairs
 * (a[d], b[d]) for the pairwise dot-product instructions: lane l of pairs[j] holds
 * dimension 32 * (j / 2) + 8 * (l / 4) + 4 * (j % 2) + l % 4 (see PAIR_ORDER). */
static inline void interleave_pairs(__m512i a0, __m512i a1, __m512i b0, __m512i b1,
                                    __m512i pairs[4]) {
    pairs[0] = _mm512_unpacklo_epi16(a0, b0);
    pairs[1] = _mm512_unpackhi_epi16(a0, b0);
    pairs[2] = _mm512_unpacklo_epi16(a1, b1);
    pairs[3] = _mm512_unpackhi_epi16(a1, b1);
}

#if defined(__AVX512BF16__)
/* 64 dimensions of q . k as 16 partial sums: bf16 pairs multiplied exactly, summed in
 * float32 (vdpbf16ps). `qv` holds the query chunk as loaded, two vectors of 32 bf16. */
typedef __m512i QueryChunk[2];
static inline void query_chunk(QueryChunk qv, const uint16_t *src) {
    qv[0] = _mm512_loadu_si512(src);
    qv[1] = _mm512_loadu_si512(src + 32);
}
static inline __m512 dot_partial(const QueryChunk qv, const uint16_t *k) {
    __m512 sum = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)qv[0],
                                  (__m512bh)_mm512_loadu_si512(k));
    return _mm512_dpbf16_ps(sum, (__m512bh)qv[1], (__m512bh)_mm512_loadu_si512(k + 32));
}
#else
/* The same without AVX512_BF16: the query chunk widened once, keys widened per token. */
typedef __m512 QueryChunk[4];
static inline void query_chunk(QueryChunk qv, const uint16_t *src) {
    for (int i = 0; i < 4; i++) qv[i] = load16_bf16(src + 16 * i);
}
static inline __m512 dot_partial(const QueryChunk qv, const uint16_t *k) {
    __m512 sum = _mm512_mul_ps(qv[0], load16_bf16(k));
    for (int i = 1; i < 4; i++) sum = _mm512_fmadd_ps(qv[i], load16_bf16(k + 16 * i), sum);
    return sum;
}
#endif

/* Prefetch distance of pass 1, in cache blocks: their keys and values to L2 (for pass 3
 * too). Prefetching the keys to L1 instead was slower: a block is 96 lines, more
 * misses than L1 keeps in flight. */
#define PREFETCH_BLOCKS 3

/* Pass 3's inner loop, per AVX-512 flavour: `n` tokens of one KV head's values (the
 * first at `v`) weighted by their probabilities `p[g * stride + i]` into the group's
 * output rows `acc[g]`, four vectors of 16 floats per 64 dimensions. */
#if defined(__AVX512BF16__)
/* With vdpbf16ps: the probabilities are rounded to bf16 (per query head context + 1 of
 * them, the last 0, where its float scores were) and two tokens' values are interleaved
 * so that one instruction adds p[t] * v[t] + p[t+1] * v[t+1] for 16 dimensions. Lane l
 * of acc[j] holds dimension 32 * (j / 2) + 8 * (l / 4) + 4 * (j % 2) + l % 4. */
typedef uint16_t Prob;
#define PROB_STRIDE(context) (2 * (context))

static inline __attribute__((always_inline)) void value_tokens(
    __m512 acc[4][4], const uint16_t *v0, int64_t token_stride, int64_t n, const Prob *p,
    int64_t stride, const int G) {
    for (int64_t i = 0; i < n; i += 2) {
        const uint16_t *v = v0 + i * token_stride;
        const __m512i a0 = _mm512_loadu_si512(v), a1 = _mm512_loadu_si512(v + 32);
        __m512i b0 = _mm512_setzero_si512(), b1 = _mm512_setzero_si512();
        if (i + 1 < n) { /* else the pair's second token is zeros */
            b0 = _mm512_loadu_si512(v + token_stride);
            b1 = _mm512_loadu_si512(v + token_stride + 32);
        }
        __m512i pairs[4];
        interleave_pairs(a0, a1, b0, b1, pairs);
        for (int g = 0; g < G; g++) {
            uint32_t two;
            memcpy(&two, p + g * stride + i, sizeof two);
            const __m512bh w = (__m512bh)_mm512_set1_epi32((int)two);
            for (int j = 0; j < 4; j++)
                acc[g][j] = _mm512_dpbf16_ps(acc[g][j], w, (__m512bh)pairs[j]);
        }
    }
}

/* For 32 dimensions held as acc[2 i], acc[2 i + 1]: which of their 32 lanes holds each
 * dimension, first the 16 lower dimensions, then the 16 upper (see value_tokens). */
static const int32_t ROW_ORDER[2][16] = {
    {0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23},
    {8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31},
};

/* Softmax numerators to bf16, in place: row `sc` of `context` floats becomes
 * context + 1 bf16 (the last 0), each element written after it has been read. */
static inline void probs_to_bf16(float *sc, int64_t context, float inv) {
    uint16_t *dst = (uint16_t *)sc;
    const __m512 scale = _mm512_set1_ps(inv);
    for (int64_t t = 0; t < context; t += 16) {
        const int n = context - t < 16 ? (int)(context - t) : 16;
        const __mmask16 mask = (__mmask16)((1u << n) - 1u);
        const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, sc + t), scale);
        const __m256bh y = _mm512_cvtneps_pbh(x);
        _mm256_mask_storeu_epi16(dst + t, mask, (__m256i)y);
    }
    dst[context] = 0;
}
#else
/* Without AVX512_BF16: float32 products, each 32 bf16 of a value row widened as its
 * even and odd elements (a shift and a mask). Lane l of acc[j] holds dimension
 * 32 * (j / 2) + 2 * l + j % 2. */
typedef float Prob;
#define PROB_STRIDE(context) (context)

static inline __attribute__((always_inline)) void value_tokens(
    __m512 acc[4][4], const uint16_t *v0, int64_t token_stride, int64_t n, const Prob *p,
    int64_t stride, const int G) {
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
    for (int64_t i = 0; i < n; i++) {
        const uint16_t *v = v0 + i * token_stride;
        const __m512i lo = _mm512_loadu_si512(v), hi = _mm512_loadu_si512(v + 32);
        const __m512 vv[4] = {
            _mm512_castsi512_ps(_mm512_slli_epi32(lo, 16)),
            _mm512_castsi512_ps(_mm512_and_si512(lo, high)),
            _mm512_castsi512_ps(_mm512_slli_epi32(hi, 16)),
            _mm512_castsi512_ps(_mm512_and_si512(hi, high)),
        };
        for (int g = 0; g < G; g++) {
            const __m512 w = _mm512_set1_ps(p[g * stride + i]);
            for (int j = 0; j < 4; j++) acc[g][j] = _mm512_fmadd_ps(w, vv[j], acc[g][j]);
        }
    }
}

static const int32_t ROW_ORDER[2][16] = {
    {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23},
    {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31},
};

static inline void probs_to_bf16(float *sc, int64_t context, float inv) {
    for (int64_t t = 0; t < context; t++) sc[t] *= inv;
}
#endif

/* A 64-dimension chunk of an output row to bf16 in dimension order, its dimensions in
 * the lanes `order` gives for each 32 (as ROW_ORDER and PAIR_ORDER). */
static inline void store_row_ordered(uint16_t *o, const float *row, const int32_t order[2][16]) {
    const __m512i lower = _mm512_loadu_si512(order[0]);
    const __m512i upper = _mm512_loadu_si512(order[1]);
    for (int pair = 0; pair < 2; pair++) {
        const __m512 a = _mm512_loadu_ps(row + 32 * pair), b = _mm512_loadu_ps(row + 32 * pair + 16);
        store16_bf16(o + 32 * pair, _mm512_permutex2var_ps(a, lower, b));
        store16_bf16(o + 32 * pair + 16, _mm512_permutex2var_ps(a, upper, b));
    }
}

/* As value_tokens leaves a chunk. */
static inline void store_row_bf16(uint16_t *o, const float *row) {
    store_row_ordered(o, row, ROW_ORDER);
}

/* The lanes of 32 dimensions summed over two tokens' rows interleaved as 16-bit pairs
 * (unpacklo_epi16 and unpackhi_epi16 of the rows), as value_tokens' vdpbf16ps leaves
 * them: for each dimension, its lane among the two vectors' 32. */
static const int32_t PAIR_ORDER[2][16] = {
    {0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23},
    {8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31},
};

static inline void store_row_pairs(uint16_t *o, const float *row) {
    store_row_ordered(o, row, PAIR_ORDER);
}

/* Pass 3 for one 64-dimension chunk `c`, block by block as pass 1: a KV head's G output
 * rows are loaded into registers for the block's tokens and put back (the rows of all
 * heads would not fit the registers at once). */
static inline __attribute__((always_inline)) void values_pass(
    const uint16_t *value, const Prob *probs, float *rows, const int64_t *table,
    int64_t context, int64_t num_blocks, int64_t num_kv_heads, int64_t block_size,
    int64_t block_stride, int64_t token_stride, int64_t head_stride, int64_t c,
    const int G) {
    const int64_t stride = PROB_STRIDE(context);
    for (int64_t blk = 0; blk < num_blocks; blk++) {
        const uint16_t *base = value + table[blk] * block_stride + c;
        const int64_t first = blk * block_size;
        const int64_t in_block = context - first < block_size ? context - first : block_size;
        for (int64_t h = 0; h < num_kv_heads; h++) {
            __m512 acc[4][4];
            float *row = rows + h * G * 64;
            for (int g = 0; g < G; g++)
                for (int j = 0; j < 4; j++) acc[g][j] = _mm512_loadu_ps(row + g * 64 + 16 * j);
            value_tokens(acc, base + h * head_stride, token_stride, in_block,
                         probs + h * G * stride + first, stride, G);
            for (int g = 0; g < G; g++)
                for (int j = 0; j < 4; j++) _mm512_storeu_ps(row + g * 64 + 16 * j, acc[g][j]);
        }
    }
}

/* Pass 2's first half: row `sc` of `context` scores is scaled by `scale` and replaced by
 * exp(score - max), whose sum is returned. */
static inline float softmax_numerators(float *sc, int64_t context, float scale) {
    const __m512 scale16 = _mm512_set1_ps(scale);
    __m512 top16 = _mm512_set1_ps(-INFINITY); /* the max in vectors: it does not
                                                 vectorize by itself (NaN order) */
    for (int64_t t = 0; t < context; t += 16) {
        const int n = context - t < 16 ? (int)(context - t) : 16;
        const __mmask16 mask = (__mmask16)((1u << n) - 1u);
        const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, sc + t), scale16);
        _mm512_mask_storeu_ps(sc + t, mask, x);
        top16 = _mm512_mask_max_ps(top16, mask, top16, x);
    }
    const float top = _mm512_reduce_max_ps(top16);
    float sum = 0.0f;
    for (int64_t t = 0; t < context; t++) sc[t] = exp_nonpositive(sc[t] - top);
    for (int64_t t = 0; t < context; t++) sum += sc[t];
    return sum;
}

/* decode_sequence for bf16 with head_dim a multiple of 64 and G query heads per KV head,
 * walking the block table block by block (no division per token):
 *   pass 1, per cache block and 16 of its tokens at a time: every KV head's keys (one
 *     contiguous stretch of the cache) against the group's query chunks, 16 scores
 *     summed at once by `sum16`, while later blocks are prefetched;
 *   pass 2 as the portable path, the maximum taken in vectors;
 *   pass 3 per 64-dimension chunk: `values_pass`. */
static inline __attribute__((always_inline)) void decode_sequence_bf16(
    const uint16_t *q, const uint16_t *key, const uint16_t *value, uint16_t *out,
    const int64_t *table, int64_t context, int64_t num_heads, int64_t num_kv_heads,
    int64_t head_dim, int64_t block_size, int64_t block_stride, int64_t token_stride,
    int64_t head_stride, float scale, const int G, float *scratch) {
    float *scores = scratch; /* [Hq, context] */
    const uint16_t *qs = q;
    const int64_t num_blocks = (context + block_size - 1) / block_size;
    for (int64_t c = 0; c < head_dim; c += 64) {
        for (int64_t blk = 0; blk < num_blocks; blk++) {
            const uint16_t *base = key + table[blk] * block_stride + c;
            const int64_t first = blk * block_size;
            const int64_t in_block = context - first < block_size ? context - first : block_size;
            if (c == 0 && blk + PREFETCH_BLOCKS < num_blocks) {
                const int64_t ahead = table[blk + PREFETCH_BLOCKS] * block_stride;
                for (int64_t i = 0; i < block_size; i++)
                    for (int64_t h = 0; h < num_kv_heads; h++)
                        for (int64_t d = 0; d < head_dim; d += 32) {
                            const int64_t at = ahead + i * token_stride + h * head_stride + d;
                            _mm_prefetch((const char *)(key + at), _MM_HINT_T1);
                            _mm_prefetch((const char *)(value + at), _MM_HINT_T1);
                        }
            }
            for (int64_t t0 = 0; t0 < in_block; t0 += 16) {
                const int n = in_block - t0 < 16 ? (int)(in_block - t0) : 16;
                const __mmask16 mask = (__mmask16)((1u << n) - 1u);
                for (int64_t h = 0; h < num_kv_heads; h++) {
                    const uint16_t *k = base + t0 * token_stride + h * head_stride;
                    for (int g = 0; g < G; g++) {
                        QueryChunk qv;
                        query_chunk(qv, qs + (h * G + g) * head_dim + c);
                        __m512 part[16];
                        if (n == 16) {
                            for (int i = 0; i < 16; i++)
                                part[i] = dot_partial(qv, k + i * token_stride);
                        } else {
                            for (int i = 0; i < 16; i++)
                                part[i] = i < n ? dot_partial(qv, k + i * token_stride)
                                                : _mm512_setzero_ps();
                        }
                        float *dst = scores + (h * G + g) * context + first + t0;
                        __m512 sums = sum16(part);
                        if (c > 0) sums = _mm512_add_ps(sums, _mm512_maskz_loadu_ps(mask, dst));
                        _mm512_mask_storeu_ps(dst, mask, sums);
                    }
                }
            }
        }
    }
    for (int64_t head = 0; head < num_heads; head++) {
        float *sc = scores + head * context;
        probs_to_bf16(sc, context, 1.0f / softmax_numerators(sc, context, scale));
    }
    const Prob *probs = (const Prob *)scores;
    float *rows = scores + num_heads * context; /* [Hq, 64] */
    for (int64_t c = 0; c < head_dim; c += 64) {
        memset(rows, 0, (size_t)(num_heads * 64) * sizeof(float));
        values_pass(value, probs, rows, table, context, num_blocks, num_kv_heads, block_size,
                    block_stride, token_stride, head_stride, c, G);
        for (int64_t head = 0; head < num_heads; head++) {
            store_row_bf16(out + head * head_dim + c, rows + head * 64);
        }
    }
}

#if defined(__AVX512BW__) && defined(__AVX512VL__)
#define HAVE_INT8_PATH 1

/* acc + the products of a's and b's int16 pairs, each pair's two summed into its int32
 * lane (vpdpwssd where the CPU has AVX512_VNNI). */
static inline __m512i dot_pairs(__m512i acc, __m512i a, __m512i b) {
#if defined(__AVX512VNNI__)
    return _mm512_dpwssd_epi32(acc, a, b);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}

/* 32 int8 at `src` sign-extended to 32 int16. */
static inline __m512i load32_int8(const int8_t *src) {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)src));
}

/* sum16 over int32 lanes. */
static inline __m512i sum16_epi32(const __m512i v[16]) {
    __m512i w[8], x[4];
    for (int i = 0; i < 8; i++)
        w[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]),
                                _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)
        x[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(w[2 * i], w[2 * i + 1]),
                                _mm512_unpackhi_epi64(w[2 * i], w[2 * i + 1]));
    const int even = _MM_SHUFFLE(2, 0, 2, 0), odd = _MM_SHUFFLE(3, 1, 3, 1);
    const __m512i y0 = _mm512_add_epi32(_mm512_shuffle_i32x4(x[0], x[1], even),
                                        _mm512_shuffle_i32x4(x[0], x[1], odd));
    const __m512i y1 = _mm512_add_epi32(_mm512_shuffle_i32x4(x[2], x[3], even),
                                        _mm512_shuffle_i32x4(x[2], x[3], odd));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(y0, y1, even), _mm512_shuffle_i32x4(y0, y1, odd));
}

/* A row of `n` floats as int16 with one scale, max|x| -> 32767 (rounded in the
 * processor's default mode, to nearest even); all zeros with scale 0 for a row of zeros.
 * 16-bit integers carry the row to about 1.5e-5 of its largest element. Returns the
 * scale. */
static inline float row_to_int16(int16_t *dst, const float *src, int64_t n) {
    __m512 top16 = _mm512_setzero_ps();
    for (int64_t t = 0; t < n; t += 16) {
        const __mmask16 mask = n - t < 16 ? (__mmask16)((1u << (n - t)) - 1u) : 0xffff;
        top16 = _mm512_max_ps(top16, _mm512_abs_ps(_mm512_maskz_loadu_ps(mask, src + t)));
    }
    const float top = _mm512_reduce_max_ps(top16);
    const __m512 inv = _mm512_set1_ps(top > 0.0f ? 32767.0f / top : 0.0f);
    for (int64_t t = 0; t < n; t += 16) {
        const __mmask16 mask = n - t < 16 ? (__mmask16)((1u << (n - t)) - 1u) : 0xffff;
        const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, src + t), inv));
        _mm256_mask_storeu_epi16(dst + t, mask, _mm512_cvtepi32_epi16(q));
    }
    return top / 32767.0f;
}

/* To L2, the keys, values and both scales of cache block `block` (an int8 row of 64
 * dimensions is one cache line). */
static inline void prefetch_int8_block(const int8_t *key, const int8_t *value,
                                       const float *key_scale, const float *value_scale,
                                       int64_t block, int64_t num_kv_heads, int64_t head_dim,
                                       int64_t block_size, int64_t block_stride,
                                       int64_t token_stride, int64_t head_stride) {
    const int64_t ahead = block * block_stride;
    for (int64_t i = 0; i < block_size; i++)
        for (int64_t h = 0; h < num_kv_heads; h++)
            for (int64_t d = 0; d < head_dim; d += 64) {
                const int64_t at = ahead + i * token_stride + h * head_stride + d;
                _mm_prefetch((const char *)(key + at), _MM_HINT_T1);
                _mm_prefetch((const char *)(value + at), _MM_HINT_T1);
            }
    const int64_t scales = num_kv_heads * block_size;
    for (int64_t i = 0; i < scales; i += 16) {
        _mm_prefetch((const char *)(key_scale + block * scales + i), _MM_HINT_T1);
        _mm_prefetch((const char *)(value_scale + block * scales + i), _MM_HINT_T1);
    }
}

/* decode_sequence for an int8 cache under bf16 queries, head_dim a multiple of 64 and G
 * query heads per KV head. The products are exact integer ones, 16-bit by 8-bit:
 *   pass 1: each query row as int16 with a scale (row_to_int16); per cache block and 16
 *     of its tokens, each token's key row sign-extended to int16 once and multiplied
 *     with the group's query rows in int32 lanes (dot_pairs), the 16 tokens' sums
 *     taken by `sum16_epi32` and scaled by the query's and the 16 keys' scales;
 *   pass 2: the softmax; each probability times its token's value scale, and the row
 *     of them as int16 with a scale;
 *   pass 3: per block, two tokens' value rows interleaved as int16 pairs against their
 *     two probabilities (as value_tokens pairs bf16), summed in int32 and added to the
 *     float32 output rows with the probabilities' scale. A block's int32 sums stay far
 *     from overflow: 16 x 32767 x 127 < 2^27. */
static inline __attribute__((always_inline)) void decode_sequence_int8(
    const uint16_t *q, const int8_t *key, const int8_t *value, const float *key_scale,
    const float *value_scale, uint16_t *out, const int64_t *table, int64_t context,
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
    int64_t block_stride, int64_t token_stride, int64_t head_stride, float scale, const int G,
    float *scratch) {
    float *scores = scratch;                        /* [Hq, context], then int16 probs */
    float *rows = scores + num_heads * context;     /* [Hq, 64] */
    float *prob_scales = rows + num_heads * 64;     /* [Hq] */
    float *query_scales = prob_scales + num_heads;  /* [Hq] */
    int16_t *queries = (int16_t *)(query_scales + num_heads); /* [Hq, D] */
    const int64_t num_blocks = (context + block_size - 1) / block_size;
    const int64_t scale_stride = num_kv_heads * block_size; /* per block */
    for (int64_t head = 0; head < num_heads; head++) {
        float row[MAX_HEAD_DIM];
        const uint16_t *src = q + head * head_dim;
        for (int64_t d = 0; d < head_dim; d += 16) _mm512_storeu_ps(row + d, load16_bf16(src + d));
        query_scales[head] = row_to_int16(queries + head * head_dim, row, head_dim);
    }
    for (int64_t c = 0; c < head_dim; c += 64) {
        for (int64_t blk = 0; blk < num_blocks; blk++) {
            const int8_t *base = key + table[blk] * block_stride + c;
            const float *scales = key_scale + table[blk] * scale_stride;
            const int64_t first = blk * block_size;
            const int64_t in_block = context - first < block_size ? context - first : block_size;
            if (c == 0 && blk + PREFETCH_BLOCKS < num_blocks)
                prefetch_int8_block(key, value, key_scale, value_scale,
                                    table[blk + PREFETCH_BLOCKS], num_kv_heads, head_dim,
                                    block_size, block_stride, token_stride, head_stride);
            for (int64_t t0 = 0; t0 < in_block; t0 += 16) {
                const int n = in_block - t0 < 16 ? (int)(in_block - t0) : 16;
                const __mmask16 mask = (__mmask16)((1u << n) - 1u);
                for (int64_t h = 0; h < num_kv_heads; h++) {
                    const int8_t *k = base + t0 * token_stride + h * head_stride;
                    __m512i qv[4][2];
                    for (int g = 0; g < G; g++)
                        for (int j = 0; j < 2; j++)
                            qv[g][j] = _mm512_loadu_si512(queries + (h * G + g) * head_dim + c + 32 * j);
                    __m512i part[4][16];
                    for (int i = 0; i < 16; i++) {
                        if (i >= n) {
                            for (int g = 0; g < G; g++) part[g][i] = _mm512_setzero_si512();
                            continue;
                        }
                        const __m512i k0 = load32_int8(k + i * token_stride);
                        const __m512i k1 = load32_int8(k + i * token_stride + 32);
                        for (int g = 0; g < G; g++)
                            part[g][i] = dot_pairs(_mm512_madd_epi16(qv[g][0], k0), qv[g][1], k1);
                    }
                    const __m512 ks = _mm512_maskz_loadu_ps(mask, scales + h * block_size + t0);
                    for (int g = 0; g < G; g++) {
                        float *dst = scores + (h * G + g) * context + first + t0;
                        const __m512 qs = _mm512_set1_ps(query_scales[h * G + g]);
                        __m512 sums = _mm512_cvtepi32_ps(sum16_epi32(part[g]));
                        sums = _mm512_mul_ps(_mm512_mul_ps(sums, qs), ks);
                        if (c > 0) sums = _mm512_add_ps(sums, _mm512_maskz_loadu_ps(mask, dst));
                        _mm512_mask_storeu_ps(dst, mask, sums);
                    }
                }
            }
        }
    }
    for (int64_t head = 0; head < num_heads; head++) {
        float *sc = scores + head * context;
        const float inv = 1.0f / softmax_numerators(sc, context, scale);
        const float *scales = value_scale + (head / G) * block_size;
        for (int64_t blk = 0; blk < num_blocks; blk++) {
            const int64_t first = blk * block_size;
            const int64_t in_block = context - first < block_size ? context - first : block_size;
            for (int64_t t0 = 0; t0 < in_block; t0 += 16) {
                const int n = in_block - t0 < 16 ? (int)(in_block - t0) : 16;
                const __mmask16 mask = (__mmask16)((1u << n) - 1u);
                const __m512 vs =
                    _mm512_maskz_loadu_ps(mask, scales + table[blk] * scale_stride + t0);
                const __m512 p = _mm512_maskz_loadu_ps(mask, sc + first + t0);
                _mm512_mask_storeu_ps(sc + first + t0, mask, _mm512_mul_ps(p, vs));
            }
        }
        /* In place: int16 element t is written after float element t has been read. */
        int16_t *probs = (int16_t *)sc;
        prob_scales[head] = inv * row_to_int16(probs, sc, context);
        probs[context] = 0; /* the pair partner of an odd context's last token */
    }
    for (int64_t c = 0; c < head_dim; c += 64) {
        memset(rows, 0, (size_t)(num_heads * 64) * sizeof(float));
        for (int64_t blk = 0; blk < num_blocks; blk++) {
            const int8_t *base = value + table[blk] * block_stride + c;
            const int64_t first = blk * block_size;
            const int64_t in_block = context - first < block_size ? context - first : block_size;
            for (int64_t h = 0; h < num_kv_heads; h++) {
                __m512i acc[4][4];
                for (int g = 0; g < G; g++)
                    for (int j = 0; j < 4; j++) acc[g][j] = _mm512_setzero_si512();
                const int16_t *p = (const int16_t *)(scores + h * G * context) + first;
                for (int64_t i = 0; i < in_block; i += 2) {
                    const int8_t *v = base + i * token_stride + h * head_stride;
                    const __m512i a0 = load32_int8(v), a1 = load32_int8(v + 32);
                    __m512i b0 = _mm512_setzero_si512(), b1 = _mm512_setzero_si512();
                    if (i + 1 < in_block) { /* else the pair's second token is zeros */
                        b0 = load32_int8(v + token_stride);
                        b1 = load32_int8(v + token_stride + 32);
                    }
                    __m512i pairs[4];
                    interleave_pairs(a0, a1, b0, b1, pairs);
                    for (int g = 0; g < G; g++) {
                        /* p[t], p[t + 1] of this head: rows are 2 * context int16 apart */
                        uint32_t two;
                        memcpy(&two, p + g * 2 * context + i, sizeof two);
                        const __m512i w = _mm512_set1_epi32((int)two);
                        for (int j = 0; j < 4; j++) acc[g][j] = dot_pairs(acc[g][j], pairs[j], w);
                    }
                }
                for (int g = 0; g < G; g++) {
                    float *row = rows + (h * G + g) * 64;
                    const __m512 ps = _mm512_set1_ps(prob_scales[h * G + g]);
                    for (int j = 0; j < 4; j++)
                        _mm512_storeu_ps(row + 16 * j,
                                         _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[g][j]), ps,
                                                         _mm512_loadu_ps(row + 16 * j)));
                }
            }
        }
        for (int64_t head = 0; head < num_heads; head++)
            store_row_pairs(out + head * head_dim + c, rows + head * 64);
    }
}
#endif

/* The fast paths' shapes: bf16 queries over a bf16 or int8 cache, head_dim a multiple
 * of 64, at most 4 query heads per KV head (so a chunk's accumulators fit the 32 vector
 * registers). Returns 0 if one ran. */
static int decode_sequence_fast(
    const void *q, const void *key, const void *value, void *out, const int64_t *table,
    int64_t context, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
    int64_t block_size, int64_t block_stride, int64_t token_stride, int64_t head_stride,
    float scale, int kind, int cache_kind, const float *key_scale, const float *value_scale,
    float *scratch) {
    if (kind != 1 || head_dim % 64 || (cache_kind != 1 && cache_kind != 2)) return 1;
#ifdef HAVE_INT8_PATH
#define DECODE_INT8 decode_sequence_int8
#else
    if (cache_kind == 2) return 1;
#define DECODE_INT8(...) (void)0
#endif
#define FAST(G)                                                                               \
    if (cache_kind == 2)                                                                      \
        DECODE_INT8(q, key, value, key_scale, value_scale, out, table, context,      \
                             num_heads, num_kv_heads, head_dim, block_size, block_stride,     \
                             token_stride, head_stride, scale, G, scratch);                   \
    else                                                                                      \
        decode_sequence_bf16(q, key, value, out, table, context, num_heads,                  \
                             num_kv_heads, head_dim, block_size, block_stride, token_stride, \
                             head_stride, scale, G, scratch)
    switch (num_heads / num_kv_heads) {
        case 1: FAST(1); return 0;
        case 2: FAST(2); return 0;
        case 3: FAST(3); return 0;
        case 4: FAST(4); return 0;
        default: return 1;
    }
#undef FAST
#undef DECODE_INT8
}
#endif

/* Sequence `b` of the batch `a` describes. */
void KERNEL(paged_decode)(const PagedDecodeArgs *a, int64_t b, float *scratch) {
    DENORMALS_OFF(csr);
    const int64_t *table = a->block_tables + b * a->table_stride;
    const size_t size = a->kind == KIND_F32 ? sizeof(float) : sizeof(uint16_t);
    const void *q = (const char *)a->q + (size_t)(b * a->q_stride) * size;
    void *out = (char *)a->out + (size_t)(b * a->out_stride) * size;
    const int64_t context = a->context_lens[b];
    const float *key_scale = a->cache_kind == KIND_INT8 ? a->key_scale : NULL;
    const float *value_scale = a->cache_kind == KIND_INT8 ? a->value_scale : NULL;
#ifdef HAVE_AVX512
    if (decode_sequence_fast(q, a->key, a->value, out, table, context, a->num_heads,
                             a->num_kv_heads, a->head_dim, a->block_size, a->block_stride,
                             a->token_stride, a->head_stride, a->scale, a->kind, a->cache_kind,
                             key_scale, value_scale, scratch) == 0) {
        DENORMALS_RESTORE(csr);
        return;
    }
#endif
#ifdef HAVE_AVX2
    if (a->head_dim % 8 == 0) {
#define AVX2_DECODE(cache_kind)                                                              \
    decode_sequence_avx2(q, a->key, a->value, out, table, context, a->num_heads,           \
                         a->num_kv_heads, a->head_dim, a->block_size, a->block_stride,     \
                         a->token_stride, a->head_stride, a->scale, a->kind, cache_kind,   \
                         key_scale, value_scale, scratch)
        /* a constant cache kind per copy: no branch in the inner loops */
        if (a->cache_kind == KIND_F32) AVX2_DECODE(KIND_F32);
        else if (a->cache_kind == KIND_BF16) AVX2_DECODE(KIND_BF16);
        else AVX2_DECODE(KIND_INT8);
#undef AVX2_DECODE
    } else
#endif
        decode_sequence(q, a->key, a->value, out, table, context, a->num_heads,
                        a->num_kv_heads, a->head_dim, a->block_size, a->block_stride,
                        a->token_stride, a->head_stride, a->scale, a->kind, a->cache_kind,
                        key_scale, value_scale, scratch);
    DENORMALS_RESTORE(csr);
}

/* One row of `n` values quantized to int8 with one scale, as LayerCache's torch path does:
 *     scale = max|x| / 127,   q = round_half_even(x * (127 / max|x|))
 * and a row of zeros (scale 0) where max|x| = 0. */
static inline void quantize_row(const void *src, int64_t offset, int n, int kind, int8_t *dst,
                                float *scale) {
#ifdef HAVE_AVX512
    if (n % 16 == 0) { /* the same arithmetic, 16 values at a time */
        __m512 top16 = _mm512_setzero_ps();
        for (int d = 0; d < n; d += 16) {
            const __m512 x = kind == 0 ? _mm512_loadu_ps((const float *)src + offset + d)
                                       : load16_bf16((const uint16_t *)src + offset + d);
            top16 = _mm512_max_ps(top16, _mm512_abs_ps(x));
        }
        const float top = _mm512_reduce_max_ps(top16);
        /* |x| * (127 / top) rounds to at most 127: the saturating narrowing never clips */
        const __m512 inv = _mm512_set1_ps(top > 0.0f ? 127.0f / top : 0.0f);
        for (int d = 0; d < n; d += 16) {
            const __m512 x = kind == 0 ? _mm512_loadu_ps((const float *)src + offset + d)
                                       : load16_bf16((const uint16_t *)src + offset + d);
            const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(x, inv)); /* to nearest even */
            _mm_storeu_si128((__m128i *)(dst + d), _mm512_cvtsepi32_epi8(q));
        }
        *scale = top > 0.0f ? top / 127.0f : 0.0f;
        return;
    }
#endif
    float row[MAX_HEAD_DIM];
    load_row(row, src, offset, n, kind, 1.0f);
    float top = 0.0f;
    for (int d = 0; d < n; d++) top = fmaxf(top, fabsf(row[d]));
    if (!(top > 0.0f)) {
        memset(dst, 0, (size_t)n);
        *scale = 0.0f;
        return;
    }
    const float inv = 127.0f / top;
    for (int d = 0; d < n; d++) {
        float r = nearbyintf(row[d] * inv);
        r = r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);
        dst[d] = (int8_t)r;
    }
    *scale = top / 127.0f;
}

/* Stores tokens [begin, end) of a forward's new keys and values into an int8 cache, each
 * row quantized by `quantize_row` and written at the token's slot (see KvStoreArgs). */
void KERNEL(kv_store_int8)(const KvStoreArgs *a, int64_t begin, int64_t end) {
    const int64_t num_kv_heads = a->num_kv_heads, head_dim = a->head_dim;
    for (int64_t t = begin; t < end; t++) {
        const int64_t slot = a->slots[t];
        const int64_t block = slot / a->block_size, offset = slot % a->block_size;
        for (int64_t h = 0; h < num_kv_heads; h++) {
            const int64_t at = (slot * num_kv_heads + h) * head_dim;
            const int64_t scale_at = (block * num_kv_heads + h) * a->block_size + offset;
            quantize_row(a->k, t * a->k_stride + h * head_dim, (int)head_dim, a->kind,
                         a->key + at, a->key_scale + scale_at);
            quantize_row(a->v, t * a->v_stride + h * head_dim, (int)head_dim, a->kind,
                         a->value + at, a->value_scale + scale_at);
        }
    }
}
