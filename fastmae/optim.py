"""The optimizer step fused into the backward pass, to train with less memory.

A plain training step holds every parameter's gradient at once: after ``backward`` and until
``optimizer.step()``, one gradient per parameter is alive (for ViT-B MAE in fp32, 0.45 GB: with
activation checkpointing, nearly all of what the step itself allocates). :class:`OptimizerInBackward` gives each
parameter its own optimizer and steps it from a ``register_post_accumulate_grad_hook`` the moment
the parameter's gradient is complete, then frees that gradient; at most the gradients of the
layer being differentiated are alive.

The update is the same as one optimizer over all parameters whenever the optimizer treats
parameters independently (AdamW, SGD, Adam: no global gradient norm, no cross-parameter state),
which ``tests/test_optim.py`` checks against ``torch.optim.AdamW``. What it cannot do, by
construction: gradient clipping by the global norm, gradient accumulation over several backward
passes (each backward steps), and reading ``p.grad`` after backward (it is None). Memory falls
only in eager backward: a ``torch.compile``'d model's backward is one graph that returns all
gradients together, so they are all alive when the hooks run. What it saves in eager, and that
it saves nothing compiled, is measured in bench/README.md.

    opt = OptimizerInBackward(param_groups, torch.optim.AdamW, lr=1.5e-4, betas=(0.9, 0.95), fused=True)
    loss.backward()          # parameters are updated here
    opt.set_lr(new_lr)       # a schedule changes every parameter's learning rate
"""
from __future__ import annotations

from typing import Any, Iterable

import torch


class LARS(torch.optim.Optimizer):
    """LARS, as the official MAE linear probe uses it (``util/lars.py``): SGD with momentum whose
    update of each matrix (``ndim > 1``) is ``g + wd * w`` scaled by the trust ratio
    ``trust_coefficient * |w| / |g + wd * w|`` (1 where a norm is 0); vectors (biases) take the
    plain momentum step without weight decay. timm's ``Lars`` divides by ``|g| + wd * |w|``
    instead and adapts vectors too, so it is not the same optimizer."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    w_norm, u_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(w_norm)
                    q = torch.where(w_norm > 0, torch.where(u_norm > 0, g["trust_coefficient"] * w_norm / u_norm, one),
                                    one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])
        return loss


class OptimizerInBackward:
    """One ``optimizer_cls`` per trainable parameter, stepped during ``backward``.

    ``params``: parameters or parameter groups (dicts with ``"params"`` and per-group options, as
    torch optimizers take them); ``defaults``: the options every group shares (``lr``, ...).
    Parameters with ``requires_grad=False`` are skipped.
    """

    def __init__(self, params: Iterable[Any], optimizer_cls: type = torch.optim.AdamW, **defaults):
        groups = list(params)
        if not groups:
            raise ValueError("OptimizerInBackward got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.optimizers: dict[torch.nn.Parameter, torch.optim.Optimizer] = {}
        self._handles = []
        for group in groups:
            options = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                if p in self.optimizers:
                    raise ValueError("a parameter appears in more than one group")
                self.optimizers[p] = optimizer_cls([{"params": [p], **options}], **defaults)
                self._handles.append(p.register_post_accumulate_grad_hook(self._step))
        if not self.optimizers:
            raise ValueError("OptimizerInBackward got no parameter that requires grad")

    def _step(self, p: torch.Tensor) -> None:
        opt = self.optimizers[p]
        opt.step()
        opt.zero_grad(set_to_none=True)

    def set_lr(self, lr: float) -> None:
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = lr

    def step(self) -> None:
        """Nothing to do: every parameter was stepped during backward. Kept, with ``zero_grad``,
        so a training loop written for a plain optimizer runs unchanged."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> list[dict]:
        """Each parameter's optimizer state, in parameter order."""
        return [opt.state_dict() for opt in self.optimizers.values()]

    def load_state_dict(self, states: list[dict]) -> None:
        if len(states) != len(self.optimizers):
            raise ValueError(f"state for {len(states)} parameters, this optimizer holds {len(self.optimizers)}")
        for opt, state in zip(self.optimizers.values(), states):
            opt.load_state_dict(state)

    def remove(self) -> None:
        """Detach the hooks: backward no longer steps."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
