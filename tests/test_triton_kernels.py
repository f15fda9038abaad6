"""Kernel-level tests of the Triton launchers in ``fastmae.kernels``, run under
``TRITON_INTERPRET=1`` on CPU tensors (tests/conftest.py sets it before the kernels are defined).

Every launcher is compared with the torch reference of its op (``fastmae.ops.*_ref``), forward
and backward, over shapes that reach every mask and tail path: N = 1..3, L from 4 to 272, K from
1 to L-1, patch sizes 4/6/7/8/14/16/32, C = 1 and 3, non-square images, D below, at and above the
tile width and not a multiple of it, misaligned tensors (scalar fallback), every dtype. Outputs
and scratch buffers are poisoned with NaN as they are allocated, so an element the kernels fail to
write shows up. Pure copies (gathers, scatters, ``dx``) must match bit for bit; rounded results
follow the tolerance rule of STYLE.md (``tolerance`` below, through ``helpers.assert_close_to_truth``).

The public ops on the triton backend are covered by tests/test_gather_mask.py,
tests/test_unshuffle_scatter.py, tests/test_norm_mse_loss.py and tests/test_model.py.
"""
import inspect
import zlib

import pytest
import torch
from helpers import assert_close_to_truth, assert_exact

from fastmae.ops import _backend

if not (_backend.has_triton() and _backend.triton_interpret()):
    pytest.skip("needs triton and TRITON_INTERPRET=1 (set by tests/conftest.py before fastmae.kernels is imported)",
                allow_module_level=True)

from fastmae.kernels import gather_mask as gm_kernels  # noqa: E402
from fastmae.kernels import norm_mse_loss as nml_kernels  # noqa: E402
from fastmae.kernels import unshuffle_scatter as us_kernels  # noqa: E402
from fastmae.ops.gather_mask import gather_mask_backward_ref, gather_mask_ref  # noqa: E402
from fastmae.ops.norm_mse_loss import norm_mse_loss_backward_ref, norm_mse_loss_ref  # noqa: E402
from fastmae.ops.unshuffle_scatter import unshuffle_scatter_backward_ref, unshuffle_scatter_ref  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Tolerance (STYLE.md, flash-attention's rule): the kernel's worst error against an fp32 truth may
# be at most twice the worst error of the torch reference run at the output precision, plus
# ATOL_REL * max|truth|. fp32: reduction-order noise. bf16: the interpreter rounds fp32 -> bf16
# toward zero (a GPU rounds to nearest even), up to one extra ulp; fp16 is rounded to nearest.
ATOL_REL = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def _rng(*case) -> torch.Generator:
    """A generator seeded from the case: fresh inputs per case, reproducible across runs."""
    return torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))


def _randn(gen, *shape, dtype=torch.float32, scale=1.0, shift=0.0):
    return (torch.randn(*shape, generator=gen) * scale + shift).to(dtype)


def _perms(gen, N, L):
    return torch.stack([torch.randperm(L, generator=gen) for _ in range(N)])


@pytest.fixture(autouse=True)
def launches_are_compiled_ahead_of_time(monkeypatch):
    """Every launch a test makes must be one of its module's ``launch_configs()``, the list that
    bench/triton_aot.py compiles for sm_80/sm_90 and checks for spills and vector width: the same
    kernel, constexprs, number of warps and pointer dtypes. (Read at each launch, so a test that
    lowers a module constant checks against the configurations that constant gives.)"""
    from fastmae.kernels._common import dtype_name

    for module in (gm_kernels, us_kernels, nml_kernels):
        def checked(kernel, grid, *args, _module=module, _real=module.launch, **kwargs):
            bound = dict(zip(kernel.arg_names, args), **kwargs)
            warps = kwargs.get("num_warps", 4)
            for c in _module.launch_configs():
                if (c.kernel is kernel and c.num_warps == warps
                        and all(bound.get(k) == v for k, v in c.constexprs.items())
                        and all(bound[n] is None or "*" + dtype_name(bound[n].dtype) == t
                                for n, t in c.signature.items() if t.startswith("*"))):
                    return _real(kernel, grid, *args, **kwargs)
            constexprs = {k: v for k, v in bound.items() if not isinstance(v, torch.Tensor) and k.isupper()}
            dtypes = {k: v.dtype for k, v in bound.items() if isinstance(v, torch.Tensor)}
            raise AssertionError(f"{kernel.__name__} launched with {constexprs}, {warps} warps, {dtypes}: "
                                 f"not among {_module.__name__}.launch_configs(), so never compiled ahead of time")

        monkeypatch.setattr(module, "launch", checked)


