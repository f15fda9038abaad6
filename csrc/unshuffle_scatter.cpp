// unshuffle_scatter: the MAE decoder input (cls row, kept tokens back in patch order, mask tokens
// for removed patches, plus positions) in one pass, and its backward.
//
// Forward: out[n, 0] = x[n, 0] + pos[0]; out[n, 1+l] = (x[n, 1+r] if r < K else mask_token) + pos[1+l]
// with r = ids_restore[n, l]; added in fp32 and rounded once. Parallel over output rows; written
// with streaming stores when the output is 16 MiB or more (common.h, stream_output).
// Backward: dx[n, 0] = grad[n, 0]; dx[n, 1+r] = grad[n, 1+l] for the kept l with r = ids_restore[n, l];
// dmask = sum of grad[n, 1+l] over removed (n, l); dpos = sum over n. Every ids_restore row is a
// permutation of [0, L) (as masking makes it; checked), so each dx row is a copy of one grad row:
// one pass over grad, a block of rows j at a time, with dmask summed per fixed chunk of rows
// (unshuffle_bwd_perm_chunks). Deterministic with no float atomics, bitwise reproducible whatever
// the thread count.
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

// 16 bf16 values as two 8-float vectors without lane-crossing permutes: in-lane interleaves with
// zeros give the values in the order lo = 0-3 8-11, hi = 4-7 12-15 (widen16); narrow16 rounds as
// bits8<Isa> and packs them back into memory order, in-lane in the AVX2 and base variants and with
// one cross-lane permute of the two rounded halves in the AVX-512 one. (load8 / store8 need a lane
// permute per 8.)
inline void widen16(const c10::BFloat16* p, v8f& lo, v8f& hi) {
  v16h v;
  std::memcpy(&v, p, sizeof(v));
  const v16h z = {};
  const v16h l = __builtin_shufflevector(z, v, 0, 16, 1, 17, 2, 18, 3, 19, 8, 24, 9, 25, 10, 26, 11, 27);
  const v16h h = __builtin_shufflevector(z, v, 4, 20, 5, 21, 6, 22, 7, 23, 12, 28, 13, 29, 14, 30, 15, 31);
  std::memcpy(&lo, &l, sizeof(lo));
  std::memcpy(&hi, &h, sizeof(hi));
}
inline v16h round_bf16(v8f v) {  // bf16 bits of v in the low half of each 32-bit lane
  v8u u;
  std::memcpy(&u, &v, sizeof(u));
  const v8u rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const v8u nan = reinterpret_cast<v8u>(v != v);
  const v8u r = (rounded & ~nan) | (nan & 0x7FC0u);
  v16h h;
  std::memcpy(&h, &r, sizeof(h));
  return h;
}
template <typename Isa>
inline v16h narrow16(v8f lo, v8f hi) {
  if constexpr (std::is_same_v<Isa, IsaAvx512>) {  // rounded 0-3 8-11 and 4-7 12-15: interleave 64-bit halves
    typedef uint64_t v2q __attribute__((vector_size(16)));
    typedef uint64_t v4q __attribute__((vector_size(32)));
    const v4q o = __builtin_shufflevector((v2q)bits8<Isa, c10::BFloat16>(lo), (v2q)bits8<Isa, c10::BFloat16>(hi), 0,
                                          2, 1, 3);
    return (v16h)o;
  }
  const v16h rl = round_bf16(lo), rh = round_bf16(hi);
  return __builtin_shufflevector(rl, rh, 0, 2, 4, 6, 16, 18, 20, 22, 8, 10, 12, 14, 24, 26, 28, 30);
}
template <typename Isa>
inline void add16_bf16(const c10::BFloat16* in, const c10::BFloat16* pos, c10::BFloat16* out, bool stream) {
  v8f al, ah, bl, bh;
  widen16(in, al, ah);
  widen16(pos, bl, bh);
  const v16h sum = narrow16<Isa>(al + bl, ah + bh);
  if (stream) {
    Stream<Isa>::store(out, sum);
  } else {
    std::memcpy(out, &sum, sizeof(sum));
  }
}

