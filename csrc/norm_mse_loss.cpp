// norm_mse_loss: the MAE loss with per-patch target normalisation, fused (forward and backward).
//
// Row (n, m) of pred [N, M, P = p*p*C] predicts patch l = ids[n, m] (or l = m) in the official
// (i, j, c) order: pred[n, m, (i*p + j)*C + c] ~ imgs[n, c, hi*p + i, wj*p + j]. Each task loads a
// patch's pixels into a small fp32 buffer in that order (the target), normalises it with the
// patch's own mean and unbiased variance when norm_pix is set (two passes over the cached patch),
// and compares it with the prediction row; nothing of target size is stored.
// Forward: loss = sum_rows w * mean_k (pred - t)^2 / sum(w). Rows are split into fixed chunks
// whose fp64 partial sums are added in chunk order: the result does not depend on the number of
// threads and is bitwise reproducible.
// Backward: dpred = grad * w * 2 (pred - t) / (P * sum(w)), one pass; dpred written with streaming
// stores when it is 16 MiB or more (common.h, stream_output).
// Clips (VideoMAE): imgs [N, C, T, H, W] and tubelets of t frames; row l = tubelet (ti, hi, wj),
// target in (dt, i, j, c) order, optionally through a per-channel affine map of the pixels and
// normalised per channel ((x - mean) / (std + eps)); load_tubelet, a plain loop, serves them.
#include "common.h"

#include <cmath>

