"""pytest-benchmark suites of the fused ops on CPU: forward and forward+backward ("full"), fp32 and
bf16, at ViT-B MAE shapes (N=64, L=196, K=49, p=16, C=3, decoder width 512).

Providers, same shapes and inputs for each:
- ``fastmae``: the public ``fastmae.ops`` function on the C++ backend (FASTMAE_BACKEND=cpp);
- ``eager``: the reference composition (the official MAE code's math) in eager PyTorch;
- ``compiled``: the same composition under ``torch.compile`` (compile time excluded by warm-up).
Plus ``test_copy_bandwidth``: ``dst.copy_(src)`` over a few hundred MB, whose bytes/s is the
bandwidth the report compares each op's minimal bytes against.

Every benchmark records ``extra_info``: op, mode, provider, dtype, the op's minimal bytes (each
input read once, each output written once; "full" = forward's + backward's) and the allocator
settings. Render with ``python bench/report.py results.json``.

Run (on a quiet machine; state the allocator setting, see PERF.md)::

    python -m pytest bench/test_bench_ops.py --benchmark-enable --benchmark-json=bench/ops.json
    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 python -m pytest ...

``FASTMAE_BENCH_QUICK=1`` shrinks the shapes (a smoke run of the suite, no meaningful figures);
``FASTMAE_BENCH_ROUNDS`` sets the timed rounds (default 10, after 2 warm-up rounds).
"""
import os

import pytest
import torch

from fastmae import ops
from fastmae.ops import _backend
from fastmae.ops.unshuffle_scatter import unshuffle_scatter_ref

