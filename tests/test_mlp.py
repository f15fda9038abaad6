"""fastmae.ops.gelu_mlp (the MLP that recomputes its GELU in backward) against its composition:
forward and backward over odd shapes, dtypes, autocast, frozen parameters; what it keeps for
backward; torch.compile; bad input."""
import gc
import zlib
import weakref

import pytest
import torch
import torch.utils._pytree as pytree
from helpers import assert_close_to_truth
from torch.utils._python_dispatch import TorchDispatchMode

from fastmae.ops import mlp as mlp_mod
from fastmae.ops.mlp import gelu_mlp, gelu_mlp_ref

# (leading shape of x, D, H): a single row, odd sizes, the MAE encoder and decoder widths (cut down)
SHAPES = [((1,), 1, 3), ((2, 7), 5, 29), ((3, 50), 64, 256), ((2, 197), 32, 128)]
# Tolerance (STYLE.md, helpers.assert_close_to_truth with the l2 norm): the relative error against
# float64 may be at most twice the composition's at the same precision, plus this
ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}
NAMES = ("out", "dx", "dfc1_weight", "dfc1_bias", "dfc2_weight", "dfc2_bias")


def _inputs(lead, D, H, dtype, bias=True, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, D, generator=g)
    w1 = torch.randn(H, D, generator=g) / D ** 0.5
    w2 = torch.randn(D, H, generator=g) / H ** 0.5
    b1 = torch.randn(H, generator=g) if bias else None
    b2 = torch.randn(D, generator=g) if bias else None
    grad = torch.randn(*lead, D, generator=g)
    return [None if t is None else t.to(device, dtype) for t in (x, w1, b1, w2, b2)], grad.to(device, dtype)