// Output rows [begin, end) of the forward (row = n*(1+L) + j). With `stream` (D a multiple of 8,
// out 16-byte aligned) every store is a streaming store of 8 or 16 whole values.
template <typename Isa, typename scalar_t>
inline void unshuffle_fwd_rows(const scalar_t* x, const scalar_t* mask, const int64_t* ids, const scalar_t* pos,
                               scalar_t* out, int64_t K, int64_t L, int64_t D, bool stream, int64_t begin,
                               int64_t end) {
  auto source = [&](int64_t row) {  // the x row (or the mask token) output row `row` copies
    const int64_t n = row / (L + 1), j = row % (L + 1);
    const scalar_t* src = x + n * (K + 1) * D;  // cls row
    if (j > 0) {
      const int64_t r = ids[n * L + j - 1];
      src = r < K ? src + (1 + r) * D : mask;
    }
    return src;
  };
  // Kept tokens are read in ids_restore's order, a permutation the hardware prefetchers cannot
  // follow: the source row a few output rows ahead is prefetched (the distance is measured in
  // bench/README.md).
  constexpr int64_t ahead = 8;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t j = row % (L + 1);
    const scalar_t* src = source(row);
    if (row + ahead < end) prefetch_bytes(source(row + ahead), D * int64_t(sizeof(scalar_t)));
    scalar_t* o = out + row * D;
    if (pos != nullptr) {
      const scalar_t* pr = pos + j * D;
      int64_t d = 0;
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        for (; d + 16 <= D; d += 16) add16_bf16<Isa>(src + d, pr + d, o + d, stream);
      }
      for (; d + 8 <= D; d += 8) put8<Isa>(o + d, load8(src + d) + load8(pr + d), stream);
      for (; d < D; ++d) o[d] = from_f<scalar_t>(to_f(src[d]) + to_f(pr[d]));  // not when streaming
    } else if (stream) {
      Stream<Isa>::copy(o, src, D * int64_t(sizeof(scalar_t)));
    } else {
      std::memcpy(o, src, D * sizeof(scalar_t));
    }
  }
  if (stream) Stream<Isa>::fence();
}
FASTMAE_DEFINE_ISA_VARIANTS(unshuffle_fwd_task, unshuffle_fwd_rows)

// out[0, D) = the fp32 sums acc rounded, where bf16 sums with D % 16 == 0 are held in widen16's
// order (see unshuffle_bwd_perm_chunks).
template <typename Isa, typename scalar_t>
inline void store_perm_sums(const float* acc, scalar_t* out, int64_t D) {
  int64_t d = 0;
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (D % 16 == 0) {
      for (; d < D; d += 16) {
        const v16h o = narrow16<Isa>(load8(acc + d), load8(acc + d + 8));
        std::memcpy(out + d, &o, sizeof(o));
      }
    }
  }
  for (; d < D; ++d) out[d] = from_f<scalar_t>(acc[d]);
}

// 16 values as two fp32 vectors: bf16 in widen16's order, other dtypes in memory order.
template <typename scalar_t>
inline void load_pair16(const scalar_t* p, v8f& lo, v8f& hi) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    widen16(p, lo, hi);
  } else {
    lo = load8(p);
    hi = load8(p + 8);
  }
}
inline v8f keep_if(v8f v, v8u mask) {  // v where mask is all ones, +0 where it is zero
  v8u u;
  std::memcpy(&u, &v, sizeof(u));
  u &= mask;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

// ap[d] += each of the G rows, am[d] += each removed one (removed[g] all ones), in row order,
// for D % 16 == 0, with the sums held in registers across the G rows: the fp32 additions one row
// at a time would make, in the same order (adding +0 for a kept row leaves am's bits unchanged:
// am starts at +0 and a sum is -0 only when both terms are), with 1/G of the loads and stores.
template <int G, bool kPos, typename scalar_t>
inline void sum_rows16(const scalar_t* const* rows, const v8u* removed, float* ap, float* am, int64_t D) {
  for (int64_t d = 0; d < D; d += 16) {
    v8f plo{}, phi{};
    if constexpr (kPos) {
      plo = load8(ap + d);
      phi = load8(ap + d + 8);
    }
    v8f mlo = load8(am + d), mhi = load8(am + d + 8);
    for (int g = 0; g < G; ++g) {
      v8f lo, hi;
      load_pair16(rows[g] + d, lo, hi);
      if constexpr (kPos) {
        plo += lo;
        phi += hi;
      }
      mlo += keep_if(lo, removed[g]);
      mhi += keep_if(hi, removed[g]);
    }
    if constexpr (kPos) {
      store8(ap + d, plo);
      store8(ap + d + 8, phi);
    }
    store8(am + d, mlo);
    store8(am + d + 8, mhi);
  }
}

// a[0, D) += row (and b[0, D) += row when b is given), fp32 in memory order: D % 16 != 0.
template <typename scalar_t>
inline void add_row(const scalar_t* row, float* a, float* b, int64_t D) {
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    const v8f v = load8(row + d);
    store8(a + d, load8(a + d) + v);
    if (b != nullptr) store8(b + d, load8(b + d) + v);
  }
  for (; d < D; ++d) {
    const float v = to_f(row[d]);
    a[d] += v;
    if (b != nullptr) b[d] += v;
  }
}

