// textgen's native CPU operators, `torch.ops.textgen.*`: their schemas, the checks of
// every argument, the threading, and the choice of ISA build.
//
// The C kernels (kernel_api.h) are compiled once per ISA level at install time (setup.py):
// `baseline` everywhere, and on x86-64 `avx2` (AVX2, FMA, F16C), `avx512` (F, BW, VL, DQ)
// and `avx512_bf16` (those, VNNI and BF16). Every level whose instructions this CPU runs
// can serve; one is selected (the best by default: `select_isa` picks another, once at
// start-up or in tests), and each op runs the selected level's kernel. The int8 product
// runs on the best level at or below the selected one that has it.
//
// Threads are torch's intra-op threads (at::parallel_for), so `torch.set_num_threads`
// governs the kernels as it does torch's own ops. Checks raise the usual torch errors
// (ValueError / IndexError / RuntimeError in Python); nothing reaches a kernel unchecked.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

extern "C" {
#define TEXTGEN_ISA baseline
#include "kernel_api.h"
#undef TEXTGEN_ISA
#ifdef TEXTGEN_X86_BUILDS
#define TEXTGEN_ISA avx2
#include "kernel_api.h"
#undef TEXTGEN_ISA
#define TEXTGEN_ISA avx512
#include "kernel_api.h"
#undef TEXTGEN_ISA
#define TEXTGEN_ISA avx512_bf16
#include "kernel_api.h"
#undef TEXTGEN_ISA
#endif
}

namespace {

// One ISA build of the kernels.
struct Build {
  const char* name;
  bool (*runs_here)();
  void (*paged_decode)(const PagedDecodeArgs*, int64_t, float*);
  void (*kv_store_int8)(const KvStoreArgs*, int64_t, int64_t);
  void (*gguf_linear)(const GgufLinearArgs*, int64_t, int64_t);
  void (*gguf_linear_int8)(const GgufLinearArgs*, int64_t, int64_t);
  void (*gemv_pack)(const uint8_t*, int, int64_t, int64_t, uint8_t*);
  void (*gemv_int8)(const GemvArgs*, int64_t, int64_t);
  int (*int8_available)();
  void (*int8_pack)(const uint8_t*, int, int64_t, int64_t, uint8_t*, float*, float*);
  void (*int8_quantize)(const Int8LinearArgs*, int64_t, int64_t);
  void (*int8_tiles)(const Int8LinearArgs*, int64_t, int64_t);
  void (*rms_norm)(const RmsNormArgs*, int64_t, int64_t);
  void (*rotary)(const RotaryArgs*, int64_t, int64_t);
  void (*silu_mul)(const SiluMulArgs*, int64_t, int64_t);
  void (*row_stats)(const RowStatsArgs*, int64_t, int64_t);
};

bool always() { return true; }

#ifdef TEXTGEN_X86_BUILDS
// __builtin_cpu_supports also asks the OS whether it saves the vector registers.
bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}

bool has_avx512() {
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

bool has_avx512_bf16() {
  return has_avx512() && __builtin_cpu_supports("avx512vnni") &&
         __builtin_cpu_supports("avx512bf16");
}
#endif

#define TEXTGEN_BUILD(isa, check)                                                             \
  Build {                                                                                     \
    #isa, check, textgen_paged_decode_##isa, textgen_kv_store_int8_##isa,                     \
        textgen_gguf_linear_##isa, textgen_gguf_linear_int8_##isa, textgen_gemv_pack_##isa,   \
        textgen_gemv_int8_##isa,                                                              \
        textgen_int8_available_##isa, textgen_int8_pack_##isa,                                \
        textgen_int8_quantize_##isa, textgen_int8_tiles_##isa, textgen_rms_norm_##isa,        \
        textgen_rotary_##isa, textgen_silu_mul_##isa, textgen_row_stats_##isa                 \
  }

// Ascending: each level runs everything the one before it runs.
const Build kBuilds[] = {
    TEXTGEN_BUILD(baseline, always),
#ifdef TEXTGEN_X86_BUILDS
    TEXTGEN_BUILD(avx2, has_avx2),
    TEXTGEN_BUILD(avx512, has_avx512),
    TEXTGEN_BUILD(avx512_bf16, has_avx512_bf16),
#endif
};
constexpr int kNumBuilds = sizeof(kBuilds) / sizeof(kBuilds[0]);

int best_level() {
  int best = 0;
  for (int i = 0; i < kNumBuilds; i++)
    if (kBuilds[i].runs_here()) best = i;
  return best;
}

std::atomic<int> g_selected{-1};

int selected_level() {
  int level = g_selected.load(std::memory_order_relaxed);
  if (level < 0) {
    level = best_level();
    g_selected.store(level, std::memory_order_relaxed);
  }
  return level;
}

const Build& selected() { return kBuilds[selected_level()]; }

// The level the int8 product runs on: the best at or below the selected one that has it.
const Build* int8_build() {
  for (int i = selected_level(); i >= 0; i--)
    if (kBuilds[i].int8_available()) return &kBuilds[i];
  return nullptr;
}

// -- ISA levels ----------------------------------------------------------------------------

std::vector<std::string> isa_levels() {
  std::vector<std::string> levels;
  for (const Build& build : kBuilds)
    if (build.runs_here()) levels.emplace_back(build.name);
  return levels;
}

void select_isa(c10::string_view level) {
  for (int i = 0; i < kNumBuilds; i++) {
    if (level != kBuilds[i].name) continue;
    TORCH_CHECK_VALUE(kBuilds[i].runs_here(), "this CPU cannot run the ", level, " kernels");
    g_selected.store(i, std::memory_order_relaxed);
    return;
  }
  TORCH_CHECK_VALUE(false, "no kernels are built for ISA level '", level, "'");
}

std::string selected_isa() { return selected().name; }

std::string int8_isa() {
  const Build* build = int8_build();
  return build == nullptr ? "" : build->name;
}

// -- checks and threading ------------------------------------------------------------------

int kind_of(const at::Tensor& t, const char* what) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), what, " must be on the CPU, got ", t.device());
  if (t.scalar_type() == at::kFloat) return KIND_F32;
  if (t.scalar_type() == at::kBFloat16) return KIND_BF16;
  TORCH_CHECK_VALUE(false, what, " must be float32 or bfloat16, got ", t.scalar_type());
  return -1;
}

void check_tensor(const at::Tensor& t, const char* what, at::ScalarType dtype, int64_t dim) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), what, " must be on the CPU, got ", t.device());
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, what, " must be ", dtype, ", got ",
                    t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == dim, what, " must have ", dim, " dimensions, got ", t.sizes());
}

