"""fastmae.ops.unshuffle_scatter on every backend (torch math, C++, Triton under the interpreter)
against fp64 math, forward and backward, through the public function and the registered ops.

Tolerance: ``helpers.assert_op_close`` (STYLE.md's rule). Shapes reach the tail paths: K = 0 to
L - 1, L up to 272, D = 0, 1, odd, across the C++ column blocks (64/128) and past the rows a C++
backward task takes in one block; N past the C++ backward's groups of 8 samples. Outputs are
allocated on NaN-filled memory; gradients are deterministic for any thread count; the input
contract (``ids_restore`` a permutation per sample) is refused the same way on every backend; the
C++ kernel's instruction-set variants and streaming stores both ways; ``torch.library.opcheck``.
(``torch.compile(fullgraph=True)`` of the three ops together: tests/test_dispatch.py.)
"""
import re

import pytest
import torch
from helpers import (OP_DTYPES, assert_op_close, case_id, cpu_has_avx512_bf16, random_masking, randn, require_cpp,
                     seeded, skip_big_on_triton, skip_triton_tracing)

from fastmae import config, ops
from fastmae.ops.unshuffle_scatter import unshuffle_scatter_backward_ref, unshuffle_scatter_ref

# (N, K, L, D); D = 1, odd, and across the C++ column-block boundary (64/128).
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


@pytest.fixture(autouse=True)
def _outputs_on_nan(nan_memory):
    """Every output of every test here is allocated on NaN (conftest's ``nan_memory``)."""


def unshuffle_truth64(x, mask_token, ids_restore, pos_embed=None):
    """fp64 truth written independently of ``unshuffle_scatter_ref``: the decoder input picked row
    by row, by a list of row numbers made from the definition (row 0 the cls token; row 1+l token
    ids_restore[l] if kept, else the mask token), out of one table of every token; plus the
    position. Its autograd gives the backward truth."""
    N, K1, D = x.shape
    table = torch.cat([x.reshape(N * K1, D).double(), mask_token.reshape(1, D).double()])  # last row: the token
    rows = []
    for n in range(N):
        rows.append(n * K1)
        rows += [n * K1 + 1 + r if r < K1 - 1 else N * K1 for r in ids_restore[n].tolist()]
    out = table[torch.tensor(rows)].reshape(N, 1 + ids_restore.shape[1], D)
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
    assert_op_close("unshuffle_scatter out", out.cpu(), ref, base, dtype)
    for name, t, r, b in zip(["dx", "dmask_token", "dpos_embed"], leaves, ref_leaves, base_leaves):
        assert t.grad.dtype == dtype and t.grad.shape == t.shape, name
        assert_op_close(f"unshuffle_scatter {name}", t.grad.cpu(), r.grad, b.grad, dtype)


@pytest.mark.parametrize("pos", ["pos", "nopos"])
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=str)
@pytest.mark.parametrize("case", UNSHUFFLE_CASES, ids=case_id)
def test_unshuffle_scatter(case, dtype, pos, backend, request):
    N, K, L, D = case
    skip_big_on_triton(backend, N * (L + 1) * D > 150_000)
    gen = seeded(request)
    x = randn(gen, N, 1 + K, D, dtype=dtype, requires_grad=True)
    mask_token = randn(gen, 1, 1, D, dtype=dtype, requires_grad=True)  # the model's shape
    pos_embed = randn(gen, 1, 1 + L, D, dtype=dtype, requires_grad=True) if pos == "pos" else None
    _, _, ids_restore, _ = random_masking(gen, N, L, K)
    grad = randn(gen, N, 1 + L, D, dtype=dtype)
    leaves = [x, mask_token] + ([pos_embed] if pos_embed is not None else [])

    out = ops.unshuffle_scatter(x, mask_token, ids_restore, pos_embed)
    out.backward(grad)
    check_unshuffle(out, leaves, ids_restore, grad, dtype)


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
    assert_op_close("out", out, ref.double(), ref, torch.bfloat16)
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


_REPEAT = ("ids_restore repeats index 1 in sample 1: the indices of a sample must be distinct, as random masking "
           "makes them")