// Backward when every kept token is restored to at most one patch (ids_restore rows are
// permutations, as masking makes them), rows j in chunks [cbegin, cend) of `chunk` rows. One pass
// over grad. The task's rows are taken in blocks of whole chunks whose fp32 dpos sums stay in L2
// (kPosBlockBytes); within a block, G samples at a time read their rows of the block front to
// back: G contiguous runs of the block's length, which the hardware prefetchers follow. Each j's
// G rows are summed into dpos[j] in ascending n (in registers across the G rows when D % 16 == 0,
// a row at a time otherwise), the removed ones into the dmask sums of their chunk, and the kept
// ones copied to their dx rows (with streaming stores when stream_dx). dmask is then the sum of
// the chunks' partial sums in chunk order. Chunks, and the order of the additions into each
// chunk's sums (groups of samples, then j), are fixed by the shape, not by the thread count or the
// blocks: bitwise reproducible. (The previous order, j-major with the N rows of a j (1+L)*D values
// apart, 197 KB in bf16 at ViT-B shapes, and their first 1 KB prefetched, took 9-23% longer, and a
// software prefetch slows this one down; bench/README.md.)
template <typename Isa, typename scalar_t>
inline void unshuffle_bwd_perm_chunks(const scalar_t* grad, const int64_t* ids, scalar_t* dx, float* mask_part,
                                      scalar_t* dpos, int64_t N, int64_t K, int64_t L, int64_t D, int64_t chunk,
                                      bool stream_dx, int64_t cbegin, int64_t cend) {
  constexpr int G = 8;  // samples per group
  constexpr int64_t kPosBlockBytes = 256 * 1024;  // fp32 dpos sums of a block: L2-resident
  const int64_t chunk_bytes = chunk * std::max<int64_t>(D, 1) * int64_t(sizeof(float));  // D = 0 is allowed
  const int64_t block_chunks = std::max<int64_t>(1, kPosBlockBytes / chunk_bytes);
  const int64_t rs = (L + 1) * D, row_bytes = D * int64_t(sizeof(scalar_t));
  thread_local std::vector<float> pos_buf;
  std::fill(mask_part + cbegin * D, mask_part + cend * D, 0.f);
  for (int64_t cb = cbegin; cb < cend; cb += block_chunks) {
    const int64_t jb = cb * chunk, je = std::min(L + 1, std::min(cend, cb + block_chunks) * chunk);
    float* pb = dpos != nullptr ? scratch(pos_buf, (je - jb) * D) : nullptr;
    if (pb != nullptr) std::fill(pb, pb + (je - jb) * D, 0.f);
    for (int64_t n0 = 0; n0 < N; n0 += G) {
      const int count = int(std::min<int64_t>(G, N - n0));
      for (int64_t j = jb; j < je; ++j) {
        float* am = mask_part + (j / chunk) * D;
        float* ap = pb != nullptr ? pb + (j - jb) * D : nullptr;
        const scalar_t* rows[G];
        v8u removed[G];
        int64_t r[G];
        for (int g = 0; g < count; ++g) {
          const int64_t n = n0 + g;
          rows[g] = grad + n * rs + j * D;
          r[g] = j == 0 ? -1 : ids[n * L + j - 1];
          const uint32_t bits = r[g] >= K ? ~0u : 0u;
          removed[g] = v8u{bits, bits, bits, bits, bits, bits, bits, bits};
        }
        if (D % 16 == 0) {
          if (count == G) {
            if (ap != nullptr) {
              sum_rows16<G, true>(rows, removed, ap, am, D);
            } else {
              sum_rows16<G, false>(rows, removed, ap, am, D);
            }
          } else {
            for (int g = 0; g < count; ++g) {
              if (ap != nullptr) {
                sum_rows16<1, true>(rows + g, removed + g, ap, am, D);
              } else {
                sum_rows16<1, false>(rows + g, removed + g, ap, am, D);
              }
            }
          }
        } else {
          for (int g = 0; g < count; ++g) {
            if (r[g] >= K) {
              add_row(rows[g], am, ap, D);
            } else if (ap != nullptr) {
              add_row(rows[g], ap, static_cast<float*>(nullptr), D);
            }
          }
        }
        for (int g = 0; g < count; ++g) {
          if (r[g] >= K) continue;
          scalar_t* o = dx + ((n0 + g) * (K + 1) + 1 + r[g]) * D;
          if (stream_dx) {
            Stream<Isa>::copy(o, rows[g], row_bytes);
          } else {
            std::memcpy(o, rows[g], row_bytes);
          }
        }
      }
    }
    if (pb != nullptr)
      for (int64_t j = jb; j < je; ++j) store_perm_sums<Isa>(pb + (j - jb) * D, dpos + j * D, D);
  }
  if (stream_dx) Stream<Isa>::fence();
}
FASTMAE_DEFINE_ISA_VARIANTS(unshuffle_bwd_perm_task, unshuffle_bwd_perm_chunks)

}  // namespace

