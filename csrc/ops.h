// The C++ CPU kernels of the three fused ops (one .cpp file each), for the files that call them
// from C++ (autograd.cpp). Each checks its arguments and index ranges before touching memory.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace fastmae {

at::Tensor gather_mask_fwd(const at::Tensor& imgs, const at::Tensor& ids_keep, int64_t patch_size);
at::Tensor gather_mask_bwd(const at::Tensor& grad, const at::Tensor& ids_keep, int64_t patch_size, int64_t H,
                           int64_t W);

at::Tensor unshuffle_scatter_fwd(const at::Tensor& x, const at::Tensor& mask_token, const at::Tensor& ids_restore,
                                 const std::optional<at::Tensor>& pos_embed);
std::tuple<at::Tensor, at::Tensor, at::Tensor> unshuffle_scatter_bwd(const at::Tensor& grad,
                                                                     const at::Tensor& ids_restore, int64_t K,
                                                                     bool need_pos_grad);

at::Tensor norm_mse_loss_fwd(const at::Tensor& pred, const at::Tensor& imgs, const at::Tensor& weight,
                             const std::optional<at::Tensor>& ids, int64_t patch_size, bool norm_pix, double eps);
at::Tensor norm_mse_loss_bwd(const at::Tensor& grad, const at::Tensor& pred, const at::Tensor& imgs,
                             const at::Tensor& weight, const std::optional<at::Tensor>& ids, int64_t patch_size,
                             bool norm_pix, double eps);

}  // namespace fastmae
