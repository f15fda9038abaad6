// Shared helpers of fastmae's C++ CPU kernels: argument checks, the one-pass index-range
// check every kernel runs before touching memory, and fp32 <-> storage conversions written so
// that the loops using them vectorise.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace fastmae {

// ------------------------------------------------------------------ fp32 <-> storage dtype
// bf16 by bit manipulation (round to nearest even, NaN kept quiet), the same results as
// c10::BFloat16 but branch-free, so loops over it vectorise. fp16 goes through c10::Half.
inline float to_f(float v) { return v; }
inline float to_f(c10::Half v) { return static_cast<float>(v); }
inline float to_f(c10::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename T>
inline T from_f(float v);
template <>
inline float from_f<float>(float v) { return v; }
template <>
inline c10::Half from_f<c10::Half>(float v) { return c10::Half(v); }
template <>
inline c10::BFloat16 from_f<c10::BFloat16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint16_t bits = (v != v) ? uint16_t(0x7FC0) : static_cast<uint16_t>(rounded);
  return c10::BFloat16(bits, c10::BFloat16::from_bits());
}

// ------------------------------------------------------------------ 8-wide fp32 vectors
// GCC vector extensions: 8 floats that the AVX2 variants hold in one register (two in the
// baseline variant). Loads and stores convert from and to the storage dtype with the same
// results as to_f / from_f; bf16 by bit manipulation, fp16 one element at a time.
// (The baseline variant passes them in memory, which GCC warns about; every use is inlined.)
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));
typedef uint16_t v16h __attribute__((vector_size(32)));

inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline v8f load8(const c10::BFloat16* p) {
  // bf16 bits in the high half of each 32-bit lane, zeros in the low half: an interleave with a
  // zero vector (2 unpacks + 1 lane permute; GCC 12 turns a widening convert into 5 instructions)
  v8h h;
  std::memcpy(&h, p, sizeof(h));
  const v16h wide = __builtin_shufflevector(v8h{}, h, 0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
  v8f v;
  std::memcpy(&v, &wide, sizeof(v));
  return v;
}
inline v8f load8(const c10::Half* p) {
  v8f v;
  for (int i = 0; i < 8; ++i) v[i] = to_f(p[i]);
  return v;
}

inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }
inline v8h round8_bf16(v8f v) {  // the bf16 bits of v, as from_f
  v8u u;
  std::memcpy(&u, &v, sizeof(u));
  const v8u rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const v8u nan = reinterpret_cast<v8u>(v != v);  // all ones where v is NaN
  return __builtin_convertvector((rounded & ~nan) | (nan & 0x7FC0u), v8h);
}
inline void store8(c10::BFloat16* p, v8f v) {
  const v8h h = round8_bf16(v);
  std::memcpy(p, &h, sizeof(h));
}
inline void store8(c10::Half* p, v8f v) {
  for (int i = 0; i < 8; ++i) p[i] = from_f<c10::Half>(v[i]);
}

// Sum of the 8 lanes in a fixed order.
inline float hsum8(v8f a) {
  return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

// ------------------------------------------------------------------ 16-wide fp32 vectors
// Two v8f side by side: one zmm register in the AVX-512 variants (half the instructions of two
// v8f there), two ymm or four xmm registers elsewhere (the same instructions as two v8f).
typedef float v16f __attribute__((vector_size(64)));
typedef uint16_t v32h __attribute__((vector_size(64)));

inline v8f lo8(v16f v) { return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7); }
inline v8f hi8(v16f v) { return __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15); }

