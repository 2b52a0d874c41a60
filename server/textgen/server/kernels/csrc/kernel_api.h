/* The C kernels' interface: one argument struct per kernel, filled and checked by ops.cpp
 * (the torch operators), and the functions every ISA build of the kernels exports.
 *
 * Each kernel source is compiled once per ISA level (setup.py: baseline, and on x86-64
 * avx2, avx512 and avx512_bf16) with -DTEXTGEN_ISA=<level>, so its functions are named
 * textgen_<kernel>_<level>; ops.cpp includes the prototypes below once per level and picks
 * one level at run time. The kernels never start threads: each function computes a range
 * of the work (rows, tokens, sequences) and ops.cpp spreads the ranges over torch's
 * intra-op threads. Nothing here validates its arguments: ops.cpp has, before the call.
 *
 * Element kinds: KIND_F32 float32, KIND_BF16 bfloat16 (rounded to nearest even where
 * written, as torch rounds), KIND_INT8 (a KV cache row as int8 with one float32 scale).
 */
#ifndef TEXTGEN_KERNEL_API_TYPES
#define TEXTGEN_KERNEL_API_TYPES

#include <stdint.h>

enum { KIND_F32 = 0, KIND_BF16 = 1, KIND_INT8 = 2 };

/* Decode attention over the paged cache, one query token per sequence (paged_attention.c).
 *   q             [B, Hq, D] of `kind`, rows q_stride elements apart, heads contiguous
 *   out           [B, Hq, D] of `kind`, rows out_stride elements apart, heads contiguous
 *   key, value    [num_blocks, block_size, Hkv, D] of `cache_kind` (= kind, or KIND_INT8),
 *                 at the given block/token/head strides (elements), dims contiguous
 *   key_scale, value_scale  [num_blocks, Hkv, block_size] float32 (KIND_INT8 only)
 *   block_tables  [B, table_stride] int64; context_lens [B] int64 */
typedef struct {
    const void *q;
    int64_t q_stride;
    const void *key, *value;
    void *out;
    int64_t out_stride;
    const int64_t *block_tables;
    int64_t table_stride;
    const int64_t *context_lens;
    int64_t num_heads, num_kv_heads, head_dim, block_size;
    int64_t block_stride, token_stride, head_stride;
    float scale;
    int kind, cache_kind;
    const float *key_scale, *value_scale;
} PagedDecodeArgs;

#define MAX_HEAD_DIM 512 /* of paged_decode and kv_store_int8 */

/* Float32 working space of one sequence of `paged_decode`. */
static inline int64_t paged_decode_scratch(int64_t num_heads, int64_t head_dim, int64_t context,
                                           int64_t block_size) {
    return num_heads * (2 * head_dim + context) + block_size;
}

/* New keys and values into an int8 cache (paged_attention.c): token t's rows (of `kind`,
 * heads contiguous, rows k_stride / v_stride elements apart) quantized and written at
 * slot slots[t]:
 *   key, value              [num_slots, Hkv, D] int8
 *   key_scale, value_scale  [num_blocks, Hkv, block_size] float32 */
typedef struct {
    const void *k, *v;
    int64_t k_stride, v_stride;
    int kind;
    const int64_t *slots;
    int64_t num_kv_heads, head_dim, block_size;
    int8_t *key, *value;
    float *key_scale, *value_scale;
} KvStoreArgs;

/* y = x W^T with W as GGUF blocks (gguf_linear.c): x [m, k] float32 contiguous, W
 * [n, k / 32] blocks of ggml type `type`, y [m, y_stride] float32. A dequantized row
 * lives on the stack: k is at most GGUF_MAX_K. With `q` set, x is taken as rounded to
 * int8 per 32 features instead (as int8_quantize leaves it: q [m, k], d_x and s_x
 * [m, k / 32]), and each block is dotted in integers (gguf_linear_int8). */
#define GGUF_MAX_K 65536
typedef struct {
    const float *x;
    const uint8_t *weight;
    int type;
    int64_t m, n, k;
    float *y;
    int64_t y_stride;
    const int8_t *q;
    const float *d_x, *s_x;
    const float *half_table; /* float32 of every f16 bit pattern (int8 path) */
} GgufLinearArgs;

/* y = x W^T for steps of a few tokens, x rounded to int8 per 32 features and a 4-bit W
 * (Q4_0, Q4_1) packed by gemv_pack, a row at a time (gguf_linear.c):
 *   rows  [n, gemv_row_bytes(k)]: per row, kp = ceil(kb / 2) pairs of blocks' 16 nibble
 *         bytes side by side (32 bytes a pair; a missing second block zeros), then kb8 =
 *         kb rounded up to 8 f16 scales d and kb8 f16 offsets m (w = d u + m, u the
 *         nibble; Q4_0's m = -8 d), zeros past kb
 *   x2    [m, kp, 2, 32] int8: per pair, the low halves of its two blocks' values, then
 *         the high halves (the nibbles' order)
 *   dx2   [m, kp, 8] float32: each pair's two activation scales, four times each
 *   s_x   [m, kb8] float32: d_x sum q per block, zeros past kb
 *   y     [m, y_stride] float32 */
#define GEMV_GROUP 8 /* blocks whose scales load as one vector */
static inline int64_t gemv_row_bytes(int64_t k) {
    const int64_t kb = k / 32, kb8 = (kb + GEMV_GROUP - 1) / GEMV_GROUP * GEMV_GROUP;
    return (kb + 1) / 2 * 32 + 4 * kb8;
}

