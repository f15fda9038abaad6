"""fastmae.ops.attention: every backend against a float64 reference, forward and backward,
its errors, and its behaviour under torch.compile and autocast."""
import importlib

import pytest
import torch
from helpers import assert_close_to_truth, cuda_only, rel_err

import fastmae
from fastmae.ops.attention import attention, attention_ref, resolve_attn_backend

attn_mod = importlib.import_module("fastmae.ops.attention")  # the module (fastmae.ops.attention is the function)

# (B, heads, Sq, Sk, head_dim): single token, odd lengths, the MAE encoder (50 tokens, d 64) and
# decoder (197 tokens, d 32) shapes, cross-length, a head_dim that is not a power of two.
SHAPES = [
    (1, 1, 1, 1, 8),
    (2, 3, 7, 7, 16),
    (2, 12, 50, 50, 64),
    (2, 4, 197, 197, 32),
    (3, 2, 5, 9, 16),
    (1, 2, 33, 33, 80),
]
# error of a backend against float64 may be at most twice the error of plain PyTorch math at the
# same precision, plus this floor. float64: PyTorch's CPU flash kernel is only ~5e-8 accurate in
# float64 (measured; its exponential is not computed to double precision), hence 1e-6 there.
ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4, torch.float64: 1e-6}


def assert_attention_close(got, truth, plain, name, dtype, baseline_tol=None):
    """STYLE.md's rule in the l2 norm: ||got - truth|| / ||truth|| at most twice plain math's plus
    ATOL, with ||truth|| floored at an RMS of 1e-2 (a gradient that is exactly zero in truth, dq
    when Sk = 1, is then compared absolutely, not relatively)."""
    assert_close_to_truth(got, truth, plain, atol=ATOL[dtype], norm="l2", rms_floor=1e-2, baseline_tol=baseline_tol,
                          name=f"{name} ({dtype})")


def _qkv(B, H, Sq, Sk, d, dtype, strided):
    """Fresh random q, k, v; strided=True slices them out of one fused [B, S, 3, H, d] tensor
    like the model's qkv projection (non-contiguous views)."""
    if strided:
        assert Sq == Sk
        qkv = torch.randn(B, Sq, 3, H, d, dtype=dtype).permute(2, 0, 3, 1, 4)
        return [t.detach().requires_grad_() for t in qkv.unbind(0)]
    shapes = [(B, H, Sq, d), (B, H, Sk, d), (B, H, Sk, d)]
    return [torch.randn(s, dtype=dtype).requires_grad_() for s in shapes]