namespace fastmae {
namespace {

// 16-bit prediction rows are prefetched two rows ahead: the hardware prefetchers do not keep up
// with that row stream among the target patches' 3 * p scattered segments. fp32 rows are not
// (measured slower with it; bench/README.md).
template <typename pred_t>
inline void prefetch_pred_row(const pred_t* pred, int64_t row, int64_t rows, int64_t P) {
  constexpr int64_t ahead = 2;
  if constexpr (sizeof(pred_t) == 2) {
    if (row + ahead < rows) prefetch_bytes(pred + (row + ahead) * P, P * int64_t(sizeof(pred_t)));
  }
}

struct Geometry {
  int64_t N, M, C, H, W, p, w, P;
  int64_t T = 1, t = 1, h = 0;    // frames and tubelet size (1 and 1 for images), patch rows
  bool per_channel = false;       // VideoMAE's per-channel target normalisation
  const float* affine = nullptr;  // [2, C] pixel scale and shift, or null
  bool tube() const { return T > 1 || t > 1 || per_channel || affine != nullptr; }
};

// Normalisation of one target patch: t = (pixel - mean) * rstd (mean 0, rstd 1 without norm_pix).
struct PatchStats {
  float mean, rstd;
};

// out = a0 b0 c0 a1 b1 c1 ...: three channel rows of n floats interleaved, four pixels at a time
// with two-input vector shuffles (the compiler lowers them to the target's shuffle instructions;
// a plain stride-3 store loop stays scalar).
inline void interleave3(const float* a, const float* b, const float* c, int64_t n, float* out) {
  typedef float v4f __attribute__((vector_size(16)));
  typedef int v4i __attribute__((vector_size(16)));
  int64_t j = 0;
  for (; j + 4 <= n; j += 4, out += 12) {
    v4f va, vb, vc;
    std::memcpy(&va, a + j, sizeof(va));
    std::memcpy(&vb, b + j, sizeof(vb));
    std::memcpy(&vc, c + j, sizeof(vc));
    const v4f ab01 = __builtin_shuffle(va, vb, v4i{0, 4, 1, 5});  // a0 b0 a1 b1
    const v4f bc12 = __builtin_shuffle(vb, vc, v4i{1, 5, 2, 6});  // b1 c1 b2 c2
    const v4f ab33 = __builtin_shuffle(va, vb, v4i{3, 7, 3, 7});  // a3 b3 a3 b3
    const v4f o0 = __builtin_shuffle(ab01, vc, v4i{0, 1, 4, 2});  // a0 b0 c0 a1
    const v4f o1 = __builtin_shuffle(bc12, va, v4i{0, 1, 6, 2});  // b1 c1 a2 b2
    const v4f o2 = __builtin_shuffle(vc, ab33, v4i{2, 4, 5, 3});  // c2 a3 b3 c3
    std::memcpy(out, &o0, sizeof(o0));
    std::memcpy(out + 4, &o1, sizeof(o1));
    std::memcpy(out + 8, &o2, sizeof(o2));
  }
  for (; j < n; ++j, out += 3) {
    out[0] = a[j];
    out[1] = b[j];
    out[2] = c[j];
  }
}

// fp32 pixels of patch l of one image (img = imgs + n*C*H*W) into x[P], in (i, j, c) order, and
// their statistics (two passes over the cached patch for the variance, as torch.var).
// x must hold P + 3*p floats (the tail is scratch). CC > 0 fixes the channel count at compile time.
template <int CC, typename img_t>
inline PatchStats load_patch(const img_t* img, int64_t l, const Geometry& g, bool norm_pix, float eps, float* x) {
  const int64_t C = CC > 0 ? CC : g.C, p = g.p, W = g.W, H = g.H, P = g.P;
  const img_t* patch = img + (l / g.w) * p * W + (l % g.w) * p;
  if constexpr (CC == 3) {  // RGB: convert the three channel rows, then interleave them
    float* rows = x + P;
    for (int64_t i = 0; i < p; ++i) {
      for (int64_t c = 0; c < 3; ++c) {
        const img_t* s = patch + (c * H + i) * W;
        float* r = rows + c * p;
        for (int64_t j = 0; j < p; ++j) r[j] = to_f(s[j]);
      }
      interleave3(rows, rows + p, rows + 2 * p, p, x + i * p * 3);
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t i = 0; i < p; ++i) {
        const img_t* s = patch + (c * H + i) * W;
        float* dst = x + i * p * C + c;
        for (int64_t j = 0; j < p; ++j) dst[j * C] = to_f(s[j]);
      }
    }
  }
  if (!norm_pix) return {0.f, 1.f};
  const float mean = sum_f32(P, [&](int64_t k) { return x[k]; }) / float(P);
  const float sq = sum_f32(P, [&](int64_t k) { return (x[k] - mean) * (x[k] - mean); });
  const float var = sq / float(P - 1);  // unbiased, as torch.var
  return {mean, 1.f / std::sqrt(var + eps)};
}

// The target of tubelet l of one clip (img = imgs + n*C*T*H*W) into x[P] in (dt, i, j, c) order,
// through the pixel affine map, normalised in place (per patch as load_patch, or per channel:
// (x - mean_c) / (std_c + eps), unbiased); returns {0, 1}: x holds the target itself.
template <typename img_t>
inline PatchStats load_tubelet(const img_t* img, int64_t l, const Geometry& g, bool norm_pix, float eps, float* x) {
  const int64_t C = g.C, p = g.p, t = g.t, W = g.W, HW = g.H * g.W, hw = g.h * g.w, P = g.P;
  const img_t* base = img + (l / hw) * t * HW + ((l % hw) / g.w) * p * W + (l % g.w) * p;
  for (int64_t c = 0; c < C; ++c) {
    const float a = g.affine != nullptr ? g.affine[c] : 1.f, b = g.affine != nullptr ? g.affine[C + c] : 0.f;
    for (int64_t dt = 0; dt < t; ++dt) {
      for (int64_t i = 0; i < p; ++i) {
        const img_t* s = base + (c * g.T + dt) * HW + i * W;
        float* dst = x + (dt * p + i) * p * C + c;
        for (int64_t j = 0; j < p; ++j) dst[j * C] = to_f(s[j]) * a + b;
      }
    }
  }
  if (!norm_pix) return {0.f, 1.f};
  const int64_t groups = g.per_channel ? C : 1, n = P / groups;  // values per group, strided by groups
  for (int64_t c = 0; c < groups; ++c) {
    const float mean = sum_f32(n, [&](int64_t k) { return x[k * groups + c]; }) / float(n);
    const float sq = sum_f32(n, [&](int64_t k) {
      const float d = x[k * groups + c] - mean;
      return d * d;
    });
    const float var = sq / float(n - 1);  // unbiased, as torch.var
    if (g.per_channel) {
      const float denom = std::sqrt(var) + eps;
      for (int64_t k = 0; k < n; ++k) x[k * groups + c] = (x[k * groups + c] - mean) / denom;
    } else {
      const float rstd = 1.f / std::sqrt(var + eps);
      for (int64_t k = 0; k < n; ++k) x[k] = (x[k] - mean) * rstd;
    }
  }
  return {0.f, 1.f};
}

// Eight pixels of the three channel rows (a, b, c) interleaved into o[0, 24): one lane permute
// per input and output vector, then two blends (element i of either input).
inline void interleave3_8(v8f a, v8f b, v8f c, float* o) {
  const v8f pa0 = __builtin_shuffle(a, v8i{0, 0, 0, 1, 0, 0, 2, 0});  // a0 .  .  a1 .  .  a2 .
  const v8f pb0 = __builtin_shuffle(b, v8i{0, 0, 0, 0, 1, 0, 0, 2});  // .  b0 .  .  b1 .  .  b2
  const v8f pc0 = __builtin_shuffle(c, v8i{0, 0, 0, 0, 0, 1, 0, 0});  // .  .  c0 .  .  c1 .  .
  const v8f pa1 = __builtin_shuffle(a, v8i{0, 3, 0, 0, 4, 0, 0, 5});  // .  a3 .  .  a4 .  .  a5
  const v8f pb1 = __builtin_shuffle(b, v8i{0, 0, 3, 0, 0, 4, 0, 0});  // .  .  b3 .  .  b4 .  .
  const v8f pc1 = __builtin_shuffle(c, v8i{2, 0, 0, 3, 0, 0, 4, 0});  // c2 .  .  c3 .  .  c4 .
  const v8f pa2 = __builtin_shuffle(a, v8i{0, 0, 6, 0, 0, 7, 0, 0});  // .  .  a6 .  .  a7 .  .
  const v8f pb2 = __builtin_shuffle(b, v8i{5, 0, 0, 6, 0, 0, 7, 0});  // b5 .  .  b6 .  .  b7 .
  const v8f pc2 = __builtin_shuffle(c, v8i{0, 5, 0, 0, 6, 0, 0, 7});  // .  c5 .  .  c6 .  .  c7
  const v8i ab0 = {0, 9, 2, 3, 12, 5, 6, 15}, abc0 = {0, 1, 10, 3, 4, 13, 6, 7};
  const v8i ab1 = {0, 1, 10, 3, 4, 13, 6, 7}, abc1 = {8, 1, 2, 11, 4, 5, 14, 7};
  const v8i ab2 = {8, 1, 2, 11, 4, 5, 14, 7}, abc2 = {0, 9, 2, 3, 12, 5, 6, 15};
  store8(o, __builtin_shuffle(__builtin_shuffle(pa0, pb0, ab0), pc0, abc0));       // a0 b0 c0 a1 b1 c1 a2 b2
  store8(o + 8, __builtin_shuffle(__builtin_shuffle(pa1, pb1, ab1), pc1, abc1));   // c2 a3 b3 c3 a4 b4 c4 a5
  store8(o + 16, __builtin_shuffle(__builtin_shuffle(pa2, pb2, ab2), pc2, abc2));  // b5 c5 a6 b6 c6 a7 b7 c7
}

// Sixteen pixels into o[0, 48): in the AVX-512 variant two two-source permutes of zmm registers
// per 16 outputs (the first takes a's and b's elements, the second c's), where interleave3_8
// twice needs 30 lane permutes and blends; elsewhere interleave3_8 twice.
template <typename Isa>
inline void interleave3_16(v16f a, v16f b, v16f c, float* o) {
  if constexpr (std::is_same_v<Isa, IsaAvx512>) {
    typedef int32_t v16i __attribute__((vector_size(64)));
    const v16i ab0 = {0, 16, 0, 1, 17, 0, 2, 18, 0, 3, 19, 0, 4, 20, 0, 5};
    const v16i abc0 = {0, 1, 16, 3, 4, 17, 6, 7, 18, 9, 10, 19, 12, 13, 20, 15};
    const v16i ab1 = {21, 0, 6, 22, 0, 7, 23, 0, 8, 24, 0, 9, 25, 0, 10, 26};
    const v16i abc1 = {0, 21, 2, 3, 22, 5, 6, 23, 8, 9, 24, 11, 12, 25, 14, 15};
    const v16i ab2 = {0, 11, 27, 0, 12, 28, 0, 13, 29, 0, 14, 30, 0, 15, 31, 0};
    const v16i abc2 = {26, 1, 2, 27, 4, 5, 28, 7, 8, 29, 10, 11, 30, 13, 14, 31};
    store16<Isa>(o, __builtin_shuffle(__builtin_shuffle(a, b, ab0), c, abc0));       // a0 b0 c0 ... a5
    store16<Isa>(o + 16, __builtin_shuffle(__builtin_shuffle(a, b, ab1), c, abc1));  // b5 c5 ... b10
    store16<Isa>(o + 32, __builtin_shuffle(__builtin_shuffle(a, b, ab2), c, abc2));  // c10 a11 ... c15
  } else {
    interleave3_8(lo8(a), lo8(b), lo8(c), o);
    interleave3_8(hi8(a), hi8(b), hi8(c), o + 24);
  }
}

// The target patch's pixels (patch = pixel (c=0, i=0, j=0)) into x in (i, j, c) order, V = 8 or
// 16 pixels of each channel row at a time, and their sum (in an order set by p and V alone).
template <typename Isa, int CC, int V, typename img_t>
inline float load_groups(const img_t* patch, int64_t p, int64_t H, int64_t W, float* x) {
  using vec = std::conditional_t<V == 16, v16f, v8f>;
  auto load = [](const img_t* s) {
    if constexpr (V == 16) {
      return load16(s);
    } else {
      return load8(s);
    }
  };
  vec s0 = {}, s1 = {};
  for (int64_t i = 0; i < p; ++i) {
    const img_t* r0 = patch + i * W;
    float* o = x + i * p * CC;
    for (int64_t j = 0; j < p; j += V, o += V * CC) {
      const vec a = load(r0 + j);
      if constexpr (CC == 3) {
        const vec b = load(r0 + H * W + j), c = load(r0 + 2 * H * W + j);
        s0 += a + b;
        s1 += c;
        if constexpr (V == 16) {
          interleave3_16<Isa>(a, b, c, o);
        } else {
          interleave3_8(a, b, c, o);
        }
      } else {
        s0 += a;
        if constexpr (V == 16) {
          store16<Isa>(o, a);
        } else {
          store8(o, a);
        }
      }
    }
  }
  if constexpr (V == 16) {
    return hsum16(s0 + s1);
  } else {
    return hsum8(s0 + s1);
  }
}

// The same for C in {1, 3} and p a multiple of 8 (every ViT patch size but 14), with vectors of
// 16 pixels (p a multiple of 16) or 8: each group of pixels of the three channel rows is
// interleaved into consecutive values of x, and the pixel sum is accumulated on the way, so only
// the variance needs a second pass (over x, in L1). The sums' order depends on the geometry only,
// never on the instruction set, so the AVX-512 and AVX2 variants give the same bits (both fuse
// multiply-adds; the baseline variant rounds the products and may differ in the last place).
template <typename Isa, int CC, typename img_t>
inline PatchStats load_patch_vec(const img_t* img, int64_t l, const Geometry& g, bool norm_pix, float eps, float* x) {
  const int64_t p = g.p, P = g.P;
  const img_t* patch = img + (l / g.w) * p * g.W + (l % g.w) * p;
  const float total = p % 16 == 0 ? load_groups<Isa, CC, 16>(patch, p, g.H, g.W, x)
                                  : load_groups<Isa, CC, 8>(patch, p, g.H, g.W, x);
  if (!norm_pix) return {0.f, 1.f};
  const float mean = total / float(P);
  const v16f vm = mean - v16f{};
  const float sq = sum_v16(P, [&](int64_t k) {
    const v16f d = load16(x + k) - vm;
    return d * d;
  });
  const float var = sq / float(P - 1);  // unbiased, as torch.var
  return {mean, 1.f / std::sqrt(var + eps)};
}

// Whether load_patch_vec handles this geometry (then P is a multiple of 64, as sum_v16 needs).
inline bool vector_path(const Geometry& g) { return (g.C == 3 || g.C == 1) && g.p % 8 == 0; }

// Pixel (c=0, i=0, j=0) of the target patch of pred row `row`.
template <typename img_t>
inline const img_t* row_patch(const img_t* imgs, const int64_t* ids, int64_t row, const Geometry& g) {
  const int64_t n = row / g.M, l = ids != nullptr ? ids[row] : row % g.M;
  return imgs + n * g.C * g.H * g.W + (l / g.w) * g.p * g.W + (l % g.w) * g.p;  // images only
}

// The pixels and statistics of the target of pred row `row` (patch ids[row], or row % M).
template <typename Isa, typename img_t>
inline PatchStats load_row_patch(const img_t* imgs, const int64_t* ids, int64_t row, const Geometry& g,
                                 bool norm_pix, float eps, float* x) {
  // The target patch two rows ahead: one row is too little lead (and at p = 16 in 16 bits, with
  // the rows in patch order, neighbouring patches share their lines, so row + 1's are often the
  // ones being read).
  constexpr int64_t ahead = 2;
  const int64_t n = row / g.M, l = ids != nullptr ? ids[row] : row % g.M;
  if (g.tube()) return load_tubelet(imgs + n * g.C * g.T * g.H * g.W, l, g, norm_pix, eps, x);
  if (row + ahead < g.N * g.M) prefetch_patch(row_patch(imgs, ids, row + ahead, g), g.C, g.p, g.H, g.W);
  const img_t* img = imgs + n * g.C * g.H * g.W;
  if (vector_path(g)) {
    return g.C == 3 ? load_patch_vec<Isa, 3>(img, l, g, norm_pix, eps, x)
                    : load_patch_vec<Isa, 1>(img, l, g, norm_pix, eps, x);
  }
  switch (g.C) {
    case 1: return load_patch<1>(img, l, g, norm_pix, eps, x);
    case 3: return load_patch<3>(img, l, g, norm_pix, eps, x);
    default: return load_patch<0>(img, l, g, norm_pix, eps, x);
  }
}

// Rows per chunk of the forward reduction: fixed, so the summation order is too.
constexpr int64_t kRowsPerChunk = 8;

// Chunks [cbegin, cend) of the forward: partial[chunk] = sum over its rows of w * mean_k (pred - t)^2.
template <typename Isa, typename pred_t, typename img_t>
inline void loss_chunks(const pred_t* pred, const img_t* imgs, const float* weight, const int64_t* ids, Geometry g,
                        bool norm_pix, float eps, double* partial, int64_t cbegin, int64_t cend) {
  const int64_t rows = g.N * g.M, P = g.P;
  thread_local std::vector<float> x_buf;
  float* x = scratch(x_buf, P + 3 * g.p);
  const bool vec = vector_path(g);
  for (int64_t chunk = cbegin; chunk < cend; ++chunk) {
    double acc = 0.0;
    const int64_t r1 = std::min(rows, (chunk + 1) * kRowsPerChunk);
    for (int64_t row = chunk * kRowsPerChunk; row < r1; ++row) {
      prefetch_pred_row(pred, row, rows, P);
      const PatchStats st = load_row_patch<Isa>(imgs, ids, row, g, norm_pix, eps, x);
      const pred_t* pr = pred + row * P;
      float se;
      if (vec) {
        const v16f vm = st.mean - v16f{}, vr = st.rstd - v16f{};
        se = sum_v16(P, [&](int64_t k) {
          const v16f diff = load16(pr + k) - (load16(x + k) - vm) * vr;
          return diff * diff;
        });
      } else {
        se = sum_f32(P, [&](int64_t k) {
          const float diff = to_f(pr[k]) - (x[k] - st.mean) * st.rstd;
          return diff * diff;
        });
      }
      acc += double(weight[row]) * double(se / float(P));
    }
    partial[chunk] = acc;
  }
}
FASTMAE_DEFINE_ISA_VARIANTS(loss_task, loss_chunks)

// Rows [begin, end) of the backward: dpred = (pred - t) * w * scale.
template <typename Isa, typename pred_t, typename img_t>
inline void grad_rows(float scale, const pred_t* pred, const img_t* imgs, const float* weight, const int64_t* ids,
                      pred_t* dpred, Geometry g, bool norm_pix, float eps, bool stream, int64_t begin,
                      int64_t end) {
  const int64_t P = g.P;
  thread_local std::vector<float> x_buf;
  float* x = scratch(x_buf, P + 3 * g.p);
  const bool vec = vector_path(g);
  for (int64_t row = begin; row < end; ++row) {
    prefetch_pred_row(pred, row, end, P);
    const PatchStats st = load_row_patch<Isa>(imgs, ids, row, g, norm_pix, eps, x);
    const float coef = weight[row] * scale;
    const pred_t* pr = pred + row * P;
    pred_t* o = dpred + row * P;
    if (vec) {
      const v16f vm = st.mean - v16f{}, vr = st.rstd - v16f{}, vc = coef - v16f{};
      for (int64_t k = 0; k < P; k += 16) put16<Isa>(o + k, (load16(pr + k) - (load16(x + k) - vm) * vr) * vc, stream);
    } else {
      for (int64_t k = 0; k < P; ++k) o[k] = from_f<pred_t>((to_f(pr[k]) - (x[k] - st.mean) * st.rstd) * coef);
    }
  }
  if (stream) Stream<Isa>::fence();
}
FASTMAE_DEFINE_ISA_VARIANTS(grad_task, grad_rows)

template <typename pred_t, typename img_t>
double loss_sum(const pred_t* pred, const img_t* imgs, const float* weight, const int64_t* ids, const Geometry& g,
                bool norm_pix, float eps, CpuIsa isa) {
  const int64_t nchunks = (g.N * g.M + kRowsPerChunk - 1) / kRowsPerChunk;
  thread_local std::vector<double> partial_buf;
  double* partial = scratch(partial_buf, nchunks);
  at::parallel_for(0, nchunks, 1, [&](int64_t cbegin, int64_t cend) {
    loss_task<pred_t, img_t>(isa, pred, imgs, weight, ids, g, norm_pix, eps, partial, cbegin, cend);
  });
  double total = 0.0;
  for (int64_t c = 0; c < nchunks; ++c) total += partial[c];
  return total;
}

template <typename pred_t, typename img_t>
void loss_grad(float scale, const pred_t* pred, const img_t* imgs, const float* weight, const int64_t* ids,
               pred_t* dpred, const Geometry& g, bool norm_pix, float eps, CpuIsa isa, int64_t stream_mode) {
  // Streamed 16 values at a time on the vector path (rows of P = a multiple of 64 values).
  const bool stream = vector_path(g) && stream_output(g.N * g.M * g.P * int64_t(sizeof(pred_t)), stream_mode) &&
                      aligned_to(dpred, 16);
  at::parallel_for(0, g.N * g.M, grain_for(3 * g.P * int64_t(sizeof(pred_t))), [&](int64_t begin, int64_t end) {
    grad_task<pred_t, img_t>(isa, scale, pred, imgs, weight, ids, dpred, g, norm_pix, eps, stream, begin, end);
  });
}

// Checks shared by forward and backward; returns the geometry.
Geometry check_loss_args(const at::Tensor& pred, const at::Tensor& imgs, const at::Tensor& weight,
                         const std::optional<at::Tensor>& ids, int64_t patch_size, int64_t tubelet_size,
                         bool per_channel, const std::optional<at::Tensor>& affine) {
  check_float_input(pred, "pred");
  check_float_input(imgs, "imgs");
  TORCH_CHECK_VALUE(imgs.dim() == 4 || imgs.dim() == 5, "imgs must be [N, C, H, W] or [N, C, T, H, W], got shape ",
                    imgs.sizes());
  Geometry g{};
  const bool clip = imgs.dim() == 5;
  g.N = imgs.size(0), g.C = imgs.size(1), g.T = clip ? imgs.size(2) : 1, g.H = imgs.size(-2), g.W = imgs.size(-1);
  g.p = patch_size, g.t = tubelet_size, g.per_channel = per_channel;
  TORCH_CHECK_VALUE(g.t >= 1 && g.T % g.t == 0, "the ", g.T, " frames are not divisible by the tubelet size ", g.t);
  const auto [h, w] = patch_grid(g.H, g.W, g.p);
  g.h = h, g.w = w;
  g.P = g.t * g.p * g.p * g.C;
  const int64_t L = (g.T / g.t) * h * w;
  if (affine.has_value()) {
    TORCH_CHECK_VALUE(affine->device().is_cpu() && affine->scalar_type() == at::kFloat && affine->is_contiguous() &&
                          affine->dim() == 2 && affine->size(0) == 2 && affine->size(1) == g.C,
                      "affine must be a contiguous float32 [2, C] = [2, ", g.C, "] tensor, got ",
                      affine->scalar_type(), " ", affine->sizes());
    g.affine = affine->const_data_ptr<float>();
  }
  TORCH_CHECK_VALUE(pred.dim() == 3 && pred.size(0) == g.N && pred.size(2) == g.P,
                    "pred must be [N, rows, t*p*p*C] = [", g.N, ", *, ", g.P, "] for inputs ", imgs.sizes(),
                    ", patch size ", g.p, " and tubelet size ", g.t, ", got ", pred.sizes());
  g.M = pred.size(1);
  TORCH_CHECK_VALUE(weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.is_contiguous() &&
                        weight.dim() == 2 && weight.size(0) == g.N && weight.size(1) == g.M,
                    "weight must be a contiguous float32 [N, rows] = [", g.N, ", ", g.M, "] tensor, got ",
                    weight.scalar_type(), " ", weight.sizes());
  if (ids.has_value()) {
    check_ids(*ids, "ids", g.N, g.M);
    check_index_range(*ids, L, "ids");
  } else {
    TORCH_CHECK_VALUE(g.M == L, "pred has ", g.M, " rows but the images have L = ", L,
                      " patches; pass ids to give predictions for a subset of patches");
  }
  return g;
}

// sum(weight) in fp64, sequential (N*M values): fixed order.
double weight_sum(const at::Tensor& weight) {
  const float* wt = weight.const_data_ptr<float>();
  double s = 0.0;
  for (int64_t i = 0, n = weight.numel(); i < n; ++i) s += wt[i];
  return s;
}

// Calls fn.template operator()<pred_t, img_t>() for the two tensors' dtypes.
template <typename Fn>
void dispatch_pred_img(const at::Tensor& pred, const at::Tensor& imgs, const Fn& fn) {
  FASTMAE_DISPATCH_FLOAT(pred.scalar_type(), "norm_mse_loss", [&] {
    using pred_t = scalar_t;
    FASTMAE_DISPATCH_FLOAT(imgs.scalar_type(), "norm_mse_loss", [&] {
      using img_t = scalar_t;
      fn(pred_t{}, img_t{});
    });
  });
}

}  // namespace

