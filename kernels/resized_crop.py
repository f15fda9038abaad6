"""Triton kernels for ``fastmae.ops.resized_crop``: crop, antialiased resize, flip and normalise a
batch of uint8 images of different sizes in one pass, with no intermediate image.

The resampler is torchvision's uint8 ``resize(antialias=True)`` (PIL's ImagingResample, as torch's
CPU kernel implements it), reproduced in its integer arithmetic. Per axis of input length ``n``
(the box's height or width) resized to ``S``: ``scale = n / S``, the filter widened by
``filterscale = max(scale, 1)``; output ``i`` reads inputs ``m`` in
``[trunc(center - support + 0.5), trunc(center + support + 0.5))`` clipped to the axis, where
``center = (i + 0.5) * scale`` and ``support = filter_support * filterscale``, with weights
``f((m + 0.5 - center) / filterscale)`` (bicubic ``a = -0.5``, support 2; bilinear, support 1)
normalised by their sum. As torch does, the normalised weights are quantised to fixed point,
``round(w * 2^prec)`` (half away from zero), with ``prec`` the most bits (at most 22) that keep the
axis's largest weight times ``2^(prec+1)`` below 2^15; each pass sums integers, adds
``2^(prec-1)``, shifts right by ``prec`` and clamps to [0, 255]: the horizontal pass over the box's
rows, then the vertical pass over its results.

Arithmetic. The tap ranges are exact: with ``big = max(n, S)`` (``S * filterscale``),
``2S (center -+ support + 0.5) = (2i + 1) n -+ 2 filter_support big + S`` in integers, and the
filter argument of input ``m`` is ``((2m + 1) S - (2i + 1) n) / (2 big)``. Weights are evaluated in
fp64, as torch's are (fp32 would put about one weight in fifty on the other side of a
quantisation step, and a pixel in a thousand one grey level off); the sums are int32, as torch's.
The pixels are those of ``resized_crop_ref`` bit for bit (up to fp64 contraction differences,
which move a weight only at an exact quantisation tie).

Kernels. ``_resized_crop_precision_kernel``: one program per (image, axis) computes ``prec`` from
the weights of the axis's ``S`` outputs into an ``[N, 2]`` int32 buffer (the only scratch).
``_resized_crop_fwd_kernel``: a program computes a ``[BLOCK_Y, BLOCK_X]`` tile of output pixels
of one image for the ``NC`` (at most 4) channels of a launch (one launch per group of 4 channels:
one for RGB; mean and std are scalar arguments). Each thread holds one column and
``BLOCK_Y / num_warps`` rows, so each tap's weight, evaluated once, serves those rows and every
channel. For each vertical tap row of its output rows it recomputes the horizontal pass at that row
(a loop over the horizontal taps: one byte load per row, channel and tap), shifts and clamps it,
and accumulates it with the vertical weight. Tap counts come from the boxes on the device: the
loops run to the largest count in the tile (at most ``2 ceil(support) + 1``), masking the shorter
ones. A flipped image's program computes the mirrored column of each output column, so stores
stay contiguous. Then ``(pixel / 255 - mean[c]) / std[c]`` with correctly rounded fp32 divisions
(what the reference computes) and one cast to the output dtype.

The launcher reads shapes and Python scalars only: no host sync, no cached device tensor; it
traces under ``torch.compile`` (two ``wrap_triton`` launches, more for over 4 channels).
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, KernelConfig, dtype_name, launch, signature_of

BLOCK_Y = 16  # output rows per tile (4 per thread: each tap's weight serves 4 rows x NC channels)
BLOCK_X = 32  # output columns per tile (a warp's 32 threads: contiguous stores)
NUM_WARPS = 4
MAX_NC = 4  # channels per launch (mean/std of each are scalar arguments)
PREC_BLOCK = 128  # output indices per step of the precision kernel
PREC_WARPS = 4


@triton.jit
def _resized_crop_filter(x, BICUBIC: tl.constexpr):
    """PIL's filter at ``x`` (torch's ``aa_filter``, same operations): bicubic with a = -0.5
    (support 2), or bilinear (support 1)."""
    ax = tl.abs(x)
    if BICUBIC:
        near = (1.5 * ax - 2.5) * ax * ax + 1.0  # ((a + 2)|x| - (a + 3)) x^2 + 1
        far = ((-0.5 * ax + 2.5) * ax - 4.0) * ax + 2.0  # ((a|x| - 5a)|x| + 8a)|x| - 4a
        w = tl.where(ax < 1.0, near, tl.where(ax < 2.0, far, 0.0))
    else:
        w = tl.where(ax < 1.0, 1.0 - ax, 0.0)
    return w


@triton.jit
def _resized_crop_taps(i, n, S, SUPPORT: tl.constexpr):
    """Taps of output index ``i`` (int tensor) on an axis of input length ``n`` (int64) resized to
    ``S``: first input index, tap count, and the fp64 filter argument of the first tap and step
    between taps (see the module doc)."""
    big = tl.maximum(n, S)  # S * filterscale
    two_c = (2 * i + 1).to(tl.int64) * n  # 2S * center
    lo = tl.maximum((two_c - 2 * SUPPORT * big + S) // (2 * S), 0)  # negative: clipped either way
    hi = tl.minimum((two_c + 2 * SUPPORT * big + S) // (2 * S), n)
    big_f = big.to(tl.float64)
    arg0 = ((2 * lo + 1) * S - two_c).to(tl.float64) / (2.0 * big_f)
    step = (big * 0 + S).to(tl.float64) / big_f
    return lo.to(tl.int32), (hi - lo).to(tl.int32), arg0, step


@triton.jit
def _resized_crop_fixed(w, scale):
    """A weight in fixed point, as torch's int16 weights: ``w * scale`` (fp64) rounded half away
    from zero."""
    v = w * scale
    return (v + tl.where(v < 0.0, -0.5, 0.5)).to(tl.int32)


@triton.jit
def _resized_crop_shift(acc, prec):
    """A pass's pixel, as torch rounds it: ``(acc + 2^(prec-1)) >> prec`` clamped to [0, 255]."""
    return tl.minimum(tl.maximum((acc + (1 << (prec - 1))) >> prec, 0), 255)


