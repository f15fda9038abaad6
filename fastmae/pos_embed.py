"""Fixed 2-D sin-cos position tables in the official MAE layout.

The official code (``util/pos_embed.py``) builds the grid with ``np.meshgrid(grid_w, grid_h)``,
so the first half of the channels encodes the *w* (column) coordinate and the second half the
*h* (row) coordinate. Tables are computed in float64, like the numpy original, then cast.
"""
from __future__ import annotations

import torch


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, dim] table: sin in the first half, cos in the second."""
    if dim % 2 != 0:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size, cls_token: bool = False) -> torch.Tensor:
    """Return ``[(1 if cls_token) + h*w, embed_dim]`` float32; row 0 is zeros for the cls token.

    ``grid_size`` is an int (square grid) or ``(h, w)``; patch ``l = i*w + j`` is row ``i``,
    column ``j``, as in patchify.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"2-D sin-cos embedding needs embed_dim divisible by 4, got {embed_dim}")
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
    rows, cols = torch.meshgrid(
        torch.arange(gh, dtype=torch.float32), torch.arange(gw, dtype=torch.float32), indexing="ij"
    )
    emb = torch.cat([_sincos_1d(embed_dim // 2, cols), _sincos_1d(embed_dim // 2, rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()
