"""Backend choice for the fused ops, and the loader of the compiled CPU extension.

One place decides which implementation runs:

- ``triton``: the Triton kernels in ``fastmae.kernels`` (CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1``, which is how they are tested without a GPU);
- ``cpp``: the C++ kernels of ``fastmae._C`` (CPU tensors);
- ``torch``: the plain PyTorch reference math (any device).

By default CUDA tensors go to Triton and CPU tensors to C++ (torch math, with one warning, if
the extension is missing). ``FASTMAE_BACKEND=torch|cpp|triton`` forces one for every op.

On the ``cpp`` backend an eager call on plain CPU tensors skips the ``fastmae::`` custom op and
calls its twin registered in C++ with a C++ autograd function (``eager_cpp``): the same kernels,
without Python between them and the public function, which checks its arguments in Python only
when that twin refuses them (to name the problem).
"""
from __future__ import annotations

import importlib
import os
import sys
import warnings

import torch

BACKENDS = ("torch", "cpp", "triton")
_BUILD_HINT = (
    "build it with `pip install --no-build-isolation .` from a fastmae checkout "
    "(a compiler and ninja are needed)"
)

# The C++ ops every CPU path needs; an extension missing one is stale (built from older sources).
REQUIRED_CPP_OPS = (
    "gather_mask_fwd", "gather_mask_bwd",
    "unshuffle_scatter_fwd", "unshuffle_scatter_bwd",
    "norm_mse_loss_fwd", "norm_mse_loss_bwd",
    "gather_mask", "unshuffle_scatter", "norm_mse_loss",  # the eager route (eager_cpp)
)
_ext_state: dict = {}


def _load_extension() -> str | None:
    try:
        importlib.import_module("fastmae._C")
    except (ImportError, OSError, RuntimeError) as e:  # missing, or built for another torch
        return f"{type(e).__name__}: {e}"
    missing = [op for op in REQUIRED_CPP_OPS if not hasattr(torch.ops.fastmae_C, op)]
    if not hasattr(sys.modules["fastmae._C"], "_eager_route"):
        missing.append("_eager_route")
    if missing:
        return f"the built extension lacks {', '.join(missing)} (built from older sources)"
    return None


def extension_error() -> str | None:
    """Why the compiled extension is unavailable, or None when it is loaded."""
    if "error" not in _ext_state:
        _ext_state["error"] = _load_extension()
    return _ext_state["error"]


def has_extension() -> bool:
    return extension_error() is None


def _warn_no_extension_once() -> None:
    if not _ext_state.get("warned"):
        _ext_state["warned"] = True
        warnings.warn(
            f"fastmae's C++ extension is not available ({extension_error()}); CPU tensors use the "
            f"slower torch math instead. To use the fused CPU kernels, {_BUILD_HINT}.",
            RuntimeWarning,
            stacklevel=3,
        )


def has_triton() -> bool:
    try:
        importlib.import_module("triton")
        return True
    except ImportError:
        return False


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def forced_backend() -> str | None:
    name = os.environ.get("FASTMAE_BACKEND", "").strip().lower()
    if not name or name == "auto":
        return None
    if name not in BACKENDS:
        raise ValueError(f"unknown FASTMAE_BACKEND={name!r}; choose one of {', '.join(BACKENDS)} or auto")
    return name


def select_backend(device: torch.device) -> str:
    """The backend that runs an op whose inputs live on ``device``."""
    forced = forced_backend()
    if forced == "triton":
        if not has_triton():
            raise RuntimeError("FASTMAE_BACKEND=triton but triton is not installed")
        if device.type != "cuda" and not triton_interpret():
            raise RuntimeError(
                f"FASTMAE_BACKEND=triton needs CUDA tensors (got {device.type}); to run the Triton "
                "kernels on CPU tensors set TRITON_INTERPRET=1 before importing fastmae"
            )
        return "triton"
    if forced == "cpp":
        if device.type != "cpu":
            raise RuntimeError(f"FASTMAE_BACKEND=cpp runs on CPU tensors only, got {device.type}")
        if not has_extension():
            raise RuntimeError(f"FASTMAE_BACKEND=cpp but the extension is unavailable "
                               f"({extension_error()}); {_BUILD_HINT}")
        return "cpp"
    if forced == "torch":
        return "torch"
    if device.type == "cuda":
        return "triton" if has_triton() else "torch"
    if device.type == "cpu":
        if has_extension():
            return "cpp"
        _warn_no_extension_once()
    return "torch"


def eager_cpp(*tensors: torch.Tensor | None) -> bool:
    """Whether an op on ``tensors`` (None for an absent optional) takes the eager C++ route.

    That route, ``torch.ops.fastmae_C.<op>`` (csrc/autograd.cpp), runs the kernels the custom op
    runs on the ``cpp`` backend, with a C++ autograd function instead of the custom op's Python
    layers. It is taken only for plain CPU tensors in eager mode: torch.compile, ``torch.jit.trace``,
    dispatch and function modes (fake tensors, FLOP counters, ``torch.set_default_device``),
    torch.func transforms and tensor subclasses get the custom op, which has the fake
    implementation and registrations they need. The tests after torch.compile's are one C++ call
    (``fastmae._C._eager_route``, csrc/module.cpp): each Python step costs microseconds when the
    caches are cold, as they are between the ops of a training step (bench/NOTES.md).
    """
    if torch.compiler.is_compiling():
        return False
    route = _ext_state.get("route")
    if route is None:
        if not has_extension():
            return False
        route = _ext_state["route"] = importlib.import_module("fastmae._C")._eager_route
    return route(*tensors)