at::Tensor unshuffle_scatter_fwd(const at::Tensor& x, const at::Tensor& mask_token, const at::Tensor& ids_restore,
                                 const std::optional<at::Tensor>& pos_embed, int64_t isa_cap, int64_t stream_mode) {
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
  check_distinct(ids_restore, L, "ids_restore");  // a permutation of [0, L) per sample
  at::Tensor out = at::empty({N, L + 1, D}, x.options());
  const CpuIsa isa = cpu_isa(isa_cap);
  const bool stream = stream_output(out.nbytes(), stream_mode) && D % 8 == 0 && aligned_to(out.const_data_ptr(), 16);
  FASTMAE_DISPATCH_FLOAT(x.scalar_type(), "unshuffle_scatter_fwd", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* tok = mask_token.const_data_ptr<scalar_t>();
    const int64_t* idp = ids_restore.const_data_ptr<int64_t>();
    const scalar_t* pos = pos_embed.has_value() ? pos_embed->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N * (L + 1), grain_for(2 * D * int64_t(sizeof(scalar_t))), [&](int64_t begin, int64_t end) {
      unshuffle_fwd_task<scalar_t>(isa, xp, tok, idp, pos, o, K, L, D, stream, begin, end);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> unshuffle_scatter_bwd(const at::Tensor& grad,
                                                                     const at::Tensor& ids_restore, int64_t K,
                                                                     bool need_pos_grad, int64_t isa_cap,
                                                                     int64_t stream_mode) {
  check_float_input(grad, "grad");
  TORCH_CHECK_VALUE(grad.dim() == 3 && grad.size(1) >= 1, "grad must be [N, 1+L, D], got shape ", grad.sizes());
  const int64_t N = grad.size(0), L = grad.size(1) - 1, D = grad.size(2);
  check_ids(ids_restore, "ids_restore", N, L);
  TORCH_CHECK_VALUE(0 <= K && K < L, "K = ", K, " kept tokens must be in [0, L = ", L, ")");
  at::Tensor dx = at::empty({N, K + 1, D}, grad.options());
  at::Tensor dmask = at::empty({D}, grad.options());
  at::Tensor dpos = need_pos_grad ? at::empty({L + 1, D}, grad.options()) : at::empty({0}, grad.options());
  check_distinct(ids_restore, L, "ids_restore");  // a permutation of [0, L) per sample
  const CpuIsa isa = cpu_isa(isa_cap);
  // dx is written to rows in ids order, so the reads for ownership that ordinary stores make of its
  // lines miss the prefetchers. Its consumer is decoder_embed's backward, two matmuls, which read it
  // from memory at little cost: dx is streamed from kStreamMatmulInputBytes on.
  const bool stream_dx = stream_output(dx.nbytes(), stream_mode, kStreamMatmulInputBytes) &&
                         (D * grad.element_size()) % 16 == 0 && aligned_to(dx.const_data_ptr(), 16);
  FASTMAE_DISPATCH_FLOAT(grad.scalar_type(), "unshuffle_scatter_bwd", [&] {
    constexpr int64_t chunk = 8;  // rows j per chunk: tasks take whole chunks; one dmask partial sum each
    const int64_t chunks = (L + 1 + chunk - 1) / chunk;
    std::vector<float> mask_part(chunks * D);
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const int64_t* idp = ids_restore.const_data_ptr<int64_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    scalar_t* dpp = need_pos_grad ? dpos.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      unshuffle_bwd_perm_task<scalar_t>(isa, g, idp, dxp, mask_part.data(), dpp, N, K, L, D, chunk, stream_dx, begin,
                                        end);
    });
    std::vector<float> acc(D, 0.f);
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t d = 0; d < D; ++d) acc[d] += mask_part[c * D + d];
    store_perm_sums<IsaBase>(acc.data(), dmask.mutable_data_ptr<scalar_t>(), D);  // one row: not worth a variant
  });
  return {dx, dmask, dpos};
}

}  // namespace fastmae

TORCH_LIBRARY_FRAGMENT(fastmae_C, m) {
  m.def("unshuffle_scatter_fwd(Tensor x, Tensor mask_token, Tensor ids_restore, Tensor? pos_embed, int isa_cap, "
        "int stream_mode) -> Tensor");
  m.def("unshuffle_scatter_bwd(Tensor grad, Tensor ids_restore, int K, bool need_pos_grad, int isa_cap, "
        "int stream_mode) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastmae_C, CPU, m) {
  m.impl("unshuffle_scatter_fwd", &fastmae::unshuffle_scatter_fwd);
  m.impl("unshuffle_scatter_bwd", &fastmae::unshuffle_scatter_bwd);
}
