"""Random masking from noise with one sort: the inverse permutation is a scatter."""
from __future__ import annotations

import torch


def random_masking_ids(noise: torch.Tensor, len_keep: int):
    """noise [N, L] -> (ids_keep [N, K], ids_restore [N, L], ids_shuffle [N, L], mask [N, L] fp32).

    Same semantics as the official ``random_masking``: patches with the smallest noise are kept,
    in ascending-noise order; ``mask`` is 1 for removed patches, in original patch order.
    """
    N, L = noise.shape
    ids_shuffle = torch.argsort(noise, dim=1)
    ranks = torch.arange(L, device=noise.device).expand(N, L)
    ids_restore = torch.empty_like(ids_shuffle).scatter_(1, ids_shuffle, ranks)
    mask = (ids_restore >= len_keep).to(torch.float32)
    return ids_shuffle[:, :len_keep], ids_restore, ids_shuffle, mask