typedef struct {
    const uint8_t *rows;
    int64_t m, n, k;
    const int8_t *x2;
    const float *dx2, *s_x;
    float *y;
    int64_t y_stride;
} GemvArgs;

/* y = x W^T with x rounded to int8 per 32 features and W packed by int8_pack
 * (int8_linear.c):
 *   x      [m, k] of `x_kind`, rows x_stride elements apart
 *   u, d_w, m_w   the packed weight, n output features (gate then up rows when gated)
 *   q, d_x, s_x   scratch: [m + 8, k] int8 and [m + 8, k / 32] float32 twice
 *   y      [m, n] (gated: [m, n / 2]) of `y_kind`, rows y_stride elements apart */
typedef struct {
    const void *x;
    int64_t x_stride;
    int x_kind;
    const uint8_t *u;
    const float *d_w, *m_w;
    int type;
    int64_t m, n, k;
    int gated;
    int8_t *q;
    float *d_x, *s_x;
    void *y;
    int64_t y_stride;
    int y_kind;
} Int8LinearArgs;

#define INT8_LANES 16     /* output features per packed tile */
#define INT8_ROWS 8       /* tokens per micro-tile (and padding rows of the scratch) */
#define INT8_ROW_CHUNK 128 /* tokens per work item */

/* Per-token operations (token_ops.c), all of one `kind` (float32 or bf16):
 *   rms_norm: out[t] = weight * norm(x[t] (+ residual[t], written to sum[t]))
 *   rotary:   q [T, q_heads, D] and k [T, k_heads, D] rotated in place by positions
 *   silu_mul: out[t] = silu(x[t, :inter]) * x[t, inter:]
 *   row_stats: argmax and log-sum-exp of float32 rows */
typedef struct {
    const void *x;
    int64_t x_stride;
    const void *residual; /* [T, hidden] contiguous, or NULL */
    void *sum;            /* [T, hidden], where residual is given */
    const void *weight;
    void *out;
    int64_t hidden;
    float eps;
    int kind;
} RmsNormArgs;

typedef struct {
    void *q, *k;
    int64_t q_stride, k_stride, q_heads, k_heads, head_dim;
    const int64_t *positions;
    const float *cos, *sin; /* [positions, D] float32 */
    int kind;
} RotaryArgs;

typedef struct {
    const void *x;
    int64_t x_stride;
    void *out;
    int64_t inter;
    int kind;
} SiluMulArgs;

typedef struct {
    const float *logits;
    int64_t cols;
    int64_t *argmax;
    float *lse;
} RowStatsArgs;

#define TEXTGEN_CAT_(a, b) a##_##b
#define TEXTGEN_CAT(a, b) TEXTGEN_CAT_(a, b)

#endif /* TEXTGEN_KERNEL_API_TYPES */

/* The functions of one ISA build, named for the level TEXTGEN_ISA names where this is
 * included (no include guard: ops.cpp declares every level's, one include each). */
#ifdef TEXTGEN_ISA
#define KERNEL(name) TEXTGEN_CAT(textgen_##name, TEXTGEN_ISA)

/* One sequence `b`; `scratch` holds paged_decode_scratch(...) floats. */
void KERNEL(paged_decode)(const PagedDecodeArgs *args, int64_t b, float *scratch);
/* Tokens [begin, end). */
void KERNEL(kv_store_int8)(const KvStoreArgs *args, int64_t begin, int64_t end);
/* Output features [begin, end) of every token. */
void KERNEL(gguf_linear)(const GgufLinearArgs *args, int64_t begin, int64_t end);
/* The same from int8 activations (args->q); only where int8_available. */
void KERNEL(gguf_linear_int8)(const GgufLinearArgs *args, int64_t begin, int64_t end);
/* GGUF Q4_0 / Q4_1 blocks [n, k / 32] into gemv's rows [n, gemv_row_bytes(k)]. */
void KERNEL(gemv_pack)(const uint8_t *blocks, int type, int64_t n, int64_t k, uint8_t *rows);
/* Rows [begin, end) of every token (only where int8_available). */
void KERNEL(gemv_int8)(const GemvArgs *args, int64_t begin, int64_t end);
/* 1 when this build multiplies in int8 (its int8_quantize and int8_tiles do work). */
int KERNEL(int8_available)(void);
/* GGUF blocks [n, k / 32] of `type` into the packed layout; n % 16 == 0, k % 32 == 0. */
void KERNEL(int8_pack)(const uint8_t *blocks, int type, int64_t n, int64_t k, uint8_t *u,
                       float *d_w, float *m_w);
/* Tokens [begin, end) of x into the scratch's q, d_x and s_x. */
void KERNEL(int8_quantize)(const Int8LinearArgs *args, int64_t begin, int64_t end);
/* Work items [begin, end): item i is chunk i / tiles of INT8_ROW_CHUNK tokens against
 * 16-feature tile i % tiles (tiles = n / 16, or n / 32 when gated). */
void KERNEL(int8_tiles)(const Int8LinearArgs *args, int64_t begin, int64_t end);
/* Tokens or rows [begin, end). */
void KERNEL(rms_norm)(const RmsNormArgs *args, int64_t begin, int64_t end);
void KERNEL(rotary)(const RotaryArgs *args, int64_t begin, int64_t end);
void KERNEL(silu_mul)(const SiluMulArgs *args, int64_t begin, int64_t end);
void KERNEL(row_stats)(const RowStatsArgs *args, int64_t begin, int64_t end);

#endif
