"""fastmae on a CUDA device: the Triton kernels compiled for the GPU (not the interpreter).

- every op, forward and backward, against fp64 math on the CPU (the tolerance rule of the op
  tests, ``helpers.assert_op_close``), over the shapes of ``test_gather_mask``,
  ``test_unshuffle_scatter`` and ``test_norm_mse_loss`` plus ViT-B shapes and unaligned inputs
  (the kernels' narrow-vector paths), outputs poisoned with NaN before the kernels write them;
- bitwise determinism of the reductions, ``torch.library.opcheck`` of every op on CUDA tensors;
- the device-side checks of the input contract (an index out of range, a patch kept twice, an
  ids_restore that is not a permutation; forward and backward) stop the stream (in a child
  process: a CUDA assert poisons the context);
- ``gelu_mlp`` against its composition (dtypes, ViT-B widths; bitwise under CUDA autocast);
- the fast model against the official golden outputs (tf32 off) and against the reference model;
- ``torch.compile(fullgraph=True)`` training over the Triton ops (fp32 and bf16 autocast): one
  graph, no recompilation, the eager numbers; the same with CUDA graphs (``mode=
  "reduce-overhead"``) and gradient accumulation, and ``fastmae pretrain --compile
  reduce-overhead`` in a fresh process.

The Triton interpreter is process-wide and the CPU tests need it, so this file runs on its own:
``TRITON_INTERPRET=0 pytest tests/test_cuda.py``. Without a CUDA device every test is skipped.
"""
import copy
import math
import os
import re
import subprocess
import sys
import textwrap
from functools import partial

import pytest
import torch
import torch._dynamo
import torch.nn as nn
import test_gather_mask as GM
import test_mlp as M
import test_norm_mse_loss as NL
import test_unshuffle_scatter as US
from helpers import (OP_DTYPES, assert_close_to_truth, assert_op_close, case_id, load_golden, random_masking, randn,
                     rel_err, seeded)
from torch._dynamo.testing import CompileCounterWithBackend

import fastmae
from fastmae import config, ops, reference
from fastmae.ops import _backend
from fastmae.ops.gather_mask import gather_mask_ref
from fastmae.ops.norm_mse_loss import norm_mse_loss_ref

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(_backend.triton_interpret(), reason="TRITON_INTERPRET=1 would interpret the kernels; run "
                       "`TRITON_INTERPRET=0 pytest tests/test_cuda.py` to compile them for the GPU"),
]
CUDA = torch.device("cuda")
VITB = (64, 3, 224, 224, 16)  # N, C, H, W, p


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 matmuls in full precision (no tf32), the default backend choice (Triton on CUDA)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    with config.override(backend="auto"):
        yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _poison(*specs):
    """NaN-filled CUDA blocks of the outputs' sizes, freed at once: the caching allocator hands
    the same blocks to the next allocations of these sizes, so an unwritten element stays NaN."""
    bufs = [torch.full(shape, math.nan, dtype=dtype, device=CUDA) for shape, dtype in specs]
    del bufs


def _leaf(t, offset=False):
    """A CUDA leaf holding ``t``; ``offset``: one element past a 16-byte boundary, so the kernels
    must fall back to narrow vectors."""
    if offset:
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=CUDA)
        dev = buf[1:].view(t.shape)
        dev.copy_(t)
    else:
        dev = t.to(CUDA)
    return dev.requires_grad_()


def test_cuda_tensors_use_triton():
    assert _backend.select_backend(CUDA) == "triton"


# ============================================================================ gather_mask
GATHER_CASES = GM.GATHER_CASES + [(*VITB, 49), (2, 3, 224, 224, 14, 64), (3, 1, 40, 24, 8, 11)]


