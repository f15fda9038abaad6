"""fastmae.ops.gather_mask on every backend (torch math, C++, Triton under the interpreter) against
fp64 math, forward and backward, through the public function and the registered ops.

Tolerance: ``helpers.assert_op_close`` (STYLE.md's rule; a gather is exact anyway). Shapes reach
the tail paths (N = 1, L from 4 to 272, K from 1 to L - 1, p from 4 to 16, C in 1/3, non-square
grids, C = 0 and N = 0). Outputs are allocated on NaN-filled memory (an unwritten element fails);
the input contract (distinct patches per sample) is refused the same way on every backend; the
C++ kernel's instruction-set variants and streaming stores both ways; ``torch.library.opcheck``.
(``torch.compile(fullgraph=True)`` of the three ops together: tests/test_dispatch.py.)
"""
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import (OP_DTYPES, assert_op_close, case_id, random_masking, randn, require_cpp, seeded,
                     skip_big_on_triton, skip_triton_tracing)

from fastmae import config, ops
from fastmae.ops.gather_mask import gather_mask_backward_ref, gather_mask_ref

# (N, C, H, W, p, K); L = (H/p) * (W/p)
GATHER_CASES = [
    (1, 1, 8, 8, 4, 1),  # L = 4, K = 1
    (2, 3, 32, 32, 16, 3),  # L = 4, K = L - 1
    (3, 3, 24, 40, 8, 7),  # non-square grid 3 x 5
    (2, 1, 28, 56, 14, 5),  # p = 14, grid 2 x 4
    (5, 3, 48, 32, 16, 2),  # grid 3 x 2
    (1, 3, 64, 68, 4, 200),  # L = 272
]


@pytest.fixture(autouse=True)
def _outputs_on_nan(nan_memory):
    """Every output of every test here is allocated on NaN (conftest's ``nan_memory``)."""


def gather_truth64(imgs, ids_keep, p):
    """fp64 truth written independently of ``gather_mask_ref``: ``F.unfold`` patches (Conv2d
    weight order c, i, j) picked by advanced indexing; its autograd gives the backward truth."""
    patches = F.unfold(imgs.double(), kernel_size=p, stride=p).transpose(1, 2)  # [N, L, C*p*p]
    return torch.stack([patches[n, ids_keep[n]] for n in range(imgs.shape[0])])


