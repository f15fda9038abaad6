// The eager CPU route of the three fused ops: each op once more as a dispatcher op
// (torch.ops.fastmae_C.gather_mask, .unshuffle_scatter, .norm_mse_loss) whose autograd is a C++
// torch::autograd::Function over the same kernels as the fastmae:: custom ops' cpp backend, so a
// call crosses no Python between the public function and the kernels, forward or backward
// (bench/NOTES.md: the custom op's layers cost 0.4-0.5 ms of a ViT-B forward + backward in the op
// benchmarks). fastmae.ops takes it only where the custom op would run these kernels with nothing
// else watching (ops/_backend.py eager_cpp, whose tests are module.cpp's _eager_route): never
// under torch.compile, tracing, dispatch or function modes, functorch transforms or tensor
// subclasses, which the custom ops support and these ops do not (no fake or Meta kernels: they
// are internal).
//
// These ops take the public functions' arguments as the user gave them: the conversions the
// public functions make before a custom op (contiguous layouts, the mask token and position table
// cast to x's dtype, the loss's mask as float32 or all ones) are made here, below autograd, and
// undone on the gradients (cast back, given the inputs' shapes), which is what autograd does
// through those conversions. Every argument the public functions refuse is refused here too (the
// kernels' checks and the few below; an input carrying a forward-mode tangent by
// torch::autograd::Function itself, which has no jvp), so the public functions run their own
// checks only when this route raises, to name the problem. Same kernels, same arguments: the
// same bits. The backward functions mirror the custom ops' (`_backward` in fastmae/ops/<op>.py).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "common.h"
#include "ops.h"
#include "route.h"

namespace fastmae {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// A backward that builds a graph (create_graph=True, grad mode on) calls its kernel through the
// dispatcher, whose Autograd kernel for it (the not-implemented fallback, registered below) gives
// the outputs a node that raises if differentiated, provided an input requires grad: a double
// backward through this route fails, as it does through the custom ops, instead of silently
// dropping the second-order term. So does a backward run under a dispatch mode or a functorch
// transform, which must see the op. A plain backward calls the kernel itself.
template <typename Fn>
c10::TypedOperatorHandle<Fn> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}
bool bwd_through_dispatcher() { return at::GradMode::is_enabled() || dispatcher_watched(); }
template <typename Fn, typename... Args>
auto call_bwd(const c10::TypedOperatorHandle<Fn>& op, Fn* kernel, Args&&... args) {
  return bwd_through_dispatcher() ? op.call(std::forward<Args>(args)...) : kernel(std::forward<Args>(args)...);
}

// ---------------------------------------------------------------------------------- arguments
struct UnshuffleArgs {
  at::Tensor x, mask_token, ids_restore;
  std::optional<at::Tensor> pos_embed;
};
UnshuffleArgs unshuffle_args(const at::Tensor& x, const at::Tensor& mask_token, const at::Tensor& ids_restore,
                             const std::optional<at::Tensor>& pos_embed) {
  check_float_dtype(x, "x");
  check_float_dtype(mask_token, "mask_token");
  TORCH_CHECK_VALUE(x.dim() == 3, "x must be [N, 1+K, D], got shape ", x.sizes());
  UnshuffleArgs a{x.contiguous(), mask_token.to(x.scalar_type()).contiguous(), ids_restore.contiguous(), std::nullopt};
  if (pos_embed.has_value()) {
    check_float_dtype(*pos_embed, "pos_embed");
    TORCH_CHECK_VALUE(pos_embed->dim() >= 1 && pos_embed->size(-1) == x.size(2), "pos_embed must be [1+L, D], got ",
                      pos_embed->sizes());
    a.pos_embed = pos_embed->to(x.scalar_type()).contiguous();
  }
  return a;
}

struct LossArgs {
  at::Tensor pred, imgs, weight;
  std::optional<at::Tensor> ids;
};
LossArgs loss_args(const at::Tensor& pred, const at::Tensor& imgs, const std::optional<at::Tensor>& mask,
                   const std::optional<at::Tensor>& ids) {
  LossArgs a{pred.contiguous(), imgs.contiguous(), at::Tensor(), std::nullopt};
  if (mask.has_value()) {
    a.weight = mask->to(at::kFloat).contiguous();
  } else {
    TORCH_CHECK_VALUE(ids.has_value() && pred.dim() == 3, "mask is required when pred covers every patch");
    a.weight = at::ones({pred.size(0), pred.size(1)}, pred.options().dtype(at::kFloat));
  }
  if (ids.has_value()) a.ids = ids->contiguous();
  return a;
}

// ---------------------------------------------------------------------------------- autograd
struct GatherMaskFn : public torch::autograd::Function<GatherMaskFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& imgs, const at::Tensor& ids_keep,
                            int64_t patch_size) {
    const at::Tensor ids = ids_keep.contiguous();
    at::Tensor out = gather_mask_fwd(imgs.contiguous(), ids, patch_size);  // checks imgs is [N, C, H, W]
    ctx->save_for_backward({ids});
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
      dimgs = call_bwd(op, gather_mask_bwd, grads[0].contiguous(), ids_keep, ctx->saved_data["p"].toInt(),
                       ctx->saved_data["H"].toInt(), ctx->saved_data["W"].toInt());
    }
    return {dimgs, at::Tensor(), at::Tensor()};
  }
};