def test_unshuffle_scatter_refuses_non_permutation(backend):
    """The input contract, the same on every backend, forward and backward: ids_restore is a
    permutation of [0, L) per sample (as random masking makes it). A repeated index (with another
    one missing) is a ValueError naming it and its sample; an index out of range an IndexError."""
    N, K, L, D = 2, 2, 4, 8
    x = torch.randn(N, 1 + K, D, requires_grad=True)
    tok = torch.randn(D, requires_grad=True)
    grad = torch.randn(N, 1 + L, D)
    backward = torch.ops.fastmae.unshuffle_scatter_backward
    repeated = torch.tensor([[0, 1, 2, 3], [1, 0, 1, 3]])  # sample 1: token 1 twice, index 2 never
    with pytest.raises(ValueError, match=re.escape(_REPEAT)):
        ops.unshuffle_scatter(x, tok, repeated)
    for need_pos in (True, False):
        with pytest.raises(ValueError, match=re.escape(_REPEAT)):
            backward(grad, repeated, K, need_pos)
    for bad in (4, -3):
        ids = torch.tensor([[0, 1, 2, 3], [3, 1, bad, 0]])
        message = re.escape(f"ids_restore holds index {bad}, outside [0, 4)")
        with pytest.raises(IndexError, match=message):
            ops.unshuffle_scatter(x, tok, ids, torch.randn(1 + L, D))
        with pytest.raises(IndexError, match=message):
            backward(grad, ids, K, True)
    assert x.grad is None and tok.grad is None


def test_unshuffle_scatter_size_one_last_dimension_with_any_stride(backend):
    """D = 1 with any stride (a transposed [N, 1, D] view; contiguous() keeps it), the upstream
    gradient likewise, forward and backward."""
    x = torch.randn(2, 1, 3).transpose(-1, -2).requires_grad_()  # [2, 3, 1]
    tok = torch.randn(1, requires_grad=True)
    ids_restore = torch.rand(2, 5).argsort(1)
    out = ops.unshuffle_scatter(x, tok, ids_restore)
    grad = torch.randn(2, 1, 6).transpose(-1, -2)
    out.backward(grad)
    x64, tok64 = x.detach().double().requires_grad_(), tok.detach().double().requires_grad_()
    ref = unshuffle_truth64(x64, tok64, ids_restore)
    ref.backward(grad.double())
    torch.testing.assert_close(out.double(), ref)
    torch.testing.assert_close(x.grad.double(), x64.grad)
    torch.testing.assert_close(tok.grad.double(), tok64.grad)


@pytest.mark.parametrize("dtype", OP_DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["converted", "token_flat"])
def test_unshuffle_scatter_non_contiguous_inputs(variant, dtype, backend, request):
    """Arguments the public function converts: a transposed x, a position table transposed and in
    another dtype than x, a [1, 1, D] or flat mask token of another dtype, a non-contiguous
    ids_restore. Outputs and gradients are bitwise those of contiguous copies in x's dtype, and
    each gradient has its input's dtype and shape."""
    gen = seeded(request)
    N, K, L, D = 3, 2, 6, 24
    _, _, restore, _ = random_masking(gen, N, L, K)
    other = torch.float32 if dtype != torch.float32 else torch.bfloat16
    x = randn(gen, N, D, 1 + K, dtype=dtype).transpose(1, 2)
    tok = randn(gen, 1, 1, D, dtype=other)
    pos = randn(gen, 1, D, 1 + L, dtype=other).transpose(1, 2)
    if variant == "token_flat":
        args, ids = [x, tok.reshape(D)], restore
    else:
        args, ids = [x, tok, pos], restore.t().contiguous().t()
        assert not ids.is_contiguous()
    grad = randn(gen, N, 1 + L, D, dtype=dtype)
    results = []
    for given in (args, [a.contiguous() for a in args]):
        leaves = [a.detach().clone().requires_grad_() for a in given]
        out = ops.unshuffle_scatter(leaves[0], leaves[1], ids, *leaves[2:])
        results.append((out, torch.autograd.grad(out, leaves, grad)))
    (out_a, grads_a), (out_b, grads_b) = results
    assert out_a.dtype == dtype and torch.equal(out_a, out_b)
    for a, ga, gb in zip(args, grads_a, grads_b):
        assert ga.dtype == a.dtype and ga.shape == a.shape and torch.equal(ga, gb)


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


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # raised inside torch
def test_unshuffle_scatter_forward_mode_ad_is_refused(backend, request):
    """A tangent on x or mask_token is a clear NotImplementedError (a custom op would drop it
    silently); outside a dual level, and with tangent-free inputs inside one, the op runs."""
    import torch.autograd.forward_ad as fwad

    gen = seeded(request)
    _, _, restore, _ = random_masking(gen, 2, 4, 1)
    x, tok = randn(gen, 2, 2, 8), randn(gen, 8)
    ops.unshuffle_scatter(x, tok, restore)
    for name, call, primal in [("x", lambda a: ops.unshuffle_scatter(a, tok, restore), x),
                               ("mask_token", lambda a: ops.unshuffle_scatter(x, a, restore), tok)]:
        with fwad.dual_level():
            call(primal)
            with pytest.raises(NotImplementedError, match=f"unshuffle_scatter does not implement forward-mode AD "
                                                          f".jvp., but {name} carries a tangent"):
                call(fwad.make_dual(primal, torch.ones_like(primal)))