inline v16f load16(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline v16f load16(const c10::BFloat16* p) {  // as load8: bf16 bits into the high halves
  v16h h;
  std::memcpy(&h, p, sizeof(h));
  const v32h wide = __builtin_shufflevector(v16h{}, h, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23, 8,
                                            24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  v16f v;
  std::memcpy(&v, &wide, sizeof(v));
  return v;
}
inline v16f load16(const c10::Half* p) {
  const v8f a = load8(p), b = load8(p + 8);
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}

// Sum of the 16 lanes in a fixed order.
inline float hsum16(v16f a) { return hsum8(lo8(a) + hi8(a)); }

// sum_{k < n} f(k), f giving the 16 values k .. k+15, for n a multiple of 64: four accumulators
// (four independent chains of additions, so that the next addition need not wait for the last)
// combined in a fixed order (deterministic, like sum_f32).
template <typename F>
inline float sum_v16(int64_t n, const F& f) {
  v16f a0 = {}, a1 = {}, a2 = {}, a3 = {};
  for (int64_t k = 0; k < n; k += 64) {
    a0 += f(k);
    a1 += f(k + 16);
    a2 += f(k + 32);
    a3 += f(k + 48);
  }
  return hsum16((a0 + a1) + (a2 + a3));
}

// Dispatch over the three float dtypes the ops accept (scalar_t inside the lambda).
#define FASTMAE_DISPATCH_FLOAT(TYPE, NAME, ...)              \
  AT_DISPATCH_SWITCH(TYPE, NAME,                             \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

// Unsigned integer type of the same size as T: pure copies move bits, never convert.
template <typename T>
using bits_t = std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>;
static_assert(sizeof(bits_t<c10::BFloat16>) == 2 && sizeof(bits_t<float>) == 4, "bits_t");

// ------------------------------------------------------------------ instruction-set dispatch
// The extension is built for the baseline x86-64 ISA (SSE2), so that it loads anywhere; the hot
// loops are compiled twice more, for AVX2 + FMA + F16C and for AVX-512 with its bf16 conversions
// (AVX512-BF16: one vcvtneps2bf16 rounds 8 or 16 floats to bf16, where the AVX2 code needs about
// 7 integer instructions per 8), and the best variant the CPU runs is chosen at run time.
// FASTMAE_DEFINE_ISA_VARIANTS(name, body) defines name_avx512<Ts...>(args...),
// name_avx2<Ts...>(args...) and name_base<Ts...>(args...), which run `body<Isa, Ts...>(args...)`
// with Isa = IsaAvx512, IsaAvx2 or IsaBase and everything the body calls inlined into it (flatten),
// so that the whole loop nest is compiled for that instruction set; and name<Ts...>(isa, args...),
// which calls the variant `isa` names. The caller caps the variant (fastmae.config's
// FASTMAE_CPU_ISA, passed to every op as an argument) to test the others on a machine that has more.
enum class CpuIsa { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

// The best variant this CPU runs.
inline CpuIsa best_cpu_isa() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool avx2 =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  static const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return avx512 ? CpuIsa::kAvx512 : avx2 ? CpuIsa::kAvx2 : CpuIsa::kBase;
#else
  return CpuIsa::kBase;
#endif
}

// The variant an op runs: the best one, capped at `cap` (0 base, 1 AVX2, 2 AVX-512).
inline CpuIsa cpu_isa(int64_t cap) {
  TORCH_CHECK_VALUE(0 <= cap && cap <= 2, "isa cap must be 0 (base), 1 (avx2) or 2 (avx512), got ", cap);
  return static_cast<CpuIsa>(std::min<int64_t>(cap, static_cast<int64_t>(best_cpu_isa())));
}

#if defined(__x86_64__) || defined(__i386__)
#define FASTMAE_AVX2_TARGET __attribute__((target("avx2,fma,f16c"), flatten))
#define FASTMAE_AVX512_ISA "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"
#define FASTMAE_AVX512_TARGET_ONLY __attribute__((target(FASTMAE_AVX512_ISA)))
#define FASTMAE_AVX512_TARGET __attribute__((target(FASTMAE_AVX512_ISA), flatten))
#else
#define FASTMAE_AVX2_TARGET __attribute__((flatten))
#define FASTMAE_AVX512_TARGET_ONLY
#define FASTMAE_AVX512_TARGET __attribute__((flatten))
#endif

// Which variant a body is compiled for: its first template argument, so that it can pick
// instruction-set specific helpers (Stream<Isa>, store8<Isa> below).
struct IsaBase {};
struct IsaAvx2 {};
struct IsaAvx512 {};

#define FASTMAE_DEFINE_ISA_VARIANTS(NAME, BODY)                                       \
  template <typename... Ts, typename... Args>                                         \
  FASTMAE_AVX512_TARGET void NAME##_avx512(Args... args) {                            \
    BODY<IsaAvx512, Ts...>(args...);                                                  \
  }                                                                                   \
  template <typename... Ts, typename... Args>                                         \
  FASTMAE_AVX2_TARGET void NAME##_avx2(Args... args) {                                \
    BODY<IsaAvx2, Ts...>(args...);                                                    \
  }                                                                                   \
  template <typename... Ts, typename... Args>                                         \
  void NAME##_base(Args... args) {                                                    \
    BODY<IsaBase, Ts...>(args...);                                                    \
  }                                                                                   \
  template <typename... Ts, typename... Args>                                         \
  inline void NAME(CpuIsa isa, Args... args) {                                        \
    switch (isa) {                                                                    \
      case CpuIsa::kAvx512: return NAME##_avx512<Ts...>(args...);                     \
      case CpuIsa::kAvx2: return NAME##_avx2<Ts...>(args...);                         \
      default: return NAME##_base<Ts...>(args...);                                    \
    }                                                                                 \
  }

