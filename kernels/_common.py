"""Helpers shared by the Triton kernels of fastmae: launch, vector widths, launch configurations.

Vector width. A contiguous run of elements is loaded with 128-bit instructions only when the
compiler can prove that every run starts on a 16-byte boundary. The kernels receive each row
length that matters for alignment as a count of ``VEC``-wide vectors (``VEC`` a constexpr power
of two), and rebuild the length as ``count * VEC``: the compiler then knows the length, and every
offset derived from it, is a multiple of ``VEC``, whatever its value. The launcher picks the
widest ``VEC`` (at most 16 bytes) that divides those lengths and the tensors' start addresses.

Launch. Every kernel is launched through ``torch.library.wrap_triton``: in eager mode the fused
ops' kernels switch it off (a direct launch), and when ``torch.compile`` traces a fused op on CUDA
tensors (``fastmae.ops._backend``), it records the kernel in the graph, where inductor calls it.
The launchers are therefore traceable with fake tensors: they read shapes, strides and storage
offsets, never data or addresses.

Launch configurations. Every module lists the configurations its launchers can choose
(``launch_configs()``, a list of :class:`KernelConfig`), built from the same constants and
choice functions the launchers use; ``bench/triton_aot.py`` compiles each one ahead of time.

Nothing here queries a device.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# torch dtype -> Triton signature type
TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
                torch.int32: "i32"}
VECTOR_BYTES = 16  # one 128-bit access


def vec_choices(dtype: torch.dtype) -> tuple[int, ...]:
    """Every vector width a launcher may pick for ``dtype``: powers of two up to 16 bytes."""
    top = VECTOR_BYTES // dtype.itemsize
    return tuple(1 << i for i in range(top.bit_length()))


def vec_width(dtype: torch.dtype, lengths: Sequence[int], tensors: Sequence[torch.Tensor] = ()) -> int:
    """Widest vector width (elements, power of two, at most 16 bytes) dividing every length in
    ``lengths`` and every start offset in ``tensors`` (in elements of ``dtype``). A tensor's start
    is its storage offset: storages start on 16-byte boundaries (PyTorch's allocators, and
    inductor's buffers, align them further), so this holds for fake tensors too."""
    size = dtype.itemsize
    for vec in reversed(vec_choices(dtype)):
        if (all(n % vec == 0 for n in lengths)
                and all(t.storage_offset() * t.element_size() % (vec * size) == 0 for t in tensors)):
            return vec
    return 1


def unit_last(t: torch.Tensor) -> bool:
    """Unit stride along the last dimension, as the kernels index it; a last dimension of size 1
    qualifies whatever its stride (``contiguous()`` keeps any stride there: ``randn(2, 1, 3)
    .transpose(1, 2)`` is contiguous with strides (3, 1, 3))."""
    return t.shape[-1] == 1 or t.stride(-1) == 1


def full_vec(dtype: torch.dtype) -> int:
    """The 128-bit vector width of ``dtype``, in elements."""
    return vec_choices(dtype)[-1]


def launch(kernel, grid, *args, **kwargs) -> None:
    """Launch a ``@triton.jit`` kernel through ``torch.library.wrap_triton`` (see the module doc)."""
    torch.library.wrap_triton(kernel)[grid](*args, **kwargs)


def inverse_map(ids: torch.Tensor, length: int) -> torch.Tensor:
    """``inv [N, length]`` int32 with ``inv[n, ids[n, k]] = k`` and -1 elsewhere, for ``ids [N, M]``
    int64 already checked (``fastmae._checks.check_distinct``) to hold distinct values in
    ``[0, length)`` per row."""
    N, M = ids.shape
    inv = torch.full((N, length), -1, dtype=torch.int32, device=ids.device)
    if ids.numel() == 0:
        return inv
    rows = torch.arange(M, dtype=torch.int32, device=ids.device).expand(N, M)
    return inv.scatter_(1, ids, rows)


@triton.jit
def patch_segment_offset(seg, p, p_vecs, s_c, s_h, VEC: tl.constexpr):
    """Offset, from a patch's first pixel, of segment ``seg`` of the patch walked in ``(c, i, j)``
    order: ``VEC`` consecutive pixels of one image row, ``p_vecs`` segments per row of the patch
    (``p = p_vecs * VEC``), channel and row strides ``s_c``, ``s_h``. int64 offsets."""
    row = seg // p_vecs  # c * p + i
    jv = seg - row * p_vecs
    c = (row // p).to(tl.int64)
    i = (row - c * p).to(tl.int64)
    return c * s_c + i * s_h + jv * VEC


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One launch configuration of one kernel, as ``bench/triton_aot.py`` compiles it.

    ``signature`` maps every non-constexpr argument to its Triton type (``*fp32``, ``i32``, ...);
    ``constexprs`` gives every constexpr; ``aligned`` names the pointer arguments a real launch
    on freshly allocated tensors specialises as 16-byte aligned. Integer sizes are not marked
    divisible: vectorisation must come from ``VEC``, not from lucky sizes.
    ``vector_loads`` / ``vector_stores``: the widest global access (bytes) the contiguous paths of
    this configuration must reach (0: no claim).
    """
    name: str
    kernel: Any
    signature: dict
    constexprs: dict
    aligned: tuple
    num_warps: int
    vector_loads: int = 0
    vector_stores: int = 0

    def label(self) -> str:
        parts = [f"{k}={v}" for k, v in self.constexprs.items()]
        dtypes = list(dict.fromkeys(v for v in self.signature.values() if v[:3] in ("*fp", "*bf")))
        return f"{self.name}[{','.join(dtypes)}; {', '.join(parts)}; warps={self.num_warps}]"


def signature_of(kernel: Callable, types: dict, constexprs: dict) -> dict:
    """Signature dict in the kernel's argument order: constexprs marked ``constexpr``."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
        else:
            raise KeyError(f"{kernel.__name__}: no type given for argument {name!r}")
    return sig


def dtype_name(dtype: torch.dtype) -> str:
    return TRITON_TYPES[dtype]