@pytest.mark.parametrize("which", ["unshuffle_scatter", "unshuffle_scatter_backward"])
def test_unshuffle_scatter_outputs_fully_written(which, backend, request):
    """Each registered op on NaN-filled new memory (the autouse fixture): every output element written."""
    gen = seeded(request)
    N, K, L, D = 2, 5, 24, 24
    _, _, ids_restore, _ = random_masking(gen, N, L, K)
    x, tok = torch.randn(N, 1 + K, D, generator=gen), torch.randn(D, generator=gen)
    pos, g_dec = torch.randn(1 + L, D, generator=gen), torch.randn(N, 1 + L, D, generator=gen)
    f = torch.ops.fastmae
    if which == "unshuffle_scatter":
        outs, refs = [f.unshuffle_scatter(x, tok, ids_restore, pos)], [unshuffle_scatter_ref(x, tok, ids_restore, pos)]
        specs = [(N, 1 + L, D)]
    else:
        outs = f.unshuffle_scatter_backward(g_dec, ids_restore, K, True)
        refs = unshuffle_scatter_backward_ref(g_dec, ids_restore, K, True)
        specs = [(N, 1 + K, D), (D,), (1 + L, D)]
    assert [tuple(o.shape) for o in outs] == specs
    for o, r in zip(outs, refs):
        assert not o.isnan().any(), f"{which}: output elements left unwritten (NaN fill survived)"
        assert_op_close(which, o, r.double(), r, torch.float32)


def _bad_inputs():
    """(name, call, exception, message pattern): every bad input, through the public function."""
    N, K, L, D = 2, 2, 6, 8
    restore = torch.rand(N, L).argsort(1)
    x, tok, pos = torch.randn(N, 1 + K, D), torch.randn(D), torch.randn(1 + L, D)
    u = ops.unshuffle_scatter
    return [
        ("index_dtype", lambda: u(x, tok, restore.int(), pos), ValueError, "ids_restore must be int64"),
        ("index_shape", lambda: u(x, tok, restore[None], pos), ValueError, "ids_restore must be 2-D"),
        ("K_equals_L", lambda: u(torch.randn(N, 1 + L, D), tok, restore, pos), ValueError, "must be fewer than L"),
        ("batch", lambda: u(x, tok, restore[:1], pos), ValueError, "batch size 1 but the data has 2"),
        ("pos_shape", lambda: u(x, tok, restore, pos[:-1]), ValueError, "pos_embed must be"),
        ("token_size", lambda: u(x, tok[:-1], restore, pos), ValueError, "mask_token must hold"),
        ("x_dtype", lambda: u(x.int(), tok, restore, pos), ValueError, "x must be float32"),
        ("x_shape", lambda: u(x[0], tok, restore, pos), ValueError, r"x must be \[N, 1\+K, D\]"),
        ("token_dtype", lambda: u(x, tok.long(), restore, pos), ValueError, "mask_token must be float32"),
        ("pos_dtype", lambda: u(x, tok, restore, pos.long()), ValueError, "pos_embed must be float32"),
        ("pos_last_dim", lambda: u(x, tok, restore, pos.reshape(D, 1 + L)), ValueError, "pos_embed must be"),
        # another device than the rest ("meta" stands for one on a machine without a GPU)
        ("devices", lambda: u(x, tok.to("meta"), restore, pos), ValueError,
         "x, mask_token, ids_restore, pos_embed must be on one device: .*mask_token on meta"),
    ]


_BAD = _bad_inputs()


@pytest.mark.parametrize("which", range(len(_BAD)), ids=[b[0] for b in _BAD])
def test_unshuffle_scatter_bad_input(which, backend):
    _, call, exc, match = _BAD[which]
    with pytest.raises(exc, match=match):
        call()


