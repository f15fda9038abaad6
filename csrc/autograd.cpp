// The eager CPU route of the three fused ops: each op once more as a dispatcher op
// (torch.ops.fastmae_C.gather_mask, .unshuffle_scatter, .norm_mse_loss) whose autograd is a C++
// torch::autograd::Function over the same kernels as the fastmae:: custom ops' cpp backend, so a
// call crosses no Python between the public function's checks and the kernels, forward or
// backward (in the op benchmarks the custom op's layers cost 0.4-0.5 ms of a ViT-B forward +
// backward; this route removed 0.1-0.45 ms of it, bench/NOTES.md). fastmae.ops takes it only
// where the custom op would run these kernels with nothing else watching (ops/_backend.py,
// eager_cpp): never under torch.compile, tracing, dispatch or function modes, functorch
// transforms or tensor subclasses, which the custom ops support and these ops do not (no fake or
// Meta kernels: they are internal). Same kernels, same arguments: the same bits. The backward
// functions mirror the custom ops' (`_backward` in fastmae/ops/<op>.py); mask_token and pos_embed
// gradients need no dtype cast here because the kernels require x's dtype for both.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "ops.h"

namespace fastmae {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// A backward that builds a graph (create_graph=True, grad mode on) calls its kernel through the
// dispatcher, whose Autograd kernel for it (the not-implemented fallback, registered below) gives
// the outputs a node that raises if differentiated: a double backward through this route fails,
// as it does through the custom ops, instead of silently dropping the second-order term. A plain
// backward (grad mode off) calls the kernel itself: nothing would record it, and the boxed
// fallback is a cost of its own on the way.
template <typename Fn>
c10::TypedOperatorHandle<Fn> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}
template <typename Fn, typename... Args>
auto call_bwd(const c10::TypedOperatorHandle<Fn>& op, Fn* kernel, Args&&... args) {
  return at::GradMode::is_enabled() ? op.call(std::forward<Args>(args)...) : kernel(std::forward<Args>(args)...);
}

struct GatherMaskFn : public torch::autograd::Function<GatherMaskFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& imgs, const at::Tensor& ids_keep,
                            int64_t patch_size) {
    at::Tensor out = gather_mask_fwd(imgs, ids_keep, patch_size);  // checks imgs is [N, C, H, W]
    ctx->save_for_backward({ids_keep});
    ctx->saved_data["p"] = patch_size;
    ctx->saved_data["H"] = imgs.size(2);
    ctx->saved_data["W"] = imgs.size(3);
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::Tensor dimgs;
    if (ctx->needs_input_grad(0)) {
      const at::Tensor ids_keep = ctx->get_saved_variables()[0];
      static const auto op = op_handle<decltype(gather_mask_bwd)>("fastmae_C::gather_mask_bwd");
      dimgs = call_bwd(op, gather_mask_bwd, grads[0].contiguous(), ids_keep, ctx->saved_data["p"].toInt(), ctx->saved_data["H"].toInt(),
                      ctx->saved_data["W"].toInt());
    }
    return {dimgs, at::Tensor(), at::Tensor()};
  }
};

struct UnshuffleScatterFn : public torch::autograd::Function<UnshuffleScatterFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& mask_token,
                            const at::Tensor& ids_restore, const std::optional<at::Tensor>& pos_embed) {
    at::Tensor out = unshuffle_scatter_fwd(x, mask_token, ids_restore, pos_embed);
    ctx->save_for_backward({ids_restore});
    ctx->saved_data["K"] = x.size(1) - 1;
    ctx->saved_data["token_shape"] = mask_token.sizes().vec();
    const bool has_pos = pos_embed.has_value() && pos_embed->defined();
    ctx->saved_data["pos_shape"] = has_pos ? pos_embed->sizes().vec() : std::vector<int64_t>{};
    ctx->saved_data["has_pos"] = has_pos;
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor ids_restore = ctx->get_saved_variables()[0];
    // edges: x, mask_token, ids_restore, then pos_embed when given
    const bool need_pos = ctx->saved_data["has_pos"].toBool() && ctx->needs_input_grad(3);
    static const auto op = op_handle<decltype(unshuffle_scatter_bwd)>("fastmae_C::unshuffle_scatter_bwd");
    auto [dx, dmask, dpos] =
        call_bwd(op, unshuffle_scatter_bwd, grads[0].contiguous(), ids_restore, ctx->saved_data["K"].toInt(), need_pos);
    return {ctx->needs_input_grad(0) ? dx : at::Tensor(),
            ctx->needs_input_grad(1) ? dmask.reshape(ctx->saved_data["token_shape"].toIntVector()) : at::Tensor(),
            at::Tensor(), need_pos ? dpos.reshape(ctx->saved_data["pos_shape"].toIntVector()) : at::Tensor()};
  }
};

