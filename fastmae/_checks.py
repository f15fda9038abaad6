"""Input validation, in one place: the models' arguments (shared by the reference and the fast
model) and the fused ops' arguments. Clear errors, early, naming the problem: a bad input never
reaches a kernel.

The ops' metadata checks (dtype, shape, device) run in their public functions, safe under
torch.compile; their value checks (index ranges, distinct indices) run inside the ops, before
any kernel reads through the indices. The C++ kernels run the same value checks themselves, with
the same messages (csrc/common.h).
"""
from __future__ import annotations

import numbers
import operator

import torch
import torch.autograd.forward_ad as fwad

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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


# ---------------------------------------------------------------------------- the fused ops
def check_float(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def check_index(ids: torch.Tensor, name: str, batch: int, width: int | None = None) -> None:
    """ids must be an int64 [batch, width] tensor (width unchecked when None)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(ids).__name__}")
    if ids.dtype != torch.int64:
        raise ValueError(f"{name} must be int64, got {ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, *], got shape {tuple(ids.shape)}")
    if ids.shape[0] != batch:
        raise ValueError(f"{name} has batch size {ids.shape[0]} but the data has {batch}")
    if width is not None and ids.shape[1] != width:
        raise ValueError(f"{name} must have shape [{batch}, {width}], got {tuple(ids.shape)}")


def check_no_tangent(op: str, *named: tuple[str, torch.Tensor | None]) -> None:
    """Forward-mode AD (jvp) is not implemented by the fused ops: an input with a tangent is an
    error (a custom op would drop the tangent and return none, silently)."""
    if fwad._current_level < 0:  # no dual level is open
        return
    for name, t in named:
        if t is not None and fwad.unpack_dual(t).tangent is not None:
            raise NotImplementedError(f"{op} does not implement forward-mode AD (jvp), but {name} carries a tangent")


def check_same_device(*named: tuple[str, torch.Tensor | None]) -> None:
    """One device for all the given tensors (None entries are skipped), or a ValueError naming each."""
    named = tuple((n, t) for n, t in named if t is not None)
    if len({t.device for _, t in named}) > 1:
        names = ", ".join(n for n, _ in named)
        raise ValueError(f"{names} must be on one device: " + ", ".join(f"{n} on {t.device}" for n, t in named))


def check_index_range(ids: torch.Tensor, upper: int, name: str) -> None:
    """Value check: every index in [0, upper), before any kernel reads or writes through it.

    On the CPU an IndexError naming the bad value. On CUDA the check is queued on the device
    (``torch._assert_async``) instead, so the training step never waits for the host: an index
    out of range stops the kernel stream with a device-side assert carrying this message
    instead of letting the kernel read or write out of bounds.
    """
    if ids.numel() == 0:
        return
    if ids.is_cuda:
        ok = (ids >= 0).all() & (ids < upper).all()
        torch._assert_async(ok, f"{name} holds an index outside [0, {upper})")
        return
    lo, hi = torch.aminmax(ids)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= upper:
        bad = lo if lo < 0 else hi
        raise IndexError(f"{name} holds index {bad}, outside [0, {upper})")


def check_distinct(ids: torch.Tensor, upper: int, name: str) -> None:
    """Value check of ``ids [N, M]``: every index in [0, upper) and none twice in a sample (for
    ``M = upper``: each row a permutation), as random masking makes them. The kernels' backward
    passes rely on it (each gradient element is a copy of at most one other). A ValueError naming
    the first repeated index on the CPU, a device-side assert on CUDA."""
    check_index_range(ids, upper, name)
    if ids.shape[1] < 2:
        return
    s = ids.sort(dim=1).values
    repeats = s[:, 1:] == s[:, :-1]
    if ids.is_cuda:
        torch._assert_async(~repeats.any(), f"{name} repeats an index within a sample")
        return
    if bool(repeats.any()):
        n = int(repeats.any(dim=1).nonzero()[0])
        seen = set()
        for r in ids[n].tolist():  # the first repeat in row order, as the C++ check names it
            if r in seen:
                break
            seen.add(r)
        raise ValueError(f"{name} repeats index {r} in sample {n}: the indices of a sample must "
                         f"be distinct, as random masking makes them")