def _opcheck_cases():
    N, K, L, D = 2, 2, 6, 8
    restore = torch.rand(N, L).argsort(1)
    rg = lambda t: t.requires_grad_()  # noqa: E731
    f = torch.ops.fastmae
    return {
        "unshuffle_scatter": (f.unshuffle_scatter, (rg(torch.randn(N, 1 + K, D)), rg(torch.randn(D)), restore,
                                                    rg(torch.randn(1 + L, D)))),
        "unshuffle_scatter_nopos": (f.unshuffle_scatter, (rg(torch.randn(N, 1 + K, D)), rg(torch.randn(D)),
                                                          restore, None)),
        "unshuffle_scatter_backward": (f.unshuffle_scatter_backward, (torch.randn(N, 1 + L, D), restore, K, True)),
        "unshuffle_scatter_backward_nopos": (f.unshuffle_scatter_backward, (torch.randn(N, 1 + L, D), restore, K,
                                                                            False)),
    }


@pytest.mark.parametrize("name", list(_opcheck_cases()))
def test_unshuffle_scatter_opcheck(name, backend):
    skip_triton_tracing(backend)
    op, args = _opcheck_cases()[name]
    torch.library.opcheck(op, args)


# ============================================================================ the C++ kernels
def test_cpp_unshuffle_scatter_kernels_validate_indices():
    """The C++ kernels check ids_restore themselves, with the messages of the other backends: an
    index out of range, and a repeated index in the backward too (the C++ backward has no path for
    non-permutations: a kept token restored twice, or one restored nowhere)."""
    require_cpp()
    c, args = torch.ops.fastmae_C, config.settings().cpp_args
    N, K, L, D = 2, 3, 8, 32
    x, tok, grad = torch.randn(N, 1 + K, D), torch.randn(D), torch.randn(N, 1 + L, D)
    for bad, exc, message in [
        ([[0, 1, 2, 3, 4, 5, 6, 7], [3, -1, 0, 1, 2, 4, 5, 6]], IndexError,
         "ids_restore holds index -1, outside [0, 8)"),
        ([[0, 1, 2, 3, 4, 5, 6, 8], [0, 1, 2, 3, 4, 5, 6, 7]], IndexError,
         "ids_restore holds index 8, outside [0, 8)"),
        # sample 0: removed index 5 twice, so kept token 2 is restored nowhere
        ([[0, 1, 5, 5, 6, 7, 4, 3], [7, 2, 0, 6, 1, 5, 4, 3]], ValueError,
         "ids_restore repeats index 5 in sample 0: the indices of a sample must be distinct"),
        ([[0, 1, 2, 3, 4, 5, 6, 7], [7, 2, 0, 6, 2, 5, 4, 3]], ValueError, "ids_restore repeats index 2 in sample 1"),
    ]:
        ids = torch.tensor(bad)
        with pytest.raises(exc, match=re.escape(message)):
            c.unshuffle_scatter_fwd(x, tok, ids, None, *args)
        with pytest.raises(exc, match=re.escape(message)):
            c.unshuffle_scatter_bwd(grad, ids, K, True, *args)


@pytest.mark.parametrize("case", BLOCK_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=str)
def test_cpp_unshuffle_scatter_blocks(case, dtype, request):
    """The C++ backward over several blocks per task against the truth, at 1 thread: one task
    holds every row j, so it runs several blocks whatever the machine's core count."""
    require_cpp()
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with config.override(backend="cpp"):
            test_unshuffle_scatter(case, dtype, "pos", "cpp", request)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("isa", ["avx2", "base"])
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=str)
def test_cpp_unshuffle_scatter_isa_variants(dtype, isa, request):
    """The C++ hot loops exist three times (AVX-512 with AVX512-BF16, AVX2 and the baseline x86-64
    ISA; the best the CPU runs is chosen at run time, and the rest of this file tests that one):
    run the lower ones too (cpu_isa caps the variant), over shapes with tails."""
    require_cpp()
    with config.override(backend="cpp", cpu_isa=isa):
        test_unshuffle_scatter(UNSHUFFLE_CASES[4], dtype, "pos", "cpp", request)
        test_unshuffle_scatter(UNSHUFFLE_CASES[5], dtype, "pos", "cpp", request)
        test_unshuffle_scatter(UNSHUFFLE_CASES[1], dtype, "nopos", "cpp", request)