void check_contiguous(const at::Tensor& t, const char* what, at::ScalarType dtype, int64_t dim) {
  check_tensor(t, what, dtype, dim);
  TORCH_CHECK_VALUE(t.is_contiguous(), what, " must be contiguous");
}

// Rows of contiguous elements (the last dimension dense), any row stride.
void check_rows(const at::Tensor& t, const char* what) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.stride(1) == 1, what,
                    " must be 2-D with contiguous rows, got sizes ", t.sizes(), " strides ",
                    t.strides());
}

// [T, heads, D] whose heads are contiguous rows of D, any token stride.
void check_heads(const at::Tensor& t, const char* what) {
  TORCH_CHECK_VALUE(t.dim() == 3 && t.stride(2) == 1 && t.stride(1) == t.size(2), what,
                    " must be [tokens, heads, head_dim] with contiguous heads, got sizes ",
                    t.sizes(), " strides ", t.strides());
}

// Items [0, n) handed out one at a time to torch's threads as each finishes its last, so
// that items of unequal cost (sequences of unequal context) and a thread the OS preempts
// do not hold the others back. f(item, thread index).
template <class F>
void parallel_dynamic(int64_t n, const F& f) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  if (threads <= 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < n; i++) f(i, at::get_thread_num());
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    const int thread = at::get_thread_num();
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) f(i, thread);
  });
}

// Below this many tokens a per-token op runs on the calling thread: waking the team costs
// more than the work.
constexpr int64_t kParallelMinTokens = 32;

// -- paged attention -----------------------------------------------------------------------

// The key and value caches [num_blocks, block_size, kv_heads, head_dim] of one layout with
// contiguous rows, of q's dtype or int8 (then with their scales): whether they are int8.
bool check_caches(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                  const std::optional<at::Tensor>& key_scale,
                  const std::optional<at::Tensor>& value_scale) {
  TORCH_CHECK_VALUE(key_cache.dim() == 4 && key_cache.sizes() == value_cache.sizes() &&
                        key_cache.strides() == value_cache.strides() &&
                        key_cache.stride(3) == 1,
                    "the key and value caches must be [num_blocks, block_size, kv_heads, "
                    "head_dim] of one layout with contiguous rows");
  TORCH_CHECK_VALUE(key_cache.scalar_type() == value_cache.scalar_type(),
                    "the key and value caches must have one dtype");
  TORCH_CHECK_VALUE(key_cache.device().is_cpu(), "the caches must be on the CPU");
  const bool int8 = key_cache.scalar_type() == at::kChar;
  TORCH_CHECK_VALUE(int8 || key_cache.scalar_type() == q.scalar_type(),
                    "the cache must have q's dtype or be int8, got ", key_cache.scalar_type());
  const int64_t num_heads = q.size(1), head_dim = q.size(2), num_kv_heads = key_cache.size(2);
  TORCH_CHECK_VALUE(key_cache.size(3) == head_dim, "q and the cache differ in head_dim");
  TORCH_CHECK_VALUE(num_kv_heads > 0 && num_heads % num_kv_heads == 0,
                    "query heads must be a multiple of the KV heads");
  TORCH_CHECK_VALUE(head_dim <= MAX_HEAD_DIM, "head_dim above ", MAX_HEAD_DIM);
  if (!int8) return false;
  TORCH_CHECK_VALUE(key_scale.has_value() && value_scale.has_value(),
                    "an int8 cache needs its key and value scales");
  const std::vector<int64_t> shape{key_cache.size(0), num_kv_heads, key_cache.size(1)};
  for (const at::Tensor* s : {&*key_scale, &*value_scale}) {
    check_contiguous(*s, "a cache scale", at::kFloat, 3);
    TORCH_CHECK_VALUE(s->sizes() == at::IntArrayRef(shape),
                      "cache scales must be [num_blocks, kv_heads, block_size]");
  }
  return true;
}

// Every sequence's context within its block table and every block it reads within the
// cache: the longest context.
int64_t check_block_tables(const at::Tensor& block_tables, const at::Tensor& context_lens,
                           int64_t num_seqs, int64_t num_blocks, int64_t block_size) {
  check_tensor(block_tables, "block_tables", at::kLong, 2);
  TORCH_CHECK_VALUE(block_tables.size(0) == num_seqs && block_tables.stride(1) == 1,
                    "block_tables must be [batch, max_blocks] with contiguous rows");
  check_contiguous(context_lens, "context_lens", at::kLong, 1);
  TORCH_CHECK_VALUE(context_lens.size(0) == num_seqs, "one context length per sequence");
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  int64_t max_context = 0;
  for (int64_t b = 0; b < num_seqs; b++) {
    const int64_t context = lens[b];
    TORCH_CHECK_INDEX(context >= 1 && context <= block_tables.size(1) * block_size,
                      "sequence ", b, ": context length ", context, " outside its block table");
    const int64_t* table = block_tables.data_ptr<int64_t>() + b * block_tables.stride(0);
    for (int64_t i = 0; i < (context + block_size - 1) / block_size; i++)
      TORCH_CHECK_INDEX(table[i] >= 0 && table[i] < num_blocks, "sequence ", b, ": block ",
                        table[i], " outside the cache's ", num_blocks);
    max_context = std::max(max_context, context);
  }
  return max_context;
}

// The decode kernel's arguments: queries q [T, num_heads, D] of `kind` (rows q_stride
// elements apart) into out (contiguous), over one layer's caches [num_blocks, block_size,
// kv_heads, D], int8 where their scales are given.
PagedDecodeArgs decode_args(const void* q, int64_t q_stride, int kind, void* out,
                            int64_t num_heads, const at::Tensor& key_cache,
                            const at::Tensor& value_cache, const at::Tensor& block_tables,
                            const at::Tensor& context_lens, double scale, const float* key_scale,
                            const float* value_scale) {
  const int64_t head_dim = key_cache.size(3);
  return PagedDecodeArgs{
      q,
      q_stride,
      key_cache.data_ptr(),
      value_cache.data_ptr(),
      out,
      num_heads * head_dim,
      block_tables.data_ptr<int64_t>(),
      block_tables.stride(0),
      context_lens.data_ptr<int64_t>(),
      num_heads,
      key_cache.size(2),
      head_dim,
      key_cache.size(1),
      key_cache.stride(0),
      key_cache.stride(1),
      key_cache.stride(2),
      static_cast<float>(scale),
      kind,
      key_scale != nullptr ? KIND_INT8 : kind,
      key_scale,
      value_scale,
  };
}