def _fwd_bwd(fn, q, k, v, dout):
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v)
    out.backward(dout)
    return [out.detach()] + [t.grad.detach() for t in (q, k, v)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("backend", ["sdpa", "math", "auto"])
def test_backend_matches_reference(shape, dtype, backend):
    B, H, Sq, Sk, d = shape
    q, k, v = _qkv(*shape, dtype=dtype, strided=(Sq == Sk and B > 1))
    dout = torch.randn(B, H, Sq, d, dtype=dtype)
    # the truth: the explicit formula in float64 on the same (rounded) inputs
    q64, k64, v64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    truth = _fwd_bwd(attention_ref, q64, k64, v64, dout.double())
    plain = _fwd_bwd(attention_ref, q, k, v, dout)  # plain PyTorch at this precision
    got = _fwd_bwd(lambda a, b, c: attention(a, b, c, backend=backend), q, k, v, dout)
    for name, g, p, t in zip(["out", "dq", "dk", "dv"], got, plain, truth):
        assert g.dtype == dtype and g.shape == t.shape, name
        assert torch.isfinite(g).all(), name
        if Sk == 1 and name in ("dq", "dk"):
            # zero in truth (a softmax over one key is constant): a kernel is left with the
            # cancellation noise of dP - rowsum(dP * P), a few eps of |dout . v| (seen on one CPU's
            # sdpa: 2e-7 in fp32), so the bound is absolute, at that scale
            scale = (dout.double().abs().sum(-1).max() * v.double().abs().max()).item()
            assert g.double().abs().max().item() <= 4 * torch.finfo(dtype).eps * scale, (backend, name)
            continue
        # the baseline itself (attention_ref at this precision, which the math backend is) must sit
        # within a few units of rounding of the truth, or the 2x rule would excuse anything
        assert_attention_close(g, t, p, f"{backend} {name}", dtype, baseline_tol=8 * torch.finfo(dtype).eps)


def test_sdpa_and_math_differ_from_a_wrong_answer():
    """The comparison above can fail: a perturbed key changes the output far beyond tolerance."""
    q, k, v = _qkv(2, 3, 7, 7, 16, torch.float32, strided=False)
    good = attention(q, k, v, backend="sdpa")
    bad = attention(q, k + 0.1 * torch.randn_like(k), v, backend="math")
    assert rel_err(bad, good) > 1e-3


def test_auto_on_cpu():
    """sdpa, except math for bf16/fp16 with short key sequences (the CPU flash kernel's slow case)."""
    cpu, short, long = torch.device("cpu"), attn_mod.CPU_LOWP_MATH_MAX_SEQ, attn_mod.CPU_LOWP_MATH_MAX_SEQ + 1
    for n in (1, 50, 197, short, long, None):
        assert resolve_attn_backend("auto", cpu, torch.float32, n) == "sdpa"
    for dtype in (torch.bfloat16, torch.float16):
        for n in (1, 50, 197, short):
            assert resolve_attn_backend("auto", cpu, dtype, n) == "math"
        for n in (long, 1024, None):
            assert resolve_attn_backend("auto", cpu, dtype, n) == "sdpa"


@pytest.mark.parametrize("backend,device,dtype,exc,msg", [
    ("xformers", "cpu", torch.float32, ValueError, "no kernels for cpu tensors.*use 'sdpa'"),
    ("xformers", "cuda", torch.float64, ValueError, "does not take torch.float64.*'sdpa'"),
    ("sdpa", "cpu", torch.int32, ValueError, "does not take torch.int32"),
    ("math", "cpu", torch.int64, ValueError, "needs floating inputs"),
    ("flash9", "cpu", torch.float32, ValueError, "unknown attention backend 'flash9'"),
    ("auto", "cpu", torch.int64, ValueError, "attention needs floating inputs, got torch.int64"),
    ("auto", "cuda", torch.int32, ValueError, "attention needs floating inputs, got torch.int32"),
])
def test_unusable_backend_errors(backend, device, dtype, exc, msg):
    with pytest.raises(exc, match=msg):
        resolve_attn_backend(backend, torch.device(device), dtype)


def test_xformers_not_importable_error(monkeypatch):
    """On CUDA, a missing xformers is a RuntimeError naming the import error; auto falls back."""
    monkeypatch.setattr(attn_mod, "_xformers_state", {"ops": None, "error": "ImportError: no xformers"})
    with pytest.raises(RuntimeError, match=r"importing xformers.ops failed \(ImportError: no xformers\).*'sdpa'"):
        resolve_attn_backend("xformers", torch.device("cuda"), torch.float16)
    assert resolve_attn_backend("auto", torch.device("cuda"), torch.float16) == "sdpa"


def test_auto_picks_xformers_on_cuda_when_importable(monkeypatch):
    monkeypatch.setattr(attn_mod, "_xformers_state", {"ops": object(), "error": None})
    assert resolve_attn_backend("auto", torch.device("cuda"), torch.bfloat16, 50) == "xformers"
    assert resolve_attn_backend("auto", torch.device("cuda"), torch.float64) == "sdpa"
    assert resolve_attn_backend("auto", torch.device("cpu"), torch.bfloat16, 1024) == "sdpa"


def test_bad_qkv_errors():
    q = torch.randn(2, 3, 5, 8)
    with pytest.raises(ValueError, match="must be 4-D"):
        attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="must agree"):
        attention(q, torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4))
    with pytest.raises(ValueError, match="must agree"):
        attention(q, torch.randn(2, 3, 6, 8), torch.randn(2, 3, 5, 8))
    with pytest.raises(ValueError, match="share one dtype"):
        attention(q, q.double(), q)
    with pytest.raises(TypeError, match="must be a tensor"):
        attention(q, q, None)


