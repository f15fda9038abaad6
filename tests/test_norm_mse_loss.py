"""fastmae.ops.norm_mse_loss on every backend (torch math, C++, Triton under the interpreter) against
the official loss in fp64, forward and backward, through the public function and the registered ops.

Tolerance: ``helpers.assert_op_close`` (STYLE.md's rule). Shapes reach the tail paths: patch sizes
4 to 48, C in 1/3, non-square images, L up to 272, the C++ vector paths (8- and 16-pixel groups,
several per patch row); predictions for every patch with a mask, or for some rows through ``ids``
with or without row weights; raw and normalised targets, flat patches where eps weighs in, mixed
dtypes. Outputs are allocated on NaN-filled memory; the loss is deterministic for any thread
count; an index out of range is refused the same way on every backend; the C++ kernel's
instruction-set variants and streaming stores both ways; ``torch.library.opcheck``. Clips
(VideoMAE's targets: tubelets of 1 to 3 frames, per-channel statistics, the pixel affine map)
against a per-tubelet loop in fp64.
(``torch.compile(fullgraph=True)`` of the three ops together: tests/test_dispatch.py.)
"""
import re

import pytest
import torch
from helpers import (OP_DTYPES, assert_op_close, case_id, cpu_has_avx512_bf16, random_masking, randn, require_cpp,
                     seeded, skip_big_on_triton, skip_triton_tracing)

from fastmae import config, ops
from fastmae.ops.norm_mse_loss import norm_mse_loss_backward_ref, norm_mse_loss_ref

EPS = 1e-6
IMAGE = (1, False, None)  # the op's clip arguments for images: tubelet_size, per_channel, affine
# (N, C, H, W, p)
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
LOSS_MODES = ["full", "ids", "ids+weights"]  # pred for every patch + mask / removed rows only


@pytest.fixture(autouse=True)
def _outputs_on_nan(nan_memory):
    """Every output of every test here is allocated on NaN (conftest's ``nan_memory``)."""


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


