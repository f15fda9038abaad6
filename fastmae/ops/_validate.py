"""Argument checks shared by the fused ops: metadata checks (safe under torch.compile) in the
public functions, and one value check of index ranges before any kernel touches memory."""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwad


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
