"""gelu_mlp: the transformer MLP ``fc2(gelu(fc1(x)))`` that keeps less for backward.

``gelu_mlp(x [..., D], fc1_weight [H, D], fc1_bias [H] | None, fc2_weight [D, H], fc2_bias [D] | None,
approximate="none") -> [..., D]``, the same numbers as the composition (``gelu_mlp_ref``).

Memory, not speed. The composition keeps three tensors for backward: the input ``x`` (for fc1's
weight gradient), the hidden pre-activation ``h`` (for GELU's gradient) and the activation
``gelu(h)`` (for fc2's weight gradient), the last two ``H = 4 D`` wide. This keeps ``x`` and ``h``
only and recomputes ``gelu(h)`` in backward (one elementwise pass).

Autograd's backward of the composition also holds three hidden-sized tensors at once (``h``,
``gelu(h)`` and the new gradient). This one, in fp32/fp64, holds ``h`` and row chunks of about
``CHUNK_BYTES``: per chunk it recomputes the activation for fc2's weight gradient, then forms the
hidden gradient (turned into ``h``'s gradient in place), adds its share to fc1's weight and bias
gradients and writes its rows of ``dx``. The forward applies fc2 in the same chunks, so no whole
activation is formed either (which matters where activation checkpointing replays the forward
inside backward). Weight gradients are then sums of per-chunk GEMMs and differ from the
composition's in the last bits. In bf16/fp16 each per-chunk sum would be rounded to that
precision, so there the whole tensor is one chunk (two hidden-sized tensors alive); so it is on
GPUs, where the chunks' small GEMMs and many launches cost more time than the memory is worth.

With activation checkpointing, the peak inside a recomputed decoder block falls by about two
hidden tensors.

Under ``torch.compile`` the function is traced as it is, in one chunk (inductor plans the
buffers): the compiled graphs keep ``h`` and not the activation, as in eager. The memory it saves
and its (unchanged) step time are in bench/README.md.

Under autocast the inputs and parameters are cast to the autocast dtype, as autocast casts them for
``F.linear``; the math then runs in that dtype, and the gradients come back in each input's dtype.
The weights are kept as given (parameters: alive anyway) and cast again in backward, where the
composition keeps their autocast copies (ViT-B: 0.15 GB of bf16 MLP weights). Under
``torch.compile`` inductor's partitioner keeps the copies all the same: recomputing a cast whose
result a backward matmul reads is banned by ``torch._functorch.config.ban_recompute_materialized_backward``
(a global setting, left to the user; bench/README.md has its effect).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

_APPROXIMATE = ("none", "tanh")
CHUNK_BYTES = 4 * 2**20  # fp32/fp64: hidden-sized temporaries of about this size (see _chunk_rows)
MIN_CHUNK_ROWS = 512


def gelu_mlp_ref(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor],
                 fc2_weight: torch.Tensor, fc2_bias: Optional[torch.Tensor],
                 approximate: str = "none") -> torch.Tensor:
    """Reference: the plain composition (what timm's and the official ``Mlp`` compute)."""
    return F.linear(F.gelu(F.linear(x, fc1_weight, fc1_bias), approximate=approximate), fc2_weight, fc2_bias)


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    device_type = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class _GeluMlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, approximate):
        cast = _autocast_dtype(x)
        w1_in, w2_in = w1, w2
        if cast is not None:
            x, w1, w2 = x.to(cast), w1.to(cast), w2.to(cast)
            b1 = None if b1 is None else b1.to(cast)
            b2 = None if b2 is None else b2.to(cast)
        with torch.autocast(x.device.type, enabled=False):
            h = F.linear(x, w1, b1)
            h2 = h.reshape(-1, h.shape[-1])
            step = _chunk_rows(h2)
            if step >= h2.shape[0]:
                y = F.linear(F.gelu(h, approximate=approximate), w2, b2)
            else:  # fc2 in chunks of rows, so no whole activation is formed
                y = h.new_empty(*h.shape[:-1], w2.shape[0])
                for hc, yc in zip(h2.split(step), y.view(-1, w2.shape[0]).split(step)):
                    a = F.gelu(hc, approximate=approximate)
                    if b2 is None:
                        torch.mm(a, w2.t(), out=yc)
                    else:
                        torch.addmm(b2, a, w2.t(), out=yc)
                    del a
        # the weights as given (parameters, alive anyway), not their autocast copies: backward
        # casts them again (ViT-B: 0.15 GB of bf16 weight copies not kept)
        ctx.save_for_backward(x, h, w1_in, w2_in)
        ctx.approximate = approximate
        ctx.has_bias = (b1 is not None, b2 is not None)
        return y

    @staticmethod
    @once_differentiable  # its out= and in-place products are not differentiable again
    def backward(ctx, gy):
        x, h, w1, w2 = ctx.saved_tensors
        w1, w2 = w1.to(h.dtype), w2.to(h.dtype)
        need_x, need_w1, need_b1, need_w2, need_b2, _ = ctx.needs_input_grad
        x2, h2 = x.reshape(-1, x.shape[-1]), h.reshape(-1, h.shape[-1])
        gy2 = gy.to(h.dtype).reshape(-1, gy.shape[-1])
        step = _chunk_rows(h2)
        chunks = list(zip(*(t.split(step) for t in (x2, h2, gy2))))
        dx = dw1 = db1 = dw2 = db2 = None
        if need_w2:  # fc2's weight gradient from the recomputed activation, one chunk at a time
            for xc, hc, gc in chunks:
                a = F.gelu(hc, approximate=ctx.approximate)
                dw2 = gc.t().mm(a) if dw2 is None else dw2.addmm_(gc.t(), a)
                del a
        if need_b2 and ctx.has_bias[1]:
            db2 = gy2.sum(0)
        if need_x or need_w1 or need_b1:
            dx = torch.empty_like(x2) if need_x else None
            for i, (xc, hc, gc) in enumerate(chunks):
                dh = gc.mm(w2)  # the gradient of gelu(h), turned into h's gradient in place
                torch.ops.aten.gelu_backward.grad_input(dh, hc, approximate=ctx.approximate, grad_input=dh)
                if need_w1:
                    dw1 = dh.t().mm(xc) if dw1 is None else dw1.addmm_(dh.t(), xc)
                if need_b1 and ctx.has_bias[0]:
                    db1 = dh.sum(0) if db1 is None else db1.add_(dh.sum(0))
                if need_x:
                    torch.mm(dh, w1, out=dx[i * step:i * step + len(xc)])
                del dh  # before the next chunk's is allocated
            dx = None if dx is None else dx.reshape(x.shape)
        return dx, dw1, db1, dw2, db2, None


