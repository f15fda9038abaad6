"""norm_mse_loss: the official MAE loss with per-patch target normalisation, fused.

``norm_mse_loss(pred [N, L, p*p*C], imgs [N, C, H, W], mask [N, L], p, norm_pix_loss=True,
eps=1e-6) -> scalar fp32``, equal to the official ``forward_loss``: the target is
``patchify(imgs)`` in ``(i, j, c)`` order per patch; with ``norm_pix_loss`` each target patch is
``(t - mean) / sqrt(var + eps)`` with its own mean and unbiased variance; the loss is the
``mask``-weighted mean over patches of the per-patch mean squared error. Target statistics are
computed on the fly from pixels, in fp32; nothing of target size is stored.

Predictions for the removed patches only: pass ``pred [N, M, p*p*C]`` with ``ids [N, M]`` (the
patch index of each row, e.g. ``ids_shuffle[:, K:]``); every row then has weight 1 unless a
``mask [N, M]`` of row weights is given as well.

The loss is differentiable in ``pred`` only (the target is data): ``imgs`` gets no gradient.

Video (VideoMAE): ``imgs [N, C, T, H, W]`` clips with ``tubelet_size`` t; row ``l`` is tubelet
``(ti, hi, wj)`` in ``(t, h, w)`` order and its target is in ``(dt, i, j, c)`` order (the official
``'b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2 c)'``; images are the case T = t = 1).
``affine [2, C]`` (scale, shift) maps each pixel to ``x * scale[c] + shift[c]`` first (VideoMAE
un-normalises the ImageNet-normalised clip); ``per_channel=True`` normalises each channel of each
tubelet on its own, as VideoMAE does: ``(x - mean) / (std + eps)`` with the unbiased std (MAE
normalises the whole patch by ``sqrt(var + eps)``).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import check_float, check_grid, check_index, check_index_range, check_no_tangent, check_same_device
from ._backend import register_kernels


def patch_targets_ref(imgs: torch.Tensor, patch_size: int, norm_pix_loss: bool, eps: float, tubelet_size: int, per_channel: bool,
                      affine: Optional[torch.Tensor]) -> torch.Tensor:
    """[N, L, t*p*p*C] fp32 targets in the official (dt, i, j, c) order, normalised if asked."""
    x = imgs.float() if imgs.dim() == 5 else imgs.float().unsqueeze(2)
    N, C, T, H, W = x.shape
    if affine is not None:
        x = x * affine[0].float().view(1, C, 1, 1, 1) + affine[1].float().view(1, C, 1, 1, 1)
    p, t = patch_size, tubelet_size
    L = (T // t) * (H // p) * (W // p)
    x = x.reshape(N, C, T // t, t, H // p, p, W // p, p).permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(N, L, t * p * p, C)
    if norm_pix_loss and per_channel:
        x = (x - x.mean(dim=-2, keepdim=True)) / (x.var(dim=-2, keepdim=True).sqrt() + eps)
    x = x.reshape(N, L, t * p * p * C)
    if norm_pix_loss and not per_channel:
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True)
        x = (x - mean) / (var + eps) ** 0.5
    return x


def _rows_targets(imgs, ids, patch_size, norm_pix_loss, eps, *video):
    t = patch_targets_ref(imgs, patch_size, norm_pix_loss, eps, *video)
    if ids is not None:
        t = torch.gather(t, 1, ids.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
    return t


def norm_mse_loss_ref(pred, imgs, weight, ids, patch_size, norm_pix_loss=True, eps=1e-6, tubelet_size=1,
                      per_channel=False, affine=None):
    """Reference forward: fp32 scalar."""
    t = _rows_targets(imgs, ids, patch_size, norm_pix_loss, eps, tubelet_size, per_channel, affine)
    per_patch = ((pred.float() - t) ** 2).mean(dim=-1)
    w = weight.float()
    return (per_patch * w).sum() / w.sum()


def norm_mse_loss_backward_ref(grad, pred, imgs, weight, ids, patch_size, norm_pix_loss=True, eps=1e-6,
                               tubelet_size=1, per_channel=False, affine=None):
    """Reference backward: dpred = grad * w * 2 (pred - target) / (P * sum w)."""
    t = _rows_targets(imgs, ids, patch_size, norm_pix_loss, eps, tubelet_size, per_channel, affine)
    w = weight.float()
    scale = grad.float() * 2.0 / (pred.shape[-1] * w.sum())
    return ((pred.float() - t) * (w * scale).unsqueeze(-1)).to(pred.dtype)


# ---------------------------------------------------------------------------- registered ops
def _num_patches(imgs, patch_size, tubelet_size):
    frames = imgs.shape[2] // tubelet_size if imgs.dim() == 5 else 1
    return frames * (imgs.shape[-2] // patch_size) * (imgs.shape[-1] // patch_size)


def _check(pred, imgs, weight, ids, patch_size, norm_pix_loss=True, eps=1e-6, tubelet_size=1, *rest):
    if ids is not None:
        check_index_range(ids, _num_patches(imgs, patch_size, tubelet_size), "ids")


@torch.library.custom_op("fastmae::norm_mse_loss", mutates_args=())
def _norm_mse_loss_op(pred: torch.Tensor, imgs: torch.Tensor, weight: torch.Tensor, ids: Optional[torch.Tensor],
                      patch_size: int, norm_pix_loss: bool, eps: float, tubelet_size: int, per_channel: bool,
                      affine: Optional[torch.Tensor]) -> torch.Tensor:
    _check(pred, imgs, weight, ids, patch_size, norm_pix_loss, eps, tubelet_size)
    return norm_mse_loss_ref(pred, imgs, weight, ids, patch_size, norm_pix_loss, eps, tubelet_size, per_channel,
                             affine)


@_norm_mse_loss_op.register_fake
def _(pred, imgs, weight, ids, patch_size, norm_pix_loss, eps, tubelet_size, per_channel, affine):
    return pred.new_empty((), dtype=torch.float32)


@torch.library.custom_op("fastmae::norm_mse_loss_backward", mutates_args=())
def _norm_mse_loss_backward_op(grad: torch.Tensor, pred: torch.Tensor, imgs: torch.Tensor, weight: torch.Tensor,
                               ids: Optional[torch.Tensor], patch_size: int, norm_pix_loss: bool,
                               eps: float, tubelet_size: int, per_channel: bool,
                               affine: Optional[torch.Tensor]) -> torch.Tensor:
    _check(pred, imgs, weight, ids, patch_size, norm_pix_loss, eps, tubelet_size)
    return norm_mse_loss_backward_ref(grad, pred, imgs, weight, ids, patch_size, norm_pix_loss, eps, tubelet_size,
                                      per_channel, affine)


@_norm_mse_loss_backward_op.register_fake
def _(grad, pred, imgs, weight, ids, patch_size, norm_pix_loss, eps, tubelet_size, per_channel, affine):
    return torch.empty_like(pred)


register_kernels(_norm_mse_loss_op, check=_check, torch_impl=norm_mse_loss_ref,
                 cpp="norm_mse_loss_fwd", triton=("norm_mse_loss", "norm_mse_loss_forward"))
register_kernels(_norm_mse_loss_backward_op, check=lambda grad, *a: _check(*a), torch_impl=norm_mse_loss_backward_ref,
                 cpp="norm_mse_loss_bwd", triton=("norm_mse_loss", "norm_mse_loss_backward"))


def _setup_context(ctx, inputs, output):
    pred, imgs, weight, ids, patch_size, norm_pix_loss, eps, tubelet_size, per_channel, affine = inputs
    ctx.save_for_backward(pred, imgs, weight, ids, affine)
    ctx.args = (patch_size, norm_pix_loss, eps, tubelet_size, per_channel)


def _backward(ctx, grad):
    pred, imgs, weight, ids, affine = ctx.saved_tensors
    dpred = None
    if ctx.needs_input_grad[0]:
        dpred = _norm_mse_loss_backward_op(grad, pred, imgs, weight, ids, *ctx.args, affine)
    return dpred, None, None, None, None, None, None, None, None, None


_norm_mse_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------- public API
def norm_mse_loss(pred: torch.Tensor, imgs: torch.Tensor, mask: Optional[torch.Tensor], patch_size: int,
                  norm_pix_loss: bool = True, eps: float = 1e-6, ids: Optional[torch.Tensor] = None, *,
                  tubelet_size: int = 1, per_channel: bool = False,
                  affine: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The MAE loss (see the module doc). ``mask`` may be None only when ``ids`` is given.
    ``imgs`` may be clips ``[N, C, T, H, W]`` with ``tubelet_size``; ``per_channel`` and ``affine``
    give VideoMAE's target."""
    check_float(pred, "pred")
    check_float(imgs, "imgs")
    if imgs.dim() not in (4, 5):
        raise ValueError(f"imgs must be images [N, C, H, W] or clips [N, C, T, H, W], got shape {tuple(imgs.shape)}")
    N, C, H, W = imgs.shape[0], imgs.shape[1], imgs.shape[-2], imgs.shape[-1]
    h, w = check_grid((H, W), patch_size)
    if isinstance(tubelet_size, bool) or not isinstance(tubelet_size, int) or tubelet_size < 1:
        raise ValueError(f"tubelet_size must be a positive integer, got {tubelet_size!r}")
    T = imgs.shape[2] if imgs.dim() == 5 else 1
    if T % tubelet_size:
        raise ValueError(f"the clips' {T} frames are not divisible by the tubelet size {tubelet_size}")
    if per_channel and not norm_pix_loss:
        raise ValueError("per_channel normalises the target: it needs norm_pix_loss=True")
    L, P = (T // tubelet_size) * h * w, tubelet_size * patch_size * patch_size * C
    if pred.dim() != 3 or pred.shape[0] != N or pred.shape[2] != P:
        raise ValueError(f"pred must be [N, rows, t*p*p*C] = [{N}, *, {P}] for inputs {tuple(imgs.shape)}, "
                         f"patch size {patch_size} and tubelet size {tubelet_size}, got {tuple(pred.shape)}")
    M = pred.shape[1]
    if ids is None:
        if M != L:
            raise ValueError(f"pred has {M} rows but the inputs have L = {L} patches; pass ids= to give "
                             f"predictions for a subset of patches")
        if mask is None:
            raise ValueError("mask is required when pred covers every patch")
    else:
        check_index(ids, "ids", N, M)
    if mask is None:
        mask = pred.new_ones(N, M, dtype=torch.float32)
    elif not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (N, M):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must have shape [N, rows] = [{N}, {M}], got {shape}")
    if affine is not None:
        if not isinstance(affine, torch.Tensor) or tuple(affine.shape) != (2, C):
            shape = tuple(affine.shape) if isinstance(affine, torch.Tensor) else type(affine).__name__
            raise ValueError(f"affine must be [2, C] = [2, {C}] (scale, shift per channel), got {shape}")
        affine = affine.detach().float().contiguous()
    check_same_device(("pred", pred), ("imgs", imgs), ("mask", mask), ("ids", ids), ("affine", affine))
    check_no_tangent("norm_mse_loss", ("pred", pred), ("imgs", imgs), ("mask", mask))
    if torch.is_grad_enabled():
        for name, t in (("imgs", imgs), ("mask", mask)):
            if t.requires_grad:  # the official loss would differentiate them; a None gradient would be silent
                raise ValueError(f"{name} requires grad, but norm_mse_loss differentiates pred only (the "
                                 f"target and its weights are data); pass {name}.detach()")
    args = (pred.contiguous(), imgs.contiguous(), mask.float().contiguous(), None if ids is None else ids.contiguous())
    return _norm_mse_loss_op(*args, int(patch_size), bool(norm_pix_loss), float(eps), int(tubelet_size),
                             bool(per_channel), affine)
