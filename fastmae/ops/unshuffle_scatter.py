"""unshuffle_scatter: the decoder input with mask tokens and positions, in one pass.

``unshuffle_scatter(x [N, 1+K, D], mask_token [D] (any shape of D elements), ids_restore [N, L]
int64, pos_embed [1+L, D] or [1, 1+L, D] or None) -> [N, 1+L, D]``:

- row 0 is ``x[:, 0] (+ pos_embed[0])`` (the cls token);
- row ``1+l`` is ``x[:, 1 + ids_restore[:, l]]`` when ``ids_restore[:, l] < K`` (patch ``l`` was
  kept; kept tokens are in noise order), else ``mask_token``; plus ``pos_embed[1+l]``.

``ids_restore`` must be a permutation of ``[0, L)`` per sample, as masking makes it: every
backend checks it (a ValueError, or an IndexError for an index out of range; a device-side assert
on CUDA).

This is the official ``cat + gather + cat + pos add``. Backward: ``dx`` is a gather of ``dout``;
``d mask_token`` a deterministic sum of ``dout`` over removed rows; ``d pos_embed`` a sum over N.
mask_token and pos_embed are cast to ``x.dtype`` (they are small); math is done in fp32. Their
gradients therefore carry ``x.dtype``'s precision: summed in fp32, rounded once to ``x.dtype``,
then cast to their own dtype (with bf16 ``x`` and fp32 parameters, ~0.4% rounding). The fast model
runs this op on an fp32 ``x`` under autocast (its decoder input is promoted first, as the official
concatenation with the fp32 mask token promotes it), so its gradients keep fp32 precision.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import check_distinct, check_float, check_index, check_no_tangent, check_same_device
from ._backend import register_kernels


def unshuffle_scatter_ref(x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor,
                          pos_embed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference: the official decoder-input construction."""
    N, K1, D = x.shape
    L = ids_restore.shape[1]
    mask_tokens = mask_token.reshape(1, 1, D).to(x.dtype).expand(N, L + 1 - K1, D)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))
    out = torch.cat([x[:, :1, :], x_], dim=1)
    if pos_embed is not None:
        out = (out.float() + pos_embed.reshape(1, L + 1, D).float()).to(x.dtype)
    return out


def unshuffle_scatter_backward_ref(grad: torch.Tensor, ids_restore: torch.Tensor, K: int,
                                   need_pos_grad: bool):
    """Reference backward -> (dx [N, 1+K, D], dmask_token [D], dpos [1+L, D] or empty)."""
    N, L1, D = grad.shape
    g = grad.float()
    removed = (ids_restore >= K)
    dmask = (g[:, 1:, :] * removed.unsqueeze(-1)).sum(dim=(0, 1))
    # kept patch l sits at x row 1 + ids_restore[l]: scatter dout rows there
    dx = g.new_zeros(N, 1 + K, D)
    rows = torch.where(removed, torch.zeros_like(ids_restore), ids_restore + 1)
    dx.scatter_add_(1, rows.unsqueeze(-1).expand(-1, -1, D), g[:, 1:, :] * (~removed).unsqueeze(-1))
    dx[:, 0] = g[:, 0]  # overwrites the zeros the removed rows added to row 0
    dpos = g.sum(0) if need_pos_grad else g.new_empty(0)
    return dx.to(grad.dtype), dmask.to(grad.dtype), dpos.to(grad.dtype)


# ---------------------------------------------------------------------------- registered ops
def _check(x_or_grad, ids_restore, *rest):
    check_distinct(ids_restore, ids_restore.shape[1], "ids_restore")  # a permutation of [0, L)


@torch.library.custom_op("fastmae::unshuffle_scatter", mutates_args=())
def _unshuffle_scatter_op(x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor,
                          pos_embed: Optional[torch.Tensor]) -> torch.Tensor:
    _check(x, ids_restore)
    return unshuffle_scatter_ref(x, mask_token, ids_restore, pos_embed).contiguous()


@_unshuffle_scatter_op.register_fake
def _(x, mask_token, ids_restore, pos_embed):
    return x.new_empty(x.shape[0], ids_restore.shape[1] + 1, x.shape[2])