// bits8<Isa, T>(v) / bits16<Isa, T>(v): the storage bits of 8 / 16 values as a vector in
// registers, rounded to T with the variant's rounding (bf16: vcvtneps2bf16 in the AVX-512
// variant, the same results as store8 except that it flushes fp32 subnormals, below 1.2e-38, to
// zero and keeps a NaN's sign and payload; store8's integer rounding elsewhere). store8<Isa> /
// store16<Isa> write them; Stream<Isa>::store streams them without a round trip through memory.
struct Avx512Bf16 {
#if defined(__x86_64__) || defined(__i386__)
  FASTMAE_AVX512_TARGET_ONLY static inline v8h round8(v8f v) {
    __m256 m;
    std::memcpy(&m, &v, sizeof(m));
    return (v8h)_mm256_cvtneps_pbh(m);
  }
  FASTMAE_AVX512_TARGET_ONLY static inline v16h round16(v16f v) {
    __m512 m;
    std::memcpy(&m, &v, sizeof(m));
    return (v16h)_mm512_cvtneps_pbh(m);
  }
#endif
};

template <typename Isa, typename T>
inline auto bits8(v8f v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
#if defined(__x86_64__) || defined(__i386__)
    if constexpr (std::is_same_v<Isa, IsaAvx512>) return Avx512Bf16::round8(v);
#endif
    return round8_bf16(v);
  } else {
    v8h h;
    for (int i = 0; i < 8; ++i) h[i] = from_f<c10::Half>(v[i]).x;
    return h;
  }
}

template <typename Isa, typename T>
inline auto bits16(v16f v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
#if defined(__x86_64__) || defined(__i386__)
    if constexpr (std::is_same_v<Isa, IsaAvx512> && std::is_same_v<T, c10::BFloat16>) return Avx512Bf16::round16(v);
#endif
    const v8h a = bits8<Isa, T>(lo8(v)), b = bits8<Isa, T>(hi8(v));
    return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  }
}

template <typename Isa, typename T>
inline void store8(T* p, v8f v) {
  const auto b = bits8<Isa, T>(v);
  std::memcpy(p, &b, sizeof(b));
}
template <typename Isa, typename T>
inline void store16(T* p, v16f v) {
  const auto b = bits16<Isa, T>(v);
  std::memcpy(p, &b, sizeof(b));
}