at::Tensor norm_mse_loss_fwd(const at::Tensor& pred, const at::Tensor& imgs, const at::Tensor& weight,
                             const std::optional<at::Tensor>& ids, int64_t patch_size, bool norm_pix, double eps,
                             int64_t tubelet_size, bool per_channel, const std::optional<at::Tensor>& affine,
                             int64_t isa_cap, int64_t stream_mode) {
  (void)stream_mode;  // the forward writes a scalar; the argument keeps every op's signature alike
  const Geometry g = check_loss_args(pred, imgs, weight, ids, patch_size, tubelet_size, per_channel, affine);
  const int64_t* idp = ids.has_value() ? ids->const_data_ptr<int64_t>() : nullptr;
  double total = 0.0;
  dispatch_pred_img(pred, imgs, [&](auto p0, auto i0) {
    using pred_t = decltype(p0);
    using img_t = decltype(i0);
    total = loss_sum<pred_t, img_t>(pred.const_data_ptr<pred_t>(), imgs.const_data_ptr<img_t>(),
                                    weight.const_data_ptr<float>(), idp, g, norm_pix, float(eps), cpu_isa(isa_cap));
  });
  return at::scalar_tensor(total / weight_sum(weight), pred.options().dtype(at::kFloat));
}

at::Tensor norm_mse_loss_bwd(const at::Tensor& grad, const at::Tensor& pred, const at::Tensor& imgs,
                             const at::Tensor& weight, const std::optional<at::Tensor>& ids, int64_t patch_size,
                             bool norm_pix, double eps, int64_t tubelet_size, bool per_channel,
                             const std::optional<at::Tensor>& affine, int64_t isa_cap, int64_t stream_mode) {
  const Geometry g = check_loss_args(pred, imgs, weight, ids, patch_size, tubelet_size, per_channel, affine);
  TORCH_CHECK_VALUE(grad.numel() == 1 && grad.device().is_cpu(), "grad must be a scalar CPU tensor, got shape ",
                    grad.sizes());
  const float scale = grad.item<float>() * 2.f / (float(g.P) * float(weight_sum(weight)));
  const int64_t* idp = ids.has_value() ? ids->const_data_ptr<int64_t>() : nullptr;
  at::Tensor dpred = at::empty_like(pred);
  dispatch_pred_img(pred, imgs, [&](auto p0, auto i0) {
    using pred_t = decltype(p0);
    using img_t = decltype(i0);
    loss_grad<pred_t, img_t>(scale, pred.const_data_ptr<pred_t>(), imgs.const_data_ptr<img_t>(),
                             weight.const_data_ptr<float>(), idp, dpred.mutable_data_ptr<pred_t>(), g, norm_pix,
                             float(eps), cpu_isa(isa_cap), stream_mode);
  });
  return dpred;
}

}  // namespace fastmae

TORCH_LIBRARY_FRAGMENT(fastmae_C, m) {
  m.def("norm_mse_loss_fwd(Tensor pred, Tensor imgs, Tensor weight, Tensor? ids, int patch_size, bool norm_pix, "
        "float eps, int tubelet_size, bool per_channel, Tensor? affine, int isa_cap, int stream_mode) -> Tensor");
  m.def("norm_mse_loss_bwd(Tensor grad, Tensor pred, Tensor imgs, Tensor weight, Tensor? ids, int patch_size, "
        "bool norm_pix, float eps, int tubelet_size, bool per_channel, Tensor? affine, int isa_cap, "
        "int stream_mode) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastmae_C, CPU, m) {
  m.impl("norm_mse_loss_fwd", &fastmae::norm_mse_loss_fwd);
  m.impl("norm_mse_loss_bwd", &fastmae::norm_mse_loss_bwd);
}