@pytest.mark.parametrize("norm_pix", [True, False], ids=["normpix", "raw"])
@pytest.mark.parametrize("mode", LOSS_MODES)
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=str)
@pytest.mark.parametrize("case", LOSS_CASES, ids=case_id)
def test_norm_mse_loss(case, dtype, mode, norm_pix, backend, request):
    N, C, H, W, p = case
    L, P = (H // p) * (W // p), p * p * C
    skip_big_on_triton(backend, N * L > 256)  # one program per row
    gen = seeded(request)
    K = max(1, L // 4)
    imgs = (randn(gen, N, C, H, W) * 0.5 + 0.3).to(dtype)  # off-zero mean, as real pixels
    ids_shuffle, _, _, mask = random_masking(gen, N, L, K)
    ids = None if mode == "full" else ids_shuffle[:, K:].contiguous()
    M = L if ids is None else L - K
    weight = mask if mode == "full" else (torch.rand(N, M, generator=gen) if mode == "ids+weights" else None)
    pred = randn(gen, N, M, P, dtype=dtype, requires_grad=True)
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
    assert_op_close("norm_mse_loss", loss, ref, base, torch.float32)
    assert_op_close("norm_mse_loss dpred", pred.grad, pred64.grad, base_pred.grad, dtype)


def _check_norm_pix_loss(loss, pred, imgs, mask, p, eps):
    """``loss`` (backward already run into ``pred.grad``) and ``pred.grad`` against the fp64
    truth, with the reference op in ``pred``'s dtype as the error baseline (STYLE.md rule)."""
    pred64 = pred.detach().double().requires_grad_()
    ref = loss_ref64(pred64, imgs, mask, None, p, True, eps)
    ref.backward()
    base_pred = pred.detach().clone().requires_grad_()
    base = norm_mse_loss_ref(base_pred, imgs, mask, None, p, True, eps)
    base.backward()
    assert_op_close("norm_mse_loss", loss, ref, base, torch.float32)
    assert_op_close("norm_mse_loss dpred", pred.grad, pred64.grad, base_pred.grad, pred.dtype)


# ============================================================================ clips (VideoMAE)
# (N, C, T, H, W, p, t)
CLIP_CASES = [
    (2, 3, 4, 16, 24, 8, 2),
    (1, 1, 6, 8, 12, 4, 3),
    (2, 3, 2, 32, 16, 16, 1),
    (1, 3, 4, 32, 32, 16, 2),  # VideoMAE's tubelet: 2 x 16 x 16 x 3 = 1536 values
]
# target: (norm_pix, per_channel, affine): VideoMAE's two, and the MAE normalisation on clips
CLIP_TARGETS = {"videomae": (True, True, True), "videomae_raw": (False, False, True), "patch": (True, False, False),
                "channel": (True, True, False)}


def clip_loss64(pred, videos, ids, p, t, norm_pix, per_channel, affine, eps=EPS):
    """VideoMAE's loss in fp64, one tubelet at a time: slice it from the clip, order its values
    (dt, i, j, c), normalise (per channel: (x - mean) / (std + eps); else MAE's), mean squared error."""
    x = videos.double()
    if affine is not None:
        x = x * affine[0].double().view(1, -1, 1, 1, 1) + affine[1].double().view(1, -1, 1, 1, 1)
    N, C, T, H, W = x.shape
    h, w = H // p, W // p
    rows = []
    for n in range(N):
        for m, l in enumerate(ids[n].tolist()):
            ti, hi, wj = l // (h * w), (l % (h * w)) // w, l % w
            tube = x[n, :, ti * t:(ti + 1) * t, hi * p:(hi + 1) * p, wj * p:(wj + 1) * p]  # [C, t, p, p]
            v = tube.permute(1, 2, 3, 0).reshape(-1, C)  # (dt, i, j) x c
            if norm_pix and per_channel:
                v = (v - v.mean(0)) / (v.var(0).sqrt() + eps)
            elif norm_pix:
                v = (v - v.mean()) / (v.var() + eps) ** 0.5
            rows.append(((pred[n, m] - v.reshape(-1)) ** 2).mean())
    return torch.stack(rows).mean()


@pytest.mark.parametrize("target", list(CLIP_TARGETS))
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=str)
@pytest.mark.parametrize("case", CLIP_CASES, ids=case_id)
def test_norm_mse_loss_clips(case, dtype, target, backend, request):
    N, C, T, H, W, p, t = case
    norm_pix, per_channel, has_affine = CLIP_TARGETS[target]
    L, P = (T // t) * (H // p) * (W // p), t * p * p * C
    gen = seeded(request)
    videos = (randn(gen, N, C, T, H, W) * 0.5 + 0.3).to(dtype)
    affine = torch.stack([torch.rand(C, generator=gen) + 0.1, randn(gen, C)]) if has_affine else None
    K = max(1, L // 4)
    ids = random_masking(gen, N, L, K)[0][:, K:].contiguous()  # the masked tubelets
    pred = randn(gen, N, L - K, P, dtype=dtype, requires_grad=True)
    g = torch.rand((), generator=gen) + 0.5
    loss = ops.norm_mse_loss(pred, videos, None, p, norm_pix, EPS, ids=ids, tubelet_size=t, per_channel=per_channel,
                             affine=affine)
    (loss * g).backward()
    pred64 = pred.detach().double().requires_grad_()
    truth = clip_loss64(pred64, videos, ids, p, t, norm_pix, per_channel, affine)
    (truth * g.double()).backward()
    base_pred = pred.detach().clone().requires_grad_()
    base = norm_mse_loss_ref(base_pred, videos, torch.ones(N, L - K), ids, p, norm_pix, EPS, t, per_channel, affine)
    (base * g).backward()
    assert loss.dtype == torch.float32 and pred.grad.dtype == dtype
    assert_op_close("norm_mse_loss clips", loss, truth, base, torch.float32)
    assert_op_close("norm_mse_loss clips dpred", pred.grad, pred64.grad, base_pred.grad, dtype)


def test_norm_mse_loss_clip_of_one_frame_is_the_image_loss(backend, request):
    """A clip of one frame in tubelets of 1 gives the image loss of that frame (same op, T = t = 1)."""
    gen = seeded(request)
    imgs, p = randn(gen, 2, 3, 16, 24), 8
    pred = randn(gen, 2, 6, 192)
    mask = (torch.rand(2, 6, generator=gen) > 0.5).float()
    mask[:, 0] = 1
    want = ops.norm_mse_loss(pred, imgs, mask, p)
    got = ops.norm_mse_loss(pred, imgs.unsqueeze(2), mask, p, tubelet_size=1)
    assert torch.equal(got, want)


@pytest.mark.parametrize("eps", [EPS, 1e-2])
def test_norm_mse_loss_flat_patches(eps, backend, request):
    """Flat and near-flat patches (sky, borders), where eps weighs in the divisor
    ``sqrt(var + eps)``: a constant patch, one whose pixels move by about one 8-bit step
    (variance ~1e-5) and one that moves by 1e-5; at the default and a large eps. (Random patches
    alone, variance ~0.25, cannot tell ``sqrt(var + eps)`` from ``sqrt(var) + eps``.)"""
    N, C, H, W, p = 2, 3, 32, 32, 8
    L, P = 16, 192
    gen = seeded(request)
    imgs = randn(gen, N, C, H, W) * 0.5 + 0.3
    imgs[:, :, :8, :8] = 0.7
    imgs[:, :, :8, 8:16] = 0.7 + 3e-3 * randn(gen, N, C, 8, 8)
    imgs[:, :, 8:16, :8] = -0.2 + 1e-5 * randn(gen, N, C, 8, 8)
    _, _, _, mask = random_masking(gen, N, L, 4)
    mask[:, [0, 1, 4]] = 1  # the three flat patches are among the removed ones
    pred = randn(gen, N, L, P, requires_grad=True)
    loss = ops.norm_mse_loss(pred, imgs, mask, p, norm_pix_loss=True, eps=eps)
    loss.backward()
    _check_norm_pix_loss(loss, pred, imgs, mask, p, eps)


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


def test_norm_mse_loss_refuses_out_of_range_ids(backend):
    """An index outside [0, L) in ``ids`` is an IndexError naming it, on every backend, forward
    and backward, before any kernel reads through it."""
    N, C, H, W, p = 2, 3, 16, 16, 8  # L = 4
    imgs, pred = torch.randn(N, C, H, W), torch.randn(N, 2, C * p * p, requires_grad=True)
    weight = torch.ones(N, 2)
    for bad in (4, -1):
        ids = torch.tensor([[0, 3], [bad, 1]])
        message = re.escape(f"ids holds index {bad}, outside [0, 4)")
        with pytest.raises(IndexError, match=message):
            ops.norm_mse_loss(pred, imgs, None, p, ids=ids)
        with pytest.raises(IndexError, match=message):
            torch.ops.fastmae.norm_mse_loss_backward(torch.tensor(1.0), pred.detach(), imgs, weight, ids, p, True, EPS,
                                                     *IMAGE)
    assert pred.grad is None


def test_norm_mse_loss_rows_of_one_patch(backend):
    """Rows are independent: two rows predicting the same patch (ids need not be distinct here)
    each get that patch's target, as in the reference."""
    N, C, H, W, p = 2, 3, 16, 16, 8
    imgs, pred = torch.rand(N, C, H, W), torch.randn(N, 3, C * p * p, requires_grad=True)
    ids = torch.tensor([[2, 2, 0], [1, 3, 1]])
    loss = ops.norm_mse_loss(pred, imgs, None, p, ids=ids)
    loss.backward()
    pred64 = pred.detach().double().requires_grad_()
    ref = loss_ref64(pred64, imgs, None, ids, p, True, EPS)
    ref.backward()
    base_pred = pred.detach().clone().requires_grad_()
    base = norm_mse_loss_ref(base_pred, imgs, torch.ones(N, 3), ids, p, True, EPS)
    base.backward()
    assert_op_close("norm_mse_loss", loss, ref, base, torch.float32)
    assert_op_close("norm_mse_loss dpred", pred.grad, pred64.grad, base_pred.grad, torch.float32)


def test_norm_mse_loss_size_one_last_dimension_with_any_stride(backend):
    """P = 1 predictions and W = 1 images whose last dimension (size 1) carries another stride
    (transposed views; contiguous() keeps them), forward and backward."""
    pred = torch.randn(2, 1, 3).transpose(-1, -2).requires_grad_()  # [2, 3, 1]
    imgs = torch.randn(2, 1, 1, 3).transpose(-1, -2)  # [2, 1, 3, 1]
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    loss = ops.norm_mse_loss(pred, imgs, mask, 1, norm_pix_loss=False)
    loss.backward()
    pred64 = pred.detach().double().requires_grad_()
    ref = loss_ref64(pred64, imgs, mask, None, 1, False, EPS)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref)
    torch.testing.assert_close(pred.grad.double(), pred64.grad)


@pytest.mark.parametrize("dtype", OP_DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["bool_mask", "no_mask"])
def test_norm_mse_loss_non_contiguous_inputs(variant, dtype, backend, request):
    """Arguments the public function converts: a transposed pred, channels_last images and a bool
    mask; or no mask with a non-contiguous ids. Loss and gradient bitwise those of contiguous
    copies (and a float mask), the gradient in pred's dtype and shape."""
    gen = seeded(request)
    N, C, H, W, p, K = 3, 3, 16, 24, 8, 2
    L = (H // p) * (W // p)
    _, _, restore, mask = random_masking(gen, N, L, K)
    imgs = randn(gen, N, C, H, W, dtype=dtype)
    if variant == "bool_mask":
        pred = randn(gen, N, C * p * p, L, dtype=dtype).transpose(1, 2)
        given = (pred, imgs.to(memory_format=torch.channels_last), mask.bool(), None)
        plain = (pred.contiguous(), imgs, mask, None)
    else:
        removed = restore.argsort(1)[:, K:]
        pred = randn(gen, N, L - K, C * p * p, dtype=dtype)
        given = (pred, imgs, None, removed.t().contiguous().t())
        plain = (pred, imgs, None, removed.contiguous())
        assert not given[3].is_contiguous()
    results = []
    for x, im, m, ids in (given, plain):
        leaf = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        loss = ops.norm_mse_loss(leaf, im, m, p, ids=ids)
        results.append((loss, *torch.autograd.grad(loss, leaf)))
    (loss_a, g_a), (loss_b, g_b) = results
    assert loss_a.dtype == torch.float32 and g_a.dtype == dtype and g_a.shape == pred.shape
    assert torch.equal(loss_a, loss_b) and torch.equal(g_a, g_b)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # raised inside torch
def test_norm_mse_loss_forward_mode_ad_is_refused(backend, request):
    """A tangent on pred is a clear NotImplementedError (a custom op would drop it silently);
    outside a dual level, and with tangent-free inputs inside one, the op runs."""
    import torch.autograd.forward_ad as fwad

    gen = seeded(request)
    _, _, _, mask = random_masking(gen, 2, 4, 1)
    imgs, pred = randn(gen, 2, 3, 16, 16), randn(gen, 2, 4, 192)
    ops.norm_mse_loss(pred, imgs, mask, 8)
    with fwad.dual_level():
        ops.norm_mse_loss(pred, imgs, mask, 8)
        with pytest.raises(NotImplementedError, match="norm_mse_loss does not implement forward-mode AD .jvp., but "
                                                      "pred carries a tangent"):
            ops.norm_mse_loss(fwad.make_dual(pred, torch.ones_like(pred)), imgs, mask, 8)


def test_norm_mse_loss_double_backward_raises(backend, request):
    """A second derivative through the loss's backward is not implemented: it says so when it is
    taken, rather than dropping the term (first derivatives under create_graph still work), for a
    contiguous pred and for the decoder's pred[:, 1:], which is not."""
    gen = seeded(request)
    imgs, mask = randn(gen, 2, 3, 16, 16), torch.ones(2, 4)
    for contiguous in (True, False):
        leaf = randn(gen, 2, 5, 3 * 8 * 8, requires_grad=True)
        pred = leaf[:, :4].contiguous() if contiguous else leaf[:, 1:]
        loss = ops.norm_mse_loss(pred, imgs, mask, 8)
        (grad,) = torch.autograd.grad(loss, leaf, create_graph=True)
        with pytest.raises(RuntimeError, match="(derivative for .*norm_mse_loss_backward.* is not implemented|"
                                               "no autograd formula was registered)"):
            (loss + grad.square().sum()).backward()


@pytest.mark.parametrize("which", ["norm_mse_loss", "norm_mse_loss_backward"])
def test_norm_mse_loss_outputs_fully_written(which, backend, request):
    """Each registered op on NaN-filled new memory (the autouse fixture): every output element written."""
    gen = seeded(request)
    N, C, H, W, p, K = 2, 3, 16, 24, 4, 5
    L = (H // p) * (W // p)
    imgs = torch.randn(N, C, H, W, generator=gen)
    _, _, _, mask = random_masking(gen, N, L, K)
    pred = torch.randn(N, L, p * p * C, generator=gen)
    f = torch.ops.fastmae
    if which == "norm_mse_loss":
        out, ref = f.norm_mse_loss(pred, imgs, mask, None, p, True, EPS, *IMAGE), norm_mse_loss_ref(pred, imgs, mask, None, p)
        assert out.shape == ()
    else:
        out = f.norm_mse_loss_backward(torch.tensor(1.0), pred, imgs, mask, None, p, True, EPS, *IMAGE)
        ref = norm_mse_loss_backward_ref(torch.tensor(1.0), pred, imgs, mask, None, p, True, EPS)
        assert out.shape == pred.shape
    assert not out.isnan().any(), f"{which}: output elements left unwritten (NaN fill survived)"
    assert_op_close(which, out, ref.double(), ref, torch.float32)


def _bad_inputs():
    """(name, call, exception, message pattern): every bad input, through the public function."""
    N, C, H, W, p, K = 2, 3, 16, 24, 8, 2
    L = (H // p) * (W // p)  # 6
    imgs = torch.randn(N, C, H, W)
    restore = torch.rand(N, L).argsort(1)
    pred = torch.randn(N, L, p * p * C)
    mask = torch.ones(N, L)
    ids_rm = restore[:, K:]
    pred_rm = torch.randn(N, L - K, p * p * C)
    nl = ops.norm_mse_loss
    return [
        ("index_dtype", lambda: nl(pred_rm, imgs, None, p, ids=ids_rm.int()), ValueError, "ids must be int64"),
        ("index_shape", lambda: nl(pred_rm, imgs, None, p, ids=ids_rm[:, :-1]), ValueError,
         r"ids must have shape \[2, 4\]"),
        ("batch", lambda: nl(pred[:1], imgs, mask, p), ValueError, r"pred must be \[N, rows, t\*p\*p\*C\]"),
        ("pred_rows", lambda: nl(pred[:, :-1], imgs, mask[:, :-1], p), ValueError,
         "pred has 5 rows but the inputs have L = 6 patches"),
        ("pred_width", lambda: nl(pred[..., :-1], imgs, mask, p), ValueError, r"= \[2, \*, 192\]"),
        ("mask_shape", lambda: nl(pred, imgs, mask[:, :-1], p), ValueError, "mask must have shape"),
        ("patch_not_dividing", lambda: nl(pred, imgs, mask, 7), ValueError, "not divisible by the patch size 7"),
        ("patch_bool", lambda: nl(pred, imgs, mask, True), ValueError, "patch_size must be an integer"),
        ("mask_requires_grad", lambda: nl(pred, imgs, mask.clone().requires_grad_(), p), ValueError,
         "mask requires grad, but norm_mse_loss differentiates pred only"),
        ("imgs_requires_grad", lambda: nl(pred, imgs.clone().requires_grad_(), mask, p), ValueError,
         "imgs requires grad"),
        ("pred_dtype", lambda: nl(pred.long(), imgs, mask, p), ValueError, "pred must be float32"),
        ("imgs_dtype", lambda: nl(pred, imgs.long(), mask, p), ValueError, "imgs must be float32"),
        ("mask_required", lambda: nl(pred, imgs, None, p), ValueError, "mask is required"),
        # another device than the rest ("meta" stands for one on a machine without a GPU)
        ("devices", lambda: nl(pred, imgs, mask.to("meta"), p), ValueError,
         "pred, imgs, mask must be on one device: .*mask on meta"),
        ("clip_frames", lambda: nl(torch.randn(N, 6, 384), imgs.unsqueeze(2).expand(-1, -1, 3, -1, -1), None, p,
                                   ids=ids_rm[:, :2].repeat(1, 3).contiguous(), tubelet_size=2), ValueError,
         "3 frames are not divisible by the tubelet size 2"),
        ("tubelet_bool", lambda: nl(pred, imgs, mask, p, tubelet_size=True), ValueError,
         "tubelet_size must be a positive integer"),
        ("clip_pred_width", lambda: nl(pred, imgs.unsqueeze(2).expand(-1, -1, 2, -1, -1), torch.ones(N, 3), p,
                                       tubelet_size=2), ValueError, r"t\*p\*p\*C\] = \[2, \*, 384\]"),
        ("per_channel_raw", lambda: nl(pred, imgs, mask, p, False, per_channel=True), ValueError,
         "per_channel normalises the target: it needs norm_pix_loss=True"),
        ("affine_shape", lambda: nl(pred, imgs, mask, p, affine=torch.ones(2, 2)), ValueError,
         r"affine must be \[2, C\] = \[2, 3\]"),
        ("imgs_rank", lambda: nl(pred, imgs[0], mask, p), ValueError, "imgs must be images"),
    ]


_BAD = _bad_inputs()


@pytest.mark.parametrize("which", range(len(_BAD)), ids=[b[0] for b in _BAD])
def test_norm_mse_loss_bad_input(which, backend):
    _, call, exc, match = _BAD[which]
    with pytest.raises(exc, match=match):
        call()


def _opcheck_cases():
    N, C, H, W, p, K = 2, 3, 16, 24, 8, 2
    L = (H // p) * (W // p)
    ids_rm = torch.rand(N, L).argsort(1)[:, K:].contiguous()
    imgs = torch.randn(N, C, H, W)
    rg = lambda t: t.requires_grad_()  # noqa: E731
    f = torch.ops.fastmae
    clips = torch.randn(N, C, 4, H, W)  # tubelets of 2 frames: 2 * L of them
    ids_clip = torch.rand(N, 2 * L).argsort(1)[:, K:].contiguous()
    affine = torch.stack([torch.rand(C) + 0.1, torch.randn(C)])
    image = IMAGE
    return {
        "norm_mse_loss": (f.norm_mse_loss, (rg(torch.randn(N, L, p * p * C)), imgs, torch.rand(N, L), None, p, True,
                                            EPS, *image)),
        "norm_mse_loss_ids": (f.norm_mse_loss, (rg(torch.randn(N, L - K, p * p * C)), imgs, torch.ones(N, L - K),
                                                ids_rm, p, False, EPS, *image)),
        "norm_mse_loss_backward": (f.norm_mse_loss_backward, (torch.tensor(0.7), torch.randn(N, L - K, p * p * C),
                                                              imgs, torch.ones(N, L - K), ids_rm, p, True, EPS,
                                                              *image)),
        "norm_mse_loss_clips": (f.norm_mse_loss, (rg(torch.randn(N, 2 * L - K, 2 * p * p * C)), clips,
                                                  torch.ones(N, 2 * L - K), ids_clip, p, True, EPS, 2, True, affine)),
        "norm_mse_loss_clips_backward": (f.norm_mse_loss_backward, (torch.tensor(0.7),
                                                                    torch.randn(N, 2 * L - K, 2 * p * p * C), clips,
                                                                    torch.ones(N, 2 * L - K), ids_clip, p, False, EPS,
                                                                    2, False, affine)),
    }


@pytest.mark.parametrize("name", list(_opcheck_cases()))
def test_norm_mse_loss_opcheck(name, backend):
    skip_triton_tracing(backend)
    op, args = _opcheck_cases()[name]
    torch.library.opcheck(op, args)


# ============================================================================ the C++ kernels
def test_cpp_norm_mse_loss_kernels_validate_indices():
    """The C++ kernels check the range of ids themselves, with the messages of the other backends."""
    require_cpp()
    c, args = torch.ops.fastmae_C, config.settings().cpp_args
    N, C, H, W, p, K = 2, 3, 16, 16, 8, 2
    imgs, pred, weight = torch.randn(N, C, H, W), torch.randn(N, K, C * p * p), torch.ones(N, K)
    bad = torch.tensor([[0, 1], [2, 4]])
    message = re.escape("ids holds index 4, outside [0, 4)")
    with pytest.raises(IndexError, match=message):
        c.norm_mse_loss_fwd(pred, imgs, weight, bad, p, True, EPS, *IMAGE, *args)
    with pytest.raises(IndexError, match=message):
        c.norm_mse_loss_bwd(torch.tensor(1.0), pred, imgs, weight, bad, p, True, EPS, *IMAGE, *args)


@pytest.mark.parametrize("isa", ["avx2", "base"])
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=str)
def test_cpp_norm_mse_loss_isa_variants(dtype, isa, request):
    """The C++ hot loops exist three times (AVX-512 with AVX512-BF16, AVX2 and the baseline x86-64
    ISA; the best the CPU runs is chosen at run time, and the rest of this file tests that one):
    run the lower ones too (cpu_isa caps the variant), over shapes with tails."""
    require_cpp()
    with config.override(backend="cpp", cpu_isa=isa):
        test_norm_mse_loss(LOSS_CASES[1], dtype, "full", True, "cpp", request)
        test_norm_mse_loss(LOSS_CASES[2], dtype, "ids+weights", True, "cpp", request)
        test_norm_mse_loss(LOSS_CASES[0], dtype, "ids", False, "cpp", request)
        test_norm_mse_loss(LOSS_CASES[3], dtype, "full", True, "cpp", request)
        test_norm_mse_loss(LOSS_CASES[6], dtype, "ids", True, "cpp", request)
        test_norm_mse_loss(LOSS_CASES[7], dtype, "ids+weights", True, "cpp", request)


@pytest.mark.parametrize("isa", ["native", "avx2", "base"])
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=str)
def test_cpp_norm_mse_loss_streaming_stores(dtype, isa, request):
    """dpred is streamed from 16 MiB. Force streaming (cpu_stream="always") on small shapes: 8- and
    16-pixel groups, C = 1 and 3, and p = 14 (not streamed), in every instruction-set variant: the
    same results as the reference, outputs poisoned first."""
    require_cpp()
    with config.override(backend="cpp", cpu_stream="always", **({} if isa == "native" else {"cpu_isa": isa})):
        for case in (LOSS_CASES[1], LOSS_CASES[3], LOSS_CASES[5], LOSS_CASES[6], LOSS_CASES[2]):
            test_norm_mse_loss(case, dtype, "full", True, "cpp", request)
            test_norm_mse_loss(case, dtype, "ids+weights", False, "cpp", request)


@pytest.mark.parametrize("isa", ["native", "avx2", "base"])
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=str)
def test_cpp_norm_mse_loss_streamed_outputs_are_bitwise_equal(dtype, isa):
    """Streaming stores change where the bits go, never which: the backward gives bitwise the same
    dpred streamed (stream mode always) as not (never), in every instruction-set variant, at
    p = 8 and 16."""
    require_cpp()
    cap = config.settings().cpp_args[0] if isa == "native" else config.ISA_CAPS[isa]
    never, always = config.STREAM_MODES["never"], config.STREAM_MODES["always"]
    gen = torch.Generator().manual_seed(11)
    f = torch.ops.fastmae_C
    imgs = torch.rand(2, 3, 32, 64, generator=gen).to(dtype)
    for p in (8, 16):
        L = (32 // p) * (64 // p)
        pred = torch.randn(2, L, 3 * p * p, generator=gen).to(dtype)
        mask = (torch.rand(2, L, generator=gen) > 0.25).float()
        args = (torch.tensor(1.0), pred, imgs, mask, None, p, True, EPS, *IMAGE)
        plain, streamed = f.norm_mse_loss_bwd(*args, cap, never), f.norm_mse_loss_bwd(*args, cap, always)
        bits = torch.int16 if plain.element_size() == 2 else torch.int32
        assert torch.equal(plain.view(bits), streamed.view(bits)), f"backward p={p}: streamed output differs"


def test_cpp_norm_mse_loss_avx512_bf16_rounding_matches_avx2():
    """The AVX-512 variant rounds fp32 to bf16 with vcvtneps2bf16, the others with integer
    arithmetic: bitwise the same dpred. At p = 16 it also interleaves its target with other
    instructions (two-source permutes of 16 values against 8-wide shuffles), its sums in the same
    order: the same bits, forward and backward."""
    require_cpp()
    if not cpu_has_avx512_bf16():
        pytest.skip("this CPU has no AVX512-BF16: only one bf16 rounding runs here")
    gen = torch.Generator().manual_seed(7)
    imgs = torch.rand(2, 3, 32, 32, generator=gen).bfloat16()
    pred = torch.randn(2, 16, 192, generator=gen).bfloat16()
    mask = (torch.rand(2, 16, generator=gen) > 0.25).float()
    pred16, mask16 = torch.randn(2, 4, 768, generator=gen).bfloat16(), mask[:, :4].contiguous()
    f, mode = torch.ops.fastmae_C, config.STREAM_MODES["auto"]

    def outputs(cap):
        return (f.norm_mse_loss_bwd(torch.tensor(1.0), pred, imgs, mask, None, 8, True, EPS, *IMAGE, cap, mode),
                f.norm_mse_loss_bwd(torch.tensor(1.0), pred16, imgs, mask16, None, 16, True, EPS, *IMAGE, cap, mode),
                f.norm_mse_loss_fwd(pred16, imgs, mask16, None, 16, True, EPS, *IMAGE, cap, mode).view(1))

    assert torch.ops.fastmae_C.cpu_isa(config.ISA_CAPS["avx512"]) == config.ISA_CAPS["avx512"]
    native, avx2 = outputs(config.ISA_CAPS["avx512"]), outputs(config.ISA_CAPS["avx2"])
    for name, a, b in zip(("dpred", "dpred, p = 16", "loss, p = 16"), native, avx2, strict=True):
        bits = torch.int16 if a.element_size() == 2 else torch.int32
        assert torch.equal(a.view(bits), b.view(bits)), f"{name}: AVX-512 and AVX2 differ"
