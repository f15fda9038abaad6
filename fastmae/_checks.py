"""Input validation shared by the reference and the fast model: clear errors, early."""
from __future__ import annotations

import numbers
import operator

import torch


def to_2tuple(size, name: str) -> tuple[int, int]:
    """An int or an (H, W) pair of positive integers -> (H, W)."""
    pair = (size, size) if _is_int(size) else tuple(size) if isinstance(size, (tuple, list)) else None
    if pair is None or len(pair) != 2 or not all(_is_int(s) and s > 0 for s in pair):
        raise ValueError(f"{name} must be a positive int or an (H, W) pair of them, got {size!r}")
    return (int(pair[0]), int(pair[1]))


def _is_int(value) -> bool:
    return not isinstance(value, bool) and _is_integer(value)


def check_grid(img_size: tuple[int, int], patch_size: int) -> tuple[int, int]:
    """(H, W) and p -> (h, w) patch grid, or a ValueError if p is not a positive integer dividing
    H and W."""
    if not _is_int(patch_size):
        raise ValueError(f"patch_size must be an integer, got {patch_size!r}")
    if patch_size <= 0:
        raise ValueError(f"patch_size must be positive, got {patch_size}")
    H, W = img_size
    if H % patch_size or W % patch_size:
        raise ValueError(
            f"image size {H}x{W} is not divisible by the patch size {patch_size}"
        )
    return H // patch_size, W // patch_size


def _is_integer(value) -> bool:
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def check_architecture(in_chans, mlp_ratio, num_patches: int) -> None:
    """Constructor arguments no MAE can train with, refused when the model is built."""
    if not _is_int(in_chans) or in_chans < 1:
        raise ValueError(f"in_chans must be a positive integer, got {in_chans!r}")
    if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, numbers.Real) or not mlp_ratio > 0:
        raise ValueError(f"mlp_ratio must be a positive number, got {mlp_ratio!r}")
    if num_patches < 2:
        raise ValueError(f"the image holds {num_patches} patch(es); an MAE needs at least 2 (one visible, "
                         f"one removed): use a larger img_size or a smaller patch_size")


def check_images(imgs: torch.Tensor, in_chans: int, img_size: tuple[int, int], patch_size: int) -> None:
    if not isinstance(imgs, torch.Tensor) or imgs.dim() != 4:
        shape = tuple(imgs.shape) if isinstance(imgs, torch.Tensor) else type(imgs).__name__
        raise ValueError(f"expected images of shape [N, C, H, W], got {shape}")
    N, C, H, W = imgs.shape
    if C != in_chans:
        raise ValueError(f"expected {in_chans} image channels, got {C} (images of shape {tuple(imgs.shape)})")
    check_grid((H, W), patch_size)
    if (H, W) != tuple(img_size):
        raise ValueError(
            f"images are {H}x{W} but the model was built for {img_size[0]}x{img_size[1]} "
            f"(pass img_size=({H}, {W}) to the constructor)"
        )
    if N == 0:
        raise ValueError("expected at least one image, got a batch of 0")


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """K = int(L * (1 - mask_ratio)), as the official code, with the ratio validated."""
    try:
        ratio = None if isinstance(mask_ratio, (str, bytes, bool)) else float(mask_ratio)
    except (TypeError, ValueError):
        ratio = None
    if ratio is None:
        raise ValueError(f"mask_ratio must be a number in [0, 1), got {mask_ratio!r}")
    if not (0.0 <= ratio < 1.0):
        raise ValueError(f"mask_ratio must lie in [0, 1), got {mask_ratio}")
    K = int(num_patches * (1 - mask_ratio))
    if K >= num_patches:
        raise ValueError(
            f"mask_ratio={mask_ratio} masks no patch of {num_patches}: the loss (mean over "
            f"removed patches) would be undefined"
        )
    if K < 1:
        raise ValueError(f"mask_ratio={mask_ratio} leaves no visible patch of {num_patches}")
    return K


def check_noise(noise, N: int, L: int, device) -> torch.Tensor:
    if noise is None:
        return torch.rand(N, L, device=device)
    if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != (N, L):
        shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"noise must have shape [N, L] = [{N}, {L}], got {shape}")
    if not noise.is_floating_point():
        raise ValueError(f"noise must be a floating tensor, got {noise.dtype}")
    if noise.device != torch.device(device):
        raise ValueError(f"noise is on {noise.device} but the images are on {device}")
    return noise
