"""Triton kernels for ``fastmae.ops.norm_mse_loss``: the MAE loss with per-patch normalised
targets, computed from pixels on the fly.

One program per prediction row ``(n, m)`` (patch ``l = ids[n, m]``):

1. with ``NORM_PIX``, the patch's mean and unbiased variance, in fp32, from its pixels read in
   image order (``VEC``-wide segments of image rows, like ``gather_mask``); chunks of the patch
   are combined with Chan's parallel formula, so a patch that fits one chunk (ViT-B/16: 768
   pixels) gets the exact two-pass statistics from registers;
2. the squared error against the prediction row, walked in its own ``(i, j, c)`` order: the
   prediction is read with ``VEC``-wide vector loads, the pixel of each element is fetched from
   the cache lines pass 1 just brought in, at an offset read from a ``[P]`` table (the same for
   every patch; built once per geometry and cached), so no per-element integer division.

Forward: each program writes ``weight[n, m] * mean_k (pred - t)^2`` to an fp32 ``[N, M]`` buffer;
a single-program kernel then sums it and the weights in a fixed order (deterministic) and writes
the 0-d loss. Backward: the weight sum first (same small kernel), then one pass writing
``dpred = grad * weight * 2 (pred - t) / (P * sum(weight))``. Nothing of target size is stored.

Clips (VideoMAE: ``imgs [N, C, T, H, W]``, tubelets of ``t`` frames, targets in ``(dt, i, j, c)``
order, an optional per-channel affine map of the pixels, per-channel normalisation) take the
``_norm_mse_tube_*`` kernels: one program per row as well, the row held as one ``[Q, C]`` tile
(``Q = t*p*p``), so the per-channel statistics are column reductions. Simpler than the image path
(pixels fetched through the offset table, no vector-width claims); its GPU speed is not measured.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (FLOAT_DTYPES, KernelConfig, dtype_name, full_vec, launch, patch_segment_offset, signature_of,
                      unit_last, vec_width)

NUM_WARPS = 4
TILE = 1024  # elements per loop step (statistics pass: BLOCK_S segments of VEC_I pixels)
SUM_BLOCK = 1024  # rows per step of the final reduction
SUM_WARPS = 4


def vec_options(dtype: torch.dtype) -> tuple[int, ...]:
    """Vector widths this module's launchers choose from: scalar or a full 16-byte vector."""
    return (1, full_vec(dtype))


@triton.jit
def _norm_mse_patch_stats(src, C, p, p_vecs, s_img_c, s_img_h, eps, VEC_I: tl.constexpr, BLOCK_S: tl.constexpr):
    """Mean and 1/sqrt(unbiased variance + eps) of the C*p*p pixels of the patch at ``src``."""
    n_segs = C * p * p_vecs
    lane = tl.arange(0, VEC_I)
    count = tl.zeros((), dtype=tl.float32)
    mean = tl.zeros((), dtype=tl.float32)
    m2 = tl.zeros((), dtype=tl.float32)
    for s0 in range(0, n_segs, BLOCK_S):
        seg = s0 + tl.arange(0, BLOCK_S)
        ok = (seg < n_segs)[:, None] & (lane < VEC_I)[None, :]
        off = patch_segment_offset(seg, p, p_vecs, s_img_c, s_img_h, VEC_I)
        x = tl.load(src + off[:, None] + lane[None, :], mask=ok, other=0.0).to(tl.float32)
        cnt = (tl.minimum(n_segs - s0, BLOCK_S) * VEC_I).to(tl.float32)
        c_mean = tl.sum(tl.sum(x, axis=1), axis=0) / cnt
        dev = tl.where(ok, x - c_mean, 0.0)
        c_m2 = tl.sum(tl.sum(dev * dev, axis=1), axis=0)
        total = count + cnt
        delta = c_mean - mean
        mean += delta * (cnt / total)
        m2 += c_m2 + delta * delta * (count * cnt / total)
        count = total
    var = m2 / (count - 1.0)
    return mean, 1.0 / tl.sqrt(var + eps)


