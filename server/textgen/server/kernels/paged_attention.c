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
 *     q, out        [B, Hq, D] contiguous; query head h*G + g reads KV head h
 *     key, value    [num_blocks, block_size, Hkv, D] with the given block/token/head strides
 *     block_tables  [B, table_stride] int64; context_lens [B] int64
 *
 * `scratch` is float32 working space owned by the caller. Element types:
 * kind 0 = float32, kind 1 = bfloat16 (rounded to nearest even on the way out, as torch
 * does). Built by textgen.server.kernels at first use with the host compiler.
 *
 * With AVX-512, bf16 caches whose head_dim is a multiple of 64 and which have at most 4
 * query heads per KV head take `decode_sequence_bf16`, which walks the block table block
 * by block, prefetching ahead, and keeps query chunks and output rows in vector
 * registers. Where the CPU has AVX512_BF16 its products are vdpbf16ps: q . k exact
 * products summed in float32 as before, and the probabilities rounded to bf16 for the
 * weighted sum of values (the rounding a bf16 attention matmul makes), summed in
 * float32. Other shapes take the portable `decode_sequence`.
 */

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "vector_math.h"
#ifdef _OPENMP
#include <omp.h>
#endif

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

#define MAX_HEAD_DIM 512

/* Row `src` of `n` elements of the given kind, widened into `dst`. */
static inline void load_row(float *dst, const void *src, int64_t offset, int n, int kind) {
    if (kind == 0) {
        memcpy(dst, (const float *)src + offset, (size_t)n * sizeof(float));
    } else {
        const uint16_t *row = (const uint16_t *)src + offset;
        for (int d = 0; d < n; d++) dst[d] = bf16_to_float(row[d]);
    }
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

/* One sequence: all its query heads over its whole context. `scratch` holds
 * Hq * (2 * D + context) floats. */
static void decode_sequence(
    const void *q, const void *key, const void *value, void *out, const int64_t *table,
    int64_t context, int64_t seq, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
    int64_t block_size, int64_t block_stride, int64_t token_stride, int64_t head_stride,
    float scale, int kind, float *scratch) {
    const int64_t group = num_heads / num_kv_heads;
    float row[MAX_HEAD_DIM];
    float *query = scratch;                        /* [Hq, D] */
    float *acc = query + num_heads * head_dim;     /* [Hq, D] */
    float *scores = acc + num_heads * head_dim;    /* [Hq, context] */
    for (int64_t head = 0; head < num_heads; head++) {
        float *qrow = query + head * head_dim;
        load_row(qrow, q, (seq * num_heads + head) * head_dim, head_dim, kind);
        for (int64_t d = 0; d < head_dim; d++) qrow[d] *= scale;
    }
    /* Pass 1: scores. Token by token, all KV heads of a token at once: the cache is
     * then read in address order, which is what keeps this memory-bound loop fed. */
    for (int64_t t = 0; t < context; t++) {
        const int64_t at = token_offset(table, t, block_size, block_stride, token_stride);
        for (int64_t h = 0; h < num_kv_heads; h++) {
            load_row(row, key, at + h * head_stride, head_dim, kind);
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
            load_row(row, value, at + h * head_stride, head_dim, kind);
            for (int64_t g = 0; g < group; g++) {
                const int64_t head = h * group + g;
                const float p = scores[head * context + t];
                float *a = acc + head * head_dim;
                for (int64_t d = 0; d < head_dim; d++) a[d] += p * row[d];
            }
        }
    }
    const int64_t at = seq * num_heads * head_dim;
    for (int64_t i = 0; i < num_heads * head_dim; i++) {
        if (kind == 0) ((float *)out)[at + i] = acc[i];
        else ((uint16_t *)out)[at + i] = float_to_bf16(acc[i]);
    }
}

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
        const __m512i pairs[4] = {
            _mm512_unpacklo_epi16(a0, b0), _mm512_unpackhi_epi16(a0, b0),
            _mm512_unpacklo_epi16(a1, b1), _mm512_unpackhi_epi16(a1, b1),
        };
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

/* A 64-dimension chunk of an output row, as value_tokens leaves it, to bf16 in
 * dimension order. */
static inline void store_row_bf16(uint16_t *o, const float *row) {
    const __m512i lower = _mm512_loadu_si512(ROW_ORDER[0]);
    const __m512i upper = _mm512_loadu_si512(ROW_ORDER[1]);
    for (int pair = 0; pair < 2; pair++) {
        const __m512 a = _mm512_loadu_ps(row + 32 * pair), b = _mm512_loadu_ps(row + 32 * pair + 16);
        store16_bf16(o + 32 * pair, _mm512_permutex2var_ps(a, lower, b));
        store16_bf16(o + 32 * pair + 16, _mm512_permutex2var_ps(a, upper, b));
    }
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

/* decode_sequence for bf16 with head_dim a multiple of 64 and G query heads per KV head,
 * walking the block table block by block (no division per token):
 *   pass 1, per cache block and 16 of its tokens at a time: every KV head's keys (one
 *     contiguous stretch of the cache) against the group's query chunks, 16 scores
 *     summed at once by `sum16`, while later blocks are prefetched;
 *   pass 2 as the portable path, the maximum taken in vectors;
 *   pass 3 per 64-dimension chunk: `values_pass`. */
static inline __attribute__((always_inline)) void decode_sequence_bf16(
    const uint16_t *q, const uint16_t *key, const uint16_t *value, uint16_t *out,
    const int64_t *table, int64_t context, int64_t seq, int64_t num_heads, int64_t num_kv_heads,
    int64_t head_dim, int64_t block_size, int64_t block_stride, int64_t token_stride,
    int64_t head_stride, float scale, const int G, float *scratch) {
    float *scores = scratch; /* [Hq, context] */
    const uint16_t *qs = q + seq * num_heads * head_dim;
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
    const __m512 scale16 = _mm512_set1_ps(scale);
    for (int64_t head = 0; head < num_heads; head++) {
        float *sc = scores + head * context;
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
        probs_to_bf16(sc, context, 1.0f / sum);
    }
    const Prob *probs = (const Prob *)scores;
    float *rows = scores + num_heads * context; /* [Hq, 64] */
    for (int64_t c = 0; c < head_dim; c += 64) {
        memset(rows, 0, (size_t)(num_heads * 64) * sizeof(float));
        values_pass(value, probs, rows, table, context, num_blocks, num_kv_heads, block_size,
                    block_stride, token_stride, head_stride, c, G);
        for (int64_t head = 0; head < num_heads; head++) {
            store_row_bf16(out + (seq * num_heads + head) * head_dim + c, rows + head * 64);
        }
    }
}

/* The fast path's shapes: bf16, head_dim a multiple of 64, at most 4 query heads per KV
 * head (so a chunk's accumulators fit the 32 vector registers). Returns 0 if it ran. */
static int decode_sequence_fast(
    const void *q, const void *key, const void *value, void *out, const int64_t *table,
    int64_t context, int64_t seq, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
    int64_t block_size, int64_t block_stride, int64_t token_stride, int64_t head_stride,
    float scale, int kind, float *scratch) {
    if (kind != 1 || head_dim % 64) return 1;
#define FAST(G)                                                                               \
    decode_sequence_bf16(q, key, value, out, table, context, seq, num_heads, num_kv_heads,   \
                         head_dim, block_size, block_stride, token_stride, head_stride,     \
                         scale, G, scratch)
    switch (num_heads / num_kv_heads) {
        case 1: FAST(1); return 0;
        case 2: FAST(2); return 0;
        case 3: FAST(3); return 0;
        case 4: FAST(4); return 0;
        default: return 1;
    }
#undef FAST
}
#endif

/* Sequences are spread over `num_threads` OpenMP threads (the runtime torch already
 * loaded, so its thread team is reused); `scratch` holds num_threads * Hq *
 * (2 * D + max(context_lens)) floats. Returns 0, or 1 for shapes it does not take. */
int textgen_paged_decode(
    const void *q, const void *key, const void *value, void *out,
    const int64_t *block_tables, int64_t table_stride, const int64_t *context_lens,
    int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
    int64_t block_size, int64_t block_stride, int64_t token_stride, int64_t head_stride,
    float scale, int kind, float *scratch, int64_t scratch_per_thread, int num_threads) {
    if (head_dim > MAX_HEAD_DIM || num_heads % num_kv_heads) return 1;
    if (num_threads > num_seqs) num_threads = (int)num_seqs;
    if (num_threads < 1) num_threads = 1;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t b = 0; b < num_seqs; b++) {
#ifdef _OPENMP
        float *mine = scratch + omp_get_thread_num() * scratch_per_thread;
#else
        float *mine = scratch;
#endif
        DENORMALS_OFF(csr);
        const int64_t *table = block_tables + b * table_stride;
#ifdef HAVE_AVX512
        if (decode_sequence_fast(q, key, value, out, table, context_lens[b], b, num_heads,
                                 num_kv_heads, head_dim, block_size, block_stride, token_stride,
                                 head_stride, scale, kind, mine) != 0)
#endif
            decode_sequence(q, key, value, out, table, context_lens[b], b, num_heads,
                            num_kv_heads, head_dim, block_size, block_stride, token_stride,
                            head_stride, scale, kind, mine);
        DENORMALS_RESTORE(csr);
    }
    return 0;
}
