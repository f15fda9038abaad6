"""The fused ops on every backend (torch math, C++, Triton under the interpreter) against fp64
reference math, forward and backward through the public ``fastmae.ops`` functions.

Tolerance (flash-attention's rule): a backend's error against the fp64 reference may be at most
twice the error of plain PyTorch at the same precision (the op's torch reference composition run
on the same low-precision inputs) plus a small atol relative to the reference's magnitude; a
failure names the worst element. Shapes reach every tail path (N = 1, L from 4 to 272, K from 1 to
L - 1, p from 4 to 48, C in 1/3, non-square grids). Also: outputs allocated on NaN-filled memory
(so an unwritten element fails), determinism, every bad-input error, ``torch.library.opcheck`` and
``torch.compile(fullgraph=True)`` of every registered op.
"""
import math
import sys
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fastmae import ops
from fastmae.ops import _backend
from fastmae.ops.gather_mask import gather_mask_ref
from fastmae.ops.norm_mse_loss import norm_mse_loss_ref
from fastmae.ops.unshuffle_scatter import unshuffle_scatter_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# atol, relative to the largest reference magnitude: summation-order noise at each precision.
ATOL = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}
# The baseline itself must sit this close to the fp64 math (relative to its magnitude), or the
# 2x rule would excuse a backend that shares a bug with the torch composition.
BASELINE_RTOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
EPS = 1e-6

# gather_mask: (N, C, H, W, p, K); L = (H/p) * (W/p)
GATHER_CASES = [
    (1, 1, 8, 8, 4, 1),  # L = 4, K = 1
    (2, 3, 32, 32, 16, 3),  # L = 4, K = L - 1
    (3, 3, 24, 40, 8, 7),  # non-square grid 3 x 5
    (2, 1, 28, 56, 14, 5),  # p = 14, grid 2 x 4
    (5, 3, 48, 32, 16, 2),  # grid 3 x 2
    (1, 3, 64, 68, 4, 200),  # L = 272
]
# unshuffle_scatter: (N, K, L, D); D = 1, odd, and across the C++ column-block boundary (64/128).
# BLOCK_CASES: rows large enough that the C++ backward takes a task's rows j in several blocks
# (3 chunks each here) at up to 4 threads (see test_cpp_unshuffle_scatter_blocks for any core count)
BLOCK_CASES = [
    (9, 20, 150, 2064),  # a full group of 8 samples and one more
    (2, 10, 100, 2050),  # D % 16 != 0
]
UNSHUFFLE_CASES = [
    (2, 0, 4, 8),  # K = 0: only the cls token kept
    (1, 1, 4, 8),
    (2, 3, 4, 33),
    (1, 5, 6, 1),
    (3, 7, 15, 64),
    (4, 49, 196, 130),
    (2, 100, 272, 40),
    (9, 5, 16, 48),  # N past the C++ backward's groups of 8 samples, D % 16 == 0
    (17, 3, 8, 40),  # two full groups and one sample, D % 16 != 0
    *BLOCK_CASES,
    (2, 3, 5, 0),  # D = 0: empty rows
]
# norm_mse_loss: (N, C, H, W, p)
LOSS_CASES = [
    (1, 1, 8, 8, 4),
    (2, 3, 32, 48, 8),
    (3, 3, 28, 28, 14),
    (2, 3, 32, 32, 16),
    (1, 1, 64, 68, 4),  # L = 272
    (2, 1, 16, 24, 8),  # C = 1, p a multiple of 8 (the C++ vector path, 8-pixel groups)
    (2, 1, 32, 48, 16),  # C = 1, p a multiple of 16 (16-pixel groups)
    (1, 3, 64, 32, 32),  # two 16-pixel groups per patch row
    (1, 3, 48, 96, 48),  # three
    (2, 3, 48, 72, 24),  # three 8-pixel groups per patch row
]


def _id(case):
    return "x".join(map(str, case))


def _gen(request):
    """A generator seeded from the test's id: fresh inputs per case, reproducible per case."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.name.encode()))


def _randn(gen, *shape, dtype=torch.float32, requires_grad=False):
    t = torch.randn(*shape, generator=gen).to(dtype)
    return t.requires_grad_(requires_grad)


def _masking(gen, N, L, K):
    """ids_shuffle, ids_keep, ids_restore and mask [N, L] (1 = removed) as MAE draws them."""
    ids_shuffle = torch.rand(N, L, generator=gen).argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones(N, L)
    mask[:, :K] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_shuffle, ids_shuffle[:, :K].contiguous(), ids_restore, mask


def assert_close(name, out, ref, baseline, dtype):
    """max |out - ref| <= 2 max |baseline - ref| + atol; ``ref`` is fp64 math, ``baseline`` plain
    PyTorch at ``dtype`` (itself checked against ``ref``). On failure, report the worst element."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    ref = ref.detach().double()
    err = (out.detach().double() - ref).abs().nan_to_num(nan=math.inf)
    base = (baseline.detach().double() - ref).abs().max().item() if ref.numel() else 0.0
    scale = ref.abs().max().item() if ref.numel() else 0.0
    bound = 2 * base + ATOL[dtype] * scale
    assert base <= BASELINE_RTOL[dtype] * scale, (
        f"{name} ({dtype}): plain PyTorch is {base:.3g} off the fp64 reference (more than "
        f"{BASELINE_RTOL[dtype]:g} x {scale:.3g}): the reference composition disagrees with the fp64 math")
    if ref.numel() and err.max().item() > bound:
        idx = tuple(int(i) for i in np.unravel_index(int(err.argmax()), tuple(err.shape)))
        raise AssertionError(
            f"{name} ({dtype}): worst element {idx}: got {out[idx].item()!r}, expected {ref[idx].item()!r}; "
            f"|error| {err.max().item():.3g} > bound {bound:.3g} (2 x torch's error {base:.3g} + atol "
            f"{ATOL[dtype]:g} x {scale:.3g})")


@pytest.fixture(autouse=True)
def _outputs_on_nan(nan_memory):
    """Every output of every test here is allocated on NaN (conftest's ``nan_memory``)."""


def _skip_big_on_triton(backend, too_big):
    if backend == "triton" and too_big:
        pytest.skip("large shape: too slow under the Triton interpreter (small shapes cover the kernel)")


# ============================================================================ gather_mask
def gather_truth64(imgs, ids_keep, p):
    """fp64 truth written independently of ``gather_mask_ref``: ``F.unfold`` patches (Conv2d
    weight order c, i, j) picked by advanced indexing; its autograd gives the backward truth."""
    patches = F.unfold(imgs.double(), kernel_size=p, stride=p).transpose(1, 2)  # [N, L, C*p*p]
    return torch.stack([patches[n, ids_keep[n]] for n in range(imgs.shape[0])])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GATHER_CASES, ids=_id)