def _chunk_rows(h2: torch.Tensor) -> int:
    """Rows per chunk: equal chunks of about ``CHUNK_BYTES`` but of at least ``MIN_CHUNK_ROWS`` rows
    (thinner GEMMs run slower), for fp32/fp64 CPU tensors. One chunk in bf16/fp16, where chunked
    sums of the weight gradients would each be rounded to that precision; under torch.compile,
    where inductor plans the buffers; and on GPUs, where ~500-row GEMMs and the launches of many
    chunks cost far more time than the memory is worth (measured on an H100: bench/README.md)."""
    rows, width = h2.shape
    if (h2.dtype not in (torch.float32, torch.float64) or h2.device.type != "cpu" or rows == 0
            or torch.compiler.is_compiling()):
        return max(rows, 1)
    chunks = max(1, min(math.ceil(rows * width * h2.element_size() / CHUNK_BYTES), rows // MIN_CHUNK_ROWS))
    return math.ceil(rows / chunks)


def gelu_mlp(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor],
             fc2_weight: torch.Tensor, fc2_bias: Optional[torch.Tensor],
             approximate: str = "none") -> torch.Tensor:
    """``fc2(gelu(fc1(x)))`` keeping only ``x`` and ``fc1(x)`` for backward (see the module doc)."""
    if approximate not in _APPROXIMATE:
        raise ValueError(f"approximate must be one of {_APPROXIMATE}, got {approximate!r}")
    H, D = fc1_weight.shape
    if x.shape[-1] != D or fc2_weight.shape != (D, H):
        raise ValueError(f"gelu_mlp needs x [..., D], fc1_weight [H, D] and fc2_weight [D, H]; got x "
                         f"{tuple(x.shape)}, fc1_weight {tuple(fc1_weight.shape)}, "
                         f"fc2_weight {tuple(fc2_weight.shape)}")
    for name, bias, n in (("fc1_bias", fc1_bias, H), ("fc2_bias", fc2_bias, D)):
        if bias is not None and tuple(bias.shape) != (n,):
            raise ValueError(f"gelu_mlp needs {name} of shape [{n}] (or None), got {tuple(bias.shape)}")
    return _GeluMlp.apply(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate)
