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
 * query heads per KV head take `decode_sequence_bf16`: per KV head and 64-dimension
 * chunk, the group's query rows and output accumulators live in vector registers while
 * the tokens stream by. Other shapes take the portable `decode_sequence`.
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
#define CHUNK 4 /* zmm vectors of 16 floats per row chunk: 64 dimensions */

/* 16 bf16 at `src` widened to float32. */
static inline __m512 load16_bf16(const uint16_t *src) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)src));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

/* decode_sequence for bf16 with head_dim a multiple of 64 and G query heads per KV head:
 * the same three passes, with the G query rows (pass 1) and the G output rows (pass 3)
 * of one 64-dimension chunk held in registers while the tokens stream by. G is a
 * compile-time constant at each call site, so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void decode_sequence_bf16(
    const uint16_t *q, const uint16_t *key, const uint16_t *value, uint16_t *out,
    const int64_t *table, int64_t context, int64_t seq, int64_t num_heads, int64_t num_kv_heads,
    int64_t head_dim, int64_t block_size, int64_t block_stride, int64_t token_stride,
    int64_t head_stride, float scale, const int G, float *scratch) {
    float *scores = scratch; /* [Hq, context] */
    const uint16_t *qs = q + seq * num_heads * head_dim;
    for (int64_t h = 0; h < num_kv_heads; h++) {
        for (int64_t t = 0; t < context; t++) /* zero: pass 1 adds chunk by chunk */
            for (int g = 0; g < G; g++) scores[(h * G + g) * context + t] = 0.0f;
        for (int64_t c = 0; c < head_dim; c += 16 * CHUNK) {
            __m512 qv[8][CHUNK];
            for (int g = 0; g < G; g++)
                for (int i = 0; i < CHUNK; i++)
                    qv[g][i] = load16_bf16(qs + (h * G + g) * head_dim + c + 16 * i);
            for (int64_t t = 0; t < context; t++) {
                const uint16_t *k = key + token_offset(table, t, block_size, block_stride,
                                                       token_stride) + h * head_stride + c;
                __m512 kv[CHUNK];
                for (int i = 0; i < CHUNK; i++) kv[i] = load16_bf16(k + 16 * i);
                for (int g = 0; g < G; g++) {
                    __m512 sum = _mm512_mul_ps(qv[g][0], kv[0]);
                    for (int i = 1; i < CHUNK; i++) sum = _mm512_fmadd_ps(qv[g][i], kv[i], sum);
                    scores[(h * G + g) * context + t] += _mm512_reduce_add_ps(sum);
                }
            }
        }
    }
    for (int64_t head = 0; head < num_heads; head++) {
        float *sc = scores + head * context;
        float top = -INFINITY;
        for (int64_t t = 0; t < context; t++) {
            sc[t] *= scale;
            top = sc[t] > top ? sc[t] : top;
        }
        float sum = 0.0f;
        for (int64_t t = 0; t < context; t++) sc[t] = exp_nonpositive(sc[t] - top);
        for (int64_t t = 0; t < context; t++) sum += sc[t];
        const float inv = 1.0f / sum;
        for (int64_t t = 0; t < context; t++) sc[t] *= inv;
    }
    for (int64_t h = 0; h < num_kv_heads; h++) {
        for (int64_t c = 0; c < head_dim; c += 16 * CHUNK) {
            __m512 acc[8][CHUNK];
            for (int g = 0; g < G; g++)
                for (int i = 0; i < CHUNK; i++) acc[g][i] = _mm512_setzero_ps();
            for (int64_t t = 0; t < context; t++) {
                const uint16_t *v = value + token_offset(table, t, block_size, block_stride,
                                                         token_stride) + h * head_stride + c;
                __m512 vv[CHUNK];
                for (int i = 0; i < CHUNK; i++) vv[i] = load16_bf16(v + 16 * i);
                for (int g = 0; g < G; g++) {
                    const __m512 p = _mm512_set1_ps(scores[(h * G + g) * context + t]);
                    for (int i = 0; i < CHUNK; i++) acc[g][i] = _mm512_fmadd_ps(p, vv[i], acc[g][i]);
                }
            }
            for (int g = 0; g < G; g++) {
                uint16_t *o = out + (seq * num_heads + h * G + g) * head_dim + c;
                for (int i = 0; i < CHUNK; i++) {
                    float lanes[16];
                    _mm512_storeu_ps(lanes, acc[g][i]);
                    for (int j = 0; j < 16; j++) o[16 * i + j] = float_to_bf16(lanes[j]);
                }
            }
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
    if (kind != 1 || head_dim % (16 * CHUNK)) return 1;
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
