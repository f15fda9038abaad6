// gather_mask: patchify + gather of the visible patches (forward) and its scatter (backward).
//
// Forward: out[n, k, (c*p + i)*p + j] = imgs[n, c, hi*p + i, wj*p + j] for patch
// l = ids_keep[n, k] = hi*w + wj (Conv2d-weight order (c, i, j)). A pure copy: each output row is
// C*p contiguous segments of p pixels read from image rows; parallel over (n, k); with streaming
// stores from 1 MiB, since a matmul reads it next (common.h, kStreamMatmulInputBytes).
// Backward: grad [N, K, C*p*p] -> grad_imgs [N, C, H, W], every element written (zero on patches
// that were not kept). The ids_keep of a sample are distinct (as masking makes them; checked), so
// each image element is a copy of at most one gradient element.
// Parallel over (n, grid row), so each task writes whole image rows contiguously; with streaming
// stores when the gradient is 16 MiB or more (common.h, stream_output).
#include "common.h"

#include <type_traits>

namespace fastmae {
namespace {

struct Grid {
  int64_t N, C, H, W, K, p, h, w, D;  // D = C*p*p values per patch row
};

// Output rows [begin, end) of the forward (row = n*K + k): a pure copy of bits.
// One patch-row segment of p values: dst = src (bits), or zeros when src is null. A fixed p
// (PC::value > 0) makes it a fixed-size memcpy: a few vector moves, since the compiler cannot
// vectorise the plain loop (it cannot rule out that dst and src overlap).
template <typename PC, typename B>
inline void copy_segment(B* dst, const B* src, int64_t p) {
  if constexpr (PC::value > 0) {
    if (src != nullptr) {
      std::memcpy(dst, src, PC::value * sizeof(B));
    } else {
      std::memset(dst, 0, PC::value * sizeof(B));
    }
  } else {
    for (int64_t j = 0; j < p; ++j) dst[j] = src != nullptr ? src[j] : B(0);
  }
}

typedef uint8_t v32b __attribute__((vector_size(32)));
typedef uint8_t v64b __attribute__((vector_size(64)));

// The 32 bytes at a and the 32 bytes at b side by side: one 64-byte line for one streaming store.
inline v64b line_of(const void* a, const void* b) {
  v32b x, y;
  std::memcpy(&x, a, sizeof(x));
  std::memcpy(&y, b, sizeof(y));
  return __builtin_shufflevector(x, y, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21,
                                 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42,
                                 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63);
}

// PC::value > 0 fixes the patch size at compile time (the segment loops become a few vector moves).
// With `stream` (only for segments of 32 or 64 bytes: p = 16 in 16-bit dtypes, 8 or 16 in fp32),
// each output line is written by one streaming store from registers: two 32-byte segments (image
// rows i and i + 1 of the patch) side by side, or one 64-byte segment.
template <typename Isa, typename scalar_t, typename PC>
inline void gather_fwd_rows(const scalar_t* imgs, const int64_t* ids, scalar_t* out, Grid g, bool stream,
                            int64_t begin, int64_t end) {
  using B = bits_t<scalar_t>;
  constexpr int64_t kSegBytes = PC::value * int64_t(sizeof(B));
  const int64_t C = g.C, H = g.H, W = g.W, p = PC::value > 0 ? PC::value : g.p;
  const B* src = reinterpret_cast<const B*>(imgs);
  auto patch_of = [&](int64_t row) {  // pixel (c=0, i=0, j=0) of the patch of output row `row`
    const int64_t n = row / g.K, l = ids[row];
    return src + (n * C * H + (l / g.w) * p) * W + (l % g.w) * p;
  };
  for (int64_t row = begin; row < end; ++row) {
    const B* patch = patch_of(row);
    if (row + 1 < g.N * g.K) prefetch_patch(patch_of(row + 1), C, p, H, W);
    B* o = reinterpret_cast<B*>(out) + row * g.D;
    if constexpr (kSegBytes == 32 || kSegBytes == 64) {
      if (stream) {
        for (int64_t c = 0; c < C; ++c) {
          const B* seg = patch + c * H * W;
          if constexpr (kSegBytes == 32) {  // p is even: rows i and i + 1 make one line
            for (int64_t i = 0; i < p; i += 2, o += 2 * p) {
              Stream<Isa>::store(o, line_of(seg + i * W, seg + (i + 1) * W));
            }
          } else {
            for (int64_t i = 0; i < p; ++i, o += p) {
              v64b v;
              std::memcpy(&v, seg + i * W, sizeof(v));
              Stream<Isa>::store(o, v);
            }
          }
        }
        continue;
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t i = 0; i < p; ++i, o += p) {
        copy_segment<PC>(o, patch + (c * H + i) * W, p);
      }
    }
  }
  if (stream) Stream<Isa>::fence();
}
FASTMAE_DEFINE_ISA_VARIANTS(gather_fwd_task, gather_fwd_rows)

// One image row of the gradient with streaming stores: w segments of p values (S bytes each, S =
// 32 or 64), segment wj copied from seg[wj] + goff, written 64 bytes (one line, two 32-byte
// segments side by side) per store where the row allows: one store per line instead of one or two
// per segment, and no branch on whether a patch was kept.
template <typename Isa, int64_t S, typename B>
inline void stream_segments(const B* const* seg, int64_t goff, B* orow, int64_t w, int64_t p) {
  int64_t wj = 0;
  if constexpr (S == 32) {
    for (; wj + 2 <= w; wj += 2) Stream<Isa>::store(orow + wj * p, line_of(seg[wj] + goff, seg[wj + 1] + goff));
  }
  typedef uint8_t vseg __attribute__((vector_size(S)));
  for (; wj < w; ++wj) {
    vseg v;
    std::memcpy(&v, seg[wj] + goff, sizeof(v));
    Stream<Isa>::store(orow + wj * p, v);
  }
}

// Image-gradient grid rows [begin, end) of the backward (t = n*h + hi): C*p whole image rows each.
// Each image row is written left to right in one pass, zero and copied segments in turn.
template <typename Isa, typename scalar_t, typename PC>
inline void gather_bwd_rows(const scalar_t* grad, const int64_t* ids, scalar_t* out, Grid g, bool stream,
                            int64_t begin, int64_t end) {
  using B = bits_t<scalar_t>;
  const int64_t C = g.C, H = g.H, W = g.W, K = g.K, p = PC::value > 0 ? PC::value : g.p, w = g.w, D = g.D;
  const B* gbits = reinterpret_cast<const B*>(grad);
  B* obits = reinterpret_cast<B*>(out);
  // row[wj]: the row k of ids_keep[n] holding patch (hi, wj), or -1. Built per grid row from the
  // K indices of sample n.
  thread_local std::vector<int64_t> row_buf;
  int64_t* row = scratch(row_buf, w);
  // With streaming stores and 32- or 64-byte segments (p = 16 in 16-bit dtypes, p = 16 or 8 in
  // fp32), each image row is written a whole line at a time from registers (stream_segments):
  // seg[wj] is the gradient row of patch (hi, wj), or a row of zeros.
  constexpr int64_t kSegBytes = PC::value * int64_t(sizeof(B));
  constexpr bool kLines = kSegBytes == 32 || kSegBytes == 64;
  const B** seg = nullptr;
  const B* zero = nullptr;
  if constexpr (kLines) {
    if (stream) {
      thread_local std::vector<const B*> seg_buf;
      thread_local std::vector<B> zero_buf;
      seg = scratch(seg_buf, w);
      if (int64_t(zero_buf.size()) < D) zero_buf.assign(D, B(0));
      zero = zero_buf.data();
    }
  }
  for (int64_t t = begin; t < end; ++t) {
    const int64_t n = t / g.h, hi = t % g.h;
    const int64_t* idn = ids + n * K;
    std::fill(row, row + w, int64_t(-1));
    for (int64_t k = 0; k < K; ++k) {
      const uint64_t wj = uint64_t(idn[k] - hi * w);  // in [0, w) iff patch idn[k] is on grid row hi
      if (wj < uint64_t(w)) row[wj] = k;
    }
    const int64_t grow0 = n * K;
    // The gradient rows of the next grid row's kept patches, prefetched: this grid row reads its
    // own in p-value pieces, one per image row, which the hardware prefetchers do not run ahead of.
    if (t + 1 < end) {
      const int64_t n1 = (t + 1) / g.h, hi1 = (t + 1) % g.h;
      const int64_t* id1 = ids + n1 * K;
      for (int64_t k = 0; k < K; ++k) {
        if (uint64_t(id1[k] - hi1 * w) < uint64_t(w)) prefetch_bytes(gbits + (n1 * K + k) * D, D * int64_t(sizeof(B)));
      }
    }
    if constexpr (kLines) {
      if (stream) {  // whole lines from registers
        for (int64_t wj = 0; wj < w; ++wj) seg[wj] = row[wj] < 0 ? zero : gbits + (grow0 + row[wj]) * D;
        for (int64_t c = 0; c < C; ++c) {
          for (int64_t i = 0; i < p; ++i) {
            stream_segments<Isa, kSegBytes>(seg, (c * p + i) * p, obits + ((n * C + c) * H + hi * p + i) * W, w, p);
          }
        }
        continue;
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t i = 0; i < p; ++i) {
        B* orow = obits + ((n * C + c) * H + hi * p + i) * W;
        const int64_t goff = (c * p + i) * p;  // this pixel row's offset inside a patch row
        for (int64_t wj = 0; wj < w; ++wj) {
          B* o = orow + wj * p;
          const B* src = row[wj] < 0 ? nullptr : gbits + (grow0 + row[wj]) * D + goff;  // zeros if not kept
          if (stream) {
            Stream<Isa>::copy(o, src, p * int64_t(sizeof(B)));
          } else {
            copy_segment<PC>(o, src, p);
          }
        }
      }
    }
  }
  if (stream) Stream<Isa>::fence();
}
FASTMAE_DEFINE_ISA_VARIANTS(gather_bwd_task, gather_bwd_rows)

// Calls fn(PC{}) with PC = std::integral_constant<int, p> for the common ViT patch sizes, 0 otherwise.
template <typename Fn>
void dispatch_patch(int64_t p, const Fn& fn) {
  switch (p) {
    case 16: return fn(std::integral_constant<int, 16>{});
    case 14: return fn(std::integral_constant<int, 14>{});
    case 8: return fn(std::integral_constant<int, 8>{});
    default: return fn(std::integral_constant<int, 0>{});
  }
}

void check_gather_ids(const at::Tensor& ids_keep, int64_t N, int64_t L) {
  check_ids(ids_keep, "ids_keep", N);
  const int64_t K = ids_keep.size(1);
  TORCH_CHECK_VALUE(0 < K && K < L, "ids_keep must keep K patches with 0 < K < L = ", L, ", got K = ", K);
  check_distinct(ids_keep, L, "ids_keep");
}

}  // namespace

at::Tensor gather_mask_fwd(const at::Tensor& imgs, const at::Tensor& ids_keep, int64_t patch_size, int64_t isa_cap,
                           int64_t stream_mode) {
  check_float_input(imgs, "imgs");
  TORCH_CHECK_VALUE(imgs.dim() == 4, "imgs must be [N, C, H, W], got shape ", imgs.sizes());
  const int64_t N = imgs.size(0), C = imgs.size(1), H = imgs.size(2), W = imgs.size(3), p = patch_size;
  const auto [h, w] = patch_grid(H, W, p);
  check_gather_ids(ids_keep, N, h * w);
  const int64_t K = ids_keep.size(1);
  at::Tensor out = at::empty({N, K, C * p * p}, imgs.options());
  const Grid g{N, C, H, W, K, p, h, w, C * p * p};
  const CpuIsa isa = cpu_isa(isa_cap);
  // Its consumer is the patch embedding, a matmul (kStreamMatmulInputBytes). Streamed only where
  // each patch's segments are whole 32- or 64-byte pieces on 16-byte boundaries.
  const int64_t seg_bytes = p * imgs.element_size();
  const bool stream = stream_output(out.nbytes(), stream_mode, kStreamMatmulInputBytes) && (seg_bytes == 32 || seg_bytes == 64) &&
                      (p == 8 || p == 16) && aligned_to(out.const_data_ptr(), 16);
  FASTMAE_DISPATCH_FLOAT(imgs.scalar_type(), "gather_mask_fwd", [&] {
    const scalar_t* src = imgs.const_data_ptr<scalar_t>();
    const int64_t* idp = ids_keep.const_data_ptr<int64_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    dispatch_patch(p, [&](auto pc) {
      using PC = decltype(pc);
      at::parallel_for(0, N * K, grain_for(2 * g.D * int64_t(sizeof(scalar_t))), [&](int64_t begin, int64_t end) {
        gather_fwd_task<scalar_t, PC>(isa, src, idp, dst, g, stream, begin, end);
      });
    });
  });
  return out;
}

at::Tensor gather_mask_bwd(const at::Tensor& grad, const at::Tensor& ids_keep, int64_t patch_size, int64_t H,
                           int64_t W, int64_t isa_cap, int64_t stream_mode) {
  check_float_input(grad, "grad");
  TORCH_CHECK_VALUE(grad.dim() == 3, "grad must be [N, K, C*p*p], got shape ", grad.sizes());
  const int64_t N = grad.size(0), K = grad.size(1), D = grad.size(2), p = patch_size;
  const auto [h, w] = patch_grid(H, W, p);
  TORCH_CHECK_VALUE(D % (p * p) == 0, "grad rows hold ", D, " values, not a multiple of p*p = ", p * p);
  check_gather_ids(ids_keep, N, h * w);
  TORCH_CHECK_VALUE(ids_keep.size(1) == K, "ids_keep has ", ids_keep.size(1), " columns but grad has K = ", K,
                    " rows per sample");
  const int64_t C = D / (p * p);
  at::Tensor out = at::empty({N, C, H, W}, grad.options());
  if (out.numel() == 0) return out;  // C = 0 (or N = 0): nothing to write
  const Grid g{N, C, H, W, K, p, h, w, D};
  const CpuIsa isa = cpu_isa(isa_cap);
  // Streaming stores write whole 16-byte pieces: every segment of p values must start on one.
  const int64_t esize = grad.element_size();
  const bool stream = stream_output(out.nbytes(), stream_mode) && (p * esize) % 16 == 0 && (W * esize) % 16 == 0 &&
                      aligned_to(out.const_data_ptr(), 16);
  FASTMAE_DISPATCH_FLOAT(grad.scalar_type(), "gather_mask_bwd", [&] {
    const scalar_t* src = grad.const_data_ptr<scalar_t>();
    const int64_t* idp = ids_keep.const_data_ptr<int64_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    dispatch_patch(p, [&](auto pc) {
      using PC = decltype(pc);
      at::parallel_for(0, N * h, grain_for(2 * C * p * W * int64_t(sizeof(scalar_t))), [&](int64_t begin, int64_t end) {
        gather_bwd_task<scalar_t, PC>(isa, src, idp, dst, g, stream, begin, end);
      });
    });
  });
  return out;
}

}  // namespace fastmae

TORCH_LIBRARY_FRAGMENT(fastmae_C, m) {
  m.def("gather_mask_fwd(Tensor imgs, Tensor ids_keep, int patch_size, int isa_cap, int stream_mode) -> Tensor");
  m.def("gather_mask_bwd(Tensor grad, Tensor ids_keep, int patch_size, int H, int W, int isa_cap, int stream_mode) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(fastmae_C, CPU, m) {
  m.impl("gather_mask_fwd", &fastmae::gather_mask_fwd);
  m.impl("gather_mask_bwd", &fastmae::gather_mask_bwd);
}