// ------------------------------------------------------------------ streaming stores
// An output much larger than the cache is written with non-temporal (streaming) stores: an
// ordinary store first reads every line it writes (read for ownership), so a write-only output
// costs twice its bytes of memory traffic. Streaming stores skip that read and bypass the cache,
// which only pays when the output would not stay in the cache for its consumer anyway; hence
// the size threshold, half the development machine's 32 MiB L3 (bench/README.md).
constexpr int64_t kStreamBytes = int64_t(16) << 20;
// An output whose consumer is a matmul (unshuffle_scatter's dx, read by decoder_embed's backward;
// gather_mask's patches, read by the patch embedding) is streamed from this size on: a matmul is
// bound by its arithmetic and reads its input from memory at little cost, so the read for
// ownership that streaming saves is a gain for the step, not only for the op.
// Below it (an L2 here) ordinary stores leave the output in the cache at little cost.
constexpr int64_t kStreamMatmulInputBytes = int64_t(1) << 20;

// How an op chooses streaming stores: fastmae.config's FASTMAE_CPU_STREAM, passed to every op
// as an argument (to test both paths).
enum class StreamMode : int64_t { kNever = 0, kAlways = 1, kAuto = 2 };

inline bool stream_output(int64_t bytes, int64_t mode, int64_t threshold = kStreamBytes) {
  TORCH_CHECK_VALUE(0 <= mode && mode <= 2, "stream mode must be 0 (never), 1 (always) or 2 (auto), got ", mode);
  switch (static_cast<StreamMode>(mode)) {
    case StreamMode::kNever: return false;
    case StreamMode::kAlways: return true;
    default: return bytes >= threshold;
  }
}

inline bool aligned_to(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Stream<Isa>::copy(dst, src, bytes): `bytes` (a multiple of 16) from src, or zeros when src is
// null, to dst (16-byte aligned) with streaming stores; 32 bytes per store in the AVX2 and
// AVX-512 variants where dst allows. Stream<Isa>::store(dst, v): the bytes of the vector v (16,
// 32 or 64) the same way (a 64-byte vector in one store in the AVX-512 variant where dst allows),
// straight from registers: values computed into a stack buffer and
// copied from there would be read back with loads wider than the stores that wrote them, which
// wait for those stores to reach the cache (a failed store-to-load forward; it doubled the time
// of unshuffle_scatter's streamed bf16 forward). Stream<Isa>::fence() orders
// them before the task ends (they are weakly ordered). Elsewhere than x86 these are plain copies.
template <typename Isa>
struct Stream;

#if defined(__x86_64__) || defined(__i386__)
template <>
struct Stream<IsaBase> {
  static inline void copy(void* dst, const void* src, int64_t bytes) {
    auto* d = static_cast<__m128i*>(dst);
    const auto* s = static_cast<const __m128i*>(src);
    for (int64_t q = 0; q < bytes / 16; ++q) {
      _mm_stream_si128(d + q, s != nullptr ? _mm_loadu_si128(s + q) : _mm_setzero_si128());
    }
  }
  template <typename V>
  static inline void store(void* dst, V v) {
    static_assert(sizeof(V) % 16 == 0, "whole 16-byte pieces");
    for (size_t b = 0; b < sizeof(V); b += 16) {
      __m128i q;
      std::memcpy(&q, reinterpret_cast<const char*>(&v) + b, sizeof(q));
      _mm_stream_si128(reinterpret_cast<__m128i*>(static_cast<char*>(dst) + b), q);
    }
  }
  static inline void fence() { _mm_sfence(); }
};
template <>
struct Stream<IsaAvx2> {
  __attribute__((target("avx2"))) static inline void copy(void* dst, const void* src, int64_t bytes) {
    char* d = static_cast<char*>(dst);
    const char* s = static_cast<const char*>(src);
    int64_t b = 0;
    if (aligned_to(d, 32)) {
      for (; b + 32 <= bytes; b += 32) {
        const __m256i v = s != nullptr ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + b))
                                       : _mm256_setzero_si256();
        _mm256_stream_si256(reinterpret_cast<__m256i*>(d + b), v);
      }
    }
    Stream<IsaBase>::copy(d + b, s != nullptr ? s + b : nullptr, bytes - b);
  }
  template <typename V>
  __attribute__((target("avx2"))) static inline void store(void* dst, V v) {
    if constexpr (sizeof(V) % 32 == 0) {
      if (aligned_to(dst, 32)) {
        for (size_t b = 0; b < sizeof(V); b += 32) {
          __m256i y;
          std::memcpy(&y, reinterpret_cast<const char*>(&v) + b, sizeof(y));
          _mm256_stream_si256(reinterpret_cast<__m256i*>(static_cast<char*>(dst) + b), y);
        }
        return;
      }
    }
    Stream<IsaBase>::store(dst, v);
  }
  static inline void fence() { _mm_sfence(); }
};
template <>
struct Stream<IsaAvx512> : Stream<IsaAvx2> {
  template <typename V>
  FASTMAE_AVX512_TARGET_ONLY static inline void store(void* dst, V v) {
    if constexpr (sizeof(V) == 64) {
      if (aligned_to(dst, 64)) {
        __m512i z;
        std::memcpy(&z, &v, sizeof(z));
        _mm512_stream_si512(static_cast<__m512i*>(dst), z);
        return;
      }
    }
    Stream<IsaAvx2>::store(dst, v);
  }
};
#else
template <typename Isa>
struct Stream {
  static inline void copy(void* dst, const void* src, int64_t bytes) {
    if (src != nullptr) {
      std::memcpy(dst, src, bytes);
    } else {
      std::memset(dst, 0, bytes);
    }
  }
  template <typename V>
  static inline void store(void* dst, V v) {
    std::memcpy(dst, &v, sizeof(v));
  }
  static inline void fence() {}
};
#endif

