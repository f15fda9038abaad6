"""gather_mask: patchify + gather of the visible patches, in one pass.

``gather_mask(imgs [N, C, H, W], ids_keep [N, K] int64, p) -> [N, K, C*p*p]``: row ``k`` of
sample ``n`` is patch ``ids_keep[n, k]`` flattened in Conv2d-weight order ``(c, i, j)``, so that
``out @ conv.weight.flatten(1).T + conv.bias`` equals the Conv2d patch embedding of the kept
patches. No ``[N, L, ...]`` tensor is formed. Backward scatters into an image-shaped gradient
(zero on patches that were not kept). The patches kept in a sample must be distinct, as masking
makes them: every backend refuses a repeated one (a ValueError, a device-side assert on CUDA).
"""
from __future__ import annotations

import torch

from .._checks import check_distinct, check_float, check_grid, check_index, check_no_tangent
from ._backend import register_kernels


def gather_mask_ref(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Reference: patchify all patches in (c, i, j) order, then gather the kept ones."""
    N, C, H, W = imgs.shape
    p = patch_size
    h, w = H // p, W // p
    patches = imgs.reshape(N, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(N, h * w, C * p * p)
    return torch.gather(patches, 1, ids_keep.unsqueeze(-1).expand(-1, -1, C * p * p))


def gather_mask_backward_ref(grad: torch.Tensor, ids_keep: torch.Tensor, patch_size: int,
                             H: int, W: int) -> torch.Tensor:
    """Reference backward: scatter patch rows back into a zero image-shaped gradient."""
    N, K, D = grad.shape
    p = patch_size
    C, h, w = D // (p * p), H // p, W // p
    patches = grad.new_zeros(N, h * w, D)
    patches.scatter_(1, ids_keep.unsqueeze(-1).expand(-1, -1, D), grad)
    return patches.reshape(N, h, w, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(N, C, H, W)


# ---------------------------------------------------------------------------- registered ops
def _check(imgs_or_grad, ids_keep, patch_size, H=None, W=None):
    H, W = imgs_or_grad.shape[-2:] if H is None else (H, W)
    check_distinct(ids_keep, (H // patch_size) * (W // patch_size), "ids_keep")


@torch.library.custom_op("fastmae::gather_mask", mutates_args=())
def _gather_mask_op(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int) -> torch.Tensor:
    _check(imgs, ids_keep, patch_size)
    return gather_mask_ref(imgs, ids_keep, patch_size).contiguous()


@_gather_mask_op.register_fake
def _(imgs, ids_keep, patch_size):
    N, C = imgs.shape[:2]
    return imgs.new_empty(N, ids_keep.shape[1], C * patch_size * patch_size)


@torch.library.custom_op("fastmae::gather_mask_backward", mutates_args=())
def _gather_mask_backward_op(grad: torch.Tensor, ids_keep: torch.Tensor, patch_size: int,
                             H: int, W: int) -> torch.Tensor:
    _check(grad, ids_keep, patch_size, H, W)
    return gather_mask_backward_ref(grad, ids_keep, patch_size, H, W).contiguous()


@_gather_mask_backward_op.register_fake
def _(grad, ids_keep, patch_size, H, W):
    N, _, D = grad.shape
    return grad.new_empty(N, D // (patch_size * patch_size), H, W)


register_kernels(_gather_mask_op, check=_check, torch_impl=lambda *a: gather_mask_ref(*a).contiguous(),
                 cpp="gather_mask_fwd", triton=("gather_mask", "gather_mask_forward"))
register_kernels(_gather_mask_backward_op, check=_check,
                 torch_impl=lambda *a: gather_mask_backward_ref(*a).contiguous(),
                 cpp="gather_mask_bwd", triton=("gather_mask", "gather_mask_backward"))


def _setup_context(ctx, inputs, output):
    imgs, ids_keep, patch_size = inputs
    ctx.save_for_backward(ids_keep)
    ctx.patch_size, ctx.hw = patch_size, tuple(imgs.shape[-2:])


def _backward(ctx, grad):
    (ids_keep,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None
    H, W = ctx.hw
    return _gather_mask_backward_op(grad.contiguous(), ids_keep, ctx.patch_size, H, W), None, None


_gather_mask_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------- public API
def gather_mask(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Visible patches ``[N, K, C*p*p]`` in (c, i, j) order, straight from NCHW pixels."""
    check_float(imgs, "imgs")
    if imgs.dim() != 4:
        raise ValueError(f"imgs must be [N, C, H, W], got shape {tuple(imgs.shape)}")
    N, C, H, W = imgs.shape
    h, w = check_grid((H, W), patch_size)
    check_index(ids_keep, "ids_keep", N)
    if not 0 < ids_keep.shape[1] < h * w:
        raise ValueError(f"ids_keep must keep K patches with 0 < K < L = {h * w}, got K = {ids_keep.shape[1]}")
    if ids_keep.device != imgs.device:
        raise ValueError(f"ids_keep is on {ids_keep.device} but imgs on {imgs.device}")
    check_no_tangent("gather_mask", ("imgs", imgs))
    return _gather_mask_op(imgs.contiguous(), ids_keep.contiguous(), int(patch_size))