@triton.jit
def _norm_mse_row(imgs_ptr, ids_ptr, pid, M, C, w, p_vecs, s_pred_n_vecs, s_pred_m_vecs,
                  s_img_n_vecs, s_img_c_vecs, s_img_h_vecs, s_ids_n, eps,
                  NORM_PIX: tl.constexpr, VEC_I: tl.constexpr, VEC_P: tl.constexpr, BLOCK_S: tl.constexpr):
    """Locate row ``pid`` = (n, m): its prediction-row offset, its patch, and the patch statistics."""
    n = pid // M
    m = pid % M
    patch = tl.load(ids_ptr + n * s_ids_n + m)
    hi = patch // w
    wj = patch % w
    p = p_vecs * VEC_I
    s_img_c = s_img_c_vecs * VEC_I
    s_img_h = s_img_h_vecs * VEC_I
    src = imgs_ptr + n * (s_img_n_vecs * VEC_I) + hi * p * s_img_h + wj * p
    row = n * (s_pred_n_vecs * VEC_P) + m * (s_pred_m_vecs * VEC_P)  # offset of the prediction row
    if NORM_PIX:
        mean, rstd = _norm_mse_patch_stats(src, C, p, p_vecs, s_img_c, s_img_h, eps, VEC_I, BLOCK_S)
    else:
        mean = 0.0
        rstd = 1.0
    return n, m, row, src, mean, rstd


@triton.jit
def _norm_mse_target(src, poff_ptr, e, ok, mean, rstd, NORM_PIX: tl.constexpr):
    """Targets of prediction elements ``e`` (official (i, j, c) order) of the patch at ``src``."""
    off = tl.load(poff_ptr + e, mask=ok, other=0)
    x = tl.load(src + off, mask=ok, other=0.0).to(tl.float32)
    if NORM_PIX:
        x = (x - mean) * rstd
    return x