@torch.library.custom_op("fastmae::unshuffle_scatter_backward", mutates_args=())
def _unshuffle_scatter_backward_op(grad: torch.Tensor, ids_restore: torch.Tensor, K: int,
                                   need_pos_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(grad, ids_restore)
    return unshuffle_scatter_backward_ref(grad, ids_restore, K, need_pos_grad)


@_unshuffle_scatter_backward_op.register_fake
def _(grad, ids_restore, K, need_pos_grad):
    N, L1, D = grad.shape
    dpos = grad.new_empty(L1, D) if need_pos_grad else grad.new_empty(0)
    return grad.new_empty(N, 1 + K, D), grad.new_empty(D), dpos


register_kernels(_unshuffle_scatter_op, check=lambda x, m, ids, pos: _check(x, ids),
                 torch_impl=lambda *a: unshuffle_scatter_ref(*a).contiguous(),
                 cpp="unshuffle_scatter_fwd", triton=("unshuffle_scatter", "unshuffle_scatter_forward"))
register_kernels(_unshuffle_scatter_backward_op, check=_check, torch_impl=unshuffle_scatter_backward_ref,
                 cpp="unshuffle_scatter_bwd", triton=("unshuffle_scatter", "unshuffle_scatter_backward"))


def _setup_context(ctx, inputs, output):
    x, mask_token, ids_restore, pos_embed = inputs
    ctx.save_for_backward(ids_restore)
    ctx.K = x.shape[1] - 1
    ctx.token_meta = (mask_token.shape, mask_token.dtype)
    ctx.pos_meta = None if pos_embed is None else (pos_embed.shape, pos_embed.dtype)


def _backward(ctx, grad):
    (ids_restore,) = ctx.saved_tensors
    need_pos = ctx.pos_meta is not None and ctx.needs_input_grad[3]
    dx, dmask, dpos = _unshuffle_scatter_backward_op(grad.contiguous(), ids_restore, ctx.K, need_pos)
    shape, dtype = ctx.token_meta
    dmask = dmask.reshape(shape).to(dtype) if ctx.needs_input_grad[1] else None
    dpos = dpos.reshape(ctx.pos_meta[0]).to(ctx.pos_meta[1]) if need_pos else None
    return (dx if ctx.needs_input_grad[0] else None), dmask, None, dpos


_unshuffle_scatter_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------- public API
def unshuffle_scatter(x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor,
                      pos_embed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Decoder input ``[N, 1+L, D]`` from ``x [N, 1+K, D]`` (cls first), see the module doc."""
    check_float(x, "x")
    if x.dim() != 3 or x.shape[1] < 1:
        raise ValueError(f"x must be [N, 1+K, D] with the cls token first, got shape {tuple(x.shape)}")
    N, K1, D = x.shape
    check_index(ids_restore, "ids_restore", N)
    L = ids_restore.shape[1]
    if not K1 - 1 < L:
        raise ValueError(f"x holds K = {K1 - 1} kept tokens, which must be fewer than L = {L} patches")
    check_float(mask_token, "mask_token")
    if mask_token.numel() != D:
        raise ValueError(f"mask_token must hold D = {D} values, got shape {tuple(mask_token.shape)}")
    if pos_embed is not None:
        check_float(pos_embed, "pos_embed")
        if pos_embed.numel() != (L + 1) * D or pos_embed.shape[-1] != D:
            raise ValueError(f"pos_embed must be [1+L, D] = [{L + 1}, {D}] (optionally with a leading 1), "
                             f"got shape {tuple(pos_embed.shape)}")
    check_same_device(("x", x), ("mask_token", mask_token), ("ids_restore", ids_restore), ("pos_embed", pos_embed))
    check_no_tangent("unshuffle_scatter", ("x", x), ("mask_token", mask_token), ("pos_embed", pos_embed))
    mask_token = mask_token.reshape(D).to(x.dtype)
    if pos_embed is not None:
        pos_embed = pos_embed.reshape(L + 1, D).to(x.dtype).contiguous()
    x, mask_token, ids_restore = x.contiguous(), mask_token.contiguous(), ids_restore.contiguous()
    return _unshuffle_scatter_op(x, mask_token, ids_restore, pos_embed)