@pytest.fixture
def poison(nan_memory):
    """New memory (the launchers' torch.empty) is NaN-filled for the test (conftest's nan_memory)."""


def tolerance(got: torch.Tensor, torch_out: torch.Tensor, truth: torch.Tensor, what: str):
    """STYLE.md's rule: max|got - truth| <= 2 max|torch_out - truth| + ATOL_REL * max|truth|."""
    assert_close_to_truth(got, truth, torch_out, atol=ATOL_REL[got.dtype], name=what)


# ---------------------------------------------------------------------------- gather_mask
# (N, C, H, W, p, K): every patch size of the issue, non-square grids, L up to 272, K from 1 to L-1,
# widths giving VEC = 4 (fp32 16-byte), 2 (p = 6, 14) and 1 (p = 7)
GATHER_CASES = [
    (1, 3, 16, 16, 4, 1),
    (2, 1, 28, 42, 14, 5),
    (3, 3, 32, 24, 8, 11),
    (2, 3, 32, 64, 16, 7),
    (1, 1, 64, 68, 4, 271),
    (2, 3, 18, 30, 6, 9),
    (1, 3, 14, 21, 7, 2),
    (1, 3, 64, 32, 32, 1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GATHER_CASES, ids=str)
def test_gather_mask_kernels(case, dtype, poison):
    N, C, H, W, p, K = case
    gen = _rng("gather", case, dtype)
    L = (H // p) * (W // p)
    imgs = _randn(gen, N, C, H, W, dtype=dtype)
    ids_keep = _perms(gen, N, L)[:, :K].contiguous()
    assert_exact(gm_kernels.gather_mask_forward(imgs, ids_keep, p), gather_mask_ref(imgs, ids_keep, p), "patches")
    grad = _randn(gen, N, K, C * p * p, dtype=dtype)
    got = gm_kernels.gather_mask_backward(grad, ids_keep, p, H, W)
    assert_exact(got, gather_mask_backward_ref(grad, ids_keep, p, H, W), "image gradient")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_mask_misaligned_tensors(dtype, poison):
    """Tensors that do not start on a 16-byte boundary take the scalar path and stay exact."""
    N, C, H, W, p, K = 2, 3, 16, 32, 8, 3
    gen = _rng("gather-misaligned", dtype)
    imgs = _randn(gen, N * C * H * W + 1, dtype=dtype)[1:].view(N, C, H, W)
    assert imgs.data_ptr() % 16 != 0
    ids_keep = _perms(gen, N, 8)[:, :K].contiguous()
    assert_exact(gm_kernels.gather_mask_forward(imgs, ids_keep, p), gather_mask_ref(imgs, ids_keep, p), "patches")
    grad = _randn(gen, N * K * C * p * p + 1, dtype=dtype)[1:].view(N, K, C * p * p)
    assert_exact(gm_kernels.gather_mask_backward(grad, ids_keep, p, H, W),
                 gather_mask_backward_ref(grad, ids_keep, p, H, W), "image gradient")


# ---------------------------------------------------------------------------- unshuffle_scatter
# (N, L, K, D): D below / at / above the tile width (32..128), odd D (VEC = 1), L up to 260
UNSHUFFLE_CASES = [
    (1, 4, 1, 8),
    (2, 16, 5, 33),
    (3, 49, 12, 96),
    (2, 260, 65, 20),
    (1, 7, 6, 128),
    (3, 10, 3, 200),
]


@pytest.mark.parametrize("with_pos", [False, True], ids=["nopos", "pos"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", UNSHUFFLE_CASES, ids=str)
def test_unshuffle_scatter_kernels(case, dtype, with_pos, poison):
    N, L, K, D = case
    gen = _rng("unshuffle", case, dtype, with_pos)
    x = _randn(gen, N, K + 1, D, dtype=dtype)
    token = _randn(gen, D, dtype=dtype)
    ids_restore = _perms(gen, N, L)
    pos = _randn(gen, L + 1, D, dtype=dtype) if with_pos else None

    out = us_kernels.unshuffle_scatter_forward(x, token, ids_restore, pos)
    ref = unshuffle_scatter_ref(x, token, ids_restore, pos)
    if pos is None or dtype == torch.float32:  # a copy, or one fp32 add rounded once: exact
        assert_exact(out, ref, "decoder input")
    else:
        truth = unshuffle_scatter_ref(x.float(), token.float(), ids_restore, pos.float())
        tolerance(out, ref, truth, "decoder input")

    grad = _randn(gen, N, L + 1, D, dtype=dtype)
    dx, dmask, dpos = us_kernels.unshuffle_scatter_backward(grad, ids_restore, K, with_pos)
    rdx, rdmask, rdpos = unshuffle_scatter_backward_ref(grad, ids_restore, K, with_pos)
    _, tdmask, tdpos = unshuffle_scatter_backward_ref(grad.float(), ids_restore, K, with_pos)
    assert_exact(dx, rdx, "dx")
    tolerance(dmask, rdmask, tdmask, "d mask_token")
    if with_pos:
        tolerance(dpos, rdpos, tdpos, "d pos_embed")
    else:
        assert dpos.shape == (0,) and dpos.dtype == dtype


@pytest.mark.parametrize("target", [1, 5, 10 ** 6])
def test_unshuffle_scatter_backward_row_splits(target, monkeypatch, poison):
    """The per-sample backward splits each sample's rows into whole blocks to have about
    TARGET_PROGRAMS programs: one split, uneven splits (128 + 128 + 5 rows) and one block each."""
    monkeypatch.setattr(us_kernels, "TARGET_PROGRAMS", target)
    N, L, K, D = 2, 260, 65, 20  # BLOCK_D 32, BLOCK_R 64: 5 row blocks per sample
    gen = _rng("unshuffle-splits", target)
    grad = _randn(gen, N, L + 1, D)
    ids_restore = _perms(gen, N, L)
    dx, dmask, _ = us_kernels.unshuffle_scatter_backward(grad, ids_restore, K, False)
    rdx, rdmask, _ = unshuffle_scatter_backward_ref(grad, ids_restore, K, False)
    assert_exact(dx, rdx, "dx")
    tolerance(dmask, rdmask, rdmask, "d mask_token")


@pytest.mark.parametrize("module", ["gather_mask", "unshuffle_scatter", "norm_mse_loss"])
def test_kernels_use_no_atomics(module):
    """Determinism by construction: partial sums in buffers, fixed-order reductions, no atomics.
    (Run-to-run equality cannot be tested here: the interpreter runs programs one at a time, so
    a race could not show; tests/test_cuda.py checks it on a GPU.)"""
    source = inspect.getsource({"gather_mask": gm_kernels, "unshuffle_scatter": us_kernels,
                                "norm_mse_loss": nml_kernels}[module])
    assert "atomic_" not in source


# ---------------------------------------------------------------------------- norm_mse_loss
# (N, C, H, W, p, M): M = None for predictions of every patch (ids None), else rows via ids.
# p = 32, C = 3 makes P = 3072 > one chunk (multi-chunk statistics); p = 14 gives VEC_I = 1.
LOSS_CASES = [
    (1, 1, 8, 8, 4, None),
    (2, 3, 28, 42, 14, 3),
    (3, 3, 32, 16, 8, 5),
    (2, 3, 32, 32, 16, None),
    (1, 3, 64, 32, 32, 1),
    (1, 1, 64, 68, 4, 120),
]
LOSS_DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
               (torch.bfloat16, torch.float32), (torch.float32, torch.float16)]


@pytest.mark.parametrize("norm_pix", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("dtypes", LOSS_DTYPES, ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
@pytest.mark.parametrize("case", LOSS_CASES, ids=str)
def test_norm_mse_loss_kernels(case, dtypes, norm_pix, poison):
    _check_loss_kernels(case, dtypes, norm_pix)


@pytest.mark.parametrize("case", [(2, 3, 64, 68, 4, None), (2, 1, 64, 68, 4, 100)], ids=str)
def test_norm_mse_loss_sum_runs_over_several_blocks(case, poison, monkeypatch):
    """The final reduction steps SUM_BLOCK rows at a time, more rows than the cases above hold:
    with 16 its loop runs 34 and 13 times."""
    monkeypatch.setattr(nml_kernels, "SUM_BLOCK", 16)
    _check_loss_kernels(case, (torch.float32, torch.float32), True)


def _check_loss_kernels(case, dtypes, norm_pix):
    N, C, H, W, p, M = case
    pred_dtype, img_dtype = dtypes
    gen = _rng("loss", case, dtypes, norm_pix)
    L = (H // p) * (W // p)
    ids = None if M is None else _perms(gen, N, L)[:, L - M:].contiguous()
    rows = L if M is None else M
    # pixels with an offset (as raw images have): the statistics must not cancel catastrophically
    imgs = _randn(gen, N, C, H, W, dtype=img_dtype, scale=0.5, shift=2.0)
    pred = _randn(gen, N, rows, C * p * p, dtype=pred_dtype)
    weight = (torch.rand(N, rows, generator=gen) < 0.7).float() * torch.rand(N, rows, generator=gen).add(0.5)
    weight[0, 0] = 1.0
    eps = 1e-6

    loss = nml_kernels.norm_mse_loss_forward(pred, imgs, weight, ids, p, norm_pix, eps)
    ref = norm_mse_loss_ref(pred, imgs, weight, ids, p, norm_pix, eps)
    assert loss.shape == () and loss.dtype == torch.float32
    tolerance(loss, ref, ref, "loss")  # both fp32 from the same inputs: reduction-order noise only

    grad = _randn(gen, (), scale=2.0)
    dpred = nml_kernels.norm_mse_loss_backward(grad, pred, imgs, weight, ids, p, norm_pix, eps)
    rdpred = norm_mse_loss_backward_ref(grad, pred, imgs, weight, ids, p, norm_pix, eps)
    truth = norm_mse_loss_backward_ref(grad, pred.float(), imgs, weight, ids, p, norm_pix, eps)
    tolerance(dpred, rdpred, truth, "dpred")


def test_norm_mse_loss_constant_patch(poison):
    """A constant patch has zero variance: its targets are 0 (not NaN), as in the reference."""
    N, C, H, W, p = 1, 3, 16, 16, 8
    imgs = torch.randn(N, C, H, W)
    imgs[..., :8, :8] = 3.25  # patch 0 constant
    pred = torch.randn(N, 4, C * p * p)
    weight = torch.ones(N, 4)
    loss = nml_kernels.norm_mse_loss_forward(pred, imgs, weight, None, p, True, 1e-6)
    ref = norm_mse_loss_ref(pred, imgs, weight, None, p, True, 1e-6)
    tolerance(loss, ref, ref, "loss")
    dpred = nml_kernels.norm_mse_loss_backward(torch.tensor(1.0), pred, imgs, weight, None, p, True, 1e-6)
    tolerance(dpred, norm_mse_loss_backward_ref(torch.tensor(1.0), pred, imgs, weight, None, p, True, 1e-6),
              norm_mse_loss_backward_ref(torch.tensor(1.0), pred, imgs, weight, None, p, True, 1e-6), "dpred")


# ---------------------------------------------------------------------------- configurations
def test_launch_configs_cover_the_launchers_choices():
    """The AOT list (launch_configs) holds every VEC the launchers can pick, for every dtype."""
    from fastmae.kernels._common import dtype_name, vec_choices
    for dtype in DTYPES:
        gm = {c.constexprs["VEC"] for c in gm_kernels.launch_configs()
              if c.name == "gather_mask_fwd" and c.signature["imgs_ptr"] == "*" + dtype_name(dtype)}
        assert gm == set(vec_choices(dtype))
        nm = {(c.constexprs["VEC_P"], c.constexprs["VEC_I"]) for c in nml_kernels.launch_configs()
              if c.name == "norm_mse_loss_bwd" and c.signature["pred_ptr"] == "*" + dtype_name(dtype)
              and c.signature["imgs_ptr"] == "*" + dtype_name(dtype)}
        assert nm == {(a, b) for a in nml_kernels.vec_options(dtype) for b in nml_kernels.vec_options(dtype)}
    us = us_kernels.launch_configs()
    for D in (1, 8, 20, 33, 64, 96, 128, 200, 512, 1024):
        bd = us_kernels._block_d(D)
        for need_pos in (False, True):
            br = us_kernels._block_r(bd, need_pos)
            assert any(c.name == "unshuffle_scatter_bwd" and c.constexprs["BLOCK_D"] == bd
                       and c.constexprs["BLOCK_R"] == br and c.constexprs["NEED_POS"] == need_pos for c in us)


def test_vector_width_choice():
    """VEC is the widest power of two (at most 16 bytes) dividing the lengths and start addresses."""
    from fastmae.kernels._common import vec_width
    fp32 = torch.empty(64)
    bf16 = torch.empty(64, dtype=torch.bfloat16)
    assert vec_width(torch.float32, [16, 224, 3 * 224 * 224], [fp32]) == 4  # ViT-B: 128-bit
    assert vec_width(torch.bfloat16, [16, 224], [bf16]) == 8
    assert vec_width(torch.float32, [14, 224], [fp32]) == 2  # p = 14: 64-bit
    assert vec_width(torch.bfloat16, [14, 224], [bf16]) == 2
    assert vec_width(torch.float16, [7, 21], []) == 1
    assert vec_width(torch.float32, [16, 224], [fp32[1:]]) == 1  # start 4 bytes past a boundary
    assert vec_width(torch.bfloat16, [16, 224], [bf16[4:]]) == 4  # 8 bytes past: 64-bit vectors


def test_loss_tables_are_host_tensors_whatever_the_default_device():
    """The loss's cached index tables are made on the host (and copied to CUDA per call, never
    cached there) even under another default device: a table cached on the default device would
    be a meta tensor here, or on CUDA a tensor inside some CUDA graph's pool."""
    nml_kernels._pixel_offsets.cache_clear()
    nml_kernels._identity.cache_clear()
    pred, imgs = torch.randn(2, 4, 48, device="cpu"), torch.randn(2, 3, 8, 8, device="cpu")
    weight = torch.ones(2, 4, device="cpu")
    with torch.device("meta"):
        loss = nml_kernels.norm_mse_loss_forward(pred, imgs, weight, None, 4, True, 1e-6)
    ref = nml_kernels.norm_mse_loss_forward(pred, imgs, weight, None, 4, True, 1e-6)
    assert loss.device.type == "cpu" and torch.equal(loss, ref)
    assert nml_kernels._identity(4, False).device.type == "cpu"
    assert nml_kernels._pixel_offsets(3, 4, 64, 8, False).device.type == "cpu"
