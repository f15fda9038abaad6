// resized_crop: a batch of packed uint8 images cropped, resized with antialiasing, flipped and
// normalised in one pass per image (fastmae/ops/resized_crop.py states the contract).
//
// The pixels are bitwise those of torchvision's resized_crop on the uint8 image (torch's uint8
// antialiased resampling, which follows PIL's ImagingResample): per axis of input length n and
// output length S, scale = n / S, the filter (bicubic a = -0.5, support 2, or bilinear, support 1)
// widened by max(scale, 1); output i reads inputs [xmin, xmin + count) with weights normalised in
// double, then quantised to fixed point the way torch does (`precision` bits: the most, up to 22,
// that keep twice the axis's largest weight below 2^15; each weight rounded half away from zero).
// A horizontal pass over the crop's rows, each sum (int32, exact) rounded half up and clamped to
// [0, 255]; then the vertical pass, likewise; then (v / 255 - mean) / std in fp32 with true
// divisions (the reference's operations, so its bits too) and one rounding to the output dtype.
// Integer sums are exact in any order: every instruction-set variant gives the same bits.
//
// Work: parallel over images; one image is one task (a 224 x 224 crop is ~0.2 ms of work).
// Per image and channel, each crop row is widened to int32 once and filtered horizontally into
// a ring of intermediate rows, just before the first vertical output row that needs it; each
// vertical output row then combines `count` ring rows, vectorised along x, and is written in the
// output dtype. The ring holds only the rows one output row reads, so it stays in L1.
// The horizontal pass computes 8 outputs at a time: each output's taps are contiguous in the row
// (a dot product of up to 8 taps per 8-wide vector, zero-padded weights), and the 8 partial-sum
// vectors are reduced together with a transposing add tree. A flip reverses the horizontal
// table (flipping commutes with the vertical pass), so it costs nothing.
// The weight tables are computed once per (n, S, filter) and cached per thread.
// The baseline variant is ~3x slower than the AVX2 one (SSE2 has no 32-bit multiply).
// Streaming stores only when forced (stream mode "always"): the op is bound by its arithmetic (an
// output of 0.6 MB per 0.2 ms), and streaming its output measured 3-7% slower at 64 images of
// 3 x 224 x 224 (19 MB) here, so the automatic mode never streams.
#include "common.h"

#include <cmath>
#include <limits>