@triton.jit
def _norm_mse_loss_fwd_kernel(
    pred_ptr,  # [N, M, P] predictions, P = p*p*C in (i, j, c) order, unit stride along P
    imgs_ptr,  # [N, C, H, W] pixels, unit stride along W
    weight_ptr,  # [N, M] fp32 row weights (the mask)
    ids_ptr,  # [N, M] int64 patch index of each row (stride 0 along N for the identity)
    poff_ptr,  # [P] int64 offset, from the patch's first pixel, of the pixel of each prediction element
    rows_ptr,  # [N * M] fp32 output: weight * mean squared error of each row
    M, C, w,  # rows per sample, channels, patches per image row
    p_vecs,  # patch size in VEC_I-wide vectors
    P_vecs,  # row length P in VEC_P-wide vectors
    s_pred_n_vecs, s_pred_m_vecs,  # pred strides in VEC_P vectors
    s_img_n_vecs, s_img_c_vecs, s_img_h_vecs,  # imgs strides in VEC_I vectors
    s_w_n, s_ids_n,  # weight and ids strides along N (elements)
    eps,  # variance epsilon
    NORM_PIX: tl.constexpr,
    VEC_I: tl.constexpr,
    VEC_P: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n, m, row, src, mean, rstd = _norm_mse_row(
        imgs_ptr, ids_ptr, pid, M, C, w, p_vecs, s_pred_n_vecs, s_pred_m_vecs, s_img_n_vecs,
        s_img_c_vecs, s_img_h_vecs, s_ids_n, eps, NORM_PIX, VEC_I, VEC_P, BLOCK_S)
    P = P_vecs * VEC_P
    acc = tl.zeros([BLOCK_E], dtype=tl.float32)
    for e0 in range(0, P, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        ok = e < P
        pr = tl.load(pred_ptr + row + e, mask=ok, other=0.0).to(tl.float32)
        t = _norm_mse_target(src, poff_ptr, e, ok, mean, rstd, NORM_PIX)
        diff = tl.where(ok, pr - t, 0.0)
        acc += diff * diff
    weight = tl.load(weight_ptr + n * s_w_n + m)
    tl.store(rows_ptr + pid, weight * (tl.sum(acc, axis=0) / P))


@triton.jit
def _norm_mse_loss_bwd_kernel(
    grad_ptr,  # [] fp32 gradient of the loss
    wsum_ptr,  # [1] fp32 sum of the weights
    pred_ptr,  # [N, M, P] predictions, unit stride along P
    imgs_ptr,  # [N, C, H, W] pixels, unit stride along W
    weight_ptr,  # [N, M] fp32 row weights
    ids_ptr,  # [N, M] int64 patch index of each row (stride 0 along N for the identity)
    poff_ptr,  # [P] int64 offset, from the patch's first pixel, of the pixel of each prediction element
    dpred_ptr,  # [N, M, P] output gradient, same strides as pred
    M, C, w, p_vecs, P_vecs,
    s_pred_n_vecs, s_pred_m_vecs,  # pred and dpred strides in VEC_P vectors
    s_img_n_vecs, s_img_c_vecs, s_img_h_vecs,  # imgs strides in VEC_I vectors
    s_w_n, s_ids_n,
    eps,
    NORM_PIX: tl.constexpr,
    VEC_I: tl.constexpr,
    VEC_P: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n, m, row, src, mean, rstd = _norm_mse_row(
        imgs_ptr, ids_ptr, pid, M, C, w, p_vecs, s_pred_n_vecs, s_pred_m_vecs, s_img_n_vecs,
        s_img_c_vecs, s_img_h_vecs, s_ids_n, eps, NORM_PIX, VEC_I, VEC_P, BLOCK_S)
    P = P_vecs * VEC_P
    weight = tl.load(weight_ptr + n * s_w_n + m)
    scale = tl.load(grad_ptr) * weight * 2.0 / (P * tl.load(wsum_ptr))
    for e0 in range(0, P, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        ok = e < P
        pr = tl.load(pred_ptr + row + e, mask=ok, other=0.0).to(tl.float32)
        t = _norm_mse_target(src, poff_ptr, e, ok, mean, rstd, NORM_PIX)
        tl.store(dpred_ptr + row + e, (scale * (pr - t)).to(dpred_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _norm_mse_loss_sum_kernel(
    rows_ptr,  # [R] fp32 weighted row losses (read only when HAS_ROWS)
    weight_ptr,  # [R] fp32 row weights, contiguous
    out_ptr,  # [] fp32: sum(rows) / sum(weight), or sum(weight) without HAS_ROWS
    R,  # rows
    HAS_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    acc_w = tl.zeros([BLOCK], dtype=tl.float32)
    acc_l = tl.zeros([BLOCK], dtype=tl.float32)
    for r0 in range(0, R, BLOCK):  # one program, fixed order: deterministic
        r = r0 + tl.arange(0, BLOCK)
        ok = r < R
        acc_w += tl.load(weight_ptr + r, mask=ok, other=0.0)
        if HAS_ROWS:
            acc_l += tl.load(rows_ptr + r, mask=ok, other=0.0)
    if HAS_ROWS:
        tl.store(out_ptr, tl.sum(acc_l, axis=0) / tl.sum(acc_w, axis=0))
    else:
        tl.store(out_ptr, tl.sum(acc_w, axis=0))


@triton.jit
def _norm_mse_tube_target(imgs_ptr, ids_ptr, poff_ptr, affine_ptr, pid, M, C, hw, w, p, t, Q,
                          s_img_n, s_img_t, s_img_h, s_ids_n, eps, NORM_PIX: tl.constexpr,
                          PER_CHANNEL: tl.constexpr, HAS_AFFINE: tl.constexpr, BLOCK_Q: tl.constexpr,
                          C_PAD: tl.constexpr):
    """Row ``pid`` = (n, m): its target as a ``[BLOCK_Q, C_PAD]`` fp32 tile (element ``q*C + c`` of
    the row at ``(q, c)``), the tile's element indices and mask."""
    n = pid // M
    m = pid % M
    tube = tl.load(ids_ptr + n * s_ids_n + m)
    ti = tube // hw
    hi = (tube % hw) // w
    wj = tube % w
    src = imgs_ptr + n * s_img_n + ti * t * s_img_t + hi * p * s_img_h + wj * p
    q = tl.arange(0, BLOCK_Q)[:, None]
    c = tl.arange(0, C_PAD)[None, :]
    ok = (q < Q) & (c < C)
    e = q * C + c
    off = tl.load(poff_ptr + e, mask=ok, other=0)
    x = tl.load(src + off, mask=ok, other=0.0).to(tl.float32)
    if HAS_AFFINE:
        x = x * tl.load(affine_ptr + c, mask=c < C, other=1.0) + tl.load(affine_ptr + C + c, mask=c < C, other=0.0)
    if NORM_PIX:
        if PER_CHANNEL:  # VideoMAE: (x - mean) / (std + eps) per channel, unbiased
            mean = tl.sum(tl.where(ok, x, 0.0), axis=0) / Q
            d = tl.where(ok, x - mean[None, :], 0.0)
            var = tl.sum(d * d, axis=0) / (Q - 1)
            x = d / (tl.sqrt(var) + eps)[None, :]
        else:  # MAE: (x - mean) / sqrt(var + eps) over the whole patch
            count = Q * C
            mean = tl.sum(tl.sum(tl.where(ok, x, 0.0), axis=1), axis=0) / count
            d = tl.where(ok, x - mean, 0.0)
            var = tl.sum(tl.sum(d * d, axis=1), axis=0) / (count - 1)
            x = d / tl.sqrt(var + eps)
    return n, m, e, ok, x


@triton.jit
def _norm_mse_tube_fwd_kernel(
    pred_ptr,  # [N, M, P] predictions, P = t*p*p*C in (dt, i, j, c) order, unit stride along P
    imgs_ptr,  # [N, C, T, H, W] pixels, unit stride along W
    weight_ptr,  # [N, M] fp32 row weights
    ids_ptr,  # [N, M] int64 tubelet index of each row (stride 0 along N for the identity)
    poff_ptr,  # [P] int64 offset, from the tubelet's first pixel, of the pixel of each prediction element
    affine_ptr,  # [2, C] fp32 pixel scale and shift (read only with HAS_AFFINE)
    rows_ptr,  # [N * M] fp32 output: weight * mean squared error of each row
    M, C, hw, w, p, t, Q,  # rows per sample, channels, tubelets per time slice, per patch row, sizes, Q = t*p*p
    s_pred_n, s_pred_m, s_img_n, s_img_t, s_img_h, s_w_n, s_ids_n,  # strides (elements)
    eps,
    NORM_PIX: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_AFFINE: tl.constexpr,
    BLOCK_Q: tl.constexpr, C_PAD: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n, m, e, ok, x = _norm_mse_tube_target(imgs_ptr, ids_ptr, poff_ptr, affine_ptr, pid, M, C, hw, w, p, t, Q,
                                           s_img_n, s_img_t, s_img_h, s_ids_n, eps, NORM_PIX, PER_CHANNEL,
                                           HAS_AFFINE, BLOCK_Q, C_PAD)
    pr = tl.load(pred_ptr + n * s_pred_n + m * s_pred_m + e, mask=ok, other=0.0).to(tl.float32)
    diff = tl.where(ok, pr - x, 0.0)
    weight = tl.load(weight_ptr + n * s_w_n + m)
    tl.store(rows_ptr + pid, weight * (tl.sum(tl.sum(diff * diff, axis=1), axis=0) / (Q * C)))


@triton.jit
def _norm_mse_tube_bwd_kernel(
    grad_ptr,  # [] fp32 gradient of the loss
    wsum_ptr,  # [1] fp32 sum of the weights
    pred_ptr, imgs_ptr, weight_ptr, ids_ptr, poff_ptr, affine_ptr,  # as the forward
    dpred_ptr,  # [N, M, P] output gradient, same strides as pred
    M, C, hw, w, p, t, Q,
    s_pred_n, s_pred_m, s_img_n, s_img_t, s_img_h, s_w_n, s_ids_n,
    eps,
    NORM_PIX: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_AFFINE: tl.constexpr,
    BLOCK_Q: tl.constexpr, C_PAD: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n, m, e, ok, x = _norm_mse_tube_target(imgs_ptr, ids_ptr, poff_ptr, affine_ptr, pid, M, C, hw, w, p, t, Q,
                                           s_img_n, s_img_t, s_img_h, s_ids_n, eps, NORM_PIX, PER_CHANNEL,
                                           HAS_AFFINE, BLOCK_Q, C_PAD)
    row = n * s_pred_n + m * s_pred_m
    pr = tl.load(pred_ptr + row + e, mask=ok, other=0.0).to(tl.float32)
    weight = tl.load(weight_ptr + n * s_w_n + m)
    scale = tl.load(grad_ptr) * weight * 2.0 / (Q * C * tl.load(wsum_ptr))
    tl.store(dpred_ptr + row + e, (scale * (pr - x)).to(dpred_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------- launchers
@functools.cache  # never evicted: a recorded CUDA graph copies from the pinned table's address
def _pixel_offsets(C: int, p: int, s_c: int, s_h: int, pinned: bool, t: int = 1, s_t: int = 0) -> torch.Tensor:
    """[P] int64 on the host: offset, from a patch's (tubelet's) first pixel, of the pixel that
    prediction element ``e = ((dt*p + i)*p + j)*C + c`` targets (``c*s_c + dt*s_t + i*s_h + j``).
    Small, one per geometry: cached."""
    e = torch.arange(t * C * p * p, device="cpu")  # whatever the default device
    dt, i, j, c = e // (p * p * C), (e // (p * C)) % p, (e // C) % p, e % C
    table = c * s_c + dt * s_t + i * s_h + j
    return table.pin_memory() if pinned else table


@functools.cache
def _identity(M: int, pinned: bool) -> torch.Tensor:
    """[M] int64 0..M-1 on the host: the patch index of each row when pred covers every patch."""
    table = torch.arange(M, device="cpu")
    return table.pin_memory() if pinned else table


def _on_device(table_fn, device: torch.device, *key: int, **extra: int) -> torch.Tensor:
    """A cached host table on ``device``: for CUDA one small asynchronous copy from pinned memory
    per call, never a cached CUDA tensor. One first made while ``torch.compile(mode=
    "reduce-overhead")`` warms up or records a CUDA graph would live in that graph's private
    memory pool, which the graph then refuses ("tensors in the cudagraph pool not tracked as
    outputs"). While torch.compile traces the op (fake tensors), the table is made afresh, not
    cached: the graph computes it."""
    if torch._guards.detect_fake_mode() is not None:
        return table_fn.__wrapped__(*key, False, **extra).to(device)
    if device.type == "cpu":
        return table_fn(*key, False, **extra)
    return table_fn(*key, True, **extra).to(device, non_blocking=True)


def _prepare(pred, imgs, weight, ids, patch_size):
    """Check shapes; return the kernel arguments shared by forward and backward."""
    if imgs.dim() != 4 or not unit_last(imgs):
        raise ValueError(f"imgs must be [N, C, H, W] with unit stride along W, got {tuple(imgs.shape)} {imgs.stride()}")
    N, C, H, W = imgs.shape
    p = int(patch_size)
    if p <= 0 or H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not divisible by the patch size {p}")
    P = C * p * p
    if pred.dim() != 3 or pred.shape[0] != N or pred.shape[2] != P or not unit_last(pred):
        raise ValueError(f"pred must be [N={N}, M, P={P}] with unit stride along P, got {tuple(pred.shape)}")
    M = pred.shape[1]
    if tuple(weight.shape) != (N, M) or weight.dtype != torch.float32 or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous float32 [{N}, {M}] tensor, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    if pred.dtype not in FLOAT_DTYPES or imgs.dtype not in FLOAT_DTYPES:
        raise ValueError(f"pred and imgs must be float32, bfloat16 or float16, got {pred.dtype} and {imgs.dtype}")
    if ids is None:
        if M != (H // p) * (W // p):
            raise ValueError(f"pred has {M} rows but the images have {(H // p) * (W // p)} patches and no ids")
        ids, s_ids_n = _on_device(_identity, pred.device, M), 0  # shared by every sample
    else:
        if tuple(ids.shape) != (N, M) or ids.dtype != torch.int64 or not unit_last(ids):
            raise ValueError(f"ids must be int64 [{N}, {M}] with unit stride, got {ids.dtype} {tuple(ids.shape)}")
        s_ids_n = ids.stride(0)
    vec_i = vec_width(imgs.dtype, [p, *imgs.stride()[:3]], [imgs])
    vec_i = vec_i if vec_i in vec_options(imgs.dtype) else 1
    vec_p = vec_width(pred.dtype, [P, *pred.stride()[:2]], [pred])
    vec_p = vec_p if vec_p in vec_options(pred.dtype) else 1
    ints = (M, C, W // p, p // vec_i, P // vec_p, pred.stride(0) // vec_p, pred.stride(1) // vec_p,
            imgs.stride(0) // vec_i, imgs.stride(1) // vec_i, imgs.stride(2) // vec_i, weight.stride(0), s_ids_n)
    poff = _on_device(_pixel_offsets, imgs.device, C, p, imgs.stride(1), imgs.stride(2))
    return N * M, ids, poff, ints, vec_i, vec_p


TUBE_MAX_TILE = 8192  # elements of a row's [BLOCK_Q, C_PAD] tile (ViT video rows: 512 x 4)


def _tube_warps(block_q: int, c_pad: int) -> int:
    return 4 if block_q * c_pad <= 2048 else 8


def _prepare_tube(pred, imgs, weight, ids, patch_size, tubelet_size, affine):
    """Checks and kernel arguments of the tubelet kernels (clips, or images through an affine map
    or per-channel statistics)."""
    x = imgs if imgs.dim() == 5 else imgs.unsqueeze(2)
    if x.dim() != 5 or x.stride(-1) != 1:
        raise ValueError(f"imgs must be [N, C, T, H, W] with unit stride along W, got {tuple(imgs.shape)}")
    N, C, T, H, W = x.shape
    p, t = int(patch_size), int(tubelet_size)
    if p <= 0 or H % p or W % p or t <= 0 or T % t:
        raise ValueError(f"clip {T}x{H}x{W} is not divisible into tubelets of {t}x{p}x{p}")
    Q = t * p * p
    P = Q * C
    if pred.dim() != 3 or pred.shape[0] != N or pred.shape[2] != P or not unit_last(pred):
        raise ValueError(f"pred must be [N={N}, M, P={P}] with unit stride along P, got {tuple(pred.shape)}")
    M = pred.shape[1]
    if tuple(weight.shape) != (N, M) or weight.dtype != torch.float32 or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous float32 [{N}, {M}] tensor, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    if pred.dtype not in FLOAT_DTYPES or imgs.dtype not in FLOAT_DTYPES:
        raise ValueError(f"pred and imgs must be float32, bfloat16 or float16, got {pred.dtype} and {imgs.dtype}")
    hw = (H // p) * (W // p)
    if ids is None:
        if M != (T // t) * hw:
            raise ValueError(f"pred has {M} rows but the clips have {(T // t) * hw} tubelets and no ids")
        ids, s_ids_n = _on_device(_identity, pred.device, M), 0
    else:
        if tuple(ids.shape) != (N, M) or ids.dtype != torch.int64 or not unit_last(ids):
            raise ValueError(f"ids must be int64 [{N}, {M}] with unit stride, got {ids.dtype} {tuple(ids.shape)}")
        s_ids_n = ids.stride(0)
    block_q, c_pad = triton.next_power_of_2(Q), triton.next_power_of_2(C)
    if block_q * c_pad > TUBE_MAX_TILE:
        raise ValueError(f"tubelets of {t}x{p}x{p}x{C} values are too large for the Triton tubelet kernel "
                         f"(a row is one tile of at most {TUBE_MAX_TILE} elements); use the torch backend")
    if affine is None:
        affine = weight  # never read (HAS_AFFINE is False); any fp32 pointer
    poff = _on_device(_pixel_offsets, imgs.device, C, p, x.stride(1), x.stride(3), t=t, s_t=x.stride(2))
    ints = (M, C, hw, W // p, p, t, Q, pred.stride(0), pred.stride(1), x.stride(0), x.stride(2), x.stride(3),
            weight.stride(0), s_ids_n)
    return N * M, ids, poff, affine, ints, block_q, c_pad


def _tube(imgs, tubelet_size, per_channel, affine) -> bool:
    return imgs.dim() == 5 or tubelet_size != 1 or per_channel or affine is not None


def _tube_constexprs(norm_pix, per_channel, has_affine, block_q, c_pad) -> dict:
    return {"NORM_PIX": bool(norm_pix), "PER_CHANNEL": bool(per_channel), "HAS_AFFINE": bool(has_affine),
            "BLOCK_Q": block_q, "C_PAD": c_pad}


def _constexprs(norm_pix: bool, vec_i: int, vec_p: int) -> dict:
    return {"NORM_PIX": bool(norm_pix), "VEC_I": vec_i, "VEC_P": vec_p, "BLOCK_S": TILE // vec_i, "BLOCK_E": TILE}


def norm_mse_loss_forward(pred, imgs, weight, ids: Optional[torch.Tensor], patch_size: int, norm_pix: bool,
                          eps: float, tubelet_size: int = 1, per_channel: bool = False,
                          affine: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The MAE loss (0-d fp32) of ``pred [N, M, p*p*C]`` against the patches ``ids [N, M]`` (all
    patches when None) of ``imgs [N, C, H, W]``, rows weighted by ``weight [N, M]`` fp32 (clips:
    see the module doc)."""
    if _tube(imgs, tubelet_size, per_channel, affine):
        rows, ids, poff, aff, ints, block_q, c_pad = _prepare_tube(pred, imgs, weight, ids, patch_size,
                                                                   tubelet_size, affine)
        row_loss = torch.empty(rows, dtype=torch.float32, device=pred.device)
        if rows:
            launch(_norm_mse_tube_fwd_kernel, (rows,), pred, imgs, weight, ids, poff, aff, row_loss, *ints,
                   float(eps), **_tube_constexprs(norm_pix, per_channel, affine is not None, block_q, c_pad),
                   num_warps=_tube_warps(block_q, c_pad))
    else:
        rows, ids, poff, ints, vec_i, vec_p = _prepare(pred, imgs, weight, ids, patch_size)
        row_loss = torch.empty(rows, dtype=torch.float32, device=pred.device)
        if rows:
            launch(_norm_mse_loss_fwd_kernel, (rows,), pred, imgs, weight, ids, poff, row_loss, *ints, float(eps),
                   **_constexprs(norm_pix, vec_i, vec_p), num_warps=NUM_WARPS)
    loss = torch.empty((), dtype=torch.float32, device=pred.device)
    launch(_norm_mse_loss_sum_kernel, (1,), row_loss, weight, loss, rows, HAS_ROWS=True, BLOCK=SUM_BLOCK,
           num_warps=SUM_WARPS)
    return loss


def norm_mse_loss_backward(grad, pred, imgs, weight, ids: Optional[torch.Tensor], patch_size: int, norm_pix: bool,
                           eps: float, tubelet_size: int = 1, per_channel: bool = False,
                           affine: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``dpred`` (``pred.dtype``, ``pred``'s shape) for the 0-d fp32 loss gradient ``grad``."""
    tube = _tube(imgs, tubelet_size, per_channel, affine)
    if tube:
        rows, ids, poff, aff, ints, block_q, c_pad = _prepare_tube(pred, imgs, weight, ids, patch_size,
                                                                   tubelet_size, affine)
    else:
        rows, ids, poff, ints, vec_i, vec_p = _prepare(pred, imgs, weight, ids, patch_size)
    if grad.numel() != 1:
        raise ValueError(f"grad must hold one value (the loss is a scalar), got shape {tuple(grad.shape)}")
    grad = grad.reshape(()).to(torch.float32)
    dpred = torch.empty_like(pred)
    if rows == 0:
        return dpred
    if dpred.stride() != pred.stride():
        raise ValueError(f"pred must be laid out densely, got strides {pred.stride()}")
    wsum = torch.empty(1, dtype=torch.float32, device=pred.device)
    launch(_norm_mse_loss_sum_kernel, (1,), weight, weight, wsum, rows, HAS_ROWS=False, BLOCK=SUM_BLOCK,
           num_warps=SUM_WARPS)
    if tube:
        launch(_norm_mse_tube_bwd_kernel, (rows,), grad, wsum, pred, imgs, weight, ids, poff, aff, dpred, *ints,
               float(eps), **_tube_constexprs(norm_pix, per_channel, affine is not None, block_q, c_pad),
               num_warps=_tube_warps(block_q, c_pad))
    else:
        launch(_norm_mse_loss_bwd_kernel, (rows,), grad, wsum, pred, imgs, weight, ids, poff, dpred, *ints,
               float(eps), **_constexprs(norm_pix, vec_i, vec_p), num_warps=NUM_WARPS)
    return dpred


# ---------------------------------------------------------------------------- configurations
def launch_configs() -> list[KernelConfig]:
    """Every configuration the launchers can choose: (pred dtype, imgs dtype) x VEC_P x VEC_I x
    NORM_PIX, for both kernels, and the two variants of the final sum."""
    ints = dict.fromkeys(["M", "C", "w", "p_vecs", "P_vecs", "s_pred_n_vecs", "s_pred_m_vecs", "s_img_n_vecs",
                          "s_img_c_vecs", "s_img_h_vecs", "s_w_n", "s_ids_n"], "i32")
    configs = []
    for pdt in FLOAT_DTYPES:
        for idt in FLOAT_DTYPES:
            tp, ti = "*" + dtype_name(pdt), "*" + dtype_name(idt)
            for vec_p in vec_options(pdt):
                for vec_i in vec_options(idt):
                    for norm_pix in (False, True):
                        ce = _constexprs(norm_pix, vec_i, vec_p)
                        # Width claims, one stream each so that the PTX check can attribute them:
                        # without NORM_PIX the only vector loads are of the prediction row (pixels
                        # are fetched in (i, j, c) order); with it, the statistics pass reads the
                        # image in VEC_I vectors (proven alone where VEC_P = 1). dpred stores: VEC_P.
                        need_ld = vec_i * idt.itemsize if norm_pix else vec_p * pdt.itemsize
                        base = {"pred_ptr": tp, "imgs_ptr": ti, "weight_ptr": "*fp32", "ids_ptr": "*i64",
                                "poff_ptr": "*i64", **ints, "eps": "fp32"}
                        fwd = {**base, "rows_ptr": "*fp32"}
                        configs.append(KernelConfig(
                            "norm_mse_loss_fwd", _norm_mse_loss_fwd_kernel,
                            signature_of(_norm_mse_loss_fwd_kernel, fwd, ce), ce,
                            ("pred_ptr", "imgs_ptr", "weight_ptr", "ids_ptr", "poff_ptr", "rows_ptr"), NUM_WARPS,
                            need_ld, 0))
                        bwd = {**base, "grad_ptr": "*fp32", "wsum_ptr": "*fp32", "dpred_ptr": tp}
                        configs.append(KernelConfig(
                            "norm_mse_loss_bwd", _norm_mse_loss_bwd_kernel,
                            signature_of(_norm_mse_loss_bwd_kernel, bwd, ce), ce,
                            ("pred_ptr", "imgs_ptr", "weight_ptr", "ids_ptr", "poff_ptr", "dpred_ptr", "grad_ptr",
                             "wsum_ptr"),
                            NUM_WARPS, need_ld, vec_p * pdt.itemsize))
    # The tubelet kernels at the VideoMAE row (t=2, p=16, C=3: a [512, 4] tile), every prediction
    # dtype against fp32 clips, in the three target forms the models use. No width claims.
    tube_ints = dict.fromkeys(["M", "C", "hw", "w", "p", "t", "Q", "s_pred_n", "s_pred_m", "s_img_n", "s_img_t",
                               "s_img_h", "s_w_n", "s_ids_n"], "i32")
    for pdt in FLOAT_DTYPES:
        tp = "*" + dtype_name(pdt)
        for norm_pix, per_channel, has_affine in ((True, True, True), (False, False, True), (True, False, False)):
            ce = _tube_constexprs(norm_pix, per_channel, has_affine, 512, 4)
            base = {"pred_ptr": tp, "imgs_ptr": "*fp32", "weight_ptr": "*fp32", "ids_ptr": "*i64", "poff_ptr": "*i64",
                    "affine_ptr": "*fp32", **tube_ints, "eps": "fp32"}
            configs.append(KernelConfig(
                "norm_mse_tube_fwd", _norm_mse_tube_fwd_kernel,
                signature_of(_norm_mse_tube_fwd_kernel, {**base, "rows_ptr": "*fp32"}, ce), ce,
                ("pred_ptr", "imgs_ptr", "weight_ptr", "ids_ptr", "poff_ptr", "affine_ptr", "rows_ptr"),
                _tube_warps(512, 4)))
            configs.append(KernelConfig(
                "norm_mse_tube_bwd", _norm_mse_tube_bwd_kernel,
                signature_of(_norm_mse_tube_bwd_kernel, {**base, "grad_ptr": "*fp32", "wsum_ptr": "*fp32",
                                                         "dpred_ptr": tp}, ce), ce,
                ("pred_ptr", "imgs_ptr", "weight_ptr", "ids_ptr", "poff_ptr", "affine_ptr", "dpred_ptr", "grad_ptr",
                 "wsum_ptr"), _tube_warps(512, 4)))
    for has_rows in (False, True):
        ce = {"HAS_ROWS": has_rows, "BLOCK": SUM_BLOCK}
        configs.append(KernelConfig(
            "norm_mse_loss_sum", _norm_mse_loss_sum_kernel,
            signature_of(_norm_mse_loss_sum_kernel, {"rows_ptr": "*fp32", "weight_ptr": "*fp32", "out_ptr": "*fp32",
                                                     "R": "i32"}, ce),
            ce, ("rows_ptr", "weight_ptr", "out_ptr"), SUM_WARPS))  # N*M floats of any count: no width claim
    return configs
