"""Which implementation of a fused op runs, and the loader of the compiled CPU extension.

Each fused op is one ``torch.library`` custom op in the ``fastmae`` namespace. Its body is the
torch math (the fallback for any device without a kernel of its own); :func:`register_kernels`
registers a kernel per device with the dispatcher:

- ``cpu``: the C++ kernel of ``fastmae._C`` (torch math, with one warning, if the extension is
  not built; Triton under ``TRITON_INTERPRET=1`` when ``FASTMAE_BACKEND=triton``, which is how the
  Triton kernels are tested without a GPU);
- ``cuda``: the Triton kernel (torch math when triton is missing or ``FASTMAE_BACKEND=torch``).

Under ``torch.compile`` a fused op on CUDA tensors is decomposed, while AOTAutograd traces it, into
its value checks and Triton launches (``torch.library.wrap_triton``), as ``torch.library.triton_op``
does for a CUDA-only op: inductor then places the kernels in its compiled graph. (``triton_op``
itself decomposes on every device, which would send CPU tensors to Triton; here the C++ kernel
stays an opaque call on CPU.) ``FASTMAE_BACKEND`` (``fastmae.config``) forces one implementation
for every device.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings
from typing import Callable

import torch
from torch._subclasses.functional_tensor import FunctionalTensorMode

from .. import config

BACKENDS = ("torch", "cpp", "triton")
_BUILD_HINT = (
    "build it with `pip install --no-build-isolation .` from a fastmae checkout "
    "(a compiler and ninja are needed)"
)

# The C++ ops every CPU path needs; an extension missing one is stale (built from older sources).
REQUIRED_CPP_OPS = (
    "gather_mask_fwd", "gather_mask_bwd",
    "resized_crop_fwd",
    "unshuffle_scatter_fwd", "unshuffle_scatter_bwd",
    "norm_mse_loss_fwd", "norm_mse_loss_bwd",
    "cpu_isa",
)
_ext_state: dict = {}


def _load_extension() -> str | None:
    try:
        importlib.import_module("fastmae._C")
    except (ImportError, OSError, RuntimeError) as e:  # missing, or built for another torch
        return f"{type(e).__name__}: {e}"
    missing = [op for op in REQUIRED_CPP_OPS if not hasattr(torch.ops.fastmae_C, op)]
    if missing:
        return f"the built extension lacks {', '.join(missing)} (built from older sources)"
    # a stale build has the names but the old signatures
    loss_args = {a.name for a in torch.ops.fastmae_C.norm_mse_loss_fwd.default._schema.arguments}
    if len(torch.ops.fastmae_C.gather_mask_fwd.default._schema.arguments) < 5 or "tubelet_size" not in loss_args:
        return "the built extension's ops take the old arguments (built from older sources)"
    return None


def build_hint() -> str:
    """How to get the extension: the install command, or, for a source checkout imported as it
    is (``python -m fastmae`` in the checkout's folder after a non-editable install), what that means."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(package, os.pardir, "setup.py")):
        return (f"this fastmae is the source checkout {package}, imported as it is: run from another folder to "
                f"use the installed fastmae, or build the checkout in place with "
                f"`pip install --no-build-isolation -e .`")
    return _BUILD_HINT


def extension_error() -> str | None:
    """Why the compiled extension is unavailable, or None when it is loaded."""
    if "error" not in _ext_state:
        _ext_state["error"] = _load_extension()
    return _ext_state["error"]


def has_extension() -> bool:
    return extension_error() is None


def _no_extension() -> str:
    """The CPU fallback when the extension is missing: torch math with one warning, or an error
    under FASTMAE_REQUIRE_EXTENSION=1."""
    if config.settings().require_extension:
        raise RuntimeError(f"FASTMAE_REQUIRE_EXTENSION=1 but fastmae's C++ extension is unavailable "
                           f"({extension_error()}); {build_hint()}")
    if not _ext_state.get("warned"):
        _ext_state["warned"] = True
        warnings.warn(
            f"fastmae's C++ extension is not available ({extension_error()}); CPU tensors use the "
            f"slower torch math instead. To use the fused CPU kernels, {build_hint()}.",
            RuntimeWarning,
            stacklevel=4,
        )
    return "torch"


@functools.cache
def has_triton() -> bool:
    try:
        importlib.import_module("triton")
        return True
    except ImportError:
        return False


def triton_interpret() -> bool:
    """Triton's own switch (not a fastmae setting): its interpreter runs kernels on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def select_backend(device: torch.device | str) -> str:
    """The implementation (``torch``, ``cpp`` or ``triton``) that runs an op on ``device``."""
    kind = torch.device(device).type
    forced = config.settings().backend
    if forced == "triton":
        if not has_triton():
            raise RuntimeError("FASTMAE_BACKEND=triton but triton is not installed")
        if kind != "cuda" and not (kind == "cpu" and triton_interpret()):
            raise RuntimeError(
                f"FASTMAE_BACKEND=triton needs CUDA tensors (got {kind}); to run the Triton "
                "kernels on CPU tensors set TRITON_INTERPRET=1 before importing fastmae"
            )
        return "triton"
    if forced == "cpp":
        if kind != "cpu":
            raise RuntimeError(f"FASTMAE_BACKEND=cpp runs on CPU tensors only, got {kind}")
        if not has_extension():
            raise RuntimeError(f"FASTMAE_BACKEND=cpp but the extension is unavailable "
                               f"({extension_error()}); {build_hint()}")
        return "cpp"
    if forced == "torch":
        return "torch"
    if kind == "cuda":
        return "triton" if has_triton() else "torch"
    if kind == "cpu":
        return "cpp" if has_extension() else _no_extension()
    return "torch"


def register_kernels(op, *, check: Callable, torch_impl: Callable, cpp: str,
                     triton: tuple[str, str]) -> None:
    """Registers the CPU and CUDA kernels of the custom op ``op``.

    ``torch_impl(*args)``: the torch math (also ``op``'s own body, for other devices);
    ``check(*args)``: the value checks (index ranges, permutations) that the torch and Triton
    paths run first (the C++ kernels run the same checks themselves); ``cpp``: the name of the
    ``torch.ops.fastmae_C`` kernel, which takes ``op``'s arguments followed by the CPU settings
    (instruction-set cap, streaming mode); ``triton``: ``(module, function)`` of the launcher in
    ``fastmae.kernels``, imported on first use (Triton is optional).
    """

    def launcher():
        module, name = triton
        return getattr(importlib.import_module(f"fastmae.kernels.{module}"), name)

    def run(backend: str, args):
        if backend == "cpp":
            return getattr(torch.ops.fastmae_C, cpp)(*args, *config.settings().cpp_args)
        check(*args)
        if backend == "triton":
            with torch._library.triton.set_wrap_triton_enabled(False):  # eager: launch directly
                return launcher()(*args)
        return torch_impl(*args)

    def cpu_kernel(*args):
        return run(select_backend("cpu"), args)

    def cuda_kernel(*args):
        return run(select_backend("cuda"), args)

    def traced(mode, op_, types, args, kwargs):
        on_cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
        if on_cuda and select_backend("cuda") == "triton":
            with mode:
                check(*args)
                return launcher()(*args, **kwargs)
        return mode.__torch_dispatch__(op_, types, args, kwargs)

    op.register_kernel("cpu", cpu_kernel)
    op.register_kernel("cuda", cuda_kernel)
    op.register_torch_dispatch(FunctionalTensorMode, traced)