struct NormMseLossFn : public torch::autograd::Function<NormMseLossFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& pred, const at::Tensor& imgs,
                            const at::Tensor& weight, const std::optional<at::Tensor>& ids, int64_t patch_size,
                            bool norm_pix, double eps) {
    at::Tensor loss = norm_mse_loss_fwd(pred, imgs, weight, ids, patch_size, norm_pix, eps);
    ctx->save_for_backward({pred, imgs, weight, ids.value_or(at::Tensor())});
    ctx->saved_data["p"] = patch_size;
    ctx->saved_data["norm_pix"] = norm_pix;
    ctx->saved_data["eps"] = eps;
    return loss;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::Tensor dpred;
    if (ctx->needs_input_grad(0)) {
      const variable_list saved = ctx->get_saved_variables();
      const std::optional<at::Tensor> ids = saved[3].defined() ? std::optional<at::Tensor>(saved[3]) : std::nullopt;
      static const auto op = op_handle<decltype(norm_mse_loss_bwd)>("fastmae_C::norm_mse_loss_bwd");
      dpred = call_bwd(op, norm_mse_loss_bwd, grads[0], saved[0], saved[1], saved[2], ids, ctx->saved_data["p"].toInt(),
                      ctx->saved_data["norm_pix"].toBool(), ctx->saved_data["eps"].toDouble());
    }
    return {dpred, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor gather_mask_autograd(const at::Tensor& imgs, const at::Tensor& ids_keep, int64_t patch_size) {
  return GatherMaskFn::apply(imgs, ids_keep, patch_size);
}
at::Tensor unshuffle_scatter_autograd(const at::Tensor& x, const at::Tensor& mask_token, const at::Tensor& ids_restore,
                                      const std::optional<at::Tensor>& pos_embed) {
  return UnshuffleScatterFn::apply(x, mask_token, ids_restore, pos_embed);
}
at::Tensor norm_mse_loss_autograd(const at::Tensor& pred, const at::Tensor& imgs, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& ids, int64_t patch_size, bool norm_pix,
                                  double eps) {
  return NormMseLossFn::apply(pred, imgs, weight, ids, patch_size, norm_pix, eps);
}

}  // namespace
}  // namespace fastmae

TORCH_LIBRARY_FRAGMENT(fastmae_C, m) {
  m.def("gather_mask(Tensor imgs, Tensor ids_keep, int patch_size) -> Tensor");
  m.def("unshuffle_scatter(Tensor x, Tensor mask_token, Tensor ids_restore, Tensor? pos_embed) -> Tensor");
  m.def("norm_mse_loss(Tensor pred, Tensor imgs, Tensor weight, Tensor? ids, int patch_size, bool norm_pix, "
        "float eps) -> Tensor");
}

// Below autograd (inference-mode tensors) the forward kernels themselves.
TORCH_LIBRARY_IMPL(fastmae_C, CPU, m) {
  m.impl("gather_mask", &fastmae::gather_mask_fwd);
  m.impl("unshuffle_scatter", &fastmae::unshuffle_scatter_fwd);
  m.impl("norm_mse_loss", &fastmae::norm_mse_loss_fwd);
}

TORCH_LIBRARY_IMPL(fastmae_C, AutogradCPU, m) {
  m.impl("gather_mask", &fastmae::gather_mask_autograd);
  m.impl("unshuffle_scatter", &fastmae::unshuffle_scatter_autograd);
  m.impl("norm_mse_loss", &fastmae::norm_mse_loss_autograd);
}

TORCH_LIBRARY_IMPL(fastmae_C, Autograd, m) {
  m.impl("gather_mask_bwd", torch::autograd::autogradNotImplementedFallback());
  m.impl("unshuffle_scatter_bwd", torch::autograd::autogradNotImplementedFallback());
  m.impl("norm_mse_loss_bwd", torch::autograd::autogradNotImplementedFallback());
}