// The sequences of `args` on torch's threads, each sequence on one thread; with fewer
// sequences than threads and a cache without scales, the items are (sequence, KV head)
// instead, so that a step of one sequence uses every thread. Each KV head's group of query
// heads is computed on its own either way (its scores, softmax and sums): the same bits.
void run_paged_decode(const Build& build, const PagedDecodeArgs& args, int64_t num_seqs,
                      float* space, int64_t per_thread) {
  const int64_t heads = args.num_kv_heads;
  if (num_seqs >= at::get_num_threads() || heads == 1 || args.cache_kind == KIND_INT8) {
    parallel_dynamic(num_seqs, [&](int64_t b, int thread) {
      build.paged_decode(&args, b, space + thread * per_thread);
    });
    return;
  }
  const int64_t group = args.num_heads / heads;
  const size_t size = args.kind == KIND_F32 ? sizeof(float) : sizeof(uint16_t);
  const size_t q_bytes = group * args.head_dim * size, kv_bytes = args.head_stride * size;
  parallel_dynamic(num_seqs * heads, [&](int64_t item, int thread) {
    const int64_t h = item % heads;
    PagedDecodeArgs part = args;
    part.q = static_cast<const char*>(args.q) + h * q_bytes;
    part.out = static_cast<char*>(args.out) + h * q_bytes;
    part.key = static_cast<const char*>(args.key) + h * kv_bytes;
    part.value = static_cast<const char*>(args.value) + h * kv_bytes;
    part.num_heads = group;
    part.num_kv_heads = 1;
    build.paged_decode(&part, item / heads, space + thread * per_thread);
  });
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& key_cache,
                        const at::Tensor& value_cache, const at::Tensor& block_tables,
                        const at::Tensor& context_lens, double scale,
                        const std::optional<at::Tensor>& key_scale,
                        const std::optional<at::Tensor>& value_scale) {
  const int kind = kind_of(q, "q");
  check_heads(q, "q");
  const bool int8 = check_caches(q, key_cache, value_cache, key_scale, value_scale);
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = key_cache.size(1);
  const int64_t max_context =
      check_block_tables(block_tables, context_lens, num_seqs, key_cache.size(0), block_size);
  at::Tensor out = at::empty({num_seqs, num_heads, head_dim}, q.options());
  if (num_seqs == 0) return out;
  const int64_t per_thread = paged_decode_scratch(num_heads, head_dim, max_context, block_size);
  at::Tensor scratch =
      at::empty({at::get_num_threads(), per_thread}, q.options().dtype(at::kFloat));
  const PagedDecodeArgs args = decode_args(
      q.data_ptr(), q.stride(0), kind, out.data_ptr(), num_heads, key_cache, value_cache,
      block_tables, context_lens, scale, int8 ? key_scale->data_ptr<float>() : nullptr,
      int8 ? value_scale->data_ptr<float>() : nullptr);
  run_paged_decode(selected(), args, num_seqs, scratch.data_ptr<float>(), per_thread);
  return out;
}

void kv_store_int8(const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots,
                   at::Tensor& key_cache, at::Tensor& value_cache, at::Tensor& key_scale,
                   at::Tensor& value_scale) {
  const int kind = kind_of(k, "k");
  TORCH_CHECK_VALUE(v.scalar_type() == k.scalar_type(), "k and v must have one dtype");
  check_heads(k, "k");
  check_heads(v, "v");
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "k and v must have one shape");
  check_contiguous(key_cache, "key_cache", at::kChar, 4);
  check_contiguous(value_cache, "value_cache", at::kChar, 4);
  TORCH_CHECK_VALUE(key_cache.sizes() == value_cache.sizes(), "the caches must have one shape");
  const int64_t num_blocks = key_cache.size(0), block_size = key_cache.size(1);
  const int64_t num_kv_heads = key_cache.size(2), head_dim = key_cache.size(3);
  TORCH_CHECK_VALUE(k.size(1) == num_kv_heads && k.size(2) == head_dim,
                    "k and v must be [tokens, kv_heads, head_dim] of the cache");
  TORCH_CHECK_VALUE(head_dim <= MAX_HEAD_DIM, "head_dim above ", MAX_HEAD_DIM);
  for (const at::Tensor* s : {&key_scale, &value_scale}) {
    check_contiguous(*s, "a cache scale", at::kFloat, 3);
    TORCH_CHECK_VALUE(s->sizes() == at::IntArrayRef({num_blocks, num_kv_heads, block_size}),
                      "cache scales must be [num_blocks, kv_heads, block_size]");
  }
  check_contiguous(slots, "slots", at::kLong, 1);
  const int64_t num_tokens = k.size(0);
  TORCH_CHECK_VALUE(slots.size(0) == num_tokens, "one slot per token");
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < num_tokens; t++)
    TORCH_CHECK_INDEX(slot[t] >= 0 && slot[t] < num_blocks * block_size, "slot ", slot[t],
                      " outside the cache's ", num_blocks * block_size);
  const KvStoreArgs args{
      k.data_ptr(),
      v.data_ptr(),
      k.stride(0),
      v.stride(0),
      kind,
      slot,
      num_kv_heads,
      head_dim,
      block_size,
      key_cache.data_ptr<int8_t>(),
      value_cache.data_ptr<int8_t>(),
      key_scale.data_ptr<float>(),
      value_scale.data_ptr<float>(),
  };
  const Build& build = selected();
  // A decode step's few rows: no team.
  at::parallel_for(0, num_tokens, 64, [&](int64_t begin, int64_t end) {
    build.kv_store_int8(&args, begin, end);
  });
}

// New keys and values [T, Hkv, D] copied into a cache of their dtype at their slots: one
// call for both, where two index_copy_ cost 12 us each at a decode step.
void kv_store(const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots,
              at::Tensor& key_cache, at::Tensor& value_cache) {
  kind_of(k, "k");
  TORCH_CHECK_VALUE(v.scalar_type() == k.scalar_type(), "k and v must have one dtype");
  check_heads(k, "k");
  check_heads(v, "v");
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "k and v must have one shape");
  check_contiguous(key_cache, "key_cache", k.scalar_type(), 4);
  check_contiguous(value_cache, "value_cache", k.scalar_type(), 4);
  TORCH_CHECK_VALUE(key_cache.sizes() == value_cache.sizes(), "the caches must have one shape");
  TORCH_CHECK_VALUE(k.size(1) == key_cache.size(2) && k.size(2) == key_cache.size(3),
                    "k and v must be [tokens, kv_heads, head_dim] of the cache");
  check_contiguous(slots, "slots", at::kLong, 1);
  const int64_t num_tokens = k.size(0), num_slots = key_cache.size(0) * key_cache.size(1);
  TORCH_CHECK_VALUE(slots.size(0) == num_tokens, "one slot per token");
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < num_tokens; t++)
    TORCH_CHECK_INDEX(slot[t] >= 0 && slot[t] < num_slots, "slot ", slot[t],
                      " outside the cache's ", num_slots);
  const int64_t row = k.size(1) * k.size(2) * k.element_size();  // a token's heads, bytes
  const auto* k_bytes = static_cast<const char*>(k.data_ptr());
  const auto* v_bytes = static_cast<const char*>(v.data_ptr());
  auto* keys = static_cast<char*>(key_cache.data_ptr());
  auto* values = static_cast<char*>(value_cache.data_ptr());
  at::parallel_for(0, num_tokens, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; t++) {
      std::memcpy(keys + slot[t] * row, k_bytes + t * k.stride(0) * k.element_size(), row);
      std::memcpy(values + slot[t] * row, v_bytes + t * v.stride(0) * v.element_size(), row);
    }
  });
}

