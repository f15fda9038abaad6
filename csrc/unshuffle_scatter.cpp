// unshuffle_scatter: the MAE decoder input (cls row, kept tokens back in patch order, mask tokens
// for removed patches, plus positions) in one pass, and its backward.
//
// Forward: out[n, 0] = x[n, 0] + pos[0]; out[n, 1+l] = (x[n, 1+r] if r < K else mask_token) + pos[1+l]
// with r = ids_restore[n, l]; added in fp32 and rounded once. Parallel over output rows.
// Backward: dx[n, 0] = grad[n, 0]; dx[n, 1+r] = grad[n, 1+l] for kept l (fp32 sum if several l
// share an r; zero if none); dmask = sum of grad[n, 1+l] over removed (n, l); dpos = sum over n.
// Deterministic with no float atomics: tasks own blocks of columns d, and every column is summed
// over (n, l) in the same ascending order whatever the thread count, so results are bitwise
// reproducible. One read of grad: each task reads its column slice of a sample's rows once for
// the sums and again, from cache, for dx.
#include "common.h"

namespace fastmae {
namespace {

// Copy n values as bits (a struct copy of c10::BFloat16 / c10::Half does not vectorise).
template <typename scalar_t>
inline void copy_values(const scalar_t* src, scalar_t* dst, int64_t n) {
  using B = bits_t<scalar_t>;
  const B* s = reinterpret_cast<const B*>(src);
  B* d = reinterpret_cast<B*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = s[i];
}

// Output rows [begin, end) of the forward (row = n*(1+L) + j).
template <typename scalar_t>
inline void unshuffle_fwd_rows(const scalar_t* x, const scalar_t* mask, const int64_t* ids, const scalar_t* pos,
                               scalar_t* out, int64_t K, int64_t L, int64_t D, int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / (L + 1), j = row % (L + 1);
    const scalar_t* src = x + n * (K + 1) * D;  // cls row
    if (j > 0) {
      const int64_t r = ids[n * L + j - 1];
      src = r < K ? src + (1 + r) * D : mask;
    }
    scalar_t* o = out + row * D;
    if (pos != nullptr) {
      const scalar_t* pr = pos + j * D;
      for (int64_t d = 0; d < D; ++d) o[d] = from_f<scalar_t>(to_f(src[d]) + to_f(pr[d]));
    } else {
      copy_values(src, o, D);
    }
  }
}
FASTMAE_DEFINE_ISA_VARIANTS(unshuffle_fwd_task, unshuffle_fwd_rows)

// Column blocks [bbegin, bend) of the backward: columns [b*block, (b+1)*block) of dx, dmask, dpos.
template <typename scalar_t>
inline void unshuffle_bwd_blocks(const scalar_t* grad, const int64_t* ids, scalar_t* dx, scalar_t* dmask,
                                 scalar_t* dpos, int64_t N, int64_t K, int64_t L, int64_t D, int64_t block,
                                 int64_t bbegin, int64_t bend) {
  // acc_pos [(1+L), width] and acc_mask [width]: fp32 sums of this block's columns;
  // head[r] / next[l]: the patches l (ascending) whose kept token is x row 1+r.
  thread_local std::vector<float> pos_buf, mask_buf;
  thread_local std::vector<int64_t> head_buf, next_buf;
  float* acc_pos = dpos != nullptr ? scratch(pos_buf, (L + 1) * block) : nullptr;
  float* acc_mask = scratch(mask_buf, block);
  int64_t* head = scratch(head_buf, K);
  int64_t* next = scratch(next_buf, L);
  for (int64_t b = bbegin; b < bend; ++b) {
    const int64_t d0 = b * block, width = std::min(block, D - d0);
    if (acc_pos != nullptr) std::fill(acc_pos, acc_pos + (L + 1) * width, 0.f);
    std::fill(acc_mask, acc_mask + width, 0.f);
    for (int64_t n = 0; n < N; ++n) {
      const scalar_t* g = grad + n * (L + 1) * D + d0;  // row 0 of sample n, column d0
      scalar_t* dxn = dx + n * (K + 1) * D + d0;
      const int64_t* idn = ids + n * L;
      copy_values(g, dxn, width);
      if (acc_pos != nullptr) {
        for (int64_t j = 0; j <= L; ++j) {
          const scalar_t* gr = g + j * D;
          float* ap = acc_pos + j * width;
          for (int64_t d = 0; d < width; ++d) ap[d] += to_f(gr[d]);
        }
      }
      std::fill(head, head + K, int64_t(-1));
      for (int64_t l = L - 1; l >= 0; --l) {
        const int64_t r = idn[l];
        if (r >= K) {
          const scalar_t* gr = g + (1 + l) * D;
          for (int64_t d = 0; d < width; ++d) acc_mask[d] += to_f(gr[d]);
        } else {
          next[l] = head[r];
          head[r] = l;
        }
      }
      for (int64_t r = 0; r < K; ++r) {
        scalar_t* o = dxn + (1 + r) * D;
        const int64_t l = head[r];
        if (l < 0) {
          for (int64_t d = 0; d < width; ++d) o[d] = from_f<scalar_t>(0.f);
        } else if (next[l] < 0) {
          copy_values(g + (1 + l) * D, o, width);
        } else {  // several patches restored from one token: fp32 sum in l order
          for (int64_t d = 0; d < width; ++d) {
            float acc = 0.f;
            for (int64_t ll = l; ll >= 0; ll = next[ll]) acc += to_f(g[(1 + ll) * D + d]);
            o[d] = from_f<scalar_t>(acc);
          }
        }
      }
    }
    for (int64_t d = 0; d < width; ++d) dmask[d0 + d] = from_f<scalar_t>(acc_mask[d]);
    if (acc_pos != nullptr) {
      for (int64_t j = 0; j <= L; ++j)
        for (int64_t d = 0; d < width; ++d) dpos[j * D + d0 + d] = from_f<scalar_t>(acc_pos[j * width + d]);
    }
  }
}
FASTMAE_DEFINE_ISA_VARIANTS(unshuffle_bwd_task, unshuffle_bwd_blocks)

}  // namespace