@pytest.mark.parametrize("isa", ["native", "avx2", "base"])
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=str)
def test_cpp_unshuffle_scatter_streaming_stores(dtype, isa, request):
    """The decoder input is streamed from 16 MiB, dx (a matmul reads it next) from 1 MiB. Force
    streaming (cpu_stream="always") on small shapes, D = 64 and 40 and D = 130 (not streamed), in
    every instruction-set variant: the same results as the reference, outputs poisoned first."""
    require_cpp()
    with config.override(backend="cpp", cpu_stream="always", **({} if isa == "native" else {"cpu_isa": isa})):
        for case in (UNSHUFFLE_CASES[4], UNSHUFFLE_CASES[5], UNSHUFFLE_CASES[6]):
            test_unshuffle_scatter(case, dtype, "pos", "cpp", request)
            test_unshuffle_scatter(case, dtype, "nopos", "cpp", request)


@pytest.mark.parametrize("isa", ["native", "avx2", "base"])
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=str)
def test_cpp_unshuffle_scatter_streamed_outputs_are_bitwise_equal(dtype, isa):
    """Streaming stores change where the bits go, never which: forward (with and without positions)
    and backward give bitwise the same outputs streamed (stream mode always) as not (never), in
    every instruction-set variant (the 16- and 8-value steps and their tails: D = 64, 40 and 56;
    the backward's dx rows)."""
    require_cpp()
    cap = config.settings().cpp_args[0] if isa == "native" else config.ISA_CAPS[isa]
    never, always = config.STREAM_MODES["never"], config.STREAM_MODES["always"]
    gen = torch.Generator().manual_seed(11)
    f = torch.ops.fastmae_C
    N, K, L = 3, 5, 12
    for D in (64, 40, 56):
        x, tok = torch.randn(N, 1 + K, D, generator=gen).to(dtype), torch.randn(D, generator=gen).to(dtype)
        pos, ids = torch.randn(1 + L, D, generator=gen).to(dtype), torch.argsort(torch.rand(N, L, generator=gen), 1)
        grad = torch.randn(N, 1 + L, D, generator=gen).to(dtype)
        for name, fn, args in ((f"forward D={D}", f.unshuffle_scatter_fwd, (x, tok, ids, pos)),
                               (f"forward D={D}, no pos", f.unshuffle_scatter_fwd, (x, tok, ids, None)),
                               (f"backward D={D}", f.unshuffle_scatter_bwd, (grad, ids, K, True))):
            plain, streamed = fn(*args, cap, never), fn(*args, cap, always)
            plain, streamed = (o if isinstance(o, (tuple, list)) else (o,) for o in (plain, streamed))
            for i, (a, b) in enumerate(zip(plain, streamed, strict=True)):
                bits = torch.int16 if a.element_size() == 2 else torch.int32
                assert torch.equal(a.view(bits), b.view(bits)), f"{name}: streamed output {i} differs"


def test_cpp_unshuffle_scatter_avx512_bf16_rounding_matches_avx2():
    """The AVX-512 variant rounds fp32 to bf16 with vcvtneps2bf16, the others with integer
    arithmetic: bitwise the same results on normal values, ties (to even) included. Sums of two
    bf16 values, as the forward makes, land on ties often; so does the backward, whose fp32 sums
    are rounded 16 at a time."""
    require_cpp()
    if not cpu_has_avx512_bf16():
        pytest.skip("this CPU has no AVX512-BF16: only one bf16 rounding runs here")
    gen = torch.Generator().manual_seed(7)
    N, K, L, D = 4, 9, 36, 48
    x = torch.randn(N, 1 + K, D, generator=gen).bfloat16()
    tok, pos = torch.randn(D, generator=gen).bfloat16(), torch.randn(1 + L, D, generator=gen).bfloat16()
    ids = torch.argsort(torch.rand(N, L, generator=gen), 1)
    grad = torch.randn(N, 1 + L, D, generator=gen).bfloat16()
    f, mode = torch.ops.fastmae_C, config.STREAM_MODES["auto"]

    def outputs(cap):
        return (f.unshuffle_scatter_fwd(x, tok, ids, pos, cap, mode), *f.unshuffle_scatter_bwd(grad, ids, K, True, cap,
                                                                                               mode))

    assert torch.ops.fastmae_C.cpu_isa(config.ISA_CAPS["avx512"]) == config.ISA_CAPS["avx512"]
    native, avx2 = outputs(config.ISA_CAPS["avx512"]), outputs(config.ISA_CAPS["avx2"])
    for name, a, b in zip(("forward", "dx", "dmask", "dpos"), native, avx2, strict=True):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16)), f"{name}: AVX-512 and AVX2 differ"