// -- GGUF block products ----------------------------------------------------------------------

// Bytes of one block of 32 weights, by ggml type id (Q4_0, Q4_1, Q8_0).
int64_t ggml_block_bytes(int64_t type) {
  switch (type) {
    case 2: return 18;
    case 3: return 20;
    case 8: return 34;
    default: TORCH_CHECK_VALUE(false, "ggml type ", type, " is not Q4_0 (2), Q4_1 (3) or Q8_0 (8)");
  }
  return 0;
}

// blocks [n, k / 32 * block bytes] uint8: k.
int64_t check_blocks(const at::Tensor& blocks, int64_t type) {
  check_contiguous(blocks, "blocks", at::kByte, 2);
  const int64_t bytes = ggml_block_bytes(type);
  TORCH_CHECK_VALUE(blocks.size(1) % bytes == 0, "block rows must be whole ", bytes,
                    "-byte blocks");
  return blocks.size(1) / bytes * 32;
}

// float32 of every f16 bit pattern: a block's scales in one load each (the int8 products).
const float* half_table() {
  static const std::vector<float> table = [] {
    std::vector<float> values(65536);
    for (uint32_t bits = 0; bits < 65536; bits++)
      values[bits] = static_cast<float>(c10::Half(static_cast<uint16_t>(bits), c10::Half::from_bits()));
    return values;
  }();
  return table.data();
}

// Rows x [m, k] (contiguous rows) as contiguous float32: x itself where it is that, else
// widened here (a few rows: a loop, not a torch op and its dispatch).
at::Tensor float_rows(const at::Tensor& x) {
  if (x.scalar_type() == at::kFloat && x.is_contiguous()) return x;
  if (x.scalar_type() == at::kFloat) return x.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  const int64_t m = x.size(0), k = x.size(1);
  const at::BFloat16* src = x.data_ptr<at::BFloat16>();
  float* dst = out.data_ptr<float>();
  for (int64_t t = 0; t < m; t++)
    for (int64_t i = 0; i < k; i++) dst[t * k + i] = static_cast<float>(src[t * x.stride(0) + i]);
  return out;
}

// The quantized rows of x: kept per thread and reused, since a fresh buffer of megabytes
// per call costs its page faults every time.
uint8_t* int8_scratch(size_t bytes) {
  thread_local std::vector<uint8_t> buffer;
  if (buffer.size() < bytes) buffer.resize(bytes);
  return buffer.data();
}

// Rows x [m, k] (of `x_kind`, rows x_stride elements apart) rounded to int8 per 32
// features by `build` (int8_quantize) into the calling thread's scratch, with `padding`
// rows of zeros after them: q, d_x, s_x.
std::tuple<int8_t*, float*, float*> quantized_rows(const Build& build, const void* x,
                                                   int64_t x_stride, int x_kind, int64_t m,
                                                   int64_t k, int64_t padding) {
  const int64_t kb = k / 32, rows = m + padding;
  uint8_t* space = int8_scratch(rows * k + 2 * rows * kb * sizeof(float));
  int8_t* q = reinterpret_cast<int8_t*>(space);
  float* d_x = reinterpret_cast<float*>(space + rows * k);
  float* s_x = d_x + rows * kb;
  // NOTE: zero padding: rows past m that a tile reads compute on zeros, never on stale
  // floats (a NaN there would not reach y, but the time spent on it would).
  std::memset(q + m * k, 0, padding * k);
  std::memset(d_x + m * kb, 0, padding * kb * sizeof(float));
  std::memset(s_x + m * kb, 0, padding * kb * sizeof(float));
  Int8LinearArgs args{};
  args.x = x;
  args.x_stride = x_stride;
  args.x_kind = x_kind;
  args.m = m;
  args.k = k;
  args.q = q;
  args.d_x = d_x;
  args.s_x = s_x;
  at::parallel_for(0, m, 1, [&](int64_t begin, int64_t end) {
    build.int8_quantize(&args, begin, end);
  });
  return {q, d_x, s_x};
}

std::tuple<int8_t*, float*, float*> quantized_rows(const Build& build, const at::Tensor& x,
                                                   int64_t padding) {
  return quantized_rows(build, x.data_ptr(), x.stride(0),
                        x.scalar_type() == at::kFloat ? KIND_F32 : KIND_BF16, x.size(0),
                        x.size(1), padding);
}

// silu(gate) * up of rows y [m, n] float32 (gate, then up), into a tensor of `dtype`:
// the native SiLU pass over the product as it would be returned (bf16: rounded first).
at::Tensor gated_rows(const Build& build, at::Tensor y, at::ScalarType dtype) {
  const int64_t m = y.size(0), n = y.size(1);
  if (dtype == at::kBFloat16) {
    at::Tensor rounded = at::empty({m, n}, y.options().dtype(at::kBFloat16));
    const float* src = y.data_ptr<float>();
    at::BFloat16* dst = rounded.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < m * n; i++) dst[i] = at::BFloat16(src[i]);
    y = rounded;
  }
  at::Tensor out = at::empty({m, n / 2}, y.options());
  const SiluMulArgs args{y.data_ptr(), n, out.data_ptr(), n / 2,
                         dtype == at::kFloat ? KIND_F32 : KIND_BF16};
  build.silu_mul(&args, 0, m);
  return out;
}