@pytest.mark.parametrize("dtype", OP_DTYPES, ids=str)
@pytest.mark.parametrize("case", GATHER_CASES, ids=case_id)
def test_gather_mask(case, dtype, backend, request):
    N, C, H, W, p, K = case
    L = (H // p) * (W // p)
    skip_big_on_triton(backend, N * C * H * W > 150_000)
    gen = seeded(request)
    imgs = randn(gen, N, C, H, W, dtype=dtype, requires_grad=True)
    _, ids_keep, _, _ = random_masking(gen, N, L, K)
    grad = randn(gen, N, K, C * p * p, dtype=dtype)

    out = ops.gather_mask(imgs, ids_keep, p)
    out.backward(grad)

    imgs64 = imgs.detach().double().requires_grad_()
    ref = gather_truth64(imgs64, ids_keep, p)
    ref.backward(grad.double())
    base_imgs = imgs.detach().clone().requires_grad_()
    base = gather_mask_ref(base_imgs, ids_keep, p)
    base.backward(grad)
    assert out.dtype == dtype and imgs.grad.dtype == dtype
    assert_op_close("gather_mask out", out, ref, base, dtype)
    assert_op_close("gather_mask dimgs", imgs.grad, imgs64.grad, base_imgs.grad, dtype)


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


_REPEAT = ("ids_keep repeats index 3 in sample 1: the indices of a sample must be distinct, as random masking "
           "makes them")


def test_gather_mask_refuses_repeated_or_out_of_range_patches(backend):
    """The input contract, the same on every backend, forward and backward: the patches kept in a
    sample are distinct (as random masking makes them), each in [0, L). A repeated patch is a
    ValueError naming it and its sample; an index out of range an IndexError naming it."""
    N, C, H, W, p = 2, 3, 16, 16, 8  # L = 4
    imgs = torch.randn(N, C, H, W, requires_grad=True)
    grad = torch.randn(N, 3, C * p * p)
    backward = torch.ops.fastmae.gather_mask_backward
    repeated = torch.tensor([[0, 2, 1], [3, 1, 3]])  # sample 1 keeps patch 3 twice
    with pytest.raises(ValueError, match=re.escape(_REPEAT)):
        ops.gather_mask(imgs, repeated, p)
    with pytest.raises(ValueError, match=re.escape(_REPEAT)):
        backward(grad, repeated, p, H, W)
    # several repeats: every backend names the first sample's first repeat in row order (5, not 1)
    several = torch.tensor([[0, 2, 1, 4], [5, 1, 5, 1], [2, 2, 3, 3]])
    with pytest.raises(ValueError, match=re.escape("ids_keep repeats index 5 in sample 1:")):
        ops.gather_mask(torch.randn(3, C, 3 * p, 3 * p), several, p)
    for bad in (4, -1):
        ids = torch.tensor([[0, 2, 1], [3, bad, 0]])
        message = re.escape(f"ids_keep holds index {bad}, outside [0, 4)")
        with pytest.raises(IndexError, match=message):
            ops.gather_mask(imgs, ids, p)
        with pytest.raises(IndexError, match=message):
            backward(grad, ids, p, H, W)
    assert imgs.grad is None


def test_gather_mask_size_one_last_dimension_with_any_stride(backend):
    """A last dimension of size 1 may carry any stride, and contiguous() keeps it: W = p = 1 images
    of a transposed layout, and K = 1 ids_keep of stride 2, forward and backward."""
    imgs = torch.randn(2, 3, 1, 4).transpose(-1, -2).requires_grad_()  # [2, 3, 4, 1], last stride 4
    ids_keep = torch.tensor([[1, 0]]).T
    out = ops.gather_mask(imgs, ids_keep, 1)
    out.backward(torch.ones_like(out))
    imgs64 = imgs.detach().double().requires_grad_()
    ref = gather_truth64(imgs64, ids_keep, 1)
    ref.backward(torch.ones_like(ref))
    torch.testing.assert_close(out.double(), ref)
    torch.testing.assert_close(imgs.grad.double(), imgs64.grad)


@pytest.mark.parametrize("dtype", OP_DTYPES, ids=str)
def test_gather_mask_non_contiguous_inputs(dtype, backend, request):
    """channels_last images and a transposed (non-contiguous) index tensor: outputs and gradients
    bitwise those of contiguous copies, with the inputs' dtype and shape."""
    gen = seeded(request)
    N, C, H, W, p, K = 3, 3, 16, 24, 8, 2
    _, keep, _, _ = random_masking(gen, N, (H // p) * (W // p), K)
    imgs = randn(gen, N, C, H, W, dtype=dtype).to(memory_format=torch.channels_last)
    keep_t = keep.t().contiguous().t()
    assert not imgs.is_contiguous() and not keep_t.is_contiguous()
    grad = randn(gen, N, K, C * p * p, dtype=dtype)
    results = []
    for x, ids in ((imgs, keep_t), (imgs.contiguous(), keep)):
        leaf = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        out = ops.gather_mask(leaf, ids, p)
        (g,) = torch.autograd.grad(out, leaf, grad)
        results.append((out, g))
    (out_a, g_a), (out_b, g_b) = results
    assert out_a.dtype == dtype and g_a.dtype == dtype and g_a.shape == imgs.shape
    assert torch.equal(out_a, out_b) and torch.equal(g_a, g_b)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # raised inside torch
def test_gather_mask_forward_mode_ad_is_refused(backend, request):
    """A tangent on imgs is a clear NotImplementedError (a custom op would drop it silently);
    outside a dual level, and with tangent-free inputs inside one, the op runs."""
    import torch.autograd.forward_ad as fwad

    gen = seeded(request)
    _, keep, _, _ = random_masking(gen, 2, 4, 1)
    imgs = randn(gen, 2, 3, 16, 16)
    ops.gather_mask(imgs, keep, 8)
    with fwad.dual_level():
        ops.gather_mask(imgs, keep, 8)
        with pytest.raises(NotImplementedError, match="gather_mask does not implement forward-mode AD .jvp., but "
                                                      "imgs carries a tangent"):
            ops.gather_mask(fwad.make_dual(imgs, torch.ones_like(imgs)), keep, 8)


@pytest.mark.parametrize("which", ["gather_mask", "gather_mask_backward"])
def test_gather_mask_outputs_fully_written(which, backend, request):
    """Each registered op on NaN-filled new memory (the autouse fixture): every output element written."""
    gen = seeded(request)
    N, C, H, W, p, K = 2, 3, 16, 24, 4, 5
    imgs = torch.randn(N, C, H, W, generator=gen)
    _, ids_keep, _, _ = random_masking(gen, N, (H // p) * (W // p), K)
    g_patch = torch.randn(N, K, C * p * p, generator=gen)
    if which == "gather_mask":
        out, ref = torch.ops.fastmae.gather_mask(imgs, ids_keep, p), gather_mask_ref(imgs, ids_keep, p)
        assert out.shape == (N, K, C * p * p)
    else:
        out = torch.ops.fastmae.gather_mask_backward(g_patch, ids_keep, p, H, W)
        ref = gather_mask_backward_ref(g_patch, ids_keep, p, H, W)
        assert out.shape == (N, C, H, W)
    assert not out.isnan().any(), f"{which}: output elements left unwritten (NaN fill survived)"
    assert_op_close(which, out, ref.double(), ref, torch.float32)


def _bad_inputs():
    """(name, call, exception, message pattern): every bad input, through the public function."""
    N, C, H, W, p, K = 2, 3, 16, 24, 8, 2
    L = (H // p) * (W // p)  # 6
    imgs = torch.randn(N, C, H, W)
    keep = torch.rand(N, L).argsort(1)[:, :K]
    restore = torch.rand(N, L).argsort(1)
    g = ops.gather_mask
    return [
        ("index_dtype", lambda: g(imgs, keep.int(), p), ValueError, "ids_keep must be int64"),
        ("index_shape", lambda: g(imgs, keep[0], p), ValueError, "ids_keep must be 2-D"),
        ("K_equals_L", lambda: g(imgs, restore, p), ValueError, "0 < K < L"),
        ("batch", lambda: g(imgs, keep[:1], p), ValueError, "batch size 1 but the data has 2"),
        ("patch_not_dividing", lambda: g(imgs, keep, 5), ValueError, "not divisible by the patch size 5"),
        ("patch_float", lambda: g(imgs, keep, 4.0), ValueError, "patch_size must be an integer, got 4.0"),
        ("imgs_dtype", lambda: g(imgs.int(), keep, p), ValueError, "imgs must be float32, bfloat16 or float16"),
        ("imgs_dims", lambda: g(imgs[0], keep, p), ValueError, r"imgs must be \[N, C, H, W\]"),
        ("devices", lambda: g(imgs, keep.to("meta"), p), ValueError, "ids_keep is on meta but imgs on cpu"),
    ]


_BAD = _bad_inputs()


@pytest.mark.parametrize("which", range(len(_BAD)), ids=[b[0] for b in _BAD])
def test_gather_mask_bad_input(which, backend):
    _, call, exc, match = _BAD[which]
    with pytest.raises(exc, match=match):
        call()


def _opcheck_cases():
    N, C, H, W, p, K = 2, 3, 16, 24, 8, 2
    keep = torch.rand(N, (H // p) * (W // p)).argsort(1)[:, :K].contiguous()
    f = torch.ops.fastmae
    return {
        "gather_mask": (f.gather_mask, (torch.randn(N, C, H, W).requires_grad_(), keep, p)),
        "gather_mask_backward": (f.gather_mask_backward, (torch.randn(N, K, C * p * p), keep, p, H, W)),
    }


@pytest.mark.parametrize("name", list(_opcheck_cases()))
def test_gather_mask_opcheck(name, backend):
    skip_triton_tracing(backend)
    op, args = _opcheck_cases()[name]
    torch.library.opcheck(op, args)


# ============================================================================ the C++ kernels
def test_cpp_gather_mask_kernels_validate_indices():
    """The C++ kernels check the indices themselves, with the messages of the other backends."""
    require_cpp()
    c, args = torch.ops.fastmae_C, config.settings().cpp_args
    N, C, H, W, p, K = 2, 3, 16, 16, 8, 2
    imgs, grad = torch.randn(N, C, H, W), torch.randn(N, K, C * p * p)
    for bad, exc, message in [([[0, 1], [2, 4]], IndexError, "ids_keep holds index 4, outside [0, 4)"),
                              ([[0, 1], [-2, 3]], IndexError, "ids_keep holds index -2, outside [0, 4)"),
                              ([[0, 1], [2, 2]], ValueError, "ids_keep repeats index 2 in sample 1: the indices of "
                                                             "a sample must be distinct")]:
        ids = torch.tensor(bad)
        with pytest.raises(exc, match=re.escape(message)):
            c.gather_mask_fwd(imgs, ids, p, *args)
        with pytest.raises(exc, match=re.escape(message)):
            c.gather_mask_bwd(grad, ids, p, H, W, *args)
    with pytest.raises(ValueError, match="must be int64"):
        c.gather_mask_fwd(imgs, torch.tensor([[0, 1], [2, 3]]).int(), p, *args)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        c.gather_mask_bwd(torch.randn(N, K, C * 25), torch.tensor([[0, 1], [2, 3]]), 5, H, W, *args)


@pytest.mark.parametrize("isa", ["avx2", "base"])
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=str)
def test_cpp_gather_mask_isa_variants(dtype, isa, request):
    """The C++ hot loops exist three times (AVX-512 with AVX512-BF16, AVX2 and the baseline x86-64
    ISA; the best the CPU runs is chosen at run time, and the rest of this file tests that one):
    run the lower ones too (cpu_isa caps the variant), over shapes with tails."""
    require_cpp()
    with config.override(backend="cpp", cpu_isa=isa):
        test_gather_mask(GATHER_CASES[2], dtype, "cpp", request)
        test_gather_mask(GATHER_CASES[3], dtype, "cpp", request)


@pytest.mark.parametrize("isa", ["native", "avx2", "base"])
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=str)
def test_cpp_gather_mask_streaming_stores(dtype, isa, request):
    """gather_mask's image gradient is streamed from 16 MiB, its patches (a matmul reads them next)
    from 1 MiB. Force streaming (cpu_stream="always") on small shapes whose rows allow it (64, 32
    and 16-byte segments in fp32) and on one that does not (p = 14), in every instruction-set
    variant: the same results as the reference, outputs poisoned first."""
    require_cpp()
    with config.override(backend="cpp", cpu_stream="always", **({} if isa == "native" else {"cpu_isa": isa})):
        for case in (GATHER_CASES[1], GATHER_CASES[2], GATHER_CASES[5], GATHER_CASES[3]):
            test_gather_mask(case, dtype, "cpp", request)


@pytest.mark.parametrize("isa", ["native", "avx2", "base"])
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=str)
def test_cpp_gather_mask_streamed_outputs_are_bitwise_equal(dtype, isa):
    """Streaming stores change where the bits go, never which: forward and backward give bitwise
    the same output streamed (stream mode always) as not (never), in every instruction-set
    variant: 32- and 64-byte segments paired into lines or not, odd grid widths (W = 40 at p = 8,
    48 at p = 16), and C = 1 before C = 3 (the row of zeros grows)."""
    require_cpp()
    cap = config.settings().cpp_args[0] if isa == "native" else config.ISA_CAPS[isa]
    never, always = config.STREAM_MODES["never"], config.STREAM_MODES["always"]
    gen = torch.Generator().manual_seed(11)
    f = torch.ops.fastmae_C
    for C, p, W in ((1, 16, 64), (3, 8, 64), (3, 8, 40), (3, 16, 64), (3, 16, 48)):
        L = (32 // p) * (W // p)
        keep = torch.argsort(torch.rand(2, L, generator=gen), 1)[:, : L // 2].contiguous()
        grad = torch.randn(2, L // 2, C * p * p, generator=gen).to(dtype)
        image = torch.rand(2, C, 32, W, generator=gen).to(dtype)
        for name, fn, args in ((f"backward C={C} p={p} W={W}", f.gather_mask_bwd, (grad, keep, p, 32, W)),
                               (f"forward C={C} p={p} W={W}", f.gather_mask_fwd, (image, keep, p))):
            plain, streamed = fn(*args, cap, never), fn(*args, cap, always)
            bits = torch.int16 if plain.element_size() == 2 else torch.int32
            assert torch.equal(plain.view(bits), streamed.view(bits)), f"{name}: streamed output differs"

