"""Memory-efficient attention with selectable backends.

``attention(q, k, v, backend="auto")`` with q ``[B, heads, Sq, head_dim]`` and k, v
``[B, heads, Sk, head_dim]`` returns ``softmax(q k^T / sqrt(head_dim)) v``, shaped like q.
Backends:

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``. PyTorch picks its fused
  kernel (flash attention on CPU and CUDA, memory-efficient attention on CUDA): the
  ``[Sq, Sk]`` probability matrix is never stored for backward, only a per-row log-sum-exp.
  Any device; float32, float64, bfloat16, float16.
- ``xformers``: ``xformers.ops.memory_efficient_attention`` (an optional dependency). CUDA
  tensors only (xformers ships no CPU operators); float32, bfloat16, float16.
- ``math``: the explicit formula, the reference (it stores the probability matrix). For
  low-precision inputs the softmax kernel accumulates in fp32 and rounds its output once, as
  the official code's softmax does under autocast.
- ``auto``: ``xformers`` for CUDA tensors when xformers imports, else ``sdpa``; except on CPU
  for bfloat16/float16 inputs with short key sequences (``Sk <= CPU_LOWP_MATH_MAX_SEQ``), where
  ``math`` runs. PyTorch's CPU flash kernel is slow in reduced precision at such lengths, in its
  backward above all, while in fp32 sdpa is as fast or faster everywhere (bench/README.md has
  the figures). The probability matrix that math stores is small at these lengths (12 x 50 x 50
  per image and block in the encoder). With the softmax kept in bf16 (rather than an fp32 copy
  of the scores, with the same error against fp64), math is faster at the MAE decoders' lengths;
  hence the limit of 256 keys, which covers the MAE decoders at 224 px
  with patch 16 (197) and 96 px with patch 8 (145). ``bench/test_bench_model.py``
  (``test_attention_backends``) re-measures the choice at the model's shapes. On CUDA in float32
  SDPA's memory-efficient kernel computes on CUDA cores, while math's two products use tf32
  tensor cores where they are allowed: math is faster there and needs more memory
  (bench/README.md). ``auto`` keeps sdpa there; pass ``math`` for speed where the memory allows.

A backend that cannot run on the given tensors raises a ValueError that says why and which
backend to use instead; ``xformers`` requested but not importable raises a RuntimeError with the
import error. The choice depends only on the backend name, the device, the dtype and the key
length, so under ``torch.compile`` it is made once at trace time and costs nothing per call.
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

ATTN_BACKENDS = ("auto", "sdpa", "xformers", "math")

# dtypes each concrete backend accepts (math takes any floating dtype)
_SDPA_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_XFORMERS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_xformers_state: dict = {}
CPU_LOWP_MATH_MAX_SEQ = 256  # auto on CPU: math for bf16/fp16 when Sk <= this (see the module doc)


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v, computed explicitly (the softmax accumulates in fp32 for
    low-precision inputs inside the kernel; no fp32 copy of the scores is made)."""
    scale = q.shape[-1] ** -0.5
    attn = (q @ k.transpose(-2, -1)) * scale
    return attn.softmax(dim=-1).to(v.dtype) @ v


def _xformers_ops():
    """(xformers.ops, None) when xformers imports, else (None, the import error). Imported once,
    on first use: importing xformers is slow and most runs never need it."""
    if "ops" not in _xformers_state:
        try:
            _xformers_state["ops"], _xformers_state["error"] = importlib.import_module("xformers.ops"), None
        except Exception as e:  # ImportError, or a binary built for another torch
            _xformers_state["ops"], _xformers_state["error"] = None, f"{type(e).__name__}: {e}"
    return _xformers_state["ops"], _xformers_state["error"]


@torch.compiler.assume_constant_result
def xformers_import_error() -> str:
    """Why xformers cannot be used ('' when it imports). Constant under torch.compile, so the
    backend choice adds no guard and no graph break."""
    return _xformers_ops()[1] or ""


def check_attn_backend(backend: str) -> str:
    """The name itself must be one of ATTN_BACKENDS (ValueError otherwise)."""
    if backend not in ATTN_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(ATTN_BACKENDS)}")
    return backend


def set_attn_backend(model: torch.nn.Module, backend: str) -> None:
    """``model.attn_backend = backend`` and the same for every attention module inside it (each
    fast attention module has an ``attn_backend`` attribute)."""
    check_attn_backend(backend)
    for m in model.modules():
        if m is model or hasattr(m, "attn_backend"):
            m.attn_backend = backend


def resolve_attn_backend(backend: str, device: torch.device, dtype: torch.dtype, seq_len_k: int | None = None) -> str:
    """The concrete backend (``sdpa``, ``xformers`` or ``math``) that runs ``backend`` on tensors
    of this device and dtype (and key length, which only ``auto`` on CPU consults), or a clear
    error when it cannot."""
    check_attn_backend(backend)
    device = torch.device(device)
    if backend == "auto":
        if not dtype.is_floating_point:
            raise ValueError(f"attention needs floating inputs, got {dtype}")
        if device.type == "cuda":
            usable = dtype in _XFORMERS_DTYPES and not xformers_import_error()
            return "xformers" if usable else "sdpa"
        short = seq_len_k is not None and seq_len_k <= CPU_LOWP_MATH_MAX_SEQ
        if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and short:
            return "math"
        return "sdpa"
    if backend == "xformers":
        if device.type != "cuda":
            raise ValueError(f"attention backend 'xformers' has no kernels for {device.type} tensors (xformers "
                             f"ships CUDA operators only); use 'sdpa', or 'auto', which picks it there")
        if dtype not in _XFORMERS_DTYPES:
            raise ValueError(f"attention backend 'xformers' does not take {dtype}; use float32, bfloat16 or "
                             f"float16 inputs, or the 'sdpa' backend")
        err = xformers_import_error()
        if err:
            raise RuntimeError(f"attention backend 'xformers' is not usable: importing xformers.ops failed "
                               f"({err}); install xformers built for this torch "
                               f"(`pip install xformers`), or use 'sdpa'")
    if backend == "sdpa" and dtype not in _SDPA_DTYPES:
        raise ValueError(f"attention backend 'sdpa' does not take {dtype}; use a floating dtype "
                         f"(float32, float64, bfloat16, float16)")
    if backend == "math" and not dtype.is_floating_point:
        raise ValueError(f"attention backend 'math' needs floating inputs, got {dtype}")
    return backend


def _check_qkv(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, heads, S, head_dim], got shape {tuple(t.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q [B, heads, Sq, d], k and v [B, heads, Sk, d] must agree in B, heads and d "
                         f"(k and v in every dimension), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Scaled dot-product attention on ``[B, heads, S, head_dim]`` tensors (see the module doc).

    Under autocast the inputs are taken as they come (a model's q, k, v leave an autocast
    ``Linear`` already in the low-precision dtype); ``sdpa`` follows autocast's own rule.
    """
    _check_qkv(q, k, v)
    backend = resolve_attn_backend(backend, q.device, q.dtype, k.shape[-2])
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "math":
        return attention_ref(q, k, v)
    xops = _xformers_ops()[0]  # xformers takes [B, S, heads, head_dim]
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