@pytest.mark.parametrize("offset", [False, True], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=str)
@pytest.mark.parametrize("case", GATHER_CASES, ids=case_id)
def test_gather_mask(case, dtype, offset, request):
    N, C, H, W, p, K = case
    L = (H // p) * (W // p)
    gen = seeded(request)
    imgs = randn(gen, N, C, H, W, dtype=dtype)
    _, ids_keep, _, _ = random_masking(gen, N, L, K)
    grad = randn(gen, N, K, C * p * p, dtype=dtype)

    x = _leaf(imgs, offset)
    _poison(((N, K, C * p * p), dtype))
    out = ops.gather_mask(x, ids_keep.to(CUDA), p)
    _poison(((N, C, H, W), dtype))
    out.backward(_leaf(grad, offset).detach())

    imgs64 = imgs.double().requires_grad_()
    ref = gather_mask_ref(imgs64, ids_keep, p)
    ref.backward(grad.double())
    # a gather is exact: the output and gradient must equal the reference bit for bit
    assert out.dtype == dtype and x.grad.dtype == dtype
    assert torch.equal(out.cpu().double(), ref.detach()), "gather_mask forward"
    assert torch.equal(x.grad.cpu().double(), imgs64.grad), "gather_mask backward"


# ============================================================================ unshuffle_scatter
UNSHUFFLE_CASES = US.UNSHUFFLE_CASES + [(64, 49, 196, 512), (3, 36, 144, 256), (2, 5, 17, 7)]


@pytest.mark.parametrize("pos", ["pos", "nopos"])
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=str)
@pytest.mark.parametrize("case", UNSHUFFLE_CASES, ids=case_id)
def test_unshuffle_scatter(case, dtype, pos, request):
    N, K, L, D = case
    gen = seeded(request)
    x = randn(gen, N, 1 + K, D, dtype=dtype)
    tok = randn(gen, 1, 1, D, dtype=dtype)
    pe = randn(gen, 1, 1 + L, D, dtype=dtype) if pos == "pos" else None
    _, _, ids_restore, _ = random_masking(gen, N, L, K)
    grad = randn(gen, N, 1 + L, D, dtype=dtype)
    leaves = [_leaf(t) for t in (x, tok) + ((pe,) if pe is not None else ())]

    _poison(((N, 1 + L, D), dtype))
    out = ops.unshuffle_scatter(leaves[0], leaves[1], ids_restore.to(CUDA), leaves[2] if pe is not None else None)
    _poison(((N, 1 + K, D), dtype), ((D,), dtype), ((1 + L, D), dtype))
    out.backward(grad.to(CUDA))
    US.check_unshuffle(out, leaves, ids_restore, grad, dtype)


def test_unshuffle_scatter_grad_deterministic():
    """The mask-token and position gradients are fixed-order reductions: bitwise equal across runs."""
    N, K, L, D = 64, 49, 196, 512
    x = torch.randn(N, 1 + K, D, device=CUDA, requires_grad=True)
    tok = torch.randn(D, device=CUDA, requires_grad=True)
    pos = torch.randn(1 + L, D, device=CUDA, requires_grad=True)
    ids_restore = torch.rand(N, L, device=CUDA).argsort(1)
    grad = torch.randn(N, 1 + L, D, device=CUDA) * 1e3

    def grads():
        for t in (x, tok, pos):
            t.grad = None
        ops.unshuffle_scatter(x, tok, ids_restore, pos).backward(grad)
        return [t.grad.clone() for t in (x, tok, pos)]

    first = grads()
    for _ in range(3):
        for name, a, b in zip(["dx", "dmask_token", "dpos"], first, grads()):
            assert torch.equal(a, b), f"{name} differs between runs"


# ============================================================================ norm_mse_loss
LOSS_CASES = NL.LOSS_CASES + [VITB, (3, 3, 96, 96, 8), (2, 1, 40, 24, 8)]