def test_model_attn_backends_agree():
    """The model option selects the backend in every block; sdpa, math and auto train alike."""
    cfg = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, decoder_embed_dim=32,
               decoder_depth=2, decoder_num_heads=4, mlp_ratio=2.0, norm_pix_loss=True)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    results = {}
    for backend in ("math", "sdpa", "auto"):
        torch.manual_seed(0)
        model = fastmae.MaskedAutoencoderViT(**cfg, attn_backend=backend)
        assert all(m.attn_backend == backend for m in model.modules() if hasattr(m, "num_heads"))
        loss, _, _ = model(imgs, noise=noise)
        loss.backward()
        results[backend] = (loss.detach(), model.blocks[0].attn.qkv.weight.grad.clone())
    for backend in ("sdpa", "auto"):
        assert rel_err(results[backend][0], results["math"][0]) < 1e-5
        assert rel_err(results[backend][1], results["math"][1]) < 1e-4
    model = fastmae.MaskedAutoencoderViT(**cfg, attn_backend="xformers")  # accepted at construction ...
    with pytest.raises(ValueError, match="no kernels for cpu tensors"):  # ... refused on CPU tensors
        model(imgs, noise=noise)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_attention_compiles_fullgraph(backend):
    """No graph break; compiled forward and backward agree with eager."""
    torch._dynamo.reset()
    q, k, v = _qkv(2, 4, 197, 197, 32, torch.float32, strided=True)
    dout = torch.randn(2, 4, 197, 32)
    fn = lambda a, b, c: attention(a, b, c, backend=backend)  # noqa: E731
    explanation = torch._dynamo.explain(fn)(q, k, v)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    eager = _fwd_bwd(fn, q, k, v, dout)
    compiled = _fwd_bwd(torch.compile(fn, fullgraph=True), q, k, v, dout)
    for name, c, e in zip(["out", "dq", "dk", "dv"], compiled, eager):
        assert rel_err(c, e) < 1e-5, name


def test_backend_choice_is_constant_under_compile(monkeypatch):
    """The xformers probe is folded to a constant at trace time: no graph break from the import."""
    torch._dynamo.reset()
    monkeypatch.setattr(attn_mod, "_xformers_state", {})  # force the probe to run inside the trace

    def f(x):
        return x * (2.0 if attn_mod.xformers_import_error() else 3.0)

    x = torch.randn(4)
    expected = x * (2.0 if attn_mod._xformers_ops()[1] else 3.0)
    monkeypatch.setattr(attn_mod, "_xformers_state", {})
    assert torch.equal(torch.compile(f, fullgraph=True)(x), expected)


def test_attention_under_autocast_bf16():
    """q, k, v leave an autocast Linear in bf16; the output stays bf16 and close to fp32."""
    q, k, v = [t.detach() for t in _qkv(2, 3, 50, 50, 64, torch.float32, strided=False)]
    truth = attention_ref(q.double(), k.double(), v.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for backend in ("sdpa", "math"):
            out = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), backend=backend)
            assert out.dtype == torch.bfloat16
            assert rel_err(out, truth) < 2e-2, backend


@cuda_only
@pytest.mark.parametrize("backend", ["sdpa", "xformers", "auto"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_cuda_backends_match_reference(backend, dtype):
    if backend == "xformers" and attn_mod.xformers_import_error():
        pytest.skip(f"xformers not importable: {attn_mod.xformers_import_error()}")
    q, k, v = [t.detach().cuda().requires_grad_() for t in _qkv(2, 4, 197, 197, 32, dtype, strided=False)]
    dout = torch.randn_like(q)
    q64, k64, v64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    truth = _fwd_bwd(attention_ref, q64, k64, v64, dout.double())
    plain = _fwd_bwd(attention_ref, q, k, v, dout)
    got = _fwd_bwd(lambda a, b, c: attention(a, b, c, backend=backend), q, k, v, dout)
    for name, g, p, t in zip(["out", "dq", "dk", "dv"], got, plain, truth):
        assert_attention_close(g, t, p, f"{backend} {name}", dtype)