at::Tensor gguf_linear(const at::Tensor& x, const at::Tensor& blocks, int64_t ggml_type,
                       bool int8_activations, bool gated) {
  const int kind = kind_of(x, "x");
  check_rows(x, "x");
  const int64_t k = check_blocks(blocks, ggml_type);
  TORCH_CHECK_VALUE(x.size(1) == k, "x has ", x.size(1), " features, the blocks ", k);
  TORCH_CHECK_VALUE(k <= GGUF_MAX_K, "more than ", GGUF_MAX_K, " input features");
  const Build* int8 = int8_activations ? int8_build() : nullptr;
  TORCH_CHECK(!int8_activations || int8 != nullptr, "no int8 product on this CPU's builds");
  const int64_t m = x.size(0), n = blocks.size(0);
  TORCH_CHECK_VALUE(!gated || n % 2 == 0, "a gated product needs gate and up halves");
  at::Tensor y = at::empty({m, n}, x.options().dtype(at::kFloat));
  if (m > 0 && n > 0) {
    const at::Tensor xf = int8 == nullptr ? float_rows(x) : at::Tensor();
    GgufLinearArgs args{int8 == nullptr ? xf.data_ptr<float>() : nullptr,
                        blocks.data_ptr<uint8_t>(),
                        static_cast<int>(ggml_type),
                        m,
                        n,
                        k,
                        y.data_ptr<float>(),
                        n,
                        nullptr,
                        nullptr,
                        nullptr,
                        half_table()};
    if (int8 != nullptr) std::tie(args.q, args.d_x, args.s_x) = quantized_rows(*int8, x, 0);
    const Build& build = int8 != nullptr ? *int8 : selected();
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      if (int8 != nullptr) build.gguf_linear_int8(&args, begin, end);
      else build.gguf_linear(&args, begin, end);
    });
  }
  if (gated) return gated_rows(selected(), y, x.scalar_type());
  if (kind == KIND_F32) return y;
  at::Tensor rounded = at::empty({m, n}, x.options());  // to nearest even, as torch rounds
  const float* src = y.data_ptr<float>();
  at::BFloat16* dst = rounded.data_ptr<at::BFloat16>();
  for (int64_t i = 0; i < m * n; i++) dst[i] = at::BFloat16(src[i]);
  return rounded;
}

at::Tensor gemv_pack(const at::Tensor& blocks, int64_t ggml_type) {
  const int64_t k = check_blocks(blocks, ggml_type);
  TORCH_CHECK_VALUE(ggml_type == 2 || ggml_type == 3, "gemv packs Q4_0 (2) and Q4_1 (3) blocks");
  at::Tensor rows = at::empty({blocks.size(0), gemv_row_bytes(k)}, blocks.options());
  // NOTE: one layout for every level: any build's pack serves.
  kBuilds[0].gemv_pack(blocks.data_ptr<uint8_t>(), static_cast<int>(ggml_type), blocks.size(0),
                       k, rows.data_ptr<uint8_t>());
  return rows;
}

// y [m, n] float32 (contiguous) = x [m, k] (of `x_kind`, rows x_stride elements apart)
// rounded to int8 per 32 features, times gemv_pack's rows [n, gemv_row_bytes(k)].
void gemv_into(const Build& build, const void* x, int64_t x_stride, int x_kind, int64_t m,
               int64_t k, const uint8_t* rows, int64_t n, float* y) {
  const int64_t kb = k / 32, kp = (kb + 1) / 2, kb8 = (kb + 7) / 8 * 8;
  const auto [q, d_x, s_x] = quantized_rows(build, x, x_stride, x_kind, m, k, 0);
  // The activations in the rows' order: per pair of blocks, the low halves, then the high.
  std::vector<int8_t> x2(m * kp * 64, 0);
  std::vector<float> dx2(m * kp * 8, 0.0f), sums(m * kb8, 0.0f);
  for (int64_t t = 0; t < m; t++)
    for (int64_t b = 0; b < kb; b++) {
      int8_t* pair = x2.data() + (t * kp + b / 2) * 64 + (b % 2) * 16;
      std::memcpy(pair, q + t * k + b * 32, 16);
      std::memcpy(pair + 32, q + t * k + b * 32 + 16, 16);
      std::fill_n(dx2.data() + (t * kp + b / 2) * 8 + (b % 2) * 4, 4, d_x[t * kb + b]);
      sums[t * kb8 + b] = s_x[t * kb + b];
    }
  const GemvArgs args{rows, m, n, k, x2.data(), dx2.data(), sums.data(), y, n};
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    build.gemv_int8(&args, begin, end);
  });
}