@pytest.mark.parametrize("norm_pix", [True, False], ids=["normpix", "raw"])
@pytest.mark.parametrize("mode", NL.LOSS_MODES)
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=str)
@pytest.mark.parametrize("case", LOSS_CASES, ids=case_id)
def test_norm_mse_loss(case, dtype, mode, norm_pix, request):
    N, C, H, W, p = case
    L, P = (H // p) * (W // p), p * p * C
    gen = seeded(request)
    K = max(1, L // 4)
    imgs = (randn(gen, N, C, H, W) * 0.5 + 0.3).to(dtype)
    ids_shuffle, _, _, mask = random_masking(gen, N, L, K)
    ids = None if mode == "full" else ids_shuffle[:, K:].contiguous()
    M = L if ids is None else L - K
    weight = mask if mode == "full" else (torch.rand(N, M, generator=gen) if mode == "ids+weights" else None)
    pred = randn(gen, N, M, P, dtype=dtype)
    g = torch.rand((), generator=gen) + 0.5
    if dtype == torch.float16:
        # at ViT-B sizes dpred ~ 1e-6 is subnormal in fp16 (plain PyTorch loses 5% to it): scale
        # the upstream gradient as GradScaler does in fp16 training
        g = g * 2.0**16

    pred_dev = _leaf(pred)
    loss = ops.norm_mse_loss(pred_dev, imgs.to(CUDA), None if weight is None else weight.to(CUDA), p,
                             norm_pix_loss=norm_pix, eps=NL.EPS, ids=None if ids is None else ids.to(CUDA))
    _poison(((N, M, P), dtype))
    (loss * g.to(CUDA)).backward()

    pred64 = pred.double().requires_grad_()
    ref = NL.loss_ref64(pred64, imgs, weight, ids, p, norm_pix, NL.EPS)
    (ref * g.double()).backward()
    base_pred = pred.clone().requires_grad_()
    base = norm_mse_loss_ref(base_pred, imgs, weight if weight is not None else torch.ones(N, M), ids, p,
                             norm_pix, NL.EPS)
    (base * g).backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0 and pred_dev.grad.dtype == dtype
    assert_op_close("norm_mse_loss", loss.cpu(), ref, base, torch.float32)
    assert_op_close("norm_mse_loss dpred", pred_dev.grad.cpu(), pred64.grad, base_pred.grad, dtype)


@pytest.mark.parametrize("target", list(NL.CLIP_TARGETS))
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=str)
@pytest.mark.parametrize("case", NL.CLIP_CASES + [(8, 3, 16, 224, 224, 16, 2)], ids=case_id)
def test_norm_mse_loss_clips(case, dtype, target, request):
    """The Triton tubelet kernels (VideoMAE's targets) against the fp64 per-tubelet loop; the last
    case is VideoMAE's 16x224x224 clip with 90% of its tubelets masked."""
    N, C, T, H, W, p, t = case
    norm_pix, per_channel, has_affine = NL.CLIP_TARGETS[target]
    L, P = (T // t) * (H // p) * (W // p), t * p * p * C
    gen = seeded(request)
    videos = (randn(gen, N, C, T, H, W) * 0.5 + 0.3).to(dtype)
    affine = torch.stack([torch.rand(C, generator=gen) + 0.1, randn(gen, C)]) if has_affine else None
    K = max(1, L // 10)
    ids = random_masking(gen, N, L, K)[0][:, K:].contiguous()
    pred = randn(gen, N, L - K, P, dtype=dtype)
    g = torch.rand((), generator=gen) + 0.5
    if dtype == torch.float16:
        g = g * 2.0**16  # as GradScaler does: dpred would be subnormal in fp16
    pred_dev = _leaf(pred)
    loss = ops.norm_mse_loss(pred_dev, videos.to(CUDA), None, p, norm_pix, NL.EPS, ids=ids.to(CUDA),
                             tubelet_size=t, per_channel=per_channel,
                             affine=None if affine is None else affine.to(CUDA))
    (loss * g.to(CUDA)).backward()
    pred64 = pred.double().requires_grad_()
    truth = NL.clip_loss64(pred64, videos, ids, p, t, norm_pix, per_channel, affine)
    (truth * g.double()).backward()
    base_pred = pred.clone().requires_grad_()
    base = norm_mse_loss_ref(base_pred, videos, torch.ones(N, L - K), ids, p, norm_pix, NL.EPS, t, per_channel,
                             affine)
    (base * g).backward()
    assert_op_close("norm_mse_loss clips", loss.cpu(), truth, base, torch.float32)
    assert_op_close("norm_mse_loss clips dpred", pred_dev.grad.cpu(), pred64.grad, base_pred.grad, dtype)


def test_norm_mse_loss_deterministic():
    N, C, H, W, p = VITB
    imgs = torch.rand(N, C, H, W, device=CUDA)
    pred = torch.randn(N, 196, p * p * C, device=CUDA, requires_grad=True)
    mask = (torch.rand(N, 196, device=CUDA) > 0.25).float()

    def run():
        pred.grad = None
        loss = ops.norm_mse_loss(pred, imgs, mask, p)
        loss.backward()
        return loss.detach().clone(), pred.grad.clone()

    first = run()
    for _ in range(3):
        again = run()
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


# ============================================================================ checks, opcheck
def _to_cuda(arg):
    if isinstance(arg, torch.Tensor):
        return arg.detach().to(CUDA).requires_grad_(arg.requires_grad)
    return arg


def _opcheck_cases():
    return {**GM._opcheck_cases(), **US._opcheck_cases(), **NL._opcheck_cases()}


@pytest.mark.parametrize("name", list(_opcheck_cases()))
def test_opcheck(name):
    op, args = _opcheck_cases()[name]
    torch.library.opcheck(op, tuple(_to_cuda(a) for a in args))


_DEVICE_ASSERTS = {
    # 16 patches: 16 is out of range
    "index out of range": ("""
        imgs = torch.randn(2, 3, 32, 32, device="cuda")
        ids = torch.tensor([[0, 1], [2, 16]], device="cuda")
        out = ops.gather_mask(imgs, ids, 8)
        """, "ids_keep holds an index outside"),
    "loss index out of range": ("""
        imgs = torch.randn(2, 3, 32, 32, device="cuda")
        ids = torch.tensor([[0, 1], [2, 16]], device="cuda")
        loss = ops.norm_mse_loss(torch.randn(2, 2, 192, device="cuda"), imgs, None, 8, ids=ids)
        """, "ids holds an index outside"),
    # patch 1 kept twice in sample 0, forward and backward
    "repeated patch": ("""
        imgs = torch.randn(2, 3, 32, 32, device="cuda")
        out = ops.gather_mask(imgs, torch.tensor([[1, 1], [2, 3]], device="cuda"), 8)
        """, "ids_keep repeats an index within a sample"),
    "repeated patch, backward": ("""
        grad = torch.randn(2, 2, 192, device="cuda")
        out = torch.ops.fastmae.gather_mask_backward(grad, torch.tensor([[1, 1], [2, 3]], device="cuda"), 8, 32, 32)
        """, "ids_keep repeats an index within a sample"),
    # sample 1 restores token 0 twice and token 2 never: not a permutation, forward and backward
    "not a permutation": ("""
        x = torch.randn(2, 3, 8, device="cuda")
        ids = torch.tensor([[0, 1, 2, 3], [0, 0, 1, 3]], device="cuda")
        out = ops.unshuffle_scatter(x, torch.zeros(8, device="cuda"), ids)
        """, "ids_restore repeats an index within a sample"),
    "not a permutation, backward": ("""
        grad = torch.randn(2, 5, 8, device="cuda")
        ids = torch.tensor([[0, 1, 2, 3], [0, 0, 1, 3]], device="cuda")
        out = torch.ops.fastmae.unshuffle_scatter_backward(grad, ids, 2, True)
        """, "ids_restore repeats an index within a sample"),
}


@pytest.mark.parametrize("case", list(_DEVICE_ASSERTS))
def test_device_side_refusals_stop_the_stream(case):
    """The input contract of every backend (indices in range, distinct per sample) holds on CUDA
    through a device-side assert queued before the kernel (no host synchronisation), forward and
    backward. The run fails, never silently (in a child process: the assert poisons the CUDA
    context). The assert's own message does not reach the child's stderr on CUDA."""
    body, message = _DEVICE_ASSERTS[case]
    script = "import torch\nfrom fastmae import ops\n" + textwrap.dedent(body) + \
        "torch.cuda.synchronize()\nprint('NO ERROR')\n"
    env = dict(os.environ, TRITON_INTERPRET="0", CUDA_LAUNCH_BLOCKING="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0 and "NO ERROR" not in proc.stdout, proc.stdout + proc.stderr
    assert "device-side assert" in proc.stderr or message in proc.stderr, proc.stderr


def test_mixed_devices_are_rejected():
    imgs = torch.randn(2, 3, 32, 32, device=CUDA)
    with pytest.raises(ValueError, match="is on cpu but imgs on cuda"):
        ops.gather_mask(imgs, torch.zeros(2, 1, dtype=torch.long), 8)


# ============================================================================ gelu_mlp
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=str)
@pytest.mark.parametrize("shape", M.SHAPES + [((64, 50), 768, 3072), ((3, 8000), 64, 256)], ids=str)
def test_gelu_mlp(shape, dtype):
    """The MLP on CUDA against its composition, each judged by its error against fp64, at ViT-B
    widths too (one chunk: rows are chunked on the CPU only)."""
    lead, D, H = shape
    tensors, grad = M._inputs(lead, D, H, dtype, seed=len(lead) + D, device=CUDA)
    truth = M._run(M.gelu_mlp_ref, [t.double() for t in tensors], grad.double())
    ref = M._run(M.gelu_mlp_ref, tensors, grad)
    fast = M._run(M.gelu_mlp, tensors, grad)
    for name, f, r, t in zip(M.NAMES, fast, ref, truth):
        assert_close_to_truth(f, t, r, atol=M.ATOL[dtype], norm="l2", name=name)


@pytest.mark.parametrize("autocast", [torch.bfloat16, torch.float16], ids=str)
def test_gelu_mlp_autocast(autocast):
    """Under CUDA autocast the same casts as the composition: bitwise equal outputs and gradients."""
    tensors, grad = M._inputs((4, 49), 768, 3072, torch.float32, device=CUDA)
    fast = M._run(M.gelu_mlp, tensors, grad, autocast=autocast)
    ref = M._run(M.gelu_mlp_ref, tensors, grad, autocast=autocast)
    assert fast[0].dtype == autocast
    for name, f, r in zip(M.NAMES, fast, ref):
        torch.testing.assert_close(f, r, rtol=0, atol=0, msg=name)


# ============================================================================ model
def _run(model, imgs, mask_ratio, noise):
    model.zero_grad(set_to_none=True)
    loss, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
    loss.backward()
    module = getattr(model, "_orig_mod", model)
    grads = {n: p.grad.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}
    return loss.detach().cpu(), pred.detach().cpu(), mask.cpu(), grads


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_golden_official_outputs(impl):
    """Both models on the GPU reproduce what the official code computed (fp32, tf32 off)."""
    golden = load_golden()
    for name, case in golden["cases"].items():
        cfg = dict(case["config"])
        eps = cfg.pop("layer_norm_eps")
        cls = reference.MaskedAutoencoderViT if impl == "reference" else fastmae.MaskedAutoencoderViT
        model = cls(**cfg, norm_layer=partial(nn.LayerNorm, eps=eps)).to(CUDA)
        model.load_state_dict(case["state_dict"], strict=True)
        loss, pred, mask, grads = _run(model, case["imgs"].to(CUDA), case["mask_ratio"], case["noise"].to(CUDA))
        assert torch.equal(mask, case["mask"]), name
        assert abs(loss.item() - case["loss"].item()) <= 1e-5 * abs(case["loss"].item()), name
        assert rel_err(pred, case["pred"]) <= 1e-5, name
        for k, g in case["grads"].items():
            assert rel_err(grads[k], g) <= 1e-4, (name, k, rel_err(grads[k], g))


def test_vit_base_fast_matches_reference():
    torch.manual_seed(0)
    ref = reference.mae_vit_base_patch16(norm_pix_loss=True).to(CUDA)
    fast = fastmae.mae_vit_base_patch16(norm_pix_loss=True).to(CUDA)
    fast.load_state_dict(ref.state_dict(), strict=True)
    imgs = torch.randn(8, 3, 224, 224, device=CUDA)
    noise = torch.rand(8, 196, device=CUDA)
    (la, pa, ma, ga), (lb, pb, mb, gb) = _run(fast, imgs, 0.75, noise), _run(ref, imgs, 0.75, noise)
    assert torch.equal(ma, mb)
    assert rel_err(la, lb) <= 1e-5 and rel_err(pa, pb) <= 1e-5
    worst = max(ga, key=lambda n: rel_err(ga[n], gb[n]))
    assert rel_err(ga[worst], gb[worst]) <= 1e-4, (worst, rel_err(ga[worst], gb[worst]))


TINY = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=48, depth=2, num_heads=3, decoder_embed_dim=32,
            decoder_depth=2, decoder_num_heads=4, mlp_ratio=2.0, norm_pix_loss=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_training_matches_eager(precision):
    """torch.compile(fullgraph=True) over the Triton ops: forward, backward and AdamW for three
    steps in one graph, no recompilation after the first step, the eager numbers."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = fastmae.MaskedAutoencoderViT(**TINY).to(CUDA)
    with torch.no_grad():
        for p in eager.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    mod = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(mod, fullgraph=True, backend=counter)
    opt_e = torch.optim.AdamW(eager.parameters(), lr=1e-3)
    opt_c = torch.optim.AdamW(mod.parameters(), lr=1e-3)
    tol = 1e-5 if precision == "fp32" else 2e-2
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        imgs = torch.randn(4, 3, 32, 32, generator=g).to(CUDA)
        noise = torch.rand(4, 16, generator=g).to(CUDA)
        outs = []
        for model, opt in ((compiled, opt_c), (eager, opt_e)):
            opt.zero_grad(set_to_none=True)
            with torch._dynamo.config.patch(error_on_recompile=step > 0), \
                    torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss, pred, mask = model(imgs, mask_ratio=0.75, noise=noise)
            loss.backward()
            grads = [p.grad.clone() for p in opt.param_groups[0]["params"] if p.requires_grad]
            outs.append((loss.detach(), pred.detach().float(), mask, grads))
            opt.step()
        (lc, pc, mc, gc), (le, pe, me, ge) = outs
        assert torch.equal(mc, me) and torch.isfinite(lc)
        assert rel_err(lc, le) <= tol and rel_err(pc, pe) <= tol, (step, lc.item(), le.item())
        worst = max(rel_err(a, b) for a, b in zip(gc, ge))
        assert worst <= 10 * tol, (step, worst)
    assert counter.frame_count == 1
    explanation = torch._dynamo.explain(eager)(imgs)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_cuda_graphs_training_with_accumulation_matches_eager():
    """torch.compile(mode="reduce-overhead"): forward and backward replayed as CUDA graphs (none
    skipped), two micro-batches accumulated per AdamW step, for three steps: the eager numbers.
    The first micro-batch's gradients stay alive in ``.grad`` while the second replays, which a
    graph that reused their memory would corrupt."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = fastmae.MaskedAutoencoderViT(**TINY).to(CUDA)
    mod = copy.deepcopy(eager)
    compiled = torch.compile(mod, fullgraph=True, mode="reduce-overhead")
    opt_e = torch.optim.AdamW(eager.parameters(), lr=1e-3)
    opt_c = torch.optim.AdamW(mod.parameters(), lr=1e-3)
    for step in range(3):
        outs = []
        for model, opt in ((compiled, opt_c), (eager, opt_e)):
            opt.zero_grad(set_to_none=True)
            losses = []
            for micro in range(2):
                g = torch.Generator().manual_seed(10 * step + micro)
                imgs = torch.randn(4, 3, 32, 32, generator=g).to(CUDA)
                noise = torch.rand(4, 16, generator=g).to(CUDA)
                loss, _, _ = model(imgs, mask_ratio=0.75, noise=noise)
                losses.append(loss.item())
                (loss / 2).backward()
            grads = [p.grad.clone() for p in opt.param_groups[0]["params"] if p.requires_grad]
            outs.append((losses, grads))
            opt.step()
        (lc, gc), (le, ge) = outs
        assert all(math.isfinite(v) for v in lc)
        assert max(abs(a - b) / abs(b) for a, b in zip(lc, le)) <= 1e-5, (step, lc, le)
        worst = max(rel_err(a, b) for a, b in zip(gc, ge))
        assert worst <= 1e-4, (step, worst)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    params_c = dict(mod.named_parameters())
    for name, p in eager.named_parameters():
        assert rel_err(params_c[name], p) <= 1e-4, name


def test_cli_trains_with_cuda_graphs(tmp_path):
    """``fastmae pretrain --compile reduce-overhead`` on the GPU in a fresh process (so that no
    cache an op fills on its first call is already warm), in fp16 with the gradient scaler (the
    CUDA default), with gradient accumulation and mid-run checkpoints: no graph is skipped, it
    trains, the loss falls, the checkpoint holds plain (uncompiled) keys. A device tensor cached
    by an op during the graphs' warm-up once made every such run fail."""
    from trainkit import TINY, make_image_folder

    from fastmae import checkpoint as ckpt_io

    folder = make_image_folder(tmp_path / "data", n=32)
    out = tmp_path / "out"
    argv = ["pretrain", *TINY, "--data_path", folder, "--output_dir", str(out), "--log_dir", str(out),
            "--device", "cuda", "--compile", "reduce-overhead", "--accum_iter", "2", "--epochs", "3",
            "--save-every", "2", "--precision", "fp16"]
    env = dict(os.environ, TRITON_INTERPRET="0", TORCH_LOGS="perf_hints")  # inductor says why it skips graphs
    proc = subprocess.run([sys.executable, "-m", "fastmae", *argv], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "compiled (reduce-overhead)" in proc.stdout
    assert "skipping cudagraphs" not in proc.stderr, proc.stderr[-3000:]
    ckpt = ckpt_io.load(str(out / ckpt_io.LAST))
    assert ckpt["step"] == 3 * 32 // (4 * 2)
    assert not any(k.startswith("_orig_mod") for k in ckpt["model"])
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    epochs = re.findall(r"^epoch \d+/3  loss ([0-9.]+)", proc.stdout, flags=re.M)
    assert len(epochs) == 3 and float(epochs[-1]) < float(epochs[0]), proc.stdout
