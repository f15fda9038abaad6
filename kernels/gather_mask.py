"""Triton kernels for ``fastmae.ops.gather_mask``: patchify + gather of the kept patches.

Forward: one program per kept row ``(n, k)``; it copies patch ``l = ids_keep[n, k]`` from NCHW
pixels into ``out[n, k]`` in Conv2d-weight order ``(c, i, j)``. The patch is walked as
*segments*: ``VEC`` consecutive pixels of one image row, which are also ``VEC`` consecutive
output elements, so both the load and the store of a segment are one vector access (128-bit when
``VEC`` elements make 16 bytes). Each pixel is read once and each output element written once.

Backward: one program per patch ``(n, l)`` of the image gradient, for every patch: the kept ones
copy their gradient row back (the inverse of ``ids_keep``, a tiny ``[N, L]`` int32 map built
first, says which row), the others are written with zeros. The image gradient is written once
and the patch gradient read once; no memset pass and no atomics. The map holds one row per patch,
so ``ids_keep`` must not repeat a patch within a sample (``fastmae.ops.gather_mask`` checks it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (KernelConfig, dtype_name, inverse_map, launch, patch_segment_offset, signature_of, unit_last,
                      vec_choices, vec_width)

TILE = 1024  # elements per loop step of one program (BLOCK_S segments of VEC elements)
NUM_WARPS = 4


@triton.jit
def _gather_mask_fwd_kernel(
    imgs_ptr,  # [N, C, H, W] pixels, unit stride along W
    ids_ptr,  # [N, K] int64, kept patch index per row
    out_ptr,  # [N, K, C*p*p] kept patches, (c, i, j) order, contiguous rows
    K, C, w,  # kept rows per sample, channels, patches per image row (W // p)
    p_vecs,  # patch size p in VEC-wide vectors (p = p_vecs * VEC)
    s_img_n_vecs, s_img_c_vecs, s_img_h_vecs,  # imgs strides in vectors
    s_out_n_vecs, s_out_k_vecs,  # out strides in vectors
    s_ids_n,  # ids_keep stride along N (elements)
    VEC: tl.constexpr,  # pixels per segment (one vector access)
    BLOCK_S: tl.constexpr,  # segments per loop step
):
    pid = tl.program_id(0).to(tl.int64)
    n = pid // K
    k = pid % K
    p = p_vecs * VEC
    s_img_n = s_img_n_vecs * VEC
    s_img_c = s_img_c_vecs * VEC
    s_img_h = s_img_h_vecs * VEC
    patch = tl.load(ids_ptr + n * s_ids_n + k)
    hi = patch // w
    wj = patch % w
    src = imgs_ptr + n * s_img_n + hi * p * s_img_h + wj * p
    dst = out_ptr + n * (s_out_n_vecs * VEC) + k * (s_out_k_vecs * VEC)
    n_segs = C * p * p_vecs  # segments in one patch: C*p image rows of p_vecs segments
    lane = tl.arange(0, VEC)
    for s0 in range(0, n_segs, BLOCK_S):
        seg = s0 + tl.arange(0, BLOCK_S)
        src_off = patch_segment_offset(seg, p, p_vecs, s_img_c, s_img_h, VEC)
        dst_off = seg.to(tl.int64) * VEC
        ok = (seg < n_segs)[:, None]
        vals = tl.load(src + src_off[:, None] + lane[None, :], mask=ok)
        tl.store(dst + dst_off[:, None] + lane[None, :], vals, mask=ok)


@triton.jit
def _gather_mask_bwd_kernel(
    grad_ptr,  # [N, K, C*p*p] gradient of the kept patches, contiguous rows
    inv_ptr,  # [N, L] int32, row k holding patch l, or -1 when patch l was not kept
    dimg_ptr,  # [N, C, H, W] image gradient (written in full), unit stride along W
    L, C, w,  # patches per image, channels, patches per image row
    p_vecs,  # patch size in VEC-wide vectors
    s_grad_n_vecs, s_grad_k_vecs,  # grad strides in vectors
    s_img_n_vecs, s_img_c_vecs, s_img_h_vecs,  # dimg strides in vectors
    s_inv_n,  # inverse map stride along N (elements)
    VEC: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n = pid // L
    patch = pid % L
    p = p_vecs * VEC
    s_img_c = s_img_c_vecs * VEC
    s_img_h = s_img_h_vecs * VEC
    k = tl.load(inv_ptr + n * s_inv_n + patch).to(tl.int64)
    kept = k >= 0
    hi = patch // w
    wj = patch % w
    dst = dimg_ptr + n * (s_img_n_vecs * VEC) + hi * p * s_img_h + wj * p
    src = grad_ptr + n * (s_grad_n_vecs * VEC) + tl.maximum(k, 0) * (s_grad_k_vecs * VEC)
    n_segs = C * p * p_vecs
    lane = tl.arange(0, VEC)
    for s0 in range(0, n_segs, BLOCK_S):
        seg = s0 + tl.arange(0, BLOCK_S)
        dst_off = patch_segment_offset(seg, p, p_vecs, s_img_c, s_img_h, VEC)
        src_off = seg.to(tl.int64) * VEC
        ok = (seg < n_segs)[:, None]
        vals = tl.load(src + src_off[:, None] + lane[None, :], mask=ok & kept, other=0.0)
        tl.store(dst + dst_off[:, None] + lane[None, :], vals, mask=ok)


# ---------------------------------------------------------------------------- launchers
def gather_mask_forward(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``imgs [N, C, H, W]``, ``ids_keep [N, K]`` int64 -> kept patches ``[N, K, C*p*p]``."""
    if imgs.dim() != 4 or not unit_last(imgs):
        raise ValueError(f"imgs must be [N, C, H, W] with unit stride along W, got shape {tuple(imgs.shape)} "
                         f"strides {imgs.stride()}")
    if (ids_keep.dim() != 2 or ids_keep.shape[0] != imgs.shape[0] or ids_keep.dtype != torch.int64
            or not unit_last(ids_keep)):
        raise ValueError(f"ids_keep must be int64 [N, K] with N = {imgs.shape[0]} and unit stride along K, got "
                         f"{ids_keep.dtype} {tuple(ids_keep.shape)} strides {ids_keep.stride()}")
    N, C, H, W = imgs.shape
    p = int(patch_size)
    if p <= 0 or H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not divisible by the patch size {p}")
    K = ids_keep.shape[1]
    out = torch.empty(N, K, C * p * p, dtype=imgs.dtype, device=imgs.device)
    if out.numel() == 0:
        return out
    vec = vec_width(imgs.dtype, [p, *imgs.stride()[:3], *out.stride()[:2]], [imgs, out])
    launch(_gather_mask_fwd_kernel, (N * K,),
           imgs, ids_keep, out, K, C, W // p, p // vec,
           imgs.stride(0) // vec, imgs.stride(1) // vec, imgs.stride(2) // vec,
           out.stride(0) // vec, out.stride(1) // vec, ids_keep.stride(0),
           VEC=vec, BLOCK_S=TILE // vec, num_warps=NUM_WARPS)
    return out


def gather_mask_backward(grad: torch.Tensor, ids_keep: torch.Tensor, patch_size: int, H: int, W: int) -> torch.Tensor:
    """``grad [N, K, C*p*p]`` -> image gradient ``[N, C, H, W]`` (zero on patches not kept)."""
    p = int(patch_size)
    if grad.dim() != 3 or not unit_last(grad) or p <= 0 or grad.shape[2] % (p * p):
        raise ValueError(f"grad must be [N, K, C*p*p] with unit stride along its last dim for patch size {p}, "
                         f"got shape {tuple(grad.shape)}")
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not divisible by the patch size {p}")
    N, K, D = grad.shape
    if tuple(ids_keep.shape) != (N, K) or ids_keep.dtype != torch.int64:
        raise ValueError(f"ids_keep must be int64 [{N}, {K}], got {ids_keep.dtype} {tuple(ids_keep.shape)}")
    C, h, w = D // (p * p), H // p, W // p
    L = h * w
    dimg = torch.empty(N, C, H, W, dtype=grad.dtype, device=grad.device)
    if dimg.numel() == 0:
        return dimg
    # inverse of ids_keep: inv[n, l] = k when ids_keep[n, k] = l, else -1 (N*L int32, tiny)
    inv = inverse_map(ids_keep, L)
    vec = vec_width(grad.dtype, [p, *grad.stride()[:2], *dimg.stride()[:3]], [grad, dimg])
    launch(_gather_mask_bwd_kernel, (N * L,),
           grad, inv, dimg, L, C, w, p // vec,
           grad.stride(0) // vec, grad.stride(1) // vec,
           dimg.stride(0) // vec, dimg.stride(1) // vec, dimg.stride(2) // vec, inv.stride(0),
           VEC=vec, BLOCK_S=TILE // vec, num_warps=NUM_WARPS)
    return dimg


# ---------------------------------------------------------------------------- configurations
def launch_configs() -> list[KernelConfig]:
    """Every configuration the launchers above can choose: one per (dtype, VEC)."""
    configs = []
    ints_fwd = dict.fromkeys(["K", "C", "w", "p_vecs", "s_img_n_vecs", "s_img_c_vecs", "s_img_h_vecs",
                              "s_out_n_vecs", "s_out_k_vecs", "s_ids_n"], "i32")
    ints_bwd = dict.fromkeys(["L", "C", "w", "p_vecs", "s_grad_n_vecs", "s_grad_k_vecs", "s_img_n_vecs",
                              "s_img_c_vecs", "s_img_h_vecs", "s_inv_n"], "i32")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t = "*" + dtype_name(dtype)
        for vec in vec_choices(dtype):
            width = vec * dtype.itemsize
            ce = {"VEC": vec, "BLOCK_S": TILE // vec}
            configs.append(KernelConfig(
                "gather_mask_fwd", _gather_mask_fwd_kernel,
                signature_of(_gather_mask_fwd_kernel, {"imgs_ptr": t, "ids_ptr": "*i64", "out_ptr": t, **ints_fwd}, ce),
                ce, ("imgs_ptr", "ids_ptr", "out_ptr"), NUM_WARPS, vector_loads=width, vector_stores=width))
            configs.append(KernelConfig(
                "gather_mask_bwd", _gather_mask_bwd_kernel,
                signature_of(_gather_mask_bwd_kernel,
                             {"grad_ptr": t, "inv_ptr": "*i32", "dimg_ptr": t, **ints_bwd}, ce),
                ce, ("grad_ptr", "inv_ptr", "dimg_ptr"), NUM_WARPS, vector_loads=width, vector_stores=width))
    return configs