at::Tensor gemv_int8(const at::Tensor& x, const at::Tensor& rows, int64_t in_features,
                     bool gated) {
  const Build* build = int8_build();
  TORCH_CHECK(build != nullptr, "no int8 product on this CPU's kernel builds");
  const int kind = kind_of(x, "x");
  check_rows(x, "x");
  check_contiguous(rows, "rows", at::kByte, 2);
  const int64_t k = in_features, m = x.size(0), n = rows.size(0);
  TORCH_CHECK_VALUE(k > 0 && k % 32 == 0 && x.size(1) == k, "x has ", x.size(1),
                    " features, the rows ", k);
  TORCH_CHECK_VALUE(rows.size(1) == gemv_row_bytes(k), "rows of ", rows.size(1),
                    " bytes are not gemv_pack's for ", k, " features");
  TORCH_CHECK_VALUE(!gated || n % 2 == 0, "a gated product needs gate and up halves");
  at::Tensor y = at::empty({m, n}, x.options().dtype(at::kFloat));
  if (m > 0 && n > 0)
    gemv_into(*build, x.data_ptr(), x.stride(0), kind, m, k, rows.data_ptr<uint8_t>(), n,
              y.data_ptr<float>());
  if (gated) return gated_rows(selected(), y, x.scalar_type());
  return x.scalar_type() == at::kFloat ? y : y.to(at::kBFloat16);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> int8_pack(const at::Tensor& blocks,
                                                         int64_t ggml_type) {
  const int64_t k = check_blocks(blocks, ggml_type);
  const int64_t n = blocks.size(0);
  TORCH_CHECK_VALUE(n % INT8_LANES == 0, "the int8 layout takes output features in 16s, got ",
                    n);
  const auto bytes = blocks.options();
  at::Tensor values = at::empty({n, k}, bytes);
  at::Tensor scales = at::empty({n, k / 32}, bytes.dtype(at::kFloat));
  at::Tensor offsets = at::empty({n, k / 32}, bytes.dtype(at::kFloat));
  // NOTE: one layout for every level: any build's pack serves.
  kBuilds[0].int8_pack(blocks.data_ptr<uint8_t>(), static_cast<int>(ggml_type), n, k,
                       values.data_ptr<uint8_t>(), scales.data_ptr<float>(),
                       offsets.data_ptr<float>());
  return {values, scales, offsets};
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& scales,
                       const at::Tensor& offsets, int64_t ggml_type, bool gated) {
  const Build* build = int8_build();
  TORCH_CHECK(build != nullptr, "no int8 product on this CPU's kernel builds");
  const int kind = kind_of(x, "x");
  check_rows(x, "x");
  check_contiguous(values, "values", at::kByte, 2);
  check_contiguous(scales, "scales", at::kFloat, 2);
  check_contiguous(offsets, "offsets", at::kFloat, 2);
  ggml_block_bytes(ggml_type);
  const int64_t n = values.size(0), k = values.size(1), m = x.size(0), kb = k / 32;
  TORCH_CHECK_VALUE(k % 32 == 0 && n % (gated ? 2 * INT8_LANES : INT8_LANES) == 0,
                    "packed weight of ", n, " x ", k, " does not fit the int8 layout");
  TORCH_CHECK_VALUE(scales.sizes() == at::IntArrayRef({n, kb}) && scales.sizes() == offsets.sizes(),
                    "scales and offsets must be [out_features, in_features / 32]");
  TORCH_CHECK_VALUE(x.size(1) == k, "x has ", x.size(1), " features, the weight ", k);
  at::Tensor y = at::empty({m, gated ? n / 2 : n}, x.options());
  if (m == 0) return y;
  const auto [q, d_x, s_x] = quantized_rows(*build, x, INT8_ROWS);
  const Int8LinearArgs args{
      x.data_ptr(), x.stride(0), kind, values.data_ptr<uint8_t>(), scales.data_ptr<float>(),
      offsets.data_ptr<float>(), static_cast<int>(ggml_type), m, n, k, gated ? 1 : 0,
      q, d_x, s_x, y.data_ptr(), y.stride(0), kind,
  };
  const int64_t tiles = gated ? n / 2 / INT8_LANES : n / INT8_LANES;
  const int64_t chunks = (m + INT8_ROW_CHUNK - 1) / INT8_ROW_CHUNK;
  parallel_dynamic(chunks * tiles, [&](int64_t item, int) {
    build->int8_tiles(&args, item, item + 1);
  });
  return y;
}

// -- per-token operations ------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> norm_rows(const at::Tensor& x, const at::Tensor* residual,
                                        const at::Tensor& weight, double eps) {
  const int kind = kind_of(x, "x");
  check_rows(x, "x");
  check_contiguous(weight, "weight", x.scalar_type(), 1);
  const int64_t tokens = x.size(0), hidden = x.size(1);
  TORCH_CHECK_VALUE(weight.size(0) == hidden, "weight must have x's ", hidden, " features");
  at::Tensor out = at::empty({tokens, hidden}, x.options());
  at::Tensor sum;
  if (residual != nullptr) {
    check_contiguous(*residual, "residual", x.scalar_type(), 2);
    TORCH_CHECK_VALUE(residual->sizes() == x.sizes(), "residual must have x's shape");
    sum = at::empty({tokens, hidden}, x.options());
  }
  const RmsNormArgs args{
      x.data_ptr(),
      x.stride(0),
      residual != nullptr ? residual->data_ptr() : nullptr,
      residual != nullptr ? sum.data_ptr() : nullptr,
      weight.data_ptr(),
      out.data_ptr(),
      hidden,
      static_cast<float>(eps),
      kind,
  };
  const Build& build = selected();
  at::parallel_for(0, tokens, kParallelMinTokens, [&](int64_t begin, int64_t end) {
    build.rms_norm(&args, begin, end);
  });
  return {out, sum};
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return std::get<0>(norm_rows(x, nullptr, weight, eps));
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  return norm_rows(x, &residual, weight, eps);
}

void rotary_(at::Tensor& q, at::Tensor& k, const at::Tensor& positions, const at::Tensor& cos,
             const at::Tensor& sin) {
  const int kind = kind_of(q, "q");
  TORCH_CHECK_VALUE(k.scalar_type() == q.scalar_type(), "q and k must have one dtype");
  check_heads(q, "q");
  check_heads(k, "k");
  const int64_t tokens = q.size(0), head_dim = q.size(2);
  TORCH_CHECK_VALUE(k.size(0) == tokens && k.size(2) == head_dim && head_dim % 2 == 0,
                    "q and k must share tokens and an even head_dim");
  check_contiguous(positions, "positions", at::kLong, 1);
  TORCH_CHECK_VALUE(positions.size(0) == tokens, "one position per token");
  check_contiguous(cos, "cos", at::kFloat, 2);
  check_contiguous(sin, "sin", at::kFloat, 2);
  TORCH_CHECK_VALUE(cos.sizes() == sin.sizes() && cos.size(1) == head_dim,
                    "cos and sin must be [positions, head_dim]");
  const int64_t* position = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; t++)
    TORCH_CHECK_INDEX(position[t] >= 0 && position[t] < cos.size(0), "position ", position[t],
                      " is past the rotary table (", cos.size(0), ")");
  const RotaryArgs args{
      q.data_ptr(), k.data_ptr(), q.stride(0), k.stride(0), q.size(1), k.size(1), head_dim,
      position, cos.data_ptr<float>(), sin.data_ptr<float>(), kind,
  };
  const Build& build = selected();
  at::parallel_for(0, tokens, kParallelMinTokens, [&](int64_t begin, int64_t end) {
    build.rotary(&args, begin, end);
  });
}