def test_gather_mask(case, dtype, backend, request):
    N, C, H, W, p, K = case
    L = (H // p) * (W // p)
    _skip_big_on_triton(backend, N * C * H * W > 150_000)
    gen = _gen(request)
    imgs = _randn(gen, N, C, H, W, dtype=dtype, requires_grad=True)
    _, ids_keep, _, _ = _masking(gen, N, L, K)
    grad = _randn(gen, N, K, C * p * p, dtype=dtype)

    out = ops.gather_mask(imgs, ids_keep, p)
    out.backward(grad)

    imgs64 = imgs.detach().double().requires_grad_()
    ref = gather_truth64(imgs64, ids_keep, p)
    ref.backward(grad.double())
    base_imgs = imgs.detach().clone().requires_grad_()
    base = gather_mask_ref(base_imgs, ids_keep, p)
    base.backward(grad)
    assert out.dtype == dtype and imgs.grad.dtype == dtype
    assert_close("gather_mask out", out, ref, base, dtype)
    assert_close("gather_mask dimgs", imgs.grad, imgs64.grad, base_imgs.grad, dtype)


@pytest.mark.parametrize("N, C", [(2, 0), (0, 3)], ids=["C=0", "N=0"])
def test_gather_mask_empty(N, C, backend):
    """Images with no channels or no samples: empty outputs and gradients of the shapes the torch
    composition gives, on every backend (the C++ backward once refused a 0-value row)."""
    imgs = torch.randn(N, C, 8, 12, requires_grad=True)
    ids = torch.rand(N, 6).argsort(1)[:, :2]
    out = ops.gather_mask(imgs, ids, 4)
    base_imgs = imgs.detach().clone().requires_grad_()
    base = gather_mask_ref(base_imgs, ids, 4)
    assert out.shape == base.shape == (N, 2, C * 16)
    grad = torch.randn_like(out)
    out.backward(grad)
    base.backward(grad)
    assert imgs.grad.shape == base_imgs.grad.shape == imgs.shape


def test_gather_mask_repeated_patch(backend):
    """A patch kept twice in a sample (masking never does it): its rows' gradients sum on the C++
    and torch backends, as autograd of the composition does; the Triton backward, whose inverse
    map holds one row per patch, refuses it instead of dropping a row."""
    imgs = torch.randn(2, 3, 16, 16, requires_grad=True)
    ids = torch.tensor([[0, 2, 0], [3, 3, 1]])
    grad = torch.randn(2, 3, 192)
    out = ops.gather_mask(imgs, ids, 8)
    imgs64 = imgs.detach().double().requires_grad_()
    gather_truth64(imgs64, ids, 8).backward(grad.double())
    assert_close("out", out, gather_truth64(imgs64.detach(), ids, 8), gather_mask_ref(imgs.detach(), ids, 8),
                 torch.float32)
    if backend == "triton":
        with pytest.raises(ValueError, match="ids_keep repeats a patch within a sample"):
            out.backward(grad)
        return
    out.backward(grad)
    base = imgs.detach().clone().requires_grad_()
    gather_mask_ref(base, ids, 8).backward(grad)
    assert_close("dimgs", imgs.grad, imgs64.grad, base.grad, torch.float32)


# ============================================================================ unshuffle_scatter
@pytest.mark.parametrize("pos", ["pos", "nopos"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", UNSHUFFLE_CASES, ids=_id)
def test_unshuffle_scatter(case, dtype, pos, backend, request):
    N, K, L, D = case
    _skip_big_on_triton(backend, N * (L + 1) * D > 150_000)
    gen = _gen(request)
    x = _randn(gen, N, 1 + K, D, dtype=dtype, requires_grad=True)
    mask_token = _randn(gen, 1, 1, D, dtype=dtype, requires_grad=True)  # the model's shape
    pos_embed = _randn(gen, 1, 1 + L, D, dtype=dtype, requires_grad=True) if pos == "pos" else None
    _, _, ids_restore, _ = _masking(gen, N, L, K)
    grad = _randn(gen, N, 1 + L, D, dtype=dtype)
    leaves = [x, mask_token] + ([pos_embed] if pos_embed is not None else [])

    out = ops.unshuffle_scatter(x, mask_token, ids_restore, pos_embed)
    out.backward(grad)
    check_unshuffle(out, leaves, ids_restore, grad, dtype)


def unshuffle_truth64(x, mask_token, ids_restore, pos_embed=None):
    """fp64 truth written independently of ``unshuffle_scatter_ref``: the decoder input built row
    by row from the definition (row 0 the cls token; row 1+l token ids_restore[l] if kept, else the
    mask token; plus the position)."""
    N, K1, D = x.shape
    rows = []
    for n in range(N):
        rows.append(x[n, 0])
        for r in ids_restore[n].tolist():
            rows.append(x[n, 1 + r] if r < K1 - 1 else mask_token.reshape(D))
    out = torch.stack(rows).reshape(N, 1 + ids_restore.shape[1], D).double()
    return out if pos_embed is None else out + pos_embed.reshape(1, out.shape[1], D).double()


def check_unshuffle(out, leaves, ids_restore, grad, dtype):
    """``out`` and the gradients of ``leaves`` (x, mask_token[, pos_embed]; any device) against
    an independent fp64 truth and the reference in plain PyTorch at ``dtype``, on the CPU."""
    ids_restore, grad = ids_restore.cpu(), grad.cpu()

    def run(fn, cast):
        ls = [t.detach().cpu().to(cast).requires_grad_() for t in leaves]
        r = fn(ls[0], ls[1], ids_restore, ls[2] if len(ls) == 3 else None)
        r.backward(grad.to(r.dtype))
        return r, ls

    ref, ref_leaves = run(unshuffle_truth64, torch.float64)
    base, base_leaves = run(unshuffle_scatter_ref, dtype)
    assert out.dtype == dtype
    assert_close("unshuffle_scatter out", out.cpu(), ref, base, dtype)
    for name, t, r, b in zip(["dx", "dmask_token", "dpos_embed"], leaves, ref_leaves, base_leaves):
        assert t.grad.dtype == dtype and t.grad.shape == t.shape, name
        assert_close(f"unshuffle_scatter {name}", t.grad.cpu(), r.grad, b.grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_unshuffle_scatter_non_permutation(dtype):
    """ids_restore that is not a permutation (repeated and missing entries) takes the C++
    kernel's general path, which sums repeated rows as autograd of the reference does; masking
    always gives permutations, which take the one-pass path the other tests cover."""
    _require_cpp()
    N, K, L, D = 3, 5, 12, 40
    gen = torch.Generator().manual_seed(7)
    x = _randn(gen, N, 1 + K, D, dtype=dtype, requires_grad=True)
    tok = _randn(gen, 1, 1, D, dtype=dtype, requires_grad=True)
    pos = _randn(gen, 1, 1 + L, D, dtype=dtype, requires_grad=True)
    ids_restore = torch.randint(0, L, (N, L), generator=gen)
    ids_restore[0, :3] = 2  # a kept row (index < K) used three times
    grad = _randn(gen, N, 1 + L, D, dtype=dtype)
    out = ops.unshuffle_scatter(x, tok, ids_restore, pos)
    out.backward(grad)
    check_unshuffle(out, [x, tok, pos], ids_restore, grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_unshuffle_scatter_unrestored_token(dtype):
    """ids_restore in which no kept token appears twice but one appears nowhere (a removed index
    repeats in its place) still takes the C++ one-pass backward, which must write that token's dx
    row as zeros (dx is allocated on NaN here, so a row left unwritten shows)."""
    _require_cpp()
    c = torch.ops.fastmae_C
    N, K, L, D = 2, 3, 8, 32
    gen = torch.Generator().manual_seed(11)
    ids = torch.tensor([[0, 1, 5, 5, 6, 7, 4, 3], [7, 2, 0, 6, 1, 5, 4, 3]])  # sample 0: token 2 nowhere
    grad = _randn(gen, N, 1 + L, D, dtype=dtype)
    dx, dmask, dpos = c.unshuffle_scatter_bwd(grad, ids, K, True)
    x = torch.zeros(N, 1 + K, D, dtype=torch.float64, requires_grad=True)
    tok = torch.zeros(D, dtype=torch.float64, requires_grad=True)
    pos = torch.zeros(1 + L, D, dtype=torch.float64, requires_grad=True)
    unshuffle_truth64(x, tok, ids, pos).backward(grad.double())
    assert torch.equal(dx[0, 3], torch.zeros(D, dtype=dtype))
    assert torch.equal(dx.double(), x.grad)  # a gather: exact
    assert_close("dmask_token", dmask, tok.grad, tok.grad.to(dtype), dtype)
    assert_close("dpos_embed", dpos, pos.grad, pos.grad.to(dtype), dtype)


def test_unshuffle_scatter_fp32_token_and_pos_with_bf16_x(backend):
    """mask_token / pos_embed of another dtype than x (fp32 parameters, bf16 activations)."""
    N, K, L, D = 2, 3, 8, 16
    x = torch.randn(N, 1 + K, D).bfloat16().requires_grad_()
    tok = torch.randn(1, 1, D, requires_grad=True)
    pos = torch.randn(1, 1 + L, D, requires_grad=True)
    ids_restore = torch.rand(N, L).argsort(1)
    out = ops.unshuffle_scatter(x, tok, ids_restore, pos)
    grad = torch.randn(N, 1 + L, D).bfloat16()
    out.backward(grad)
    assert out.dtype == torch.bfloat16 and tok.grad.dtype == torch.float32 and pos.grad.dtype == torch.float32
    ref = unshuffle_scatter_ref(x.detach(), tok.detach(), ids_restore, pos.detach().bfloat16())
    assert_close("out", out, ref.double(), ref, torch.bfloat16)
    # gradients against fp64: dx is a gather of bf16 values (exact); the parameters' gradients are
    # fp32 sums rounded once to x's dtype (the op's documented precision): within one bf16 rounding
    # (one bf16 ulp under the Triton interpreter, whose fp32 -> bf16 conversion truncates)
    leaves = [t.detach().double().requires_grad_() for t in (x, tok, pos)]
    unshuffle_scatter_ref(leaves[0], leaves[1], ids_restore, leaves[2]).backward(grad.double())
    assert torch.equal(x.grad.double(), leaves[0].grad)
    rtol = 2**-7 if backend == "triton" else 2**-8
    for name, got, truth in [("dmask_token", tok.grad, leaves[1].grad), ("dpos", pos.grad, leaves[2].grad)]:
        err = ((got.double() - truth).abs() / truth.abs().clamp_min(1e-6)).max().item()
        assert err <= rtol, f"{name}: relative error {err:.3g} against fp64, allowed {rtol:.3g}"


def test_unshuffle_scatter_non_permutation(backend):
    """ids_restore that repeats a token and skips another (masking never makes one): the C++ and
    torch backwards give autograd's answer (the repeat summed, the skipped token zero); the Triton
    backward refuses it (its dx rows would race or stay unwritten)."""
    x = torch.randn(2, 3, 4, requires_grad=True)  # K = 2
    tok = torch.randn(4, requires_grad=True)
    ids = torch.tensor([[0, 0, 2, 3], [1, 0, 2, 3]])  # sample 0: token 0 twice, token 1 never
    grad = torch.randn(2, 5, 4)
    out = ops.unshuffle_scatter(x, tok, ids)
    if backend == "triton":
        with pytest.raises(ValueError, match="ids_restore is not a permutation"):
            out.backward(grad)
        return
    out.backward(grad)
    x64, tok64 = x.detach().double().requires_grad_(), tok.detach().double().requires_grad_()
    unshuffle_truth64(x64, tok64, ids).backward(grad.double())
    torch.testing.assert_close(x.grad.double(), x64.grad)
    torch.testing.assert_close(tok.grad.double(), tok64.grad)


def test_size_one_last_dimension_with_any_stride(backend):
    """A last dimension of size 1 may carry any stride, and contiguous() keeps it (e.g. a transposed
    [N, 1, D] view): every op takes such tensors, forward and backward, on every backend."""
    def odd(*shape):  # the shape with its last two dimensions' strides swapped, last size 1
        return torch.randn(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2)

    # unshuffle_scatter, D = 1 (and its upstream gradient likewise)
    x, tok = odd(2, 3, 1).requires_grad_(), torch.randn(1, requires_grad=True)
    ids_restore = torch.rand(2, 5).argsort(1)
    out = ops.unshuffle_scatter(x, tok, ids_restore)
    grad = odd(2, 6, 1)
    out.backward(grad)
    x64, tok64 = x.detach().double().requires_grad_(), tok.detach().double().requires_grad_()
    ref = unshuffle_truth64(x64, tok64, ids_restore)
    ref.backward(grad.double())
    torch.testing.assert_close(out.double(), ref)
    torch.testing.assert_close(x.grad.double(), x64.grad)
    # gather_mask, W = p = 1, and K = 1 ids_keep of stride 2
    imgs = odd(2, 3, 4, 1).requires_grad_()
    ids_keep = torch.tensor([[1, 0]]).T
    out = ops.gather_mask(imgs, ids_keep, 1)
    out.backward(torch.ones_like(out))
    imgs64 = imgs.detach().double().requires_grad_()
    ref = gather_truth64(imgs64, ids_keep, 1)
    ref.backward(torch.ones_like(ref))
    torch.testing.assert_close(out.double(), ref)
    torch.testing.assert_close(imgs.grad.double(), imgs64.grad)
    # norm_mse_loss, P = 1 (pred) and W = 1 (imgs)
    pred, imgs = odd(2, 3, 1).requires_grad_(), odd(2, 1, 3, 1)
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    loss = ops.norm_mse_loss(pred, imgs, mask, 1, norm_pix_loss=False)
    loss.backward()
    pred64 = pred.detach().double().requires_grad_()
    ref = loss_ref64(pred64, imgs, mask, None, 1, False, EPS)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref)
    torch.testing.assert_close(pred.grad.double(), pred64.grad)


@pytest.mark.parametrize("D", [96, 2064])
def test_unshuffle_scatter_grad_deterministic(backend, D):
    """dmask_token and dpos are reductions without atomics: bitwise the same on every run (and,
    for the C++ kernels, for any thread count: at D = 2064 the backward's tasks split their rows
    into blocks, which start elsewhere with 1 thread than with 2 or 4)."""
    if backend == "triton":
        pytest.skip("the Triton interpreter runs programs one at a time, so a race could not show here: "
                    "tests/test_cuda.py checks this on a GPU, test_triton_kernels that no atomics are used")
    N, K, L = 16, 49, 196
    x = torch.randn(N, 1 + K, D, requires_grad=True)
    tok = torch.randn(D, requires_grad=True)
    pos = torch.randn(1 + L, D, requires_grad=True)
    ids_restore = torch.rand(N, L).argsort(1)
    grad = torch.randn(N, 1 + L, D) * 1e3  # large values make order-dependent rounding visible

    def grads(threads):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for t in (x, tok, pos):
                t.grad = None
            ops.unshuffle_scatter(x, tok, ids_restore, pos).backward(grad)
            return [t.grad.clone() for t in (x, tok, pos)]
        finally:
            torch.set_num_threads(old)

    first = grads(1)
    # At D = 2064 the tasks of 2 and 4 threads start at chunks 13 and 7, 14, 21: none of them
    # starts a block at 1 thread (blocks of 3 chunks).
    for threads in (1, 2, 4):
        again = grads(threads)
        for name, a, b in zip(["dx", "dmask_token", "dpos"], first, again):
            assert torch.equal(a, b), f"{name} differs between runs ({threads} threads)"


# ============================================================================ norm_mse_loss
def loss_ref64(pred, imgs, mask, ids, p, norm_pix, eps):
    """The official ``forward_loss`` in fp64 (patchify in (i, j, c) order), with optional rows."""
    N, C, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.double().reshape(N, C, h, p, w, p)
    target = torch.einsum("nchpwq->nhwpqc", x).reshape(N, h * w, p * p * C)
    if ids is not None:
        target = torch.gather(target, 1, ids.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    if mask is None:
        mask = torch.ones_like(loss)
    return (loss * mask.double()).sum() / mask.double().sum()


LOSS_MODES = ["full", "ids", "ids+weights"]  # pred for every patch + mask / removed rows only


@pytest.mark.parametrize("norm_pix", [True, False], ids=["normpix", "raw"])
@pytest.mark.parametrize("mode", LOSS_MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LOSS_CASES, ids=_id)
def test_norm_mse_loss(case, dtype, mode, norm_pix, backend, request):
    N, C, H, W, p = case
    L, P = (H // p) * (W // p), p * p * C
    _skip_big_on_triton(backend, N * L > 256)  # one program per row
    gen = _gen(request)
    K = max(1, L // 4)
    imgs = (_randn(gen, N, C, H, W) * 0.5 + 0.3).to(dtype)  # off-zero mean, as real pixels
    ids_shuffle, _, _, mask = _masking(gen, N, L, K)
    ids = None if mode == "full" else ids_shuffle[:, K:].contiguous()
    M = L if ids is None else L - K
    weight = mask if mode == "full" else (torch.rand(N, M, generator=gen) if mode == "ids+weights" else None)
    pred = _randn(gen, N, M, P, dtype=dtype, requires_grad=True)
    g = torch.rand((), generator=gen) + 0.5  # a non-unit upstream gradient

    loss = ops.norm_mse_loss(pred, imgs, weight, p, norm_pix_loss=norm_pix, eps=EPS, ids=ids)
    (loss * g).backward()

    pred64 = pred.detach().double().requires_grad_()
    ref = loss_ref64(pred64, imgs, weight, ids, p, norm_pix, EPS)
    (ref * g.double()).backward()
    base_pred = pred.detach().clone().requires_grad_()
    w_base = weight if weight is not None else torch.ones(N, M)
    base = norm_mse_loss_ref(base_pred, imgs, w_base, ids, p, norm_pix, EPS)
    (base * g).backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert pred.grad.dtype == dtype
    assert_close("norm_mse_loss", loss, ref, base, torch.float32)
    assert_close("norm_mse_loss dpred", pred.grad, pred64.grad, base_pred.grad, dtype)


@pytest.mark.parametrize("eps", [EPS, 1e-2])
def test_norm_mse_loss_flat_patches(eps, backend, request):
    """Flat and near-flat patches (sky, borders), where eps weighs in the divisor
    ``sqrt(var + eps)``: a constant patch, one whose pixels move by about one 8-bit step
    (variance ~1e-5) and one that moves by 1e-5; at the default and a large eps. (Random patches
    alone, variance ~0.25, cannot tell ``sqrt(var + eps)`` from ``sqrt(var) + eps``.)"""
    N, C, H, W, p = 2, 3, 32, 32, 8
    L, P = 16, 192
    gen = _gen(request)
    imgs = _randn(gen, N, C, H, W) * 0.5 + 0.3
    imgs[:, :, :8, :8] = 0.7
    imgs[:, :, :8, 8:16] = 0.7 + 3e-3 * _randn(gen, N, C, 8, 8)
    imgs[:, :, 8:16, :8] = -0.2 + 1e-5 * _randn(gen, N, C, 8, 8)
    _, _, _, mask = _masking(gen, N, L, 4)
    mask[:, [0, 1, 4]] = 1  # the three flat patches are among the removed ones
    pred = _randn(gen, N, L, P, requires_grad=True)
    loss = ops.norm_mse_loss(pred, imgs, mask, p, norm_pix_loss=True, eps=eps)
    loss.backward()
    _check_norm_pix_loss(loss, pred, imgs, mask, p, eps)


def _check_norm_pix_loss(loss, pred, imgs, mask, p, eps):
    """``loss`` (backward already run into ``pred.grad``) and ``pred.grad`` against the fp64
    truth, with the reference op in ``pred``'s dtype as the error baseline (STYLE.md rule)."""
    pred64 = pred.detach().double().requires_grad_()
    ref = loss_ref64(pred64, imgs, mask, None, p, True, eps)
    ref.backward()
    base_pred = pred.detach().clone().requires_grad_()
    base = norm_mse_loss_ref(base_pred, imgs, mask, None, p, True, eps)
    base.backward()
    assert_close("norm_mse_loss", loss, ref, base, torch.float32)
    assert_close("norm_mse_loss dpred", pred.grad, pred64.grad, base_pred.grad, pred.dtype)


@pytest.mark.parametrize("pred_dtype,img_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16)],
                         ids=["bf16pred-fp32imgs", "fp32pred-fp16imgs"])
def test_norm_mse_loss_mixed_dtypes(pred_dtype, img_dtype, backend):
    N, C, H, W, p = 2, 3, 16, 24, 8
    L, P = 6, 192
    imgs = torch.rand(N, C, H, W).to(img_dtype)
    pred = torch.randn(N, L, P).to(pred_dtype).requires_grad_()
    mask = (torch.rand(N, L) > 0.5).float()
    mask[:, 0] = 1
    loss = ops.norm_mse_loss(pred, imgs, mask, p)
    loss.backward()
    _check_norm_pix_loss(loss, pred, imgs, mask, p, EPS)


def test_norm_mse_loss_deterministic(backend):
    """The loss is a fixed-order reduction: bitwise the same on every run and thread count."""
    if backend == "triton":
        pytest.skip("the Triton interpreter runs programs one at a time, so a race could not show here: "
                    "tests/test_cuda.py checks this on a GPU")
    N, C, H, W, p = 8, 3, 64, 64, 8
    imgs = torch.rand(N, C, H, W)
    pred = torch.randn(N, 64, p * p * C)
    mask = (torch.rand(N, 64) > 0.25).float()
    first = ops.norm_mse_loss(pred, imgs, mask, p)
    old = torch.get_num_threads()
    try:
        for threads in (old, 1):
            torch.set_num_threads(threads)
            assert torch.equal(ops.norm_mse_loss(pred, imgs, mask, p), first), f"{threads} threads"
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("case", BLOCK_CASES, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_unshuffle_scatter_blocks(case, dtype, monkeypatch, request):
    """The C++ backward over several blocks per task against the truth, at 1 thread: one task
    holds every row j, so it runs several blocks whatever the machine's core count."""
    _require_cpp()
    monkeypatch.setenv("FASTMAE_BACKEND", "cpp")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        test_unshuffle_scatter(case, dtype, "pos", "cpp", request)
    finally:
        torch.set_num_threads(old)


# ============================================================================ C++ ISA variants
@pytest.mark.parametrize("isa", ["avx2", "base"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_isa_variants(dtype, isa, monkeypatch, request):
    """The C++ hot loops exist three times (AVX-512 with AVX512-BF16, AVX2 and the baseline x86-64
    ISA; the best the CPU runs is chosen at run time, and the rest of this file tests that one):
    run the lower ones too (FASTMAE_CPU_ISA caps the variant), over shapes with tails."""
    _require_cpp()
    monkeypatch.setenv("FASTMAE_BACKEND", "cpp")
    monkeypatch.setenv("FASTMAE_CPU_ISA", isa)
    test_gather_mask(GATHER_CASES[2], dtype, "cpp", request)
    test_unshuffle_scatter(UNSHUFFLE_CASES[4], dtype, "pos", "cpp", request)
    test_unshuffle_scatter(UNSHUFFLE_CASES[5], dtype, "pos", "cpp", request)
    test_unshuffle_scatter(UNSHUFFLE_CASES[1], dtype, "nopos", "cpp", request)
    test_norm_mse_loss(LOSS_CASES[1], dtype, "full", True, "cpp", request)
    test_norm_mse_loss(LOSS_CASES[2], dtype, "ids+weights", True, "cpp", request)
    test_norm_mse_loss(LOSS_CASES[0], dtype, "ids", False, "cpp", request)
    test_norm_mse_loss(LOSS_CASES[3], dtype, "full", True, "cpp", request)
    test_norm_mse_loss(LOSS_CASES[6], dtype, "ids", True, "cpp", request)
    test_norm_mse_loss(LOSS_CASES[7], dtype, "ids+weights", True, "cpp", request)


def _cpu_has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return all(flag in flags for flag in ("avx512_bf16", "avx512vl", "avx512bw"))


def test_cpp_avx512_bf16_rounding_matches_avx2(monkeypatch):
    """The AVX-512 variant rounds fp32 to bf16 with vcvtneps2bf16, the others with integer
    arithmetic: bitwise the same results on normal values, ties (to even) included. Sums of two
    bf16 values, as unshuffle_scatter's forward makes, land on ties often. The loss at p = 16
    also interleaves its target with other instructions (two-source permutes of 16 values against
    8-wide shuffles), its sums in the same order: the same bits, forward and backward. So does
    unshuffle_scatter's backward, whose fp32 sums are rounded 16 at a time."""
    _require_cpp()
    if not _cpu_has_avx512_bf16():
        pytest.skip("this CPU has no AVX512-BF16: only one bf16 rounding runs here")
    gen = torch.Generator().manual_seed(7)
    N, K, L, D = 4, 9, 36, 48
    x = torch.randn(N, 1 + K, D, generator=gen).bfloat16()
    tok, pos = torch.randn(D, generator=gen).bfloat16(), torch.randn(1 + L, D, generator=gen).bfloat16()
    ids = torch.argsort(torch.rand(N, L, generator=gen), 1)
    imgs = torch.rand(2, 3, 32, 32, generator=gen).bfloat16()
    pred = torch.randn(2, 16, 192, generator=gen).bfloat16()
    mask = (torch.rand(2, 16, generator=gen) > 0.25).float()
    pred16, mask16 = torch.randn(2, 4, 768, generator=gen).bfloat16(), mask[:, :4].contiguous()
    f = torch.ops.fastmae_C

    grad = torch.randn(N, 1 + L, D, generator=gen).bfloat16()

    def outputs():
        return (f.unshuffle_scatter_fwd(x, tok, ids, pos),
                *f.unshuffle_scatter_bwd(grad, ids, K, True),
                f.norm_mse_loss_bwd(torch.tensor(1.0), pred, imgs, mask, None, 8, True, EPS),
                f.norm_mse_loss_bwd(torch.tensor(1.0), pred16, imgs, mask16, None, 16, True, EPS),
                f.norm_mse_loss_fwd(pred16, imgs, mask16, None, 16, True, EPS).view(1))

    monkeypatch.delenv("FASTMAE_CPU_ISA", raising=False)  # the best variant: AVX-512 here
    native = outputs()
    monkeypatch.setenv("FASTMAE_CPU_ISA", "avx2")
    names = ("unshuffle_scatter", "unshuffle_scatter dx", "dmask", "dpos", "norm_mse_loss dpred",
             "norm_mse_loss dpred, p = 16", "norm_mse_loss, p = 16")
    for name, a, b in zip(names, native, outputs(), strict=True):
        bits = torch.int16 if a.element_size() == 2 else torch.int32
        assert torch.equal(a.view(bits), b.view(bits)), f"{name}: AVX-512 and AVX2 differ"


@pytest.mark.parametrize("isa", ["native", "avx2", "base"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_streaming_stores(dtype, isa, monkeypatch, request):
    """Outputs of 16 MiB or more (gather_mask's image gradient, norm_mse_loss's dpred,
    unshuffle_scatter's decoder input), and from 1 MiB those a matmul reads next (gather_mask's
    patches, unshuffle_scatter's dx), are written with streaming stores. Force them
    (FASTMAE_CPU_STREAM=always) on small shapes whose rows allow them, and on some that do not,
    in every instruction-set variant: the same results as the reference, outputs poisoned first."""
    _require_cpp()
    monkeypatch.setenv("FASTMAE_BACKEND", "cpp")
    monkeypatch.setenv("FASTMAE_CPU_STREAM", "always")
    if isa != "native":
        monkeypatch.setenv("FASTMAE_CPU_ISA", isa)
    for case in (GATHER_CASES[1], GATHER_CASES[2], GATHER_CASES[5]):  # 64, 32 and 16-byte segments (fp32)
        test_gather_mask(case, dtype, "cpp", request)
    if dtype == torch.float32:
        test_gather_mask_repeated_patch("cpp")  # streamed and summed segments mixed
    for case in (UNSHUFFLE_CASES[4], UNSHUFFLE_CASES[5], UNSHUFFLE_CASES[6]):  # D = 64, 130 (not streamed), 40
        test_unshuffle_scatter(case, dtype, "pos", "cpp", request)
        test_unshuffle_scatter(case, dtype, "nopos", "cpp", request)
    # 8- and 16-pixel groups, C = 1 and 3; the last (p = 14) is not streamed
    for case in (LOSS_CASES[1], LOSS_CASES[3], LOSS_CASES[5], LOSS_CASES[6], LOSS_CASES[2]):
        test_norm_mse_loss(case, dtype, "full", True, "cpp", request)
        test_norm_mse_loss(case, dtype, "ids+weights", False, "cpp", request)


@pytest.mark.parametrize("isa", ["native", "avx2", "base"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_streamed_outputs_are_bitwise_equal(dtype, isa, monkeypatch):
    """Streaming stores change where the bits go, never which: every kernel with a streamed path
    gives bitwise the same output with FASTMAE_CPU_STREAM=always as with never, in every
    instruction-set variant (unshuffle_scatter's 16- and 8-value steps and their tails: D = 64, 40
    and 56; its backward's dx rows)."""
    _require_cpp()
    if isa != "native":
        monkeypatch.setenv("FASTMAE_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(11)
    f = torch.ops.fastmae_C
    runs = []
    for D in (64, 40, 56):
        N, K, L = 3, 5, 12
        x, tok = torch.randn(N, 1 + K, D, generator=gen).to(dtype), torch.randn(D, generator=gen).to(dtype)
        pos, ids = torch.randn(1 + L, D, generator=gen).to(dtype), torch.argsort(torch.rand(N, L, generator=gen), 1)
        runs.append((f"unshuffle_scatter D={D}", f.unshuffle_scatter_fwd, (x, tok, ids, pos)))
        runs.append((f"unshuffle_scatter D={D}, no pos", f.unshuffle_scatter_fwd, (x, tok, ids, None)))
        grad = torch.randn(N, 1 + L, D, generator=gen).to(dtype)
        runs.append((f"unshuffle_scatter backward D={D}", f.unshuffle_scatter_bwd, (grad, ids, K, True)))
    imgs = torch.rand(2, 3, 32, 64, generator=gen).to(dtype)
    # gather_mask: 32- and 64-byte segments paired into lines or not, odd grid widths (W = 40 at
    # p = 8, 48 at p = 16), a patch kept twice (its grid row takes the summing path), and C = 1
    # before C = 3 (the row of zeros grows)
    for C, p, W, repeat in ((1, 16, 64, False), (3, 8, 64, False), (3, 8, 40, False), (3, 16, 64, False),
                            (3, 16, 48, False), (3, 16, 48, True)):
        L = (32 // p) * (W // p)
        keep = torch.argsort(torch.rand(2, L, generator=gen), 1)[:, : L // 2].contiguous()
        if repeat:
            keep[0, 1] = keep[0, 0]
        grad = torch.randn(2, L // 2, C * p * p, generator=gen).to(dtype)
        runs.append((f"gather_mask backward C={C} p={p} W={W}{' repeat' if repeat else ''}", f.gather_mask_bwd,
                     (grad, keep, p, 32, W)))
        image = torch.rand(2, C, 32, W, generator=gen).to(dtype)
        runs.append((f"gather_mask forward C={C} p={p} W={W}{' repeat' if repeat else ''}", f.gather_mask_fwd,
                     (image, keep, p)))
    for p in (8, 16):
        L = (32 // p) * (64 // p)
        pred = torch.randn(2, L, 3 * p * p, generator=gen).to(dtype)
        mask = (torch.rand(2, L, generator=gen) > 0.25).float()
        runs.append((f"norm_mse_loss backward p={p}", f.norm_mse_loss_bwd,
                     (torch.tensor(1.0), pred, imgs, mask, None, p, True, EPS)))
    for name, fn, args in runs:
        monkeypatch.setenv("FASTMAE_CPU_STREAM", "never")
        plain = fn(*args)
        monkeypatch.setenv("FASTMAE_CPU_STREAM", "always")
        streamed = fn(*args)
        for i, (a, b) in enumerate(zip(*(o if isinstance(o, tuple) else (o,) for o in (plain, streamed)), strict=True)):
            bits = torch.int16 if a.element_size() == 2 else torch.int32
            assert torch.equal(a.view(bits), b.view(bits)), f"{name}: streamed output {i} differs"


@pytest.mark.parametrize("var, value, message", [
    ("FASTMAE_CPU_ISA", "avx9", "FASTMAE_CPU_ISA must be auto, avx512, avx2 or base"),
    ("FASTMAE_CPU_STREAM", "sometimes", "FASTMAE_CPU_STREAM must be auto, always or never"),
])
def test_cpp_settings_are_checked(var, value, message, monkeypatch):
    _require_cpp()
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=message):
        torch.ops.fastmae_C.unshuffle_scatter_fwd(torch.randn(1, 2, 8), torch.randn(8), torch.tensor([[0, 1]]),
                                                  None)


# ============================================================================ backend choice
def test_backend_choice(monkeypatch):
    """Without FASTMAE_BACKEND: CPU tensors to C++ (torch math, with one warning, when the extension
    is missing or stale), CUDA tensors to Triton (torch without it); a forced backend that cannot
    run, or an unknown name, is a clear error."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("FASTMAE_BACKEND", raising=False)
    built = _backend.has_extension()
    assert _backend.select_backend(cpu) == ("cpp" if built else "torch")
    monkeypatch.setattr(_backend, "has_triton", lambda: True)
    assert _backend.select_backend(cuda) == "triton"
    monkeypatch.setattr(_backend, "has_triton", lambda: False)
    assert _backend.select_backend(cuda) == "torch"
    monkeypatch.setattr(_backend, "REQUIRED_CPP_OPS", _backend.REQUIRED_CPP_OPS + ("no_such_op",))
    monkeypatch.setattr(_backend, "_ext_state", {})
    with pytest.warns(RuntimeWarning) as warned:
        assert _backend.select_backend(cpu) == "torch" and _backend.select_backend(cpu) == "torch"
    assert len(warned) == 1 and "torch math instead" in str(warned[0].message)
    if built:  # importable, but missing an op it should have: stale
        assert "lacks no_such_op (built from older sources)" in _backend.extension_error()
    monkeypatch.setenv("FASTMAE_BACKEND", "cpp")
    with pytest.raises(RuntimeError, match="FASTMAE_BACKEND=cpp but the extension is unavailable"):
        _backend.select_backend(cpu)
    with pytest.raises(RuntimeError, match="runs on CPU tensors only, got cuda"):
        _backend.select_backend(cuda)
    monkeypatch.setenv("FASTMAE_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="but triton is not installed"):
        _backend.select_backend(cuda)
    monkeypatch.setattr(_backend, "has_triton", lambda: True)
    with pytest.raises(RuntimeError, match="needs CUDA tensors .got cpu.*TRITON_INTERPRET=1"):
        _backend.select_backend(cpu)
    monkeypatch.setenv("FASTMAE_BACKEND", "Torch ")
    assert _backend.select_backend(cuda) == "torch"
    monkeypatch.setenv("FASTMAE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown FASTMAE_BACKEND='bogus'; choose one of torch, cpp, triton or auto"):
        _backend.select_backend(cpu)


# ============================================================================ the eager C++ route
def _route_cases(gen, dtype):
    """name -> (C++-route op, custom op, args, indices of the args to differentiate): odd shapes,
    and the variants the C++ autograd functions branch on (no pos_embed, a [1, 1, D] mask token,
    an input that needs no gradient, loss on removed rows only)."""
    mod = {name: sys.modules[f"fastmae.ops.{name}"] for name in ("gather_mask", "unshuffle_scatter", "norm_mse_loss")}
    c = torch.ops.fastmae_C
    N, C, H, W, p, K = 3, 3, 24, 40, 8, 7
    L = (H // p) * (W // p)
    _, keep, restore, mask = _masking(gen, N, L, K)
    removed = restore.argsort(1)[:, K:].contiguous()
    imgs = _randn(gen, N, C, H, W, dtype=dtype)
    Dx = 33
    x, tok = _randn(gen, N, 1 + K, Dx, dtype=dtype), _randn(gen, 1, 1, Dx, dtype=dtype)
    pos = _randn(gen, 1 + L, Dx, dtype=dtype)
    pred, pred_rm = _randn(gen, N, L, C * p * p, dtype=dtype), _randn(gen, N, L - K, C * p * p, dtype=dtype)
    us, loss = mod["unshuffle_scatter"]._unshuffle_scatter_op, mod["norm_mse_loss"]._norm_mse_loss_op
    return {
        "gather_mask": (c.gather_mask, mod["gather_mask"]._gather_mask_op, (imgs, keep, p), [0]),
        "unshuffle_scatter": (c.unshuffle_scatter, us, (x, tok, restore, pos), [0, 1, 3]),
        "unshuffle_scatter_x_only": (c.unshuffle_scatter, us, (x, tok, restore, pos), [0]),
        "unshuffle_scatter_nopos": (c.unshuffle_scatter, us, (x, tok, restore, None), [0, 1]),
        "norm_mse_loss": (c.norm_mse_loss, loss, (pred, imgs, mask, None, p, True, EPS), [0]),
        "norm_mse_loss_ids": (c.norm_mse_loss, loss, (pred_rm, imgs, torch.rand(N, L - K, generator=gen), removed, p,
                                                      False, EPS), [0]),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["gather_mask", "unshuffle_scatter", "unshuffle_scatter_x_only",
                                  "unshuffle_scatter_nopos", "norm_mse_loss", "norm_mse_loss_ids"])
def test_eager_cpp_route_matches_custom_op(name, dtype, monkeypatch, request):
    """The op registered in C++ with a C++ autograd function (the eager CPU route) gives the
    custom op's outputs and gradients bit for bit: the same kernels, reached without Python."""
    _require_cpp()
    monkeypatch.setenv("FASTMAE_BACKEND", "cpp")  # the custom op's backend
    gen = _gen(request)
    route, custom, args, wrt = _route_cases(gen, dtype)[name]
    results = []
    for fn in (route, custom):
        leaves = [a.detach().clone().requires_grad_(i in wrt) if isinstance(a, torch.Tensor) and a.is_floating_point()
                  else a for i, a in enumerate(args)]
        out = fn(*leaves)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
        grads = torch.autograd.grad(out, [leaves[i] for i in wrt], grad_out)
        results.append((out, grads))
    (out_r, grads_r), (out_c, grads_c) = results
    assert "CppNode" not in type(out_c.grad_fn).__name__ and out_r.grad_fn.name().endswith("Fn>")
    assert out_r.dtype == out_c.dtype and torch.equal(out_r, out_c)
    for i, gr, gc in zip(wrt, grads_r, grads_c):
        assert gr.shape == args[i].shape and gr.dtype == gc.dtype and torch.equal(gr, gc), f"argument {i}"


def _conversion_cases(gen, dtype):
    """name -> (public call, its float arguments, the indices to differentiate): arguments the
    public functions convert before a custom op, and the C++ route converts itself: layouts that
    are not contiguous, a mask token and position table in another dtype and shape than x's, a
    bool mask, no mask (ids given), a non-contiguous index tensor."""
    N, C, H, W, p, K, D = 3, 3, 16, 24, 8, 2, 24
    L = (H // p) * (W // p)
    _, keep, restore, mask = _masking(gen, N, L, K)
    removed = restore.argsort(1)[:, K:]
    other = torch.float32 if dtype != torch.float32 else torch.bfloat16
    imgs_cl = _randn(gen, N, C, H, W, dtype=dtype).to(memory_format=torch.channels_last)
    x_t = _randn(gen, N, D, 1 + K, dtype=dtype).transpose(1, 2)
    tok = _randn(gen, 1, 1, D, dtype=other)
    pos_t = _randn(gen, 1, D, 1 + L, dtype=other).transpose(1, 2)
    pred_t = _randn(gen, N, C * p * p, L, dtype=dtype).transpose(1, 2)
    imgs = _randn(gen, N, C, H, W, dtype=dtype)
    keep_t = keep.t().contiguous().t()
    u, g, nl = ops.unshuffle_scatter, ops.gather_mask, ops.norm_mse_loss
    return {
        "gather_noncontiguous": (lambda a, b: g(a, b, p), (imgs_cl, keep_t), [0]),
        "unshuffle_converted": (lambda a, b, c: u(a, b, restore.t().contiguous().t(), c), (x_t, tok, pos_t), [0, 1, 2]),
        "unshuffle_token_flat": (lambda a, b: u(a, b, restore), (x_t, tok.reshape(D)), [0, 1]),
        "loss_bool_mask": (lambda a, b: nl(a, b, mask.bool(), p), (pred_t, imgs_cl), [0]),
        "loss_no_mask": (lambda a, b: nl(a, b, None, p, ids=removed.t().contiguous().t()),
                         (_randn(gen, N, L - K, C * p * p, dtype=dtype), imgs), [0]),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["gather_noncontiguous", "unshuffle_converted", "unshuffle_token_flat",
                                  "loss_bool_mask", "loss_no_mask"])
def test_eager_cpp_route_converts_like_the_public_functions(name, dtype, monkeypatch, request):
    """The C++ route takes the arguments as given and makes the public functions' conversions
    itself (undoing them on the gradients): outputs and gradients, with their dtypes and shapes,
    are bitwise those of the custom-op path, which converts in Python."""
    _require_cpp()
    monkeypatch.setenv("FASTMAE_BACKEND", "cpp")
    call, args, wrt = _conversion_cases(_gen(request), dtype)[name]
    results = []
    for route in (True, False):
        if not route:
            monkeypatch.setattr(_backend, "eager_cpp", lambda *a: False)
        leaves = [a.detach().clone(memory_format=torch.preserve_format).requires_grad_(i in wrt)
                  for i, a in enumerate(args)]
        out = call(*leaves)
        assert out.grad_fn.name().endswith("Fn>") == route, out.grad_fn.name()
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
        results.append((out, torch.autograd.grad(out, [leaves[i] for i in wrt], grad_out)))
    (out_r, grads_r), (out_c, grads_c) = results
    assert out_r.dtype == out_c.dtype and out_r.shape == out_c.shape and torch.equal(out_r, out_c)
    for i, gr, gc in zip(wrt, grads_r, grads_c):
        assert gr.shape == args[i].shape and gr.dtype == gc.dtype == args[i].dtype, f"argument {i}"
        assert torch.equal(gr, gc), f"argument {i}"


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:FutureWarning", "ignore::torch.jit.TracerWarning")
def test_eager_cpp_route_only_in_plain_eager(monkeypatch, request):
    """Plain eager calls on the cpp backend take the C++ route; under a dispatch mode (what fake
    tensors and FLOP counters use), a function mode, a torch.func transform, torch.jit.trace,
    with a tensor subclass, a tensor on another device, or on another backend the public
    functions call the custom ops; inference mode runs the C++ route's forward kernel."""
    _require_cpp()
    monkeypatch.setenv("FASTMAE_BACKEND", "cpp")
    gen = _gen(request)
    N, C, H, W, p, K, D = 2, 3, 16, 24, 8, 2, 8
    L = (H // p) * (W // p)
    _, keep, restore, mask = _masking(gen, N, L, K)
    imgs = _randn(gen, N, C, H, W)
    calls = {  # name -> (call, the input it differentiates)
        "gather_mask": (lambda t: ops.gather_mask(t, keep, p), _randn(gen, N, C, H, W)),
        "unshuffle_scatter": (lambda t: ops.unshuffle_scatter(t, torch.zeros(D), restore), _randn(gen, N, 1 + K, D)),
        "norm_mse_loss": (lambda t: ops.norm_mse_loss(t, imgs, mask, p), _randn(gen, N, L, C * p * p)),
    }
    for name, (call, leaf) in calls.items():
        leaf = leaf.requires_grad_()
        out = call(leaf)
        assert f"{''.join(w.title() for w in name.split('_'))}Fn" in out.grad_fn.name(), name
        with _RecordOps() as rec:  # a mode entered for the backward only sees the route's backward op
            out.sum().backward()
        assert f"fastmae_C.{name}_bwd.default" in rec.ops, name
        with _RecordOps() as rec:
            call(leaf).sum().backward()
        assert f"fastmae.{name}.default" in rec.ops and f"fastmae.{name}_backward.default" in rec.ops, name
        with torch.inference_mode():
            inferred = call(leaf.detach())
        torch.testing.assert_close(inferred, call(leaf).detach(), rtol=0, atol=0)

    traced = torch.jit.trace(calls["gather_mask"][0], (imgs,), check_trace=False)
    assert "fastmae::gather_mask" in [node.kind() for node in traced.graph.nodes()]

    class Sub(torch.Tensor):
        pass

    assert not _backend.eager_cpp(imgs.as_subclass(Sub), keep)
    assert _backend.eager_cpp(imgs, keep) and _backend.eager_cpp(torch.nn.Parameter(imgs), keep, None)
    assert not _backend.eager_cpp(imgs, keep.to("meta")) and not _backend.eager_cpp(None, imgs)
    seen = []

    def under_transform(t):
        seen.append(_backend.eager_cpp(t, keep))
        return t.sum()

    torch.func.grad(under_transform)(imgs)
    torch.func.vmap(under_transform)(imgs)
    with torch.device("cpu"):  # a function mode
        seen.append(_backend.eager_cpp(imgs, keep))
    assert seen == [False, False, False]
    monkeypatch.setenv("FASTMAE_BACKEND", " Cpp ")
    assert _backend.eager_cpp(imgs, keep)
    monkeypatch.setenv("FASTMAE_BACKEND", "c pp")  # refused by select_backend, on every path
    assert not _backend.eager_cpp(imgs, keep)
    with pytest.raises(ValueError, match="unknown FASTMAE_BACKEND='c pp'"):
        ops.gather_mask(imgs, keep, p)
    monkeypatch.setenv("FASTMAE_BACKEND", "torch")
    assert not _backend.eager_cpp(imgs, keep)
    assert "CppNode" not in ops.gather_mask(imgs.requires_grad_(), keep, p).grad_fn.name()


def test_eager_cpp_route_ops_schema():
    """The C++-route ops declare no mutation or aliasing, and register an autograd kernel."""
    _require_cpp()
    c = torch.ops.fastmae_C
    N, K, L, D = 2, 3, 8, 16
    restore = torch.stack([torch.randperm(L) for _ in range(N)])
    args = (torch.randn(N, 1 + K, D, requires_grad=True), torch.randn(D, requires_grad=True), restore,
            torch.randn(1 + L, D, requires_grad=True))
    utils = ("test_schema", "test_autograd_registration")
    torch.library.opcheck(c.unshuffle_scatter, args, test_utils=utils)
    imgs = torch.randn(N, 3, 16, 32)  # L = 8 patches of 8 x 8
    torch.library.opcheck(c.gather_mask, (imgs.clone().requires_grad_(), restore[:, :K].contiguous(), 8),
                          test_utils=utils)
    pred = torch.randn(N, L, 3 * 8 * 8, requires_grad=True)
    torch.library.opcheck(c.norm_mse_loss, (pred, imgs, torch.rand(N, L), None, 8, True, EPS), test_utils=utils)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # raised inside torch
def test_forward_mode_ad_is_refused(backend, request):
    """A tangent on an input is a clear NotImplementedError (a custom op would drop it silently);
    outside a dual level, and with tangent-free inputs inside one, the ops run."""
    import torch.autograd.forward_ad as fwad

    gen = _gen(request)
    N, C, H, W, p, K, D = 2, 3, 16, 16, 8, 1, 8
    _, keep, restore, mask = _masking(gen, N, 4, K)
    imgs, x, tok = _randn(gen, N, C, H, W), _randn(gen, N, 1 + K, D), _randn(gen, D)
    pred = _randn(gen, N, 4, C * p * p)
    calls = [
        ("gather_mask", "imgs", lambda a: ops.gather_mask(a, keep, p), imgs),
        ("unshuffle_scatter", "x", lambda a: ops.unshuffle_scatter(a, tok, restore), x),
        ("unshuffle_scatter", "mask_token", lambda a: ops.unshuffle_scatter(x, a, restore), tok),
        ("norm_mse_loss", "pred", lambda a: ops.norm_mse_loss(a, imgs, mask, p), pred),
    ]
    for op, name, call, primal in calls:
        with fwad.dual_level():
            call(primal)  # no tangent: runs
            with pytest.raises(NotImplementedError, match=f"{op} does not implement forward-mode AD .jvp., but "
                                                          f"{name} carries a tangent"):
                call(fwad.make_dual(primal, torch.ones_like(primal)))


def test_eager_cpp_route_double_backward_raises(monkeypatch, request):
    """A second derivative through the loss's backward is not implemented: both routes say so when
    it is taken, rather than dropping the term (first derivatives under create_graph still work)."""
    _require_cpp()
    monkeypatch.setenv("FASTMAE_BACKEND", "cpp")
    gen = _gen(request)
    imgs, mask = _randn(gen, 2, 3, 16, 16), torch.ones(2, 4)
    for route in (True, False):
        monkeypatch.setattr(_backend, "eager_cpp", lambda *a, route=route: route)
        for contiguous in (True, False):  # the decoder's pred[:, 1:] is not (the route copies it)
            leaf = _randn(gen, 2, 5, 3 * 8 * 8, requires_grad=True)
            pred = leaf[:, :4].contiguous() if contiguous else leaf[:, 1:]
            loss = ops.norm_mse_loss(pred, imgs, mask, 8)
            (grad,) = torch.autograd.grad(loss, leaf, create_graph=True)
            with pytest.raises(RuntimeError, match="(derivative for fastmae_C::norm_mse_loss_bwd is not implemented|"
                                                   "no autograd formula was registered)"):
                (loss + grad.square().sum()).backward()


# ============================================================================ outputs fully written
def _primitive_calls(gen):
    """(name, op call, output spec, reference) for every registered primitive, at small sizes
    whose outputs the allocator reuses (so the NaN poison reaches the kernel)."""
    N, C, H, W, p, K, D = 2, 3, 16, 24, 4, 5, 24
    L = (H // p) * (W // p)
    imgs = torch.randn(N, C, H, W, generator=gen)
    ids_shuffle, ids_keep, ids_restore, mask = _masking(gen, N, L, K)
    g_patch = torch.randn(N, K, C * p * p, generator=gen)
    x = torch.randn(N, 1 + K, D, generator=gen)
    tok = torch.randn(D, generator=gen)
    pos = torch.randn(1 + L, D, generator=gen)
    g_dec = torch.randn(N, 1 + L, D, generator=gen)
    pred = torch.randn(N, L, p * p * C, generator=gen)
    f = torch.ops.fastmae
    from fastmae.ops.gather_mask import gather_mask_backward_ref
    from fastmae.ops.norm_mse_loss import norm_mse_loss_backward_ref
    from fastmae.ops.unshuffle_scatter import unshuffle_scatter_backward_ref
    return [
        ("gather_mask", lambda: f.gather_mask(imgs, ids_keep, p), [(N, K, C * p * p)],
         lambda: gather_mask_ref(imgs, ids_keep, p)),
        ("gather_mask_backward", lambda: f.gather_mask_backward(g_patch, ids_keep, p, H, W), [(N, C, H, W)],
         lambda: gather_mask_backward_ref(g_patch, ids_keep, p, H, W)),
        ("unshuffle_scatter", lambda: f.unshuffle_scatter(x, tok, ids_restore, pos), [(N, 1 + L, D)],
         lambda: unshuffle_scatter_ref(x, tok, ids_restore, pos)),
        ("unshuffle_scatter_backward", lambda: f.unshuffle_scatter_backward(g_dec, ids_restore, K, True),
         [(N, 1 + K, D), (D,), (1 + L, D)], lambda: unshuffle_scatter_backward_ref(g_dec, ids_restore, K, True)),
        ("norm_mse_loss_backward",
         lambda: f.norm_mse_loss_backward(torch.tensor(1.0), pred, imgs, mask, None, p, True, EPS),
         [tuple(pred.shape)], lambda: norm_mse_loss_backward_ref(torch.tensor(1.0), pred, imgs, mask, None, p,
                                                                 True, EPS)),
    ]


@pytest.mark.parametrize("which", range(5), ids=["gather_mask", "gather_mask_backward", "unshuffle_scatter",
                                                  "unshuffle_scatter_backward", "norm_mse_loss_backward"])
def test_outputs_fully_written(which, backend, request):
    """Each primitive on NaN-filled new memory (the autouse fixture): every output element written."""
    name, call, specs, ref = _primitive_calls(_gen(request))[which]
    outs = call()
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    refs = ref()
    refs = refs if isinstance(refs, (tuple, list)) else (refs,)
    assert [tuple(o.shape) for o in outs] == [tuple(s) for s in specs]
    for o, r in zip(outs, refs):
        assert not o.isnan().any(), f"{name}: output elements left unwritten (NaN fill survived)"
        assert_close(name, o, r.double(), r, torch.float32)


# ============================================================================ bad input
def _bad_inputs():
    """(name, call, exception, message pattern): every bad input of the issue, through the public API."""
    N, C, H, W, p, K, D = 2, 3, 16, 24, 8, 2, 8
    L = (H // p) * (W // p)  # 6
    imgs = torch.randn(N, C, H, W)
    keep = torch.rand(N, L).argsort(1)[:, :K]
    restore = torch.rand(N, L).argsort(1)
    x = torch.randn(N, 1 + K, D)
    tok = torch.randn(D)
    pos = torch.randn(1 + L, D)
    pred = torch.randn(N, L, p * p * C)
    mask = torch.ones(N, L)
    ids_rm = restore[:, K:]
    pred_rm = torch.randn(N, L - K, p * p * C)

    def with_value(t, v):
        t = t.clone()
        t[-1, -1] = v
        return t

    g, u, nl = ops.gather_mask, ops.unshuffle_scatter, ops.norm_mse_loss
    return [
        ("gather_index_high", lambda: g(imgs, with_value(keep, L), p), IndexError, f"ids_keep holds index {L}"),
        ("gather_index_negative", lambda: g(imgs, with_value(keep, -1), p), IndexError, "ids_keep holds index -1"),
        ("gather_index_dtype", lambda: g(imgs, keep.int(), p), ValueError, "ids_keep must be int64"),
        ("gather_index_shape", lambda: g(imgs, keep[0], p), ValueError, "ids_keep must be 2-D"),
        ("gather_K_equals_L", lambda: g(imgs, restore, p), ValueError, "0 < K < L"),
        ("gather_batch", lambda: g(imgs, keep[:1], p), ValueError, "batch size 1 but the data has 2"),
        ("gather_patch_not_dividing", lambda: g(imgs, keep, 5), ValueError, "not divisible by the patch size 5"),
        ("unshuffle_index_high", lambda: u(x, tok, with_value(restore, L), pos), IndexError,
         f"ids_restore holds index {L}"),
        ("unshuffle_index_negative", lambda: u(x, tok, with_value(restore, -3), None), IndexError,
         "ids_restore holds index -3"),
        ("unshuffle_index_dtype", lambda: u(x, tok, restore.int(), pos), ValueError, "ids_restore must be int64"),
        ("unshuffle_index_shape", lambda: u(x, tok, restore[None], pos), ValueError, "ids_restore must be 2-D"),
        ("unshuffle_K_equals_L", lambda: u(torch.randn(N, 1 + L, D), tok, restore, pos), ValueError,
         "must be fewer than L"),
        ("unshuffle_batch", lambda: u(x, tok, restore[:1], pos), ValueError, "batch size 1 but the data has 2"),
        ("unshuffle_pos_shape", lambda: u(x, tok, restore, pos[:-1]), ValueError, "pos_embed must be"),
        ("unshuffle_token_size", lambda: u(x, tok[:-1], restore, pos), ValueError, "mask_token must hold"),
        ("loss_index_high", lambda: nl(pred_rm, imgs, None, p, ids=with_value(ids_rm, L)), IndexError,
         f"ids holds index {L}"),
        ("loss_index_negative", lambda: nl(pred_rm, imgs, None, p, ids=with_value(ids_rm, -1)), IndexError,
         "ids holds index -1"),
        ("loss_index_dtype", lambda: nl(pred_rm, imgs, None, p, ids=ids_rm.int()), ValueError, "ids must be int64"),
        ("loss_index_shape", lambda: nl(pred_rm, imgs, None, p, ids=ids_rm[:, :-1]), ValueError,
         r"ids must have shape \[2, 4\]"),
        ("loss_batch", lambda: nl(pred[:1], imgs, mask, p), ValueError, r"pred must be \[N, rows, p\*p\*C\]"),
        ("loss_pred_rows", lambda: nl(pred[:, :-1], imgs, mask[:, :-1], p), ValueError,
         "pred has 5 rows but the images have L = 6 patches"),
        ("loss_pred_width", lambda: nl(pred[..., :-1], imgs, mask, p), ValueError, r"= \[2, \*, 192\]"),
        ("loss_mask_shape", lambda: nl(pred, imgs, mask[:, :-1], p), ValueError, "mask must have shape"),
        ("loss_patch_not_dividing", lambda: nl(pred, imgs, mask, 7), ValueError, "not divisible by the patch size 7"),
        ("gather_patch_float", lambda: g(imgs, keep, 4.0), ValueError, "patch_size must be an integer, got 4.0"),
        ("loss_patch_bool", lambda: nl(pred, imgs, mask, True), ValueError, "patch_size must be an integer"),
        ("loss_mask_requires_grad", lambda: nl(pred, imgs, mask.clone().requires_grad_(), p), ValueError,
         "mask requires grad, but norm_mse_loss differentiates pred only"),
        ("loss_imgs_requires_grad", lambda: nl(pred, imgs.clone().requires_grad_(), mask, p), ValueError,
         "imgs requires grad"),
        # arguments the C++ route converts (layouts, dtypes of the token and table, the mask's) but
        # must still refuse
        ("gather_imgs_dtype", lambda: g(imgs.int(), keep, p), ValueError, "imgs must be float32, bfloat16 or float16"),
        ("unshuffle_x_dtype", lambda: u(x.int(), tok, restore, pos), ValueError, "x must be float32"),
        ("unshuffle_token_dtype", lambda: u(x, tok.long(), restore, pos), ValueError, "mask_token must be float32"),
        ("unshuffle_pos_dtype", lambda: u(x, tok, restore, pos.long()), ValueError, "pos_embed must be float32"),
        ("unshuffle_pos_last_dim", lambda: u(x, tok, restore, pos.reshape(D, 1 + L)), ValueError,
         "pos_embed must be"),
        ("loss_pred_dtype", lambda: nl(pred.long(), imgs, mask, p), ValueError, "pred must be float32"),
        ("loss_mask_required", lambda: nl(pred, imgs, None, p), ValueError, "mask is required"),
        # another device than the rest ("meta" stands for one on a machine without a GPU)
        ("unshuffle_devices", lambda: u(x, tok.to("meta"), restore, pos), ValueError,
         "x, mask_token, ids_restore, pos_embed must be on one device: .*mask_token on meta"),
        ("loss_devices", lambda: nl(pred, imgs, mask.to("meta"), p), ValueError,
         "pred, imgs, mask must be on one device: .*mask on meta"),
    ]


_BAD = _bad_inputs()


@pytest.mark.parametrize("which", range(len(_BAD)), ids=[b[0] for b in _BAD])
def test_bad_input(which, backend):
    _, call, exc, match = _BAD[which]
    with pytest.raises(exc, match=match):
        call()


def _require_cpp():
    if not _backend.has_extension():
        if __import__("os").environ.get("FASTMAE_REQUIRE_EXTENSION") == "1":
            pytest.fail(f"the C++ extension is unavailable: {_backend.extension_error()}")
        pytest.skip(f"the C++ extension is unavailable: {_backend.extension_error()}")


def test_cpp_kernels_validate_index_ranges():
    """The C++ primitives check index ranges themselves (the Python layer leaves it to them)."""
    _require_cpp()
    c = torch.ops.fastmae_C
    N, C, H, W, p, K, D = 2, 3, 16, 16, 8, 2, 8
    L = 4
    imgs = torch.randn(N, C, H, W)
    bad_keep = torch.tensor([[0, 1], [2, 4]])
    bad_restore = torch.tensor([[0, 1, 2, 3], [3, -1, 0, 1]])
    calls = [
        (lambda: c.gather_mask_fwd(imgs, bad_keep, p), "ids_keep holds index 4, outside \\[0, 4\\)"),
        (lambda: c.gather_mask_bwd(torch.randn(N, K, C * p * p), bad_keep, p, H, W), "ids_keep holds index 4"),
        (lambda: c.unshuffle_scatter_fwd(torch.randn(N, 1 + K, D), torch.randn(D), bad_restore, None),
         "ids_restore holds index -1"),
        (lambda: c.unshuffle_scatter_bwd(torch.randn(N, 1 + L, D), bad_restore, K, True),
         "ids_restore holds index -1"),
        (lambda: c.norm_mse_loss_fwd(torch.randn(N, K, C * p * p), imgs, torch.ones(N, K), bad_keep, p, True, EPS),
         "ids holds index 4"),
        (lambda: c.norm_mse_loss_bwd(torch.tensor(1.0), torch.randn(N, K, C * p * p), imgs, torch.ones(N, K),
                                     bad_keep, p, True, EPS), "ids holds index 4"),
    ]
    for call, match in calls:
        with pytest.raises(IndexError, match=match):
            call()
    with pytest.raises(ValueError, match="must be int64"):
        c.gather_mask_fwd(imgs, bad_keep.int(), p)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        c.gather_mask_bwd(torch.randn(N, K, C * 25), bad_keep.clamp_max(3), 5, H, W)


# ============================================================================ opcheck / compile
def _skip_triton_tracing(backend):
    if backend == "triton":
        pytest.skip("opcheck and torch.compile run the kernel on fake tensors, which the Triton "
                    "interpreter cannot; the Triton path is covered by the eager tests")


def _opcheck_cases():
    N, C, H, W, p, K, D = 2, 3, 16, 24, 8, 2, 8
    L = (H // p) * (W // p)
    ids_shuffle = torch.rand(N, L).argsort(1)
    keep, restore, ids_rm = ids_shuffle[:, :K].contiguous(), ids_shuffle.argsort(1), ids_shuffle[:, K:].contiguous()
    imgs = torch.randn(N, C, H, W)
    rg = lambda t: t.requires_grad_()  # noqa: E731
    f = torch.ops.fastmae
    return {
        "gather_mask": (f.gather_mask, (rg(imgs.clone()), keep, p)),
        "gather_mask_backward": (f.gather_mask_backward, (torch.randn(N, K, C * p * p), keep, p, H, W)),
        "unshuffle_scatter": (f.unshuffle_scatter, (rg(torch.randn(N, 1 + K, D)), rg(torch.randn(D)), restore,
                                                    rg(torch.randn(1 + L, D)))),
        "unshuffle_scatter_nopos": (f.unshuffle_scatter, (rg(torch.randn(N, 1 + K, D)), rg(torch.randn(D)),
                                                          restore, None)),
        "unshuffle_scatter_backward": (f.unshuffle_scatter_backward, (torch.randn(N, 1 + L, D), restore, K, True)),
        "norm_mse_loss": (f.norm_mse_loss, (rg(torch.randn(N, L, p * p * C)), imgs, torch.rand(N, L), None, p, True,
                                            EPS)),
        "norm_mse_loss_ids": (f.norm_mse_loss, (rg(torch.randn(N, L - K, p * p * C)), imgs, torch.ones(N, L - K),
                                                ids_rm, p, False, EPS)),
        "norm_mse_loss_backward": (f.norm_mse_loss_backward, (torch.tensor(0.7), torch.randn(N, L - K, p * p * C),
                                                              imgs, torch.ones(N, L - K), ids_rm, p, True, EPS)),
    }


@pytest.mark.parametrize("name", list(_opcheck_cases()))
def test_opcheck(name, backend):
    _skip_triton_tracing(backend)
    op, args = _opcheck_cases()[name]
    torch.library.opcheck(op, args)


def test_compile_fullgraph(backend):
    """One compiled function using every op forward and backward matches eager."""
    _skip_triton_tracing(backend)
    N, C, H, W, p, K, D = 2, 3, 16, 24, 8, 2, 8
    L = (H // p) * (W // p)
    ids_shuffle = torch.rand(N, L).argsort(1)
    keep, restore = ids_shuffle[:, :K].contiguous(), ids_shuffle.argsort(1)
    mask = torch.ones(N, L)
    mask[:, :K] = 0
    mask = torch.gather(mask, 1, restore)
    imgs = torch.randn(N, C, H, W)
    proj = torch.randn(C * p * p, D) * 0.1
    head = torch.randn(D, p * p * C) * 0.1

    def step(imgs, tok, pos):
        x = ops.gather_mask(imgs, keep, p) @ proj  # [N, K, D]
        x = torch.cat([x.mean(1, keepdim=True), x], dim=1)
        dec = ops.unshuffle_scatter(x, tok, restore, pos)
        pred = dec[:, 1:] @ head
        return ops.norm_mse_loss(pred, imgs.detach(), mask, p)  # the target is data

    def run(fn):
        leaves = [imgs.clone().requires_grad_(), torch.randn(D, generator=torch.Generator().manual_seed(1)),
                  torch.randn(1 + L, D, generator=torch.Generator().manual_seed(2))]
        for t in leaves[1:]:
            t.requires_grad_()
        loss = fn(*leaves)
        loss.backward()
        return [loss] + [t.grad for t in leaves]

    torch._dynamo.reset()
    eager = run(step)
    compiled = run(torch.compile(step, fullgraph=True))
    for name, a, b in zip(["loss", "dimgs", "dmask_token", "dpos"], compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