QUICK = os.environ.get("FASTMAE_BENCH_QUICK") == "1"
ROUNDS = int(os.environ.get("FASTMAE_BENCH_ROUNDS", "1" if QUICK else "10"))
WARMUP = 1 if QUICK else 2
# ViT-B/16 MAE at 224, 75% masking, decoder width 512 (QUICK: a tiny stand-in)
N, C, IMG, P_SIZE, D_DEC = (4, 3, 64, 16, 64) if QUICK else (64, 3, 224, 16, 512)
L = (IMG // P_SIZE) ** 2
K = int(L * 0.25)
PATCH = P_SIZE * P_SIZE * C
COPY_BYTES = (16 if QUICK else 256) * 2**20  # size of the copied tensor

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROVIDERS = ["fastmae", "eager", "compiled"]
MODES = ["forward", "full"]
ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")


# ---------------------------------------------------------------------------- reference compositions
def patchify_official(imgs, p):
    """models_mae.patchify: [N, C, H, W] -> [N, L, p*p*C] in (i, j, c) order."""
    n, c, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(n, c, h, p, w, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, h * w, p * p * c)


def gather_reference(imgs, ids_keep, p):
    """Patch-embed-free official composition: patchify every patch (Conv2d order), then gather."""
    n, c, H, W = imgs.shape
    h, w = H // p, W // p
    patches = imgs.reshape(n, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(n, h * w, c * p * p)
    return torch.gather(patches, 1, ids_keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))


def loss_reference(pred, imgs, mask, p):
    """models_mae.forward_loss with norm_pix_loss=True."""
    target = patchify_official(imgs, p)
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


# ---------------------------------------------------------------------------- op setups
def _masking(gen):
    ids_shuffle = torch.rand(N, L, generator=gen).argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones(N, L)
    mask[:, :K] = 0
    return ids_shuffle[:, :K].contiguous(), ids_restore, torch.gather(mask, 1, ids_restore)


def _setup(op, dtype, need_grad):
    """(inputs needing grad, fastmae fn, reference fn, upstream grad or None, minimal bytes fwd/bwd)."""
    gen = torch.Generator().manual_seed(0)
    ids_keep, ids_restore, mask = _masking(gen)
    es = torch.tensor([], dtype=dtype).element_size()
    if op == "gather_mask":
        imgs = torch.randn(N, C, IMG, IMG, generator=gen).to(dtype).requires_grad_(need_grad)
        grad = torch.randn(N, K, PATCH, generator=gen).to(dtype)
        fwd_bytes = 2 * N * K * PATCH * es + ids_keep.numel() * 8
        bwd_bytes = N * K * PATCH * es + imgs.numel() * es + ids_keep.numel() * 8
        return ([imgs], lambda x: ops.gather_mask(x, ids_keep, P_SIZE),
                lambda x: gather_reference(x, ids_keep, P_SIZE), grad, fwd_bytes, bwd_bytes)
    if op == "unshuffle_scatter":
        x = torch.randn(N, 1 + K, D_DEC, generator=gen).to(dtype).requires_grad_(need_grad)
        tok = torch.randn(1, 1, D_DEC, generator=gen).to(dtype).requires_grad_(need_grad)
        pos = torch.randn(1, 1 + L, D_DEC, generator=gen).to(dtype).requires_grad_(need_grad)
        grad = torch.randn(N, 1 + L, D_DEC, generator=gen).to(dtype)
        out_elems, small = N * (1 + L) * D_DEC, ((1 + L) * D_DEC + D_DEC) * es + ids_restore.numel() * 8
        fwd_bytes = (x.numel() + out_elems) * es + small
        bwd_bytes = (out_elems + x.numel()) * es + small
        return ([x, tok, pos], lambda a, b, c: ops.unshuffle_scatter(a, b, ids_restore, c),
                lambda a, b, c: unshuffle_scatter_ref(a, b, ids_restore, c), grad, fwd_bytes, bwd_bytes)
    if op == "norm_mse_loss":
        imgs = torch.randn(N, C, IMG, IMG, generator=gen).to(dtype)
        pred = torch.randn(N, L, PATCH, generator=gen).to(dtype).requires_grad_(need_grad)
        fwd_bytes = (pred.numel() + imgs.numel()) * es + mask.numel() * 4
        bwd_bytes = fwd_bytes + pred.numel() * es
        return ([pred], lambda pr: ops.norm_mse_loss(pr, imgs, mask, P_SIZE),
                lambda pr: loss_reference(pr, imgs, mask, P_SIZE), None, fwd_bytes, bwd_bytes)
    raise ValueError(op)


def _allocator_info():
    return {k: os.environ.get(k, "") for k in ALLOCATOR_ENV}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", ["gather_mask", "unshuffle_scatter", "norm_mse_loss"])
def test_bench_op(op, mode, dtype, provider, benchmark, monkeypatch):
    if provider == "fastmae":
        if not _backend.has_extension():
            pytest.skip(f"the C++ extension is unavailable: {_backend.extension_error()}")
        monkeypatch.setenv("FASTMAE_BACKEND", "cpp")
    full = mode == "full"
    leaves, fast_fn, ref_fn, grad, fwd_bytes, bwd_bytes = _setup(op, DTYPES[dtype], full)
    fn = {"fastmae": fast_fn, "eager": ref_fn}.get(provider)
    if provider == "compiled":
        torch._dynamo.reset()
        fn = torch.compile(ref_fn)

    def run():
        if not full:
            with torch.no_grad():
                return fn(*leaves)
        for t in leaves:
            t.grad = None
        out = fn(*leaves)
        out.backward(grad)
        return out

    benchmark.group = f"{op} {mode} {dtype}"
    benchmark.extra_info.update(op=op, mode=mode, dtype=dtype, provider=provider,
                                bytes=fwd_bytes + bwd_bytes if full else fwd_bytes,
                                shape=dict(N=N, C=C, H=IMG, W=IMG, p=P_SIZE, K=K, D=D_DEC),
                                threads=torch.get_num_threads(), allocator=_allocator_info())
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)
    # the fastmae and reference results must agree (a benchmark of a wrong kernel is worthless)
    if provider == "fastmae" and not full:
        monkeypatch.delenv("FASTMAE_BACKEND")
        with torch.no_grad():
            tol = 1e-4 if dtype == "fp32" else 5e-2
            torch.testing.assert_close(run().float(), ref_fn(*leaves).float(), rtol=tol, atol=tol)


def test_copy_bandwidth(benchmark):
    """dst.copy_(src): the memory bandwidth the ops' minimal bytes are compared against."""
    src = torch.randn(COPY_BYTES // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch outside the timing
    benchmark.group = "copy"
    benchmark.extra_info.update(op="copy", mode="copy", dtype="fp32", provider="copy", bytes=2 * COPY_BYTES,
                                threads=torch.get_num_threads(), allocator=_allocator_info())
    benchmark.pedantic(dst.copy_, args=(src,), rounds=max(ROUNDS, 5), iterations=1, warmup_rounds=WARMUP)