@triton.jit
def _resized_crop_precision_kernel(
    boxes_ptr,  # [N, 4] int64, (top, left, height, width) of each crop, contiguous
    prec_ptr,  # [N, 2] int32 out: fixed-point bits of the vertical and horizontal weights
    S,  # output size
    BICUBIC: tl.constexpr,
    BLOCK: tl.constexpr,  # output indices per step
):
    """One program per image and axis: torch's weight precision, the first ``p < 22`` with
    ``(int)(0.5 + wt_max * 2^(p+1)) >= 2^15`` (else 22), where ``wt_max`` is the largest
    normalised weight over the axis's ``S`` outputs."""
    SUPPORT: tl.constexpr = 2 if BICUBIC else 1
    pid = tl.program_id(0).to(tl.int64)  # 2 n + axis
    n_in = tl.load(boxes_ptr + 4 * (pid // 2) + 2 + pid % 2)  # box height, then width
    wt_max = tl.zeros([BLOCK], dtype=tl.float64)
    for i0 in range(0, S, BLOCK):
        i = tl.minimum(i0 + tl.arange(0, BLOCK), S - 1)
        lo, size, arg0, step = _resized_crop_taps(i, n_in, S, SUPPORT)
        total = tl.zeros([BLOCK], dtype=tl.float64)
        top_w = tl.zeros([BLOCK], dtype=tl.float64)
        for j in range(0, tl.max(size)):
            w = tl.where(j < size, _resized_crop_filter(arg0 + j * step, BICUBIC), 0.0)
            total += w
            top_w = tl.maximum(top_w, w)
        wt_max = tl.maximum(wt_max, tl.where(total != 0.0, top_w / total, 0.0))
    # the left side grows with p: p is the count of the values below 2^15
    p = tl.arange(0, 32)
    small = (p < 22) & ((0.5 + tl.max(wt_max) * (2 << p.to(tl.int64)).to(tl.float64)) < 32768.0)
    tl.store(prec_ptr + pid, tl.sum(small.to(tl.int32)))


@triton.jit
def _resized_crop_store(out_ptr, offs, pixel, mean, std, mask):
    """Scale a pixel to [0, 1], normalise (correctly rounded fp32 divisions) and store."""
    x = tl.math.div_rn(pixel.to(tl.float32), 255.0)
    tl.store(out_ptr + offs, tl.math.div_rn(x - mean, std).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _resized_crop_fwd_kernel(
    data_ptr,  # [bytes] uint8, every image CHW, back to back
    offsets_ptr,  # [N] int64, first byte of each image in data
    sizes_ptr,  # [N, 2] int64, (H, W) of each image, contiguous
    boxes_ptr,  # [N, 4] int64, (top, left, height, width) of each crop, contiguous
    flips_ptr,  # [N] bool, mirror the output left-right
    prec_ptr,  # [N, 2] int32, fixed-point bits of the vertical and horizontal weights
    out_ptr,  # [N, C, S, S] normalised pixels, contiguous
    C, S, c0,  # channels, output size, first channel of this launch
    tiles_x, tiles,  # tiles per band of output rows, tiles per image
    m0, m1, m2, m3,  # mean of channels c0 .. c0 + NC - 1 (fp32)
    s0, s1, s2, s3,  # std of channels c0 .. c0 + NC - 1 (fp32)
    NC: tl.constexpr,  # channels of this launch, 1 to 4
    BICUBIC: tl.constexpr,
    BLOCK_Y: tl.constexpr,
    BLOCK_X: tl.constexpr,
):
    SUPPORT: tl.constexpr = 2 if BICUBIC else 1
    pid = tl.program_id(0).to(tl.int64)
    n = pid // tiles
    t = pid % tiles
    H = tl.load(sizes_ptr + 2 * n)
    W = tl.load(sizes_ptr + 2 * n + 1)
    top = tl.load(boxes_ptr + 4 * n)
    left = tl.load(boxes_ptr + 4 * n + 1)
    bh = tl.load(boxes_ptr + 4 * n + 2)
    bw = tl.load(boxes_ptr + 4 * n + 3)
    flip = tl.load(flips_ptr + n) != 0
    prec_y = tl.load(prec_ptr + 2 * n)
    prec_x = tl.load(prec_ptr + 2 * n + 1)
    plane = H * W
    src_ptr = data_ptr + tl.load(offsets_ptr + n) + c0 * plane  # first channel of this launch

    yo = (t // tiles_x) * BLOCK_Y + tl.arange(0, BLOCK_Y)[:, None]  # [BY, 1] output rows
    xo = (t % tiles_x) * BLOCK_X + tl.arange(0, BLOCK_X)[None, :]  # [1, BX] output columns
    y_ok = yo < S
    x_ok = xo < S
    ys = tl.minimum(yo, S - 1)  # padding lanes compute a real pixel, never stored
    xs = tl.minimum(xo, S - 1)
    xs = tl.where(flip, S - 1 - xs, xs)  # the column whose value lands at xo

    ymin, ysize, ay0, sy = _resized_crop_taps(ys, bh, S, SUPPORT)
    xmin, xsize, ax0, sx = _resized_crop_taps(xs, bw, S, SUPPORT)
    ny = tl.max(ysize)
    nx = tl.max(xsize)
    # fixed-point scale of each output's weights: 2^prec / (the sum of its weights)
    vtot = tl.zeros([BLOCK_Y, 1], dtype=tl.float64)
    for ty in range(0, ny):
        vtot += tl.where(ty < ysize, _resized_crop_filter(ay0 + ty * sy, BICUBIC), 0.0)
    htot = tl.zeros([1, BLOCK_X], dtype=tl.float64)
    for j in range(0, nx):
        htot += tl.where(j < xsize, _resized_crop_filter(ax0 + j * sx, BICUBIC), 0.0)
    v_scale = (1 << prec_y).to(tl.float64) / vtot
    h_scale = (1 << prec_x).to(tl.float64) / htot
    x_taps = tl.where(x_ok, xsize, 0)  # padding columns load nothing

    acc0 = tl.zeros([BLOCK_Y, BLOCK_X], dtype=tl.int32)
    acc1 = tl.zeros([BLOCK_Y, BLOCK_X], dtype=tl.int32)
    acc2 = tl.zeros([BLOCK_Y, BLOCK_X], dtype=tl.int32)
    acc3 = tl.zeros([BLOCK_Y, BLOCK_X], dtype=tl.int32)
    for ty in range(0, ny):
        row_ok = y_ok & (ty < ysize)  # [BY, 1]
        wy = _resized_crop_fixed(tl.where(ty < ysize, _resized_crop_filter(ay0 + ty * sy, BICUBIC), 0.0),
                                 v_scale)  # [BY, 1]
        m = tl.minimum(ymin + ty, bh - 1)  # box row of this tap (clipped where masked)
        p = src_ptr + ((top + m) * W + left + xmin)  # [BY, BX] first horizontal tap, channel 0
        h0 = tl.zeros([BLOCK_Y, BLOCK_X], dtype=tl.int32)
        h1 = tl.zeros([BLOCK_Y, BLOCK_X], dtype=tl.int32)
        h2 = tl.zeros([BLOCK_Y, BLOCK_X], dtype=tl.int32)
        h3 = tl.zeros([BLOCK_Y, BLOCK_X], dtype=tl.int32)
        for j in range(0, nx):
            k = _resized_crop_fixed(_resized_crop_filter(ax0 + j * sx, BICUBIC), h_scale)  # [1, BX]
            ok = row_ok & (j < x_taps)
            q = p + j
            h0 += k * tl.load(q, mask=ok, other=0).to(tl.int32)
            if NC > 1:
                h1 += k * tl.load(q + plane, mask=ok, other=0).to(tl.int32)
            if NC > 2:
                h2 += k * tl.load(q + 2 * plane, mask=ok, other=0).to(tl.int32)
            if NC > 3:
                h3 += k * tl.load(q + 3 * plane, mask=ok, other=0).to(tl.int32)
        acc0 += wy * _resized_crop_shift(h0, prec_x)
        if NC > 1:
            acc1 += wy * _resized_crop_shift(h1, prec_x)
        if NC > 2:
            acc2 += wy * _resized_crop_shift(h2, prec_x)
        if NC > 3:
            acc3 += wy * _resized_crop_shift(h3, prec_x)

    ok = y_ok & x_ok
    c_out = n * C + c0  # output plane of channel c0 (int64)
    _resized_crop_store(out_ptr, (c_out * S + yo) * S + xo, _resized_crop_shift(acc0, prec_y), m0, s0, ok)
    if NC > 1:
        _resized_crop_store(out_ptr, ((c_out + 1) * S + yo) * S + xo, _resized_crop_shift(acc1, prec_y), m1, s1, ok)
    if NC > 2:
        _resized_crop_store(out_ptr, ((c_out + 2) * S + yo) * S + xo, _resized_crop_shift(acc2, prec_y), m2, s2, ok)
    if NC > 3:
        _resized_crop_store(out_ptr, ((c_out + 3) * S + yo) * S + xo, _resized_crop_shift(acc3, prec_y), m3, s3, ok)


# ---------------------------------------------------------------------------- launcher
def resized_crop(data: torch.Tensor, offsets: torch.Tensor, sizes: torch.Tensor, boxes: torch.Tensor,
                 flips: torch.Tensor, channels: int, size: int, mean: Sequence[float], std: Sequence[float],
                 dtype: torch.dtype, bicubic: bool) -> torch.Tensor:
    """``[N, channels, size, size]`` of ``dtype``: each packed uint8 image cropped to its box,
    resized (antialiased bicubic or bilinear), mirrored where ``flips``, scaled to [0, 1] and
    normalised by ``mean``/``std`` (the arguments of ``fastmae.ops.resized_crop``'s op, whose value
    checks have run)."""
    N = offsets.shape[0]
    C, S = int(channels), int(size)
    if data.dim() != 1 or data.dtype != torch.uint8:
        raise ValueError(f"data must be 1-D uint8, got {data.dtype} of shape {tuple(data.shape)}")
    for name, t, shape in (("offsets", offsets, (N,)), ("sizes", sizes, (N, 2)), ("boxes", boxes, (N, 4))):
        if t.dtype != torch.int64 or tuple(t.shape) != shape:
            raise ValueError(f"{name} must be int64 {list(shape)}, got {t.dtype} {tuple(t.shape)}")
    if flips.dtype != torch.bool or tuple(flips.shape) != (N,):
        raise ValueError(f"flips must be bool [{N}], got {flips.dtype} {tuple(flips.shape)}")
    if C < 1 or S < 1 or len(mean) != C or len(std) != C:
        raise ValueError(f"need channels >= 1, size >= 1 and one mean and std per channel, got channels {C}, "
                         f"size {S}, {len(mean)} means, {len(std)} stds")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype}")
    out = torch.empty((N, C, S, S), dtype=dtype, device=data.device)
    if N == 0:
        return out
    # no-ops for the op's own (contiguous) arguments
    data, offsets, sizes, boxes, flips = (t.contiguous() for t in (data, offsets, sizes, boxes, flips))
    prec = torch.empty((N, 2), dtype=torch.int32, device=data.device)
    launch(_resized_crop_precision_kernel, (2 * N,), boxes, prec, S, BICUBIC=bool(bicubic), BLOCK=PREC_BLOCK,
           num_warps=PREC_WARPS)
    tiles_x = triton.cdiv(S, BLOCK_X)
    tiles = triton.cdiv(S, BLOCK_Y) * tiles_x
    for c0 in range(0, C, MAX_NC):
        nc = min(MAX_NC, C - c0)
        means = [float(v) for v in mean[c0:c0 + nc]] + [0.0] * (MAX_NC - nc)
        stds = [float(v) for v in std[c0:c0 + nc]] + [1.0] * (MAX_NC - nc)
        launch(_resized_crop_fwd_kernel, (N * tiles,),
               data, offsets, sizes, boxes, flips, prec, out, C, S, c0, tiles_x, tiles, *means, *stds,
               **_constexprs(nc, bicubic), num_warps=NUM_WARPS)
    return out


def _constexprs(nc: int, bicubic: bool) -> dict:
    return {"NC": nc, "BICUBIC": bool(bicubic), "BLOCK_Y": BLOCK_Y, "BLOCK_X": BLOCK_X}


# ---------------------------------------------------------------------------- configurations
def launch_configs() -> list[KernelConfig]:
    """Every configuration the launcher can choose: output dtype x channels per launch x filter.
    Byte gathers and rows of any length: no vector-width claim."""
    ints = dict.fromkeys(["C", "S", "c0", "tiles_x", "tiles"], "i32")
    floats = dict.fromkeys(["m0", "m1", "m2", "m3", "s0", "s1", "s2", "s3"], "fp32")
    configs = []
    for dtype in FLOAT_DTYPES:
        for nc in range(1, MAX_NC + 1):
            for bicubic in (False, True):
                ce = _constexprs(nc, bicubic)
                types = {"data_ptr": "*u8", "offsets_ptr": "*i64", "sizes_ptr": "*i64", "boxes_ptr": "*i64",
                         "flips_ptr": "*i1", "prec_ptr": "*i32", "out_ptr": "*" + dtype_name(dtype), **ints, **floats}
                configs.append(KernelConfig(
                    "resized_crop_fwd", _resized_crop_fwd_kernel,
                    signature_of(_resized_crop_fwd_kernel, types, ce), ce,
                    ("data_ptr", "offsets_ptr", "sizes_ptr", "boxes_ptr", "flips_ptr", "prec_ptr", "out_ptr"),
                    NUM_WARPS))
    for bicubic in (False, True):
        ce = {"BICUBIC": bicubic, "BLOCK": PREC_BLOCK}
        configs.append(KernelConfig(
            "resized_crop_precision", _resized_crop_precision_kernel,
            signature_of(_resized_crop_precision_kernel, {"boxes_ptr": "*i64", "prec_ptr": "*i32", "S": "i32"}, ce),
            ce, ("boxes_ptr", "prec_ptr"), PREC_WARPS))
    return configs