at::Tensor silu_and_mul(const at::Tensor& x) {
  const int kind = kind_of(x, "x");
  check_rows(x, "x");
  TORCH_CHECK_VALUE(x.size(1) % 2 == 0, "x must hold gate and up halves of one width");
  const int64_t tokens = x.size(0), inter = x.size(1) / 2;
  at::Tensor out = at::empty({tokens, inter}, x.options());
  const SiluMulArgs args{x.data_ptr(), x.stride(0), out.data_ptr(), inter, kind};
  const Build& build = selected();
  at::parallel_for(0, tokens, kParallelMinTokens, [&](int64_t begin, int64_t end) {
    build.silu_mul(&args, begin, end);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> row_stats(const at::Tensor& logits) {
  check_contiguous(logits, "logits", at::kFloat, 2);
  const int64_t rows = logits.size(0), cols = logits.size(1);
  TORCH_CHECK_VALUE(cols > 0, "rows of no logits");
  at::Tensor argmax = at::empty({rows}, logits.options().dtype(at::kLong));
  at::Tensor lse = at::empty({rows}, logits.options());
  const RowStatsArgs args{logits.data_ptr<float>(), cols, argmax.data_ptr<int64_t>(),
                          lse.data_ptr<float>()};
  const Build& build = selected();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    build.row_stats(&args, begin, end);
  });
  return {argmax, lse};
}


// -- a Llama decoder stack's small step ----------------------------------------------------

// The decoder layers of a Llama-family model (RMSNorm, fused q/k/v, rotary, paged
// attention, o, RMSNorm, fused gate/up with SiLU, down) over a step of a few tokens, in one
// call: every kernel and every thread split is the one the single operators use, in the
// order the Python layers call them, so the result equals theirs to the bit; what goes is
// the Python and the dispatch between them (about 0.1 ms a layer). float32 activations;
// the four products per layer on int8 activations against gemv_pack'ed 4-bit rows; the
// cache float32 or int8. Layer l reads norms[2l] (input) and norms[2l + 1] (post-attention)
// and rows[4l .. 4l + 3] (qkv, o, gate/up, down). Each query token t attends through
// block_tables[t] to context_lens[t] tokens (a decode step's per-sequence metadata, or a
// prefill's per-token one). Returns the last layer's (mlp output, residual).
std::tuple<at::Tensor, at::Tensor> llama_small_step(
    const at::Tensor& hidden, const at::Tensor& positions, const at::Tensor& slots,
    const at::Tensor& block_tables, const at::Tensor& context_lens, at::TensorList norms,
    at::TensorList rows, at::TensorList key_caches, at::TensorList value_caches,
    at::TensorList key_scales, at::TensorList value_scales, const at::Tensor& cos,
    const at::Tensor& sin, int64_t num_heads, int64_t intermediate, double eps, double scale) {
  const Build* int8 = int8_build();
  TORCH_CHECK(int8 != nullptr, "no int8 product on this CPU's kernel builds");
  check_contiguous(hidden, "hidden", at::kFloat, 2);
  const int64_t tokens = hidden.size(0), width = hidden.size(1);
  const int64_t layers = static_cast<int64_t>(key_caches.size());
  const auto count = [](at::TensorList list) { return static_cast<int64_t>(list.size()); };
  TORCH_CHECK_VALUE(layers > 0 && count(value_caches) == layers,
                    "one key and one value cache per layer");
  TORCH_CHECK_VALUE(count(norms) == 2 * layers && count(rows) == 4 * layers,
                    "two norms and four products per layer");
  const bool quantized = key_caches[0].scalar_type() == at::kChar;
  TORCH_CHECK_VALUE(count(key_scales) == (quantized ? layers : 0) &&
                        count(value_scales) == count(key_scales),
                    "an int8 cache's scales per layer, no scales for a float cache");
  const at::Tensor& cache0 = key_caches[0];
  TORCH_CHECK_VALUE(cache0.dim() == 4, "caches must be [num_blocks, block_size, kv_heads, head_dim]");
  const int64_t num_blocks = cache0.size(0), block_size = cache0.size(1);
  const int64_t num_kv_heads = cache0.size(2), head_dim = cache0.size(3);
  TORCH_CHECK_VALUE(num_kv_heads > 0 && num_heads > 0 && num_heads % num_kv_heads == 0,
                    "query heads must be a multiple of the KV heads");
  TORCH_CHECK_VALUE(head_dim % 2 == 0 && head_dim <= MAX_HEAD_DIM, "head_dim must be even and at most ",
                    MAX_HEAD_DIM);
  for (int64_t l = 0; l < layers; l++) {
    for (const at::Tensor* c : {&key_caches[l], &value_caches[l]}) {
      check_contiguous(*c, "a cache", quantized ? at::kChar : at::kFloat, 4);
      TORCH_CHECK_VALUE(c->sizes() == cache0.sizes(), "every layer's caches must have one shape");
    }
    if (quantized)
      for (const at::Tensor* s : {&key_scales[l], &value_scales[l]}) {
        check_contiguous(*s, "a cache scale", at::kFloat, 3);
        TORCH_CHECK_VALUE(s->sizes() == at::IntArrayRef({num_blocks, num_kv_heads, block_size}),
                          "cache scales must be [num_blocks, kv_heads, block_size]");
      }
    for (int64_t i = 0; i < 2; i++) {
      check_contiguous(norms[2 * l + i], "a norm weight", at::kFloat, 1);
      TORCH_CHECK_VALUE(norms[2 * l + i].size(0) == width, "norm weights must have ", width,
                        " features");
    }
  }
  const int64_t q_width = num_heads * head_dim, kv_width = num_kv_heads * head_dim;
  const int64_t qkv_width = q_width + 2 * kv_width;
  // (output features, input features) of qkv, o, gate/up and down.
  const int64_t shapes[4][2] = {
      {qkv_width, width}, {width, q_width}, {2 * intermediate, width}, {width, intermediate}};
  for (int64_t l = 0; l < layers; l++)
    for (int64_t i = 0; i < 4; i++) {
      const at::Tensor& r = rows[4 * l + i];
      check_contiguous(r, "rows", at::kByte, 2);
      const int64_t n = shapes[i][0], k = shapes[i][1];
      TORCH_CHECK_VALUE(k % 32 == 0 && r.size(0) == n && r.size(1) == gemv_row_bytes(k),
                        "layer ", l, " product ", i, ": rows ", r.sizes(),
                        " are not gemv_pack's for ", n, " x ", k);
    }
  check_contiguous(positions, "positions", at::kLong, 1);
  check_contiguous(slots, "slots", at::kLong, 1);
  TORCH_CHECK_VALUE(positions.size(0) == tokens && slots.size(0) == tokens,
                    "one position and one slot per token");
  check_contiguous(cos, "cos", at::kFloat, 2);
  check_contiguous(sin, "sin", at::kFloat, 2);
  TORCH_CHECK_VALUE(cos.sizes() == sin.sizes() && cos.size(1) == head_dim,
                    "cos and sin must be [positions, head_dim]");
  const int64_t* position = positions.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; t++) {
    TORCH_CHECK_INDEX(position[t] >= 0 && position[t] < cos.size(0), "position ", position[t],
                      " is past the rotary table (", cos.size(0), ")");
    TORCH_CHECK_INDEX(slot[t] >= 0 && slot[t] < num_blocks * block_size, "slot ", slot[t],
                      " outside the cache's ", num_blocks * block_size);
  }
  const int64_t max_context =
      check_block_tables(block_tables, context_lens, tokens, num_blocks, block_size);

  const auto floats = hidden.options();
  at::Tensor out = at::empty({tokens, width}, floats);
  at::Tensor residual = at::empty({tokens, width}, floats);
  if (tokens == 0) return {out, residual};
  // Working rows: the norm's output, the other residual, qkv, attention, the gate/up product
  // and its activation.
  at::Tensor work = at::empty({tokens * (2 * width + qkv_width + q_width + 3 * intermediate)},
                              floats);
  float* normed = work.data_ptr<float>();
  float* other = normed + tokens * width;
  float* qkv = other + tokens * width;
  float* attn = qkv + tokens * qkv_width;
  float* gate_up = attn + tokens * q_width;
  float* inner = gate_up + tokens * 2 * intermediate;
  const int64_t per_thread = paged_decode_scratch(num_heads, head_dim, max_context, block_size);
  at::Tensor attention_space = at::empty({at::get_num_threads(), per_thread}, floats);
  const Build& build = selected();

  auto norm = [&](const float* x, const float* res, float* sum, const at::Tensor& weight) {
    const RmsNormArgs args{x, width, res, sum, weight.data_ptr<float>(), normed, width,
                           static_cast<float>(eps), KIND_F32};
    at::parallel_for(0, tokens, kParallelMinTokens, [&](int64_t begin, int64_t end) {
      build.rms_norm(&args, begin, end);
    });
  };
  auto product = [&](const float* x, int64_t k, const at::Tensor& r, float* y) {
    gemv_into(*int8, x, k, KIND_F32, tokens, k, r.data_ptr<uint8_t>(), r.size(0), y);
  };
  // The residual stream: the embeddings, then the sums the norms write, alternating
  // between the result tensor and the working rows so that no sum overwrites its input.
  const float* stream = hidden.data_ptr<float>();
  float* sums[2] = {residual.data_ptr<float>(), other};
  int next_sum = 0;
  float* mlp = out.data_ptr<float>();
  for (int64_t l = 0; l < layers; l++) {
    if (l == 0) {
      norm(stream, nullptr, nullptr, norms[0]);
    } else {
      float* sum = sums[next_sum];
      next_sum ^= 1;
      norm(mlp, stream, sum, norms[2 * l]);
      stream = sum;
    }
    product(normed, width, rows[4 * l], qkv);
    float* keys = qkv + q_width;
    float* values = keys + kv_width;
    const RotaryArgs rotary{qkv, keys, qkv_width, qkv_width, num_heads, num_kv_heads, head_dim,
                            position, cos.data_ptr<float>(), sin.data_ptr<float>(), KIND_F32};
    at::parallel_for(0, tokens, kParallelMinTokens, [&](int64_t begin, int64_t end) {
      build.rotary(&rotary, begin, end);
    });
    const at::Tensor &key_cache = key_caches[l], &value_cache = value_caches[l];
    if (quantized) {
      const KvStoreArgs store{keys, values, qkv_width, qkv_width, KIND_F32, slot, num_kv_heads,
                              head_dim, block_size, key_cache.data_ptr<int8_t>(),
                              value_cache.data_ptr<int8_t>(), key_scales[l].data_ptr<float>(),
                              value_scales[l].data_ptr<float>()};
      at::parallel_for(0, tokens, 64, [&](int64_t begin, int64_t end) {
        build.kv_store_int8(&store, begin, end);
      });
    } else {
      auto* key_rows = key_cache.data_ptr<float>();
      auto* value_rows = value_cache.data_ptr<float>();
      for (int64_t t = 0; t < tokens; t++) {
        std::memcpy(key_rows + slot[t] * kv_width, keys + t * qkv_width, kv_width * sizeof(float));
        std::memcpy(value_rows + slot[t] * kv_width, values + t * qkv_width,
                    kv_width * sizeof(float));
      }
    }
    const PagedDecodeArgs attention = decode_args(
        qkv, qkv_width, KIND_F32, attn, num_heads, key_cache, value_cache, block_tables,
        context_lens, scale, quantized ? key_scales[l].data_ptr<float>() : nullptr,
        quantized ? value_scales[l].data_ptr<float>() : nullptr);
    run_paged_decode(build, attention, tokens, attention_space.data_ptr<float>(), per_thread);
    product(attn, q_width, rows[4 * l + 1], mlp);  // o_proj, into the free output rows
    float* sum = sums[next_sum];
    next_sum ^= 1;
    norm(mlp, stream, sum, norms[2 * l + 1]);
    stream = sum;
    product(normed, width, rows[4 * l + 2], gate_up);
    const SiluMulArgs act{gate_up, 2 * intermediate, inner, intermediate, KIND_F32};
    build.silu_mul(&act, 0, tokens);
    product(inner, intermediate, rows[4 * l + 3], mlp);
  }
  if (stream != residual.data_ptr<float>())
    std::memcpy(residual.data_ptr<float>(), stream, tokens * width * sizeof(float));
  return {out, residual};
}
}  // namespace

