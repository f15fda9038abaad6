// gather_mask: patchify + gather of the visible patches (forward) and its scatter (backward).
//
// Forward: out[n, k, (c*p + i)*p + j] = imgs[n, c, hi*p + i, wj*p + j] for patch
// l = ids_keep[n, k] = hi*w + wj (Conv2d-weight order (c, i, j)). A pure copy: each output row is
// C*p contiguous segments of p pixels read from image rows; parallel over (n, k).
// Backward: grad [N, K, C*p*p] -> grad_imgs [N, C, H, W], every element written (zero on patches
// that were not kept; a patch kept more than once gets the fp32 sum of its rows, in k order).
// Parallel over (n, grid row), so each task writes whole image rows contiguously.
#include "common.h"

namespace fastmae {
namespace {

template <typename scalar_t>
void gather_fwd_kernel(const scalar_t* imgs, const int64_t* ids, scalar_t* out, int64_t N, int64_t C,
                       int64_t H, int64_t W, int64_t K, int64_t p) {
  using B = bits_t<scalar_t>;
  const int64_t w = W / p, D = C * p * p;
  const B* src = reinterpret_cast<const B*>(imgs);
  B* dst = reinterpret_cast<B*>(out);
  at::parallel_for(0, N * K, grain_for(2 * D * int64_t(sizeof(B))), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / K, l = ids[row];
      const int64_t hi = l / w, wj = l % w;
      const B* patch = src + (n * C * H + hi * p) * W + wj * p;  // pixel (c=0, i=0, j=0)
      B* o = dst + row * D;
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t i = 0; i < p; ++i, o += p) {
          const B* s = patch + (c * H + i) * W;
          for (int64_t j = 0; j < p; ++j) o[j] = s[j];
        }
      }
    }
  });
}

template <typename scalar_t>
void gather_bwd_kernel(const scalar_t* grad, const int64_t* ids, scalar_t* out, int64_t N, int64_t C,
                       int64_t H, int64_t W, int64_t K, int64_t p) {
  using B = bits_t<scalar_t>;
  const int64_t h = H / p, w = W / p, D = C * p * p;
  const B* gbits = reinterpret_cast<const B*>(grad);
  B* obits = reinterpret_cast<B*>(out);
  at::parallel_for(0, N * h, grain_for(2 * C * p * W * int64_t(sizeof(B))), [&](int64_t begin, int64_t end) {
    // head[wj]: first row k of ids_keep[n] holding patch (hi, wj), or -1; next[k]: the following
    // row holding the same patch. Built per task from the K indices of sample n.
    thread_local std::vector<int64_t> head_buf, next_buf;
    int64_t* head = scratch(head_buf, w);
    int64_t* next = scratch(next_buf, K);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / h, hi = t % h;
      const int64_t* idn = ids + n * K;
      std::fill(head, head + w, int64_t(-1));
      for (int64_t k = K - 1; k >= 0; --k) {
        if (idn[k] / w == hi) {
          const int64_t wj = idn[k] % w;
          next[k] = head[wj];
          head[wj] = k;
        }
      }
      const int64_t grow0 = n * K;
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t i = 0; i < p; ++i) {
          const int64_t y = hi * p + i;
          B* orow = obits + ((n * C + c) * H + y) * W;
          const int64_t goff = (c * p + i) * p;  // this pixel row's offset inside a patch row
          for (int64_t wj = 0; wj < w; ++wj) {
            B* o = orow + wj * p;
            const int64_t k = head[wj];
            if (k < 0) {
              for (int64_t j = 0; j < p; ++j) o[j] = B(0);
            } else if (next[k] < 0) {
              const B* g = gbits + (grow0 + k) * D + goff;
              for (int64_t j = 0; j < p; ++j) o[j] = g[j];
            } else {  // duplicate indices: fp32 sum in k order, rounded once
              scalar_t* os = reinterpret_cast<scalar_t*>(o);
              for (int64_t j = 0; j < p; ++j) {
                float acc = 0.f;
                for (int64_t kk = k; kk >= 0; kk = next[kk]) acc += to_f(grad[(grow0 + kk) * D + goff + j]);
                os[j] = from_f<scalar_t>(acc);
              }
            }
          }
        }
      }
    }
  });
}

void check_gather_ids(const at::Tensor& ids_keep, int64_t N, int64_t L) {
  check_ids(ids_keep, "ids_keep", N);
  const int64_t K = ids_keep.size(1);
  TORCH_CHECK_VALUE(0 < K && K < L, "ids_keep must keep K patches with 0 < K < L = ", L, ", got K = ", K);
  check_index_range(ids_keep, L, "ids_keep");
}

}  // namespace

at::Tensor gather_mask_fwd(const at::Tensor& imgs, const at::Tensor& ids_keep, int64_t patch_size) {
  check_float_input(imgs, "imgs");
  TORCH_CHECK_VALUE(imgs.dim() == 4, "imgs must be [N, C, H, W], got shape ", imgs.sizes());
  const int64_t N = imgs.size(0), C = imgs.size(1), H = imgs.size(2), W = imgs.size(3), p = patch_size;
  const auto [h, w] = patch_grid(H, W, p);
  check_gather_ids(ids_keep, N, h * w);
  const int64_t K = ids_keep.size(1);
  at::Tensor out = at::empty({N, K, C * p * p}, imgs.options());
  FASTMAE_DISPATCH_FLOAT(imgs.scalar_type(), "gather_mask_fwd", [&] {
    gather_fwd_kernel<scalar_t>(imgs.const_data_ptr<scalar_t>(), ids_keep.const_data_ptr<int64_t>(),
                                out.mutable_data_ptr<scalar_t>(), N, C, H, W, K, p);
  });
  return out;
}

at::Tensor gather_mask_bwd(const at::Tensor& grad, const at::Tensor& ids_keep, int64_t patch_size, int64_t H,
                           int64_t W) {
  check_float_input(grad, "grad");
  TORCH_CHECK_VALUE(grad.dim() == 3, "grad must be [N, K, C*p*p], got shape ", grad.sizes());
  const int64_t N = grad.size(0), K = grad.size(1), D = grad.size(2), p = patch_size;
  const auto [h, w] = patch_grid(H, W, p);
  TORCH_CHECK_VALUE(D % (p * p) == 0 && D > 0, "grad rows hold ", D,
                    " values, not a multiple of p*p = ", p * p);
  check_gather_ids(ids_keep, N, h * w);
  TORCH_CHECK_VALUE(ids_keep.size(1) == K, "ids_keep has ", ids_keep.size(1), " columns but grad has K = ", K,
                    " rows per sample");
  const int64_t C = D / (p * p);
  at::Tensor out = at::empty({N, C, H, W}, grad.options());
  FASTMAE_DISPATCH_FLOAT(grad.scalar_type(), "gather_mask_bwd", [&] {
    gather_bwd_kernel<scalar_t>(grad.const_data_ptr<scalar_t>(), ids_keep.const_data_ptr<int64_t>(),
                                out.mutable_data_ptr<scalar_t>(), N, C, H, W, K, p);
  });
  return out;
}

}  // namespace fastmae

TORCH_LIBRARY_FRAGMENT(fastmae_C, m) {
  m.def("gather_mask_fwd(Tensor imgs, Tensor ids_keep, int patch_size) -> Tensor");
  m.def("gather_mask_bwd(Tensor grad, Tensor ids_keep, int patch_size, int H, int W) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastmae_C, CPU, m) {
  m.impl("gather_mask_fwd", &fastmae::gather_mask_fwd);
  m.impl("gather_mask_bwd", &fastmae::gather_mask_bwd);
}
