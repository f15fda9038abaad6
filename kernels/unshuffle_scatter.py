"""Triton kernels for ``fastmae.ops.unshuffle_scatter``: the MAE decoder input in one pass.

Forward: a program writes a ``[BLOCK_R, BLOCK_D]`` tile of ``out [N, 1+L, D]``. Output row ``o``
of sample ``n`` reads its source once: ``x[n, 0]`` for the cls row, ``x[n, 1 + r]`` when
``r = ids_restore[n, o-1] < K`` (a kept patch), else the mask token; adds ``pos_embed[o]`` in fp32
and rounds once. Rows run along ``D``, which is contiguous: ``VEC``-wide vector accesses.

Backward: ``dx`` is the scatter of ``grad`` rows back to their source rows (a permutation: each
``dx`` row written once); ``d mask_token`` is the sum of ``grad`` over removed rows and
``d pos_embed`` the sum over ``N``. No float atomics: each program reduces its own tile into an
fp32 partial ``[D]`` row of a ``[programs, D]`` buffer, and a second small kernel sums the partial
rows in a fixed order, so the mask-token gradient is bitwise reproducible. Two schedules:

- without the position gradient (MAE's fixed sin-cos table): a program per ``(n, row split,
  D block)`` walks a split of its sample's ``1+L`` rows (whole ``BLOCK_R`` blocks; splits only as
  many as needed for about ``TARGET_PROGRAMS`` programs); the partial buffer is ``[N * splits, D]``;
- with it: a program per ``(row block, D block)`` walks all ``N`` samples and also owns its
  ``dpos`` tile (summed in registers, written once); the partial buffer is ``[row blocks, D]``.

Both read ``grad`` once and write ``dx`` (and ``dpos``) once.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import KernelConfig, dtype_name, launch, signature_of, unit_last, vec_choices, vec_width

NUM_WARPS = 4
NUM_WARPS_POS = 2  # the position-gradient schedule has small tiles: 2 warps keep 16-byte accesses
BLOCK_D_CHOICES = (32, 64, 128)  # columns per tile
TILE = 2048  # elements per tile (BLOCK_R * BLOCK_D): forward and the per-sample backward
TILE_POS = 512  # elements per tile of the backward that also sums the position gradient
TARGET_PROGRAMS = 512  # per-sample backward: split rows until about this many programs (no device query)
PARTIAL_ROWS = 16  # partial rows summed per step by the mask-token reduction
PARTIAL_COLS = 128


@triton.jit
def _unshuffle_scatter_fwd_kernel(
    x_ptr,  # [N, 1+K, D] encoder tokens, cls first, unit stride along D
    tok_ptr,  # [D] mask token
    ids_ptr,  # [N, L] int64 ids_restore
    pos_ptr,  # [1+L, D] position embedding (read only when HAS_POS)
    out_ptr,  # [N, 1+L, D] decoder input
    L, K,  # patches, kept patches
    D_vecs,  # D in VEC-wide vectors
    s_x_n_vecs, s_x_r_vecs,  # x strides in vectors
    s_pos_r_vecs,  # pos_embed row stride in vectors
    s_out_n_vecs, s_out_r_vecs,  # out strides in vectors
    s_ids_n,  # ids_restore stride along N (elements)
    HAS_POS: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_r = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    row_blocks = tl.cdiv(L + 1, BLOCK_R)
    n = pid_r // row_blocks
    o = (pid_r % row_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)  # output rows
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D_vecs * VEC
    row_ok = o <= L
    is_cls = o == 0
    r = tl.load(ids_ptr + n * s_ids_n + (o - 1), mask=row_ok & (o > 0), other=0)
    kept = is_cls | (r < K)
    src_row = tl.where(is_cls, 0, r + 1)
    ok = row_ok[:, None] & d_ok[None, :]
    xs = tl.load(x_ptr + n * (s_x_n_vecs * VEC) + src_row[:, None] * (s_x_r_vecs * VEC) + d[None, :],
                 mask=ok & kept[:, None], other=0.0).to(tl.float32)
    tok = tl.load(tok_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
    vals = tl.where(kept[:, None], xs, tok[None, :])
    if HAS_POS:
        vals += tl.load(pos_ptr + o[:, None] * (s_pos_r_vecs * VEC) + d[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + n * (s_out_n_vecs * VEC) + o[:, None] * (s_out_r_vecs * VEC) + d[None, :],
             vals.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _unshuffle_scatter_bwd_tile(grad_ptr, ids_ptr, dx_ptr, n, o, d, d_ok, L, K, s_grad_n, s_grad_r, s_dx_n, s_dx_r,
                                s_ids_n):
    """Copy one [rows, D block] tile of grad rows to their dx rows; return it in fp32 with the
    rows that held a mask token."""
    row_ok = o <= L
    is_cls = o == 0
    r = tl.load(ids_ptr + n * s_ids_n + (o - 1), mask=row_ok & (o > 0), other=0)
    kept = is_cls | (r < K)
    dst_row = tl.where(is_cls, 0, r + 1)
    ok = row_ok[:, None] & d_ok[None, :]
    g = tl.load(grad_ptr + n * s_grad_n + o[:, None] * s_grad_r + d[None, :], mask=ok, other=0.0)
    tl.store(dx_ptr + n * s_dx_n + dst_row[:, None] * s_dx_r + d[None, :], g, mask=ok & kept[:, None])
    return g.to(tl.float32), row_ok & (o > 0) & (r >= K)


@triton.jit
def _unshuffle_scatter_bwd_kernel(
    grad_ptr,  # [N, 1+L, D] gradient of the decoder input, unit stride along D
    ids_ptr,  # [N, L] int64 ids_restore
    dx_ptr,  # [N, 1+K, D] gradient of the encoder tokens
    dpos_ptr,  # [1+L, D] position gradient (written only when NEED_POS)
    part_ptr,  # [programs along axis 0, D] fp32 partial mask-token gradients
    N, L, K,  # samples, patches, kept patches
    row_splits, rows_per_split,  # without NEED_POS: splits of each sample's rows, rows per split
    D_vecs,  # D in VEC-wide vectors
    s_grad_n_vecs, s_grad_r_vecs,  # grad strides in vectors
    s_dx_n_vecs, s_dx_r_vecs,  # dx strides in vectors
    s_dpos_r_vecs,  # dpos row stride in vectors
    s_part_r_vecs,  # partial buffer row stride in vectors
    s_ids_n,  # ids_restore stride along N (elements)
    NEED_POS: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D_vecs * VEC
    s_grad_n = s_grad_n_vecs * VEC
    s_grad_r = s_grad_r_vecs * VEC
    s_dx_n = s_dx_n_vecs * VEC
    s_dx_r = s_dx_r_vecs * VEC
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)  # mask-token gradient of this program
    if NEED_POS:
        # one row block, every sample: the position gradient of these rows is complete here
        o = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        pos_acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        for n in range(0, N):
            n64 = tl.cast(n, tl.int64)  # sample offsets in int64
            g, removed = _unshuffle_scatter_bwd_tile(grad_ptr, ids_ptr, dx_ptr, n64, o, d, d_ok, L, K, s_grad_n,
                                                     s_grad_r, s_dx_n, s_dx_r, s_ids_n)
            pos_acc += g
            acc += tl.where(removed[:, None], g, 0.0)
        tl.store(dpos_ptr + o[:, None] * (s_dpos_r_vecs * VEC) + d[None, :], pos_acc.to(dpos_ptr.dtype.element_ty),
                 mask=(o <= L)[:, None] & d_ok[None, :])
    else:
        # one split of one sample's rows: whole BLOCK_R blocks (rows_per_split is a multiple of it)
        n = pid // row_splits
        first = (pid % row_splits) * rows_per_split
        for o0 in range(first, tl.minimum(first + rows_per_split, L + 1), BLOCK_R):
            o = o0 + tl.arange(0, BLOCK_R)
            g, removed = _unshuffle_scatter_bwd_tile(grad_ptr, ids_ptr, dx_ptr, n, o, d, d_ok, L, K, s_grad_n,
                                                     s_grad_r, s_dx_n, s_dx_r, s_ids_n)
            acc += tl.where(removed[:, None], g, 0.0)
    tl.store(part_ptr + pid * (s_part_r_vecs * VEC) + d, tl.sum(acc, axis=0), mask=d_ok)


@triton.jit
def _unshuffle_scatter_dmask_kernel(
    part_ptr,  # [P, D] fp32 partial mask-token gradients, contiguous
    dmask_ptr,  # [D] mask-token gradient
    P, D,  # partial rows, width
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    d = pid * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    acc = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):  # fixed order: bitwise reproducible
        rows = (p0 + tl.arange(0, BLOCK_P)).to(tl.int64)
        acc += tl.load(part_ptr + rows[:, None] * D + d[None, :], mask=(rows < P)[:, None] & d_ok[None, :], other=0.0)
    tl.store(dmask_ptr + d, tl.sum(acc, axis=0).to(dmask_ptr.dtype.element_ty), mask=d_ok)


# ---------------------------------------------------------------------------- launchers
def _block_d(D: int) -> int:
    return min(BLOCK_D_CHOICES[-1], max(BLOCK_D_CHOICES[0], triton.next_power_of_2(D)))


def _block_r(block_d: int, need_pos: bool) -> int:
    return (TILE_POS if need_pos else TILE) // block_d


def unshuffle_scatter_forward(x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor,
                              pos_embed: Optional[torch.Tensor]) -> torch.Tensor:
    """``x [N, 1+K, D]``, ``mask_token [D]``, ``ids_restore [N, L]``, ``pos_embed [1+L, D]`` or None
    -> ``[N, 1+L, D]`` in ``x.dtype``."""
    if x.dim() != 3 or not unit_last(x):
        raise ValueError(f"x must be [N, 1+K, D] with unit stride along D, got {tuple(x.shape)} {x.stride()}")
    N, K1, D = x.shape
    if ids_restore.dim() != 2 or ids_restore.shape[0] != N or ids_restore.dtype != torch.int64 \
            or not unit_last(ids_restore):
        raise ValueError(f"ids_restore must be int64 [N={N}, L] with unit stride along L, got {ids_restore.dtype} "
                         f"{tuple(ids_restore.shape)} strides {ids_restore.stride()}")
    L = ids_restore.shape[1]
    if mask_token.shape != (D,) or mask_token.dtype != x.dtype or mask_token.stride(0) != 1:
        raise ValueError(f"mask_token must be a contiguous [{D}] {x.dtype} tensor, got {mask_token.dtype} "
                         f"{tuple(mask_token.shape)}")
    if pos_embed is not None and (pos_embed.shape != (L + 1, D) or pos_embed.dtype != x.dtype
                                  or not unit_last(pos_embed)):
        raise ValueError(f"pos_embed must be [{L + 1}, {D}] {x.dtype} with unit stride along D, got "
                         f"{pos_embed.dtype} {tuple(pos_embed.shape)}")
    out = torch.empty(N, L + 1, D, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    pos = pos_embed if pos_embed is not None else mask_token  # never read without HAS_POS
    s_pos = pos_embed.stride(0) if pos_embed is not None else D
    vec = vec_width(x.dtype, [D, *x.stride()[:2], *out.stride()[:2], s_pos], [x, mask_token, pos, out])
    block_d = _block_d(D)
    block_r = _block_r(block_d, False)
    grid = (N * triton.cdiv(L + 1, block_r), triton.cdiv(D, block_d))
    launch(_unshuffle_scatter_fwd_kernel, grid,
           x, mask_token, ids_restore, pos, out, L, K1 - 1, D // vec,
           x.stride(0) // vec, x.stride(1) // vec, s_pos // vec,
           out.stride(0) // vec, out.stride(1) // vec, ids_restore.stride(0),
           HAS_POS=pos_embed is not None, VEC=vec, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=NUM_WARPS)
    return out


def unshuffle_scatter_backward(grad: torch.Tensor, ids_restore: torch.Tensor, K: int, need_pos_grad: bool):
    """``grad [N, 1+L, D]`` -> ``(dx [N, 1+K, D], dmask [D], dpos [1+L, D] or [0])`` in ``grad.dtype``.
    ``ids_restore`` must be a permutation of ``0..L-1`` per sample (as masking produces)."""
    if grad.dim() != 3 or not unit_last(grad):
        raise ValueError(f"grad must be [N, 1+L, D] with unit stride along D, got {tuple(grad.shape)} {grad.stride()}")
    N, L1, D = grad.shape
    L, K = L1 - 1, int(K)
    if tuple(ids_restore.shape) != (N, L) or ids_restore.dtype != torch.int64 or not unit_last(ids_restore):
        raise ValueError(f"ids_restore must be int64 [{N}, {L}] with unit stride along L, got {ids_restore.dtype} "
                         f"{tuple(ids_restore.shape)} strides {ids_restore.stride()}")
    if not 0 <= K <= L:
        raise ValueError(f"K = {K} kept tokens must be within [0, L = {L}]")
    # each dx row is written by the one output row that reads it: ids_restore must be a permutation
    # (a repeat would race, a gap would leave a row unwritten), which fastmae.ops checks first
    dev, dtype = grad.device, grad.dtype
    dx = torch.empty(N, K + 1, D, dtype=dtype, device=dev)
    dmask = torch.empty(D, dtype=dtype, device=dev)
    dpos = torch.empty(L1, D, dtype=dtype, device=dev) if need_pos_grad else torch.empty(0, dtype=dtype, device=dev)
    if N == 0 or D == 0:
        dmask.zero_()
        dpos.zero_()
        return dx, dmask, dpos
    block_d = _block_d(D)
    block_r = _block_r(block_d, need_pos_grad)
    row_blocks, d_blocks = triton.cdiv(L1, block_r), triton.cdiv(D, block_d)
    if need_pos_grad:
        programs, splits, blocks_per_split = row_blocks, 1, row_blocks
    else:
        splits = min(row_blocks, max(1, triton.cdiv(TARGET_PROGRAMS, N * d_blocks)))
        blocks_per_split = triton.cdiv(row_blocks, splits)
        splits = triton.cdiv(row_blocks, blocks_per_split)
        programs = N * splits
    part = torch.empty(programs, D, dtype=torch.float32, device=dev)
    dpos_arg = dpos if need_pos_grad else part  # never written without NEED_POS
    vec = vec_width(dtype, [D, *grad.stride()[:2], *dx.stride()[:2], dpos_arg.stride(0), part.stride(0)],
                    [grad, dx, dpos_arg, part])
    launch(_unshuffle_scatter_bwd_kernel, (programs, d_blocks),
           grad, ids_restore, dx, dpos_arg, part, N, L, K, splits, blocks_per_split * block_r, D // vec,
           grad.stride(0) // vec, grad.stride(1) // vec, dx.stride(0) // vec, dx.stride(1) // vec,
           dpos_arg.stride(0) // vec, part.stride(0) // vec, ids_restore.stride(0),
           NEED_POS=bool(need_pos_grad), VEC=vec, BLOCK_R=block_r, BLOCK_D=block_d,
           num_warps=NUM_WARPS_POS if need_pos_grad else NUM_WARPS)
    launch(_unshuffle_scatter_dmask_kernel, (triton.cdiv(D, PARTIAL_COLS),),
           part, dmask, programs, D, BLOCK_P=PARTIAL_ROWS, BLOCK_D=PARTIAL_COLS, num_warps=NUM_WARPS)
    return dx, dmask, dpos


# ---------------------------------------------------------------------------- configurations
def launch_configs() -> list[KernelConfig]:
    """Every configuration the launchers can choose: dtype x VEC x BLOCK_D x (HAS_POS | NEED_POS)."""
    fwd_ints = dict.fromkeys(["L", "K", "D_vecs", "s_x_n_vecs", "s_x_r_vecs", "s_pos_r_vecs", "s_out_n_vecs",
                              "s_out_r_vecs", "s_ids_n"], "i32")
    bwd_ints = dict.fromkeys(["N", "L", "K", "row_splits", "rows_per_split", "D_vecs", "s_grad_n_vecs", "s_grad_r_vecs", "s_dx_n_vecs",
                              "s_dx_r_vecs", "s_dpos_r_vecs", "s_part_r_vecs", "s_ids_n"], "i32")
    configs = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t = "*" + dtype_name(dtype)
        for vec in vec_choices(dtype):
            width = vec * dtype.itemsize
            for block_d in BLOCK_D_CHOICES:
                for flag in (False, True):
                    ce = {"HAS_POS": flag, "VEC": vec, "BLOCK_R": _block_r(block_d, False), "BLOCK_D": block_d}
                    types = {"x_ptr": t, "tok_ptr": t, "ids_ptr": "*i64", "pos_ptr": t, "out_ptr": t, **fwd_ints}
                    configs.append(KernelConfig(
                        "unshuffle_scatter_fwd", _unshuffle_scatter_fwd_kernel,
                        signature_of(_unshuffle_scatter_fwd_kernel, types, ce), ce,
                        ("x_ptr", "tok_ptr", "ids_ptr", "pos_ptr", "out_ptr"), NUM_WARPS, width, width))
                    ce = {"NEED_POS": flag, "VEC": vec, "BLOCK_R": _block_r(block_d, flag), "BLOCK_D": block_d}
                    part_t = t if flag else "*fp32"  # without NEED_POS the partial buffer stands in for dpos
                    types = {"grad_ptr": t, "ids_ptr": "*i64", "dx_ptr": t, "dpos_ptr": part_t, "part_ptr": "*fp32",
                             **bwd_ints}
                    configs.append(KernelConfig(
                        "unshuffle_scatter_bwd", _unshuffle_scatter_bwd_kernel,
                        signature_of(_unshuffle_scatter_bwd_kernel, types, ce), ce,
                        ("grad_ptr", "ids_ptr", "dx_ptr", "dpos_ptr", "part_ptr"),
                        NUM_WARPS_POS if flag else NUM_WARPS, width, width))
        ce = {"BLOCK_P": PARTIAL_ROWS, "BLOCK_D": PARTIAL_COLS}
        configs.append(KernelConfig(
            "unshuffle_scatter_dmask", _unshuffle_scatter_dmask_kernel,
            signature_of(_unshuffle_scatter_dmask_kernel, {"part_ptr": "*fp32", "dmask_ptr": t, "P": "i32", "D": "i32"},
                         ce), ce, ("part_ptr", "dmask_ptr"), NUM_WARPS))
    return configs