namespace fastmae {
namespace {

// ------------------------------------------------------------------ weights
double bicubic_filter(double x) {
  constexpr double a = -0.5;
  x = std::fabs(x);
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
  if (x < 2.0) return (((x - 5.0) * x + 8.0) * x - 4.0) * a;
  return 0.0;
}

double bilinear_filter(double x) {
  x = std::fabs(x);
  return x < 1.0 ? 1.0 - x : 0.0;
}

// One axis: output i (of `outputs`, S rounded up to a whole number of vectors; the extra
// outputs have zero weights) reads inputs [start[i], start[i] + count[i]) with fixed-point
// weights weights[i * taps + j] (`precision` fractional bits; taps: the largest count rounded up
// to 8, zero-padded).
struct AxisTable {
  int64_t n = -1, S = -1, bicubic = -1;  // the key
  int64_t outputs = 0, taps = 0, max_count = 0, precision = 0;
  std::vector<int64_t> start, count;
  std::vector<int32_t> weights;
  // The same table for the outputs in reverse order (a horizontal flip).
  std::vector<int64_t> start_rev;
  std::vector<int32_t> weights_rev;
};

constexpr int64_t kOutputAlign = 16;  // outputs per row rounded up to this (one 16-lane vector)

// Fills `t` for (n, S, bicubic), unless it holds them already: torch's
// _compute_index_ranges_weights (double) and its int16 quantisation. Not inlined into the ISA
// variants: one copy of the double math.
__attribute__((noinline)) void axis_table(AxisTable& t, int64_t n, int64_t S, bool bicubic, bool reversed) {
  if (t.n != n || t.S != S || t.bicubic != int64_t(bicubic)) {
    const double scale = double(n) / double(S);
    const double support = (bicubic ? 2.0 : 1.0) * (scale >= 1.0 ? scale : 1.0);
    const double invscale = scale >= 1.0 ? 1.0 / scale : 1.0;
    const int64_t outputs = (S + kOutputAlign - 1) / kOutputAlign * kOutputAlign;
    t.start.assign(outputs, 0);
    t.count.assign(outputs, 0);
    int64_t max_count = 1;
    for (int64_t i = 0; i < S; ++i) {
      const double center = scale * (double(i) + 0.5);
      const int64_t lo = std::max<int64_t>(static_cast<int64_t>(center - support + 0.5), 0);
      const int64_t hi = std::min<int64_t>(static_cast<int64_t>(center + support + 0.5), n);
      t.start[i] = lo;
      t.count[i] = std::max<int64_t>(hi - lo, 0);
      max_count = std::max(max_count, t.count[i]);
    }
    const int64_t taps = (max_count + 7) / 8 * 8;
    std::vector<double> w(S * max_count, 0.0);
    double w_max = 0.0;
    for (int64_t i = 0; i < S; ++i) {
      const double center = scale * (double(i) + 0.5);
      double* k = w.data() + i * max_count;
      double total = 0.0;
      for (int64_t j = 0; j < t.count[i]; ++j) {
        const double x = (double(j + t.start[i]) - center + 0.5) * invscale;
        k[j] = bicubic ? bicubic_filter(x) : bilinear_filter(x);
        total += k[j];
      }
      if (total != 0.0) {
        for (int64_t j = 0; j < t.count[i]; ++j) {
          k[j] /= total;
          w_max = std::max(w_max, k[j]);
        }
      }
    }
    int64_t precision = 0;
    for (; precision < 22; ++precision) {
      if (static_cast<int64_t>(0.5 + w_max * double(int64_t(1) << (precision + 1))) >= (1 << 15)) break;
    }
    t.weights.assign(outputs * taps, 0);
    for (int64_t i = 0; i < S; ++i) {
      for (int64_t j = 0; j < t.count[i]; ++j) {
        const double v = w[i * max_count + j] * double(int64_t(1) << precision);
        t.weights[i * taps + j] = static_cast<int16_t>(v < 0.0 ? v - 0.5 : v + 0.5);
      }
    }
    t.n = n;
    t.S = S;
    t.bicubic = bicubic;
    t.outputs = outputs;
    t.taps = taps;
    t.max_count = max_count;
    t.precision = precision;
    t.start_rev.clear();
    t.weights_rev.clear();
  }
  if (reversed && t.start_rev.empty()) {
    t.start_rev.assign(t.outputs, 0);
    t.weights_rev.assign(t.outputs * t.taps, 0);
    for (int64_t i = 0; i < S; ++i) {
      t.start_rev[i] = t.start[S - 1 - i];
      std::copy_n(t.weights.begin() + (S - 1 - i) * t.taps, t.taps, t.weights_rev.begin() + i * t.taps);
    }
  }
}

// ------------------------------------------------------------------ the two passes
typedef int32_t v4i __attribute__((vector_size(16)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef float v4f __attribute__((vector_size(16)));

template <typename V>
inline V load_v(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// The pixel a fixed-point sum stands for: (sum + 2^(precision - 1)) >> precision, clamped to
// [0, 255] (the bias is added by the caller, as the sum's initial value).
template <typename V>
inline V to_pixel(V acc, int64_t precision) {
  V v = acc >> int(precision);
  v = v > 255 ? 255 : v;
  return v < 0 ? 0 : v;
}

// [a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, a6+a7, b4+b5, b6+b7] (vphaddd)
inline v8i hadd(v8i a, v8i b) {
  return __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
         __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}

// The lane sums of p[0..7], in one vector (lane k: the sum of p[k]).
inline v8i reduce8x8(const v8i* p) {
  const v8i q0 = hadd(hadd(p[0], p[1]), hadd(p[2], p[3]));
  const v8i q1 = hadd(hadd(p[4], p[5]), hadd(p[6], p[7]));
  return __builtin_shufflevector(q0, q1, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(q0, q1, 4, 5, 6, 7, 12, 13, 14, 15);
}

// One crop row (int32 pixels, zero-padded by `taps` values) filtered horizontally into
// dst[outputs] (pixels): 8 outputs at a time, each a dot product over its zero-padded taps.
// TAPS > 0 fixes the tap count at compile time (8: one vector per output, the usual case up to
// a 2x downscale).
template <int64_t TAPS>
__attribute__((always_inline)) inline void horizontal_row(const int32_t* row, const int64_t* start,
                                                          const int32_t* weights, int64_t taps, int64_t precision,
                                                          int64_t outputs, int32_t* dst) {
  const int64_t K = TAPS > 0 ? TAPS : taps;
  const int32_t bias = int32_t(1) << (precision - 1);
  for (int64_t x = 0; x < outputs; x += 8) {
    v8i p[8];
    for (int k = 0; k < 8; ++k) {
      const int32_t* r = row + start[x + k];
      const int32_t* w = weights + (x + k) * K;
      v8i acc = load_v<v8i>(r) * load_v<v8i>(w);
      for (int64_t t = 8; t < K; t += 8) acc += load_v<v8i>(r + t) * load_v<v8i>(w + t);
      p[k] = acc;
    }
    const v8i v = to_pixel(reduce8x8(p) + bias, precision);
    std::memcpy(dst + x, &v, sizeof(v));
  }
}

// The vectors of the vertical pass: 16 lanes in one zmm register in the AVX-512 variant, 8 in
// one ymm elsewhere, 4 in one xmm in the baseline variant (GCC splits a generic vector wider
// than the registers badly: it spills it to the stack).
template <typename Isa>
struct Lanes {  // the baseline variant (plain stores: it serves CPUs without AVX2)
  typedef v4i I;
  typedef v4f F;
  static constexpr int64_t n = 4;
  template <typename T>
  static void put(T* dst, F v, bool) {
    for (int i = 0; i < 4; ++i) dst[i] = from_f<T>(v[i]);
  }
};
template <>
struct Lanes<IsaAvx2> {
  typedef v8i I;
  typedef v8f F;
  static constexpr int64_t n = 8;
  template <typename T>
  static void put(T* dst, F v, bool stream) { put8<IsaAvx2>(dst, v, stream); }
};
template <>
struct Lanes<IsaAvx512> {
  typedef v16i I;
  typedef v16f F;
  static constexpr int64_t n = 16;
  template <typename T>
  static void put(T* dst, F v, bool stream) { put16<IsaAvx512>(dst, v, stream); }
};

// One output row: the pixels of sum_j w[j] * rows[j][x] over x < S, normalised as the reference
// does ((v / 255 - mean) / std, fp32), stored in T. The rows hold whole vectors (outputs is a
// multiple of 16): only the last store may be partial.
template <typename Isa, typename T>
__attribute__((always_inline)) inline void vertical_row(const int32_t* const* rows, const int32_t* w, int64_t count,
                                                        int64_t precision, int64_t S, float mean, float std_,
                                                        T* out, bool stream) {
  using L = Lanes<Isa>;
  using I = typename L::I;
  using F = typename L::F;
  constexpr int64_t n = L::n;
  const int32_t bias = int32_t(1) << (precision - 1);
  auto value = [&](I acc) {
    const F v = __builtin_convertvector(to_pixel(acc, precision), F);
    return (v / 255.0f - mean) / std_;
  };
  int64_t x = 0;
  for (; x + 2 * n <= S; x += 2 * n) {  // two vectors per weight broadcast
    I acc0 = bias + w[0] * load_v<I>(rows[0] + x), acc1 = bias + w[0] * load_v<I>(rows[0] + x + n);
    for (int64_t j = 1; j < count; ++j) {
      acc0 += w[j] * load_v<I>(rows[j] + x);
      acc1 += w[j] * load_v<I>(rows[j] + x + n);
    }
    L::put(out + x, value(acc0), stream);
    L::put(out + x + n, value(acc1), stream);
  }
  for (; x < S; x += n) {
    I acc = bias + w[0] * load_v<I>(rows[0] + x);
    for (int64_t j = 1; j < count; ++j) acc += w[j] * load_v<I>(rows[j] + x);
    const F v = value(acc);
    if (x + n <= S) {
      L::put(out + x, v, stream);
    } else {
      for (int64_t i = 0; x + i < S; ++i) out[x + i] = from_f<T>(v[i]);
    }
  }
}

// ------------------------------------------------------------------ one task: images [begin, end)
struct Job {
  const uint8_t* data;
  const int64_t* offsets;
  const int64_t* sizes;  // [N, 2]: H, W
  const int64_t* boxes;  // [N, 4]: top, left, h, w
  const bool* flips;     // [N]
  int64_t C, S;
  const float* mean;     // [C], fp32 as the reference rounds them
  const float* std_;     // [C]
  bool bicubic, stream;
  void* out;             // [N, C, S, S] of the output dtype
};

struct Scratch {
  AxisTable horizontal, vertical;
  std::vector<int32_t> row;   // one crop row, widened, zero-padded
  std::vector<int32_t> ring;  // the intermediate rows one output row reads: [slots][outputs]
  std::vector<const int32_t*> rows;
};

Scratch& thread_scratch() {
  thread_local Scratch s;
  return s;
}

template <typename Isa, typename T>
inline void crop_images(Job job, int64_t begin, int64_t end) {
  Scratch& s = thread_scratch();
  const int64_t C = job.C, S = job.S;
  for (int64_t n = begin; n < end; ++n) {
    const int64_t H = job.sizes[2 * n], W = job.sizes[2 * n + 1];
    const int64_t top = job.boxes[4 * n], left = job.boxes[4 * n + 1], h = job.boxes[4 * n + 2],
                  w = job.boxes[4 * n + 3];
    const bool flip = job.flips[n];
    axis_table(s.horizontal, w, S, job.bicubic, flip);
    axis_table(s.vertical, h, S, job.bicubic, false);
    const AxisTable& ht = s.horizontal;
    const AxisTable& vt = s.vertical;
    const int64_t* hstart = flip ? ht.start_rev.data() : ht.start.data();
    const int32_t* hweights = flip ? ht.weights_rev.data() : ht.weights.data();
    const int64_t outputs = ht.outputs, slots = vt.max_count;
    int32_t* row = scratch(s.row, w + ht.taps);
    std::fill(row + w, row + w + ht.taps, 0);
    int32_t* ring = scratch(s.ring, slots * outputs);
    const int32_t** rows = scratch(s.rows, vt.max_count);
    for (int64_t c = 0; c < C; ++c) {
      const uint8_t* plane = job.data + job.offsets[n] + c * H * W + top * W + left;
      T* out = static_cast<T*>(job.out) + (n * C + c) * S * S;
      int64_t done = 0;  // crop rows filtered so far (row y lives in ring slot y % slots)
      for (int64_t yo = 0; yo < S; ++yo) {
        const int64_t first = vt.start[yo], count = vt.count[yo];
        for (; done < first + count; ++done) {
          const uint8_t* src = plane + done * W;
          for (int64_t x = 0; x < w; ++x) row[x] = src[x];
          int32_t* dst = ring + (done % slots) * outputs;
          if (ht.taps == 8) {
            horizontal_row<8>(row, hstart, hweights, 8, ht.precision, outputs, dst);
          } else {
            horizontal_row<0>(row, hstart, hweights, ht.taps, ht.precision, outputs, dst);
          }
        }
        for (int64_t j = 0; j < count; ++j) rows[j] = ring + ((first + j) % slots) * outputs;
        vertical_row<Isa>(rows, vt.weights.data() + yo * vt.taps, count, vt.precision, S, job.mean[c],
                          job.std_[c], out + yo * S, job.stream);
      }
    }
  }
  if (job.stream) Stream<Isa>::fence();
}
FASTMAE_DEFINE_ISA_VARIANTS(crop_task, crop_images)

// ------------------------------------------------------------------ checks
std::string box_str(const int64_t* b) {
  return "(" + std::to_string(b[0]) + ", " + std::to_string(b[1]) + ", " + std::to_string(b[2]) + ", " +
         std::to_string(b[3]) + ")";
}

// The value checks of fastmae/ops/resized_crop.py's _check, with its messages and its order (the
// first image outside the data, then the first empty box, then the first box outside its image).
void check_boxes(const at::Tensor& data, const int64_t* offsets, const int64_t* sizes, const int64_t* boxes,
                 int64_t N, int64_t C) {
  const int64_t bytes = data.numel();
  for (int64_t i = 0; i < N; ++i) {
    const int64_t off = offsets[i], H = sizes[2 * i], W = sizes[2 * i + 1];
    int64_t count = 0;
    const bool overflow = __builtin_mul_overflow(C, H, &count) || __builtin_mul_overflow(count, W, &count);
    const bool bad = off < 0 || H <= 0 || W <= 0 || overflow || off > bytes - count;
    TORCH_CHECK_VALUE(!bad, "image ", i, " (offset ", off, ", size ", H, "x", W, ", ", C,
                      " channels) does not lie inside the ", bytes, " bytes of data");
  }
  for (int64_t i = 0; i < N; ++i) {
    const int64_t* b = boxes + 4 * i;
    TORCH_CHECK_VALUE(b[2] > 0 && b[3] > 0, "box ", i, " ", box_str(b), " (top, left, height, width) is empty");
  }
  for (int64_t i = 0; i < N; ++i) {
    const int64_t* b = boxes + 4 * i;
    const int64_t H = sizes[2 * i], W = sizes[2 * i + 1];  // > 0 (checked above)
    const bool outside = b[0] < 0 || b[1] < 0 || b[2] > H - b[0] || b[3] > W - b[1];
    TORCH_CHECK_VALUE(!outside, "box ", i, " ", box_str(b), " (top, left, height, width) lies outside its ", H, "x",
                      W, " image");
  }
}

void check_index_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

}  // namespace

at::Tensor resized_crop_fwd(const at::Tensor& data, const at::Tensor& offsets, const at::Tensor& sizes,
                            const at::Tensor& boxes, const at::Tensor& flips, int64_t channels, int64_t size,
                            at::ArrayRef<double> mean, at::ArrayRef<double> stdev, at::ScalarType dtype, bool bicubic,
                            int64_t isa_cap, int64_t stream_mode) {
  TORCH_CHECK_VALUE(data.device().is_cpu(), "data must be a CPU tensor, got ", data.device());
  TORCH_CHECK_VALUE(data.scalar_type() == at::kByte && data.dim() == 1,
                    "packed image data must be a 1-D uint8 tensor, got ", data.scalar_type(), " of ", data.dim(),
                    " dims");
  TORCH_CHECK_VALUE(data.is_contiguous(), "data must be contiguous");
  TORCH_CHECK_VALUE(offsets.dim() == 1, "offsets must be a 1-D int64 tensor, got shape ", offsets.sizes());
  const int64_t N = offsets.size(0);
  check_index_tensor(offsets, "offsets", at::kLong, {N});
  check_index_tensor(sizes, "sizes", at::kLong, {N, 2});
  check_index_tensor(boxes, "boxes", at::kLong, {N, 4});
  check_index_tensor(flips, "flips", at::kBool, {N});
  TORCH_CHECK_VALUE(size >= 1, "size must be a positive int, got ", size);
  TORCH_CHECK_VALUE(channels >= 1 && int64_t(mean.size()) == channels && int64_t(stdev.size()) == channels,
                    "mean and std need one value per channel (", channels, "), got ", mean.size(), " and ",
                    stdev.size());
  for (double v : stdev) TORCH_CHECK_VALUE(v != 0.0, "std must not be 0, got ", stdev);
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                    "dtype must be float32, bfloat16 or float16, got ", dtype);
  const CpuIsa isa = cpu_isa(isa_cap);
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  const int64_t* hw = sizes.const_data_ptr<int64_t>();
  const int64_t* box = boxes.const_data_ptr<int64_t>();
  check_boxes(data, off, hw, box, N, channels);

  at::Tensor out = at::empty({N, channels, size, size}, data.options().dtype(dtype));
  // Streamed only when forced (see the top); streamed rows start on 16-byte boundaries (the partial
  // vector at a row's end is stored plainly).
  const bool stream = stream_output(out.nbytes(), stream_mode, std::numeric_limits<int64_t>::max()) &&
                      (size * out.element_size()) % 16 == 0 && aligned_to(out.const_data_ptr(), 16);
  if (N == 0) return out;
  // mean and std in fp32, as the reference holds them
  const std::vector<float> mean_f(mean.begin(), mean.end()), std_f(stdev.begin(), stdev.end());
  Job job{data.const_data_ptr<uint8_t>(), off, hw, box, flips.const_data_ptr<bool>(), channels, size,
          mean_f.data(), std_f.data(), bicubic, stream, out.mutable_data_ptr()};
  FASTMAE_DISPATCH_FLOAT(dtype, "resized_crop_fwd", [&] {
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) { crop_task<scalar_t>(isa, job, begin, end); });
  });
  return out;
}

}  // namespace fastmae

TORCH_LIBRARY_FRAGMENT(fastmae_C, m) {
  m.def("resized_crop_fwd(Tensor data, Tensor offsets, Tensor sizes, Tensor boxes, Tensor flips, int channels, "
        "int size, float[] mean, float[] std, ScalarType dtype, bool bicubic, int isa_cap, int stream_mode) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastmae_C, CPU, m) { m.impl("resized_crop_fwd", &fastmae::resized_crop_fwd); }