// store8<Isa> / store16<Isa>, or their streaming stores when `stream` (dst then 16-byte
// aligned): one loop serves both (`stream` is the same for a whole task, so the branch is predicted).
template <typename Isa, typename T>
inline void put8(T* dst, v8f v, bool stream) {
  if (stream) {
    Stream<Isa>::store(dst, bits8<Isa, T>(v));
  } else {
    store8<Isa>(dst, v);
  }
}
template <typename Isa, typename T>
inline void put16(T* dst, v16f v, bool stream) {
  if (stream) {
    Stream<Isa>::store(dst, bits16<Isa, T>(v));
  } else {
    store16<Isa>(dst, v);
  }
}

// ------------------------------------------------------------------ argument checks
// The Python op layer checks metadata before calling these ops; the kernels check again
// (cheaply) so that a direct call through torch.ops can never read or write out of bounds.
inline void check_float_dtype(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, name,
                    " must be float32, bfloat16 or float16, got ", dt);
}
inline void check_float_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  check_float_dtype(t, name);
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

// ids must be a contiguous CPU int64 [batch, width] tensor (width unchecked when < 0).
inline void check_ids(const at::Tensor& ids, const char* name, int64_t batch, int64_t width = -1) {
  TORCH_CHECK_VALUE(ids.device().is_cpu(), name, " must be a CPU tensor, got ", ids.device());
  TORCH_CHECK_VALUE(ids.scalar_type() == at::kLong, name, " must be int64, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(ids.dim() == 2, name, " must be 2-D [N, *], got shape ", ids.sizes());
  TORCH_CHECK_VALUE(ids.size(0) == batch, name, " has batch size ", ids.size(0), " but the data has ",
                    batch);
  TORCH_CHECK_VALUE(width < 0 || ids.size(1) == width, name, " must have shape [", batch, ", ", width,
                    "], got ", ids.sizes());
  TORCH_CHECK_VALUE(ids.is_contiguous(), name, " must be contiguous");
}

// Patch grid (h, w) of an H x W image; the patch size must divide both sides.
inline std::pair<int64_t, int64_t> patch_grid(int64_t H, int64_t W, int64_t p) {
  TORCH_CHECK_VALUE(p > 0, "patch_size must be positive, got ", p);
  TORCH_CHECK_VALUE(H % p == 0 && W % p == 0, "image size ", H, "x", W,
                    " is not divisible by the patch size ", p);
  return {H / p, W / p};
}

// Every index in [0, upper), checked in one pass before any kernel reads through them;
// raises IndexError naming the tensor and the offending value.
inline void check_index_range(const at::Tensor& ids, int64_t upper, const char* name) {
  const int64_t n = ids.numel();
  if (n == 0) return;
  const int64_t* v = ids.data_ptr<int64_t>();
  int64_t lo = v[0], hi = v[0];
  for (int64_t i = 1; i < n; ++i) {
    lo = v[i] < lo ? v[i] : lo;
    hi = v[i] > hi ? v[i] : hi;
  }
  if (lo < 0 || hi >= upper) {
    const int64_t bad = lo < 0 ? lo : hi;
    TORCH_CHECK_INDEX(false, name, " holds index ", bad, ", outside [0, ", upper, ")");
  }
}

// Every index in [0, upper) and no index twice in a row of ids [N, M] (M <= upper), checked in one
// pass before any kernel reads through them. The same contract and messages as the Python
// checks in fastmae/_checks.py, which guard the other backends.
inline void check_distinct(const at::Tensor& ids, int64_t upper, const char* name) {
  check_index_range(ids, upper, name);
  const int64_t N = ids.size(0), M = ids.size(1);
  const int64_t* v = ids.const_data_ptr<int64_t>();
  std::vector<uint8_t> seen(upper);
  for (int64_t n = 0; n < N; ++n) {
    std::fill(seen.begin(), seen.end(), uint8_t(0));
    for (int64_t m = 0; m < M; ++m) {
      const int64_t r = v[n * M + m];
      TORCH_CHECK_VALUE(!seen[r], name, " repeats index ", r, " in sample ", n,
                        ": the indices of a sample must be distinct, as random masking makes them");
      seen[r] = 1;
    }
  }
}

// sum_{k < n} f(k) in fp32 with 32 independent partial sums combined in a fixed order: plain
// float reductions do not vectorise without fast-math (the compiler may not reorder them); this
// form does, and it is deterministic.
template <typename F>
inline float sum_f32(int64_t n, const F& f) {
  constexpr int kLanes = 32;
  float acc[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    for (int u = 0; u < kLanes; ++u) acc[u] += f(k + u);
  }
  for (int u = 0; k < n; ++k, ++u) acc[u] += f(k);
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int u = 0; u < width; ++u) acc[u] += acc[u + width];
  }
  return acc[0];
}

// Every 64-byte line of [p, p + bytes): a contiguous row the hardware prefetchers would not
// reach in time (rows read in a permuted order, or one stream among many).
inline void prefetch_bytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b);
}

// Prefetch the C*p pixel rows (p pixels each) of one patch: patches are read in an order the
// hardware prefetchers cannot guess (random ids, rows far apart), so the next patch's lines are
// requested while the current one is processed.
template <typename T>
inline void prefetch_patch(const T* patch, int64_t C, int64_t p, int64_t H, int64_t W) {
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t i = 0; i < p; ++i) {
      const T* s = patch + (c * H + i) * W;
      __builtin_prefetch(s);
      __builtin_prefetch(s + p - 1);
    }
  }
}

// Work items per at::parallel_for task so that a task moves at least ~32 KiB.
inline int64_t grain_for(int64_t bytes_per_item) {
  constexpr int64_t kTaskBytes = 32 * 1024;
  return bytes_per_item >= kTaskBytes ? 1 : kTaskBytes / (bytes_per_item > 0 ? bytes_per_item : 1);
}

// A per-thread scratch buffer, grown on demand and reused across calls (no per-call malloc).
template <typename T>
inline T* scratch(std::vector<T>& buf, size_t n) {
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

}  // namespace fastmae