struct UnshuffleScatterFn : public torch::autograd::Function<UnshuffleScatterFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& mask_token,
                            const at::Tensor& ids_restore, const std::optional<at::Tensor>& pos_embed) {
    const UnshuffleArgs a = unshuffle_args(x, mask_token, ids_restore, pos_embed);
    at::Tensor out = unshuffle_scatter_fwd(a.x, a.mask_token, a.ids_restore, a.pos_embed);
    ctx->save_for_backward({a.ids_restore});
    ctx->saved_data["K"] = x.size(1) - 1;
    ctx->saved_data["token_shape"] = mask_token.sizes().vec();
    ctx->saved_data["token_dtype"] = mask_token.scalar_type();
    const bool has_pos = pos_embed.has_value();
    ctx->saved_data["pos_shape"] = has_pos ? pos_embed->sizes().vec() : std::vector<int64_t>{};
    ctx->saved_data["pos_dtype"] = has_pos ? pos_embed->scalar_type() : x.scalar_type();
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
    auto as_input = [&](const at::Tensor& g, const char* shape, const char* dtype) {  // undo the conversion
      return g.to(ctx->saved_data[dtype].toScalarType()).reshape(ctx->saved_data[shape].toIntVector());
    };
    return {ctx->needs_input_grad(0) ? dx : at::Tensor(),
            ctx->needs_input_grad(1) ? as_input(dmask, "token_shape", "token_dtype") : at::Tensor(), at::Tensor(),
            need_pos ? as_input(dpos, "pos_shape", "pos_dtype") : at::Tensor()};
  }
};

struct NormMseLossFn : public torch::autograd::Function<NormMseLossFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& pred, const at::Tensor& imgs,
                            const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& ids,
                            int64_t patch_size, bool norm_pix, double eps) {
    const LossArgs a = loss_args(pred, imgs, mask, ids);
    at::Tensor loss = norm_mse_loss_fwd(a.pred, a.imgs, a.weight, a.ids, patch_size, norm_pix, eps);
    // pred itself too: a contiguous copy made here has no history, so a backward that builds a
    // graph takes pred's own (see call_bwd); it costs no memory when pred is contiguous
    ctx->save_for_backward({a.pred, a.imgs, a.weight, a.ids.value_or(at::Tensor()), pred});
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
      const at::Tensor p = bwd_through_dispatcher() ? saved[4].contiguous() : saved[0];
      dpred = call_bwd(op, norm_mse_loss_bwd, grads[0], p, saved[1], saved[2], ids, ctx->saved_data["p"].toInt(),
                       ctx->saved_data["norm_pix"].toBool(), ctx->saved_data["eps"].toDouble());
    }
    return {dpred, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// ---------------------------------------------------------------------------------- kernels
at::Tensor gather_mask_autograd(const at::Tensor& imgs, const at::Tensor& ids_keep, int64_t patch_size) {
  return GatherMaskFn::apply(imgs, ids_keep, patch_size);
}
at::Tensor unshuffle_scatter_autograd(const at::Tensor& x, const at::Tensor& mask_token, const at::Tensor& ids_restore,
                                      const std::optional<at::Tensor>& pos_embed) {
  return UnshuffleScatterFn::apply(x, mask_token, ids_restore, pos_embed);
}
at::Tensor norm_mse_loss_autograd(const at::Tensor& pred, const at::Tensor& imgs,
                                  const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& ids,
                                  int64_t patch_size, bool norm_pix, double eps) {
  // the target and its weights are data: a gradient asked of them would silently be None
  TORCH_CHECK_VALUE(!at::GradMode::is_enabled() || !(imgs.requires_grad() || (mask && mask->requires_grad())),
                    "norm_mse_loss differentiates pred only; imgs and mask must not require grad");
  return NormMseLossFn::apply(pred, imgs, mask, ids, patch_size, norm_pix, eps);
}

// Below autograd (inference mode): the same conversions, then the forward kernels.
at::Tensor gather_mask_plain(const at::Tensor& imgs, const at::Tensor& ids_keep, int64_t patch_size) {
  return gather_mask_fwd(imgs.contiguous(), ids_keep.contiguous(), patch_size);
}
at::Tensor unshuffle_scatter_plain(const at::Tensor& x, const at::Tensor& mask_token, const at::Tensor& ids_restore,
                                   const std::optional<at::Tensor>& pos_embed) {
  const UnshuffleArgs a = unshuffle_args(x, mask_token, ids_restore, pos_embed);
  return unshuffle_scatter_fwd(a.x, a.mask_token, a.ids_restore, a.pos_embed);
}
at::Tensor norm_mse_loss_plain(const at::Tensor& pred, const at::Tensor& imgs, const std::optional<at::Tensor>& mask,
                               const std::optional<at::Tensor>& ids, int64_t patch_size, bool norm_pix, double eps) {
  const LossArgs a = loss_args(pred, imgs, mask, ids);
  return norm_mse_loss_fwd(a.pred, a.imgs, a.weight, a.ids, patch_size, norm_pix, eps);
}

}  // namespace
}  // namespace fastmae

TORCH_LIBRARY_FRAGMENT(fastmae_C, m) {
  m.def("gather_mask(Tensor imgs, Tensor ids_keep, int patch_size) -> Tensor");
  m.def("unshuffle_scatter(Tensor x, Tensor mask_token, Tensor ids_restore, Tensor? pos_embed) -> Tensor");
  m.def("norm_mse_loss(Tensor pred, Tensor imgs, Tensor? mask, Tensor? ids, int patch_size, bool norm_pix, "
        "float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastmae_C, CPU, m) {
  m.impl("gather_mask", &fastmae::gather_mask_plain);
  m.impl("unshuffle_scatter", &fastmae::unshuffle_scatter_plain);
  m.impl("norm_mse_loss", &fastmae::norm_mse_loss_plain);
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