at::Tensor unshuffle_scatter_fwd(const at::Tensor& x, const at::Tensor& mask_token, const at::Tensor& ids_restore,
                                 const std::optional<at::Tensor>& pos_embed) {
  check_float_input(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 3 && x.size(1) >= 1, "x must be [N, 1+K, D] with the cls token first, got shape ",
                    x.sizes());
  const int64_t N = x.size(0), K = x.size(1) - 1, D = x.size(2);
  check_ids(ids_restore, "ids_restore", N);
  const int64_t L = ids_restore.size(1);
  TORCH_CHECK_VALUE(K < L, "x holds K = ", K, " kept tokens, which must be fewer than L = ", L, " patches");
  check_float_input(mask_token, "mask_token");
  TORCH_CHECK_VALUE(mask_token.numel() == D && mask_token.scalar_type() == x.scalar_type(),
                    "mask_token must hold D = ", D, " values of x's dtype ", x.scalar_type(), ", got shape ",
                    mask_token.sizes(), " and dtype ", mask_token.scalar_type());
  if (pos_embed.has_value()) {
    check_float_input(*pos_embed, "pos_embed");
    TORCH_CHECK_VALUE(pos_embed->numel() == (L + 1) * D && pos_embed->scalar_type() == x.scalar_type(),
                      "pos_embed must be [1+L, D] = [", L + 1, ", ", D, "] of x's dtype ", x.scalar_type(),
                      ", got shape ", pos_embed->sizes(), " and dtype ", pos_embed->scalar_type());
  }
  check_index_range(ids_restore, L, "ids_restore");
  at::Tensor out = at::empty({N, L + 1, D}, x.options());
  const bool avx2 = use_avx2();
  FASTMAE_DISPATCH_FLOAT(x.scalar_type(), "unshuffle_scatter_fwd", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* tok = mask_token.const_data_ptr<scalar_t>();
    const int64_t* idp = ids_restore.const_data_ptr<int64_t>();
    const scalar_t* pos = pos_embed.has_value() ? pos_embed->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N * (L + 1), grain_for(2 * D * int64_t(sizeof(scalar_t))), [&](int64_t begin, int64_t end) {
      unshuffle_fwd_task<scalar_t>(avx2, xp, tok, idp, pos, o, K, L, D, begin, end);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> unshuffle_scatter_bwd(const at::Tensor& grad,
                                                                     const at::Tensor& ids_restore, int64_t K,
                                                                     bool need_pos_grad) {
  check_float_input(grad, "grad");
  TORCH_CHECK_VALUE(grad.dim() == 3 && grad.size(1) >= 1, "grad must be [N, 1+L, D], got shape ", grad.sizes());
  const int64_t N = grad.size(0), L = grad.size(1) - 1, D = grad.size(2);
  check_ids(ids_restore, "ids_restore", N, L);
  TORCH_CHECK_VALUE(0 <= K && K < L, "K = ", K, " kept tokens must be in [0, L = ", L, ")");
  check_index_range(ids_restore, L, "ids_restore");
  at::Tensor dx = at::empty({N, K + 1, D}, grad.options());
  at::Tensor dmask = at::empty({D}, grad.options());
  at::Tensor dpos = need_pos_grad ? at::empty({L + 1, D}, grad.options()) : at::empty({0}, grad.options());
  const bool avx2 = use_avx2();
  FASTMAE_DISPATCH_FLOAT(grad.scalar_type(), "unshuffle_scatter_bwd", [&] {
    // Column blocks of >= 256 bytes, so every row segment a task reads is a few whole cache lines.
    const int64_t block = 256 / int64_t(sizeof(scalar_t));
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const int64_t* idp = ids_restore.const_data_ptr<int64_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    scalar_t* dmp = dmask.mutable_data_ptr<scalar_t>();
    scalar_t* dpp = need_pos_grad ? dpos.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, (D + block - 1) / block, 1, [&](int64_t begin, int64_t end) {
      unshuffle_bwd_task<scalar_t>(avx2, g, idp, dxp, dmp, dpp, N, K, L, D, block, begin, end);
    });
  });
  return {dx, dmask, dpos};
}

}  // namespace fastmae

TORCH_LIBRARY_FRAGMENT(fastmae_C, m) {
  m.def("unshuffle_scatter_fwd(Tensor x, Tensor mask_token, Tensor ids_restore, Tensor? pos_embed) -> Tensor");
  m.def("unshuffle_scatter_bwd(Tensor grad, Tensor ids_restore, int K, bool need_pos_grad) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastmae_C, CPU, m) {
  m.impl("unshuffle_scatter_fwd", &fastmae::unshuffle_scatter_fwd);
  m.impl("unshuffle_scatter_bwd", &fastmae::unshuffle_scatter_bwd);
}