TORCH_LIBRARY(textgen, m) {
  m.def("isa_levels() -> str[]", &isa_levels);
  m.def("select_isa(str level) -> ()", &select_isa);
  m.def("selected_isa() -> str", &selected_isa);
  m.def("int8_isa() -> str", &int8_isa);
  m.def(
      "paged_decode(Tensor q, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
      "Tensor context_lens, float scale, Tensor? key_scale=None, Tensor? value_scale=None) "
      "-> Tensor");
  m.def(
      "kv_store_int8(Tensor k, Tensor v, Tensor slots, Tensor(a!) key_cache, "
      "Tensor(b!) value_cache, Tensor(c!) key_scale, Tensor(d!) value_scale) -> ()");
  m.def(
      "gguf_linear(Tensor x, Tensor blocks, int ggml_type, bool int8_activations=False, "
      "bool gated=False) -> Tensor");
  m.def(
      "kv_store(Tensor k, Tensor v, Tensor slots, Tensor(a!) key_cache, Tensor(b!) value_cache) "
      "-> ()");
  m.def("int8_pack(Tensor blocks, int ggml_type) -> (Tensor, Tensor, Tensor)");
  m.def("gemv_pack(Tensor blocks, int ggml_type) -> Tensor");
  m.def("gemv_int8(Tensor x, Tensor rows, int in_features, bool gated=False) -> Tensor");
  m.def(
      "int8_linear(Tensor x, Tensor values, Tensor scales, Tensor offsets, int ggml_type, "
      "bool gated=False) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rotary_(Tensor(a!) q, Tensor(b!) k, Tensor positions, Tensor cos, Tensor sin) -> ()");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("row_stats(Tensor logits) -> (Tensor, Tensor)");
  m.def(
      "llama_small_step(Tensor hidden, Tensor positions, Tensor slots, Tensor block_tables, "
      "Tensor context_lens, Tensor[] norms, Tensor[] rows, Tensor(a!)[] key_caches, "
      "Tensor(b!)[] value_caches, Tensor(c!)[] key_scales, Tensor(d!)[] value_scales, "
      "Tensor cos, Tensor sin, int num_heads, int intermediate, float eps, float scale) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(textgen, CPU, m) {
  m.impl("paged_decode", &paged_decode);
  m.impl("kv_store_int8", &kv_store_int8);
  m.impl("kv_store", &kv_store);
  m.impl("gguf_linear", &gguf_linear);
  m.impl("int8_pack", &int8_pack);
  m.impl("gemv_pack", &gemv_pack);
  m.impl("gemv_int8", &gemv_int8);
  m.impl("int8_linear", &int8_linear);
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rotary_", &rotary_);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("row_stats", &row_stats);
  m.impl("llama_small_step", &llama_small_step);
}

// `import textgen.server.kernels._C` registers the operators above.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "textgen's native CPU operators: torch.ops.textgen", -1,
                               nullptr};
  return PyModule_Create(&module);
}
