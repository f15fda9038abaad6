// Thread state the eager C++ route (autograd.cpp) shares with its eligibility test (module.cpp).
#pragma once

#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

namespace fastmae {

// A torch.func transform is active: its dynamic-layer keys are in the thread's included set (what
// torch._C._are_functorch_transforms_active reports).
inline bool functorch_active() {
  const c10::DispatchKeySet included = c10::impl::tls_local_dispatch_key_set().included_;
  return included.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
         included.has(c10::DispatchKey::FuncTorchDynamicLayerBackMode);
}

// Something watches the dispatcher: a dispatch mode (fake tensors, FLOP counters, tracing to a
// graph) or a functorch transform. Ops must then go through it, not straight to their kernels.
inline bool dispatcher_watched() {
  return c10::impl::TorchDispatchModeTLS::stack_len() != 0 || functorch_active();
}

}  // namespace fastmae
