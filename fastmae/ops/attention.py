"""Memory-efficient attention with selectable backends.

``attention(q, k, v, backend="auto")`` with q, k, v ``[B, heads, S, head_dim]`` returns
``softmax(q k^T / sqrt(head_dim)) v`` of the same shape. Backends:

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient
  kernels where PyTorch has them; the default);
- ``xformers``: ``xformers.ops.memory_efficient_attention`` (CUDA only, optional dependency);
- ``math``: the explicit formula, the reference;
- ``auto``: xformers for CUDA tensors when it imports, else sdpa.
"""
from __future__ import annotations

import functools
import importlib

import torch
import torch.nn.functional as F

ATTN_BACKENDS = ("auto", "sdpa", "xformers", "math")


def attention_ref(q, k, v):
    """softmax(q k^T / sqrt(d)) v, computed explicitly (fp32 softmax for low-precision inputs)."""
    scale = q.shape[-1] ** -0.5
    attn = (q @ k.transpose(-2, -1)) * scale
    attn = attn.float().softmax(dim=-1).to(q.dtype)
    return attn @ v


@functools.lru_cache(maxsize=None)
def _xformers_ops():
    try:
        return importlib.import_module("xformers.ops"), None
    except Exception as e:  # ImportError, or a binary built for another torch
        return None, f"{type(e).__name__}: {e}"


def check_attn_backend(backend: str) -> str:
    if backend not in ATTN_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(ATTN_BACKENDS)}")
    return backend


def resolve_attn_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    check_attn_backend(backend)
    if backend == "auto":
        return "xformers" if device.type == "cuda" and _xformers_ops()[0] is not None else "sdpa"
    if backend == "xformers":
        if device.type != "cuda":
            raise RuntimeError(f"attention backend 'xformers' has no kernels for {device.type} tensors; "
                               "use 'sdpa' (or 'auto', which picks it there)")
        if _xformers_ops()[0] is None:
            raise RuntimeError(f"attention backend 'xformers' is not importable ({_xformers_ops()[1]}); "
                               "install xformers or use 'sdpa'")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise RuntimeError(f"attention backend 'xformers' does not take {dtype}; use 'sdpa'")
    return backend


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Scaled dot-product attention on ``[B, heads, S, head_dim]`` tensors."""
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one [B, heads, S, head_dim] shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    backend = resolve_attn_backend(backend, q.device, q.dtype)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "math":
        return attention_ref(q, k, v)
    xops = _xformers_ops()[0]  # xformers takes [B, S, heads, head_dim]
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