def _run(fn, tensors, grad, approximate="none", autocast=None, requires=(True,) * 5):
    leaves = [None if t is None else t.detach().clone().requires_grad_(r) for t, r in zip(tensors, requires)]
    with torch.autocast(tensors[0].device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = fn(*leaves, approximate=approximate)
    wrt = [t for t in leaves if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(out, wrt, grad.to(out.dtype)))
    return [out] + [next(grads) if t is not None and t.requires_grad else None for t in leaves]


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_composition(shape, dtype, bias, approximate):
    lead, D, H = shape
    tensors, grad = _inputs(lead, D, H, dtype, bias, seed=zlib.crc32(repr((shape, dtype, bias)).encode()))
    truth = _run(gelu_mlp_ref, [None if t is None else t.double() for t in tensors], grad.double(), approximate)
    ref = _run(gelu_mlp_ref, tensors, grad, approximate)
    fast = _run(gelu_mlp, tensors, grad, approximate)
    for name, f, r, t in zip(NAMES, fast, ref, truth):
        if t is None:
            assert f is None and r is None, name
            continue
        assert f.dtype == r.dtype == dtype and f.shape == r.shape, name
        assert_close_to_truth(f, t, r, atol=ATOL[dtype], norm="l2", name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("chunk_rows", [1, 3, 16])  # 23, 8 and 2 chunks (of 12 and 11 rows)
def test_chunked_backward(chunk_rows, dtype, monkeypatch):
    """Backward in chunks of rows (the fp32/fp64 path at large sizes), a tail chunk included:
    23 rows of hidden width 40."""
    monkeypatch.setattr(mlp_mod, "CHUNK_BYTES", chunk_rows * 40 * torch.tensor([], dtype=dtype).element_size())
    monkeypatch.setattr(mlp_mod, "MIN_CHUNK_ROWS", 1)
    tensors, grad = _inputs((23,), 9, 40, dtype, seed=chunk_rows)
    truth = _run(gelu_mlp_ref, [t.double() for t in tensors], grad.double())
    ref = _run(gelu_mlp_ref, tensors, grad)
    fast = _run(gelu_mlp, tensors, grad)
    for name, f, r, t in zip(NAMES, fast, ref, truth):
        assert_close_to_truth(f, t, r, atol=1e-6, norm="l2", name=name)


def test_chunks_on_cpu_only():
    """Rows are chunked for fp32/fp64 CPU tensors only: one chunk in bf16 and on other devices."""
    rows = 24000
    assert mlp_mod._chunk_rows(torch.empty(rows, 256)) < rows
    assert mlp_mod._chunk_rows(torch.empty(rows, 256, dtype=torch.float64)) < rows
    assert mlp_mod._chunk_rows(torch.empty(rows, 256, dtype=torch.bfloat16)) == rows
    assert mlp_mod._chunk_rows(torch.empty(rows, 256, device="meta")) == rows


@pytest.mark.parametrize("autocast", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_same_as_composition(autocast):
    """Under autocast both cast to the autocast dtype the same way: outputs and gradients (fp32
    leaves) come out bitwise equal at these shapes (the same ATen kernels on the same operands)."""
    tensors, grad = _inputs((2, 9), 16, 64, torch.float32)
    fast = _run(gelu_mlp, tensors, grad, autocast=autocast)
    ref = _run(gelu_mlp_ref, tensors, grad, autocast=autocast)
    assert fast[0].dtype == autocast
    for name, f, r in zip(NAMES, fast, ref):
        assert f.dtype == r.dtype, name
        torch.testing.assert_close(f, r, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("requires", [(False, True, True, True, True), (True, False, False, True, True),
                                      (True, True, True, False, False), (True, False, False, False, False)],
                         ids=["frozen-input", "frozen-fc1", "frozen-fc2", "input-only"])
def test_partial_requires_grad(requires):
    tensors, grad = _inputs((3, 5), 8, 24, torch.float32)
    fast = _run(gelu_mlp, tensors, grad, requires=requires)
    ref = _run(gelu_mlp_ref, tensors, grad, requires=requires)
    for name, f, r in zip(NAMES, fast, ref):
        if r is None:
            assert f is None, name
        else:
            torch.testing.assert_close(f, r, msg=name)


def test_gradcheck_float64():
    tensors, _ = _inputs((2, 3), 4, 6, torch.float64)
    leaves = [t.requires_grad_() for t in tensors]
    assert torch.autograd.gradcheck(lambda *a: gelu_mlp(*a), leaves)


class _Allocations(TorchDispatchMode):
    """Weak references to every tensor an ATen op returns while the mode is active."""

    def __init__(self):
        super().__init__()
        self.refs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.refs += [weakref.ref(t) for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def _kept_bytes(fn, tensors):
    """Bytes of the distinct storages created by the forward of one call that are still alive
    after it, the output aside: what the call keeps for backward, by whatever means."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    with _Allocations() as allocs:
        out = fn(*leaves)
    gc.collect()
    given = {t.untyped_storage().data_ptr() for t in leaves + [out]}  # views of these are not new
    storages = {}
    for ref in allocs.refs:
        t = ref()
        if t is not None and t.untyped_storage().data_ptr() not in given:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def test_keeps_no_activation():
    """It keeps fc1's output (x and the weights are the caller's); the composition keeps the GELU
    output too."""
    lead, D, H = (4, 50), 32, 128
    tensors, _ = _inputs(lead, D, H, torch.float32)
    hidden_bytes = 4 * 200 * H
    assert _kept_bytes(gelu_mlp, tensors) == hidden_bytes
    assert _kept_bytes(gelu_mlp_ref, tensors) == 2 * hidden_bytes


def test_keeps_no_weight_copy_under_autocast():
    """Under bf16 autocast it keeps the bf16 copy of x and fc1's output, not the bf16 copies of the
    weights (backward casts them again); the composition keeps those and the activation too."""
    lead, D, H = (4, 50), 32, 128
    tensors, _ = _inputs(lead, D, H, torch.float32)

    def under_autocast(fn):
        def run(*args):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(*args)
        return run

    x_bytes, hidden_bytes, weight_bytes = 2 * 200 * D, 2 * 200 * H, 2 * 2 * D * H
    assert _kept_bytes(under_autocast(gelu_mlp), tensors) == x_bytes + hidden_bytes
    assert _kept_bytes(under_autocast(gelu_mlp_ref), tensors) == x_bytes + 2 * hidden_bytes + weight_bytes


def test_compile_fullgraph_matches_eager():
    tensors, grad = _inputs((2, 11), 16, 48, torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(gelu_mlp, fullgraph=True, backend="aot_eager")
    fast = _run(compiled, tensors, grad)
    ref = _run(gelu_mlp_ref, tensors, grad)
    for name, f, r in zip(NAMES, fast, ref):
        torch.testing.assert_close(f, r, msg=name)


def test_bad_input():
    tensors, _ = _inputs((2, 3), 4, 8, torch.float32)
    x, w1, b1, w2, b2 = tensors
    with pytest.raises(ValueError, match="approximate"):
        gelu_mlp(x, w1, b1, w2, b2, approximate="erf")
    with pytest.raises(ValueError, match="x \\[..., D\\]"):
        gelu_mlp(x[..., :3], w1, b1, w2, b2)
    with pytest.raises(ValueError, match="fc2_weight \\[D, H\\]"):
        gelu_mlp(x, w1, b1, w2.t(), b2)
    with pytest.raises(ValueError, match=r"fc1_bias of shape \[8\] \(or None\), got \(7,\)"):
        gelu_mlp(x, w1, b1[:-1], w2, b2)
    with pytest.raises(ValueError, match=r"fc2_bias of shape \[4\] \(or None\), got \(4, 1\)"):
        gelu_mlp(x, w1, b1, w2, b2[:, None])
