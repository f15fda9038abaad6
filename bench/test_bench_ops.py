"""pytest-benchmark suite of the fused ops on CPU: forward and forward+backward ("full"), fp32 and
bf16, at ViT-B MAE shapes (N=64, L=196, K=49, p=16, C=3, decoder width 512).

Providers, same shapes and inputs for each:
- ``fastmae``: the public ``fastmae.ops`` function on the C++ backend (FASTMAE_BACKEND=cpp);
- ``eager``: the reference composition (the official MAE code's math) in eager PyTorch;
- ``compiled``: the same composition under ``torch.compile`` (compile time excluded by warm-up);
- ``copy``: ``dst.copy_(src)`` of 64 MB (4 pairs of fresh tensors in turn, each pair 4x the LLC
  here), whose bytes/s (read + write) is the bandwidth the report compares each op's minimal
  bytes against.

Method (one test per op, mode and dtype; see bench/README.md for why):
- Side by side: each benchmark round is one cycle that calls every provider once, in an order
  rotated every round (A B C D, B C D A, ...), each call timed on its own. Per provider
  ``extra_info`` holds the median, min and max ms and the median number of page faults per call
  (``ru_minflt``: first touches of fresh memory, which the allocator decides, not the kernel).
  The pytest-benchmark statistics themselves are of the whole cycle and mean little.
- Cold caches: every call takes the next of several input sets, enough of them that the sets
  together exceed twice the last-level cache (``/sys/.../index3/size``), and the 128 MB copy in
  every cycle flushes that cache: no provider is timed on inputs left in cache by its last call.
- Steady state: WARMUP cycles first (compilation, and the heap's growth to its working size).

Every benchmark records ``extra_info``: op, mode, dtype, the op's minimal bytes (each input read
once, each output written once; "full" = forward's + backward's), the number of input sets, the
LLC size and the allocator settings.

Run (on a quiet machine; both allocator settings, see PERF.md), or through ``fastmae bench``,
which runs this suite under both settings and renders it::

    python -m pytest bench/test_bench_ops.py --benchmark-enable --benchmark-json=ops.json
    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 python -m pytest ...
    python -m fastmae.bench.report ops.json --out report/

Environment (``fastmae bench`` sets these for its tiers): ``FASTMAE_BENCH_ROUNDS`` (timed cycles,
default 15), ``FASTMAE_BENCH_WARMUP`` (warm-up cycles, default 5), ``FASTMAE_BENCH_MODES``
(comma-separated, default ``forward,full``), ``FASTMAE_BENCH_INPUT_SETS`` (the number of input
sets; default: enough to exceed twice the LLC; 1 reproduces the old cache-warm figures),
``FASTMAE_BENCH_TIER`` (a label recorded with the results), ``FASTMAE_BENCH_SMOKE=1`` (tiny shapes,
one round: a smoke run of the suite, no meaningful figures).
"""
import math
import os
import resource
import statistics
import time

import pytest
import torch

from fastmae import config, ops
from fastmae.config import bench_setting
from fastmae.ops import _backend
from fastmae.ops.unshuffle_scatter import unshuffle_scatter_ref

SMOKE = bench_setting("FASTMAE_BENCH_SMOKE", "0") == "1"
ROUNDS = int(bench_setting("FASTMAE_BENCH_ROUNDS", "1" if SMOKE else "15"))
WARMUP = int(bench_setting("FASTMAE_BENCH_WARMUP", "1" if SMOKE else "5"))
INPUT_SETS = int(bench_setting("FASTMAE_BENCH_INPUT_SETS", "0"))  # 0: enough to exceed 2x the LLC
TIER = bench_setting("FASTMAE_BENCH_TIER", "smoke" if SMOKE else "")
# ViT-B/16 MAE at 224, 75% masking, decoder width 512 (SMOKE: a tiny stand-in)
N, C, IMG, P_SIZE, D_DEC = (4, 3, 64, 16, 64) if SMOKE else (64, 3, 224, 16, 512)
L = (IMG // P_SIZE) ** 2
K = int(L * 0.25)
PATCH = P_SIZE * P_SIZE * C
COPY_BYTES = (4 if SMOKE else 64) * 2**20  # size of each copied tensor
COPY_PAIRS = 4  # (src, dst) pairs the copy rotates through, like the ops' input sets

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROVIDERS = ["fastmae", "eager", "compiled", "copy"]
MODES = [m for m in bench_setting("FASTMAE_BENCH_MODES", "forward,full").split(",") if m]
for _m in MODES:
    if _m not in ("forward", "full"):
        raise ValueError(f"FASTMAE_BENCH_MODES names {_m!r}; choose from forward, full")
ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")


def llc_bytes() -> int:
    """Size of the last-level cache (L3) of cpu0, 32 MiB if the kernel does not say."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
        return int(text.rstrip("KMG")) * scale
    except (OSError, ValueError, IndexError):
        return 32 * 2**20


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


def _setup(op, dtype, need_grad, seed=0):
    """One input set: (leaves needing grad, constant inputs, upstream grad or None, minimal bytes
    fwd/bwd). The providers' functions (``_functions``) take ``*leaves, *consts``."""
    gen = torch.Generator().manual_seed(seed)
    ids_keep, ids_restore, mask = _masking(gen)
    es = torch.tensor([], dtype=dtype).element_size()
    if op == "gather_mask":
        imgs = torch.randn(N, C, IMG, IMG, generator=gen).to(dtype).requires_grad_(need_grad)
        grad = torch.randn(N, K, PATCH, generator=gen).to(dtype)
        fwd_bytes = 2 * N * K * PATCH * es + ids_keep.numel() * 8
        bwd_bytes = N * K * PATCH * es + imgs.numel() * es + ids_keep.numel() * 8
        return [imgs], [ids_keep], grad, fwd_bytes, bwd_bytes
    if op == "unshuffle_scatter":
        x = torch.randn(N, 1 + K, D_DEC, generator=gen).to(dtype).requires_grad_(need_grad)
        tok = torch.randn(1, 1, D_DEC, generator=gen).to(dtype).requires_grad_(need_grad)
        pos = torch.randn(1, 1 + L, D_DEC, generator=gen).to(dtype).requires_grad_(need_grad)
        grad = torch.randn(N, 1 + L, D_DEC, generator=gen).to(dtype)
        out_elems, small = N * (1 + L) * D_DEC, ((1 + L) * D_DEC + D_DEC) * es + ids_restore.numel() * 8
        fwd_bytes = (x.numel() + out_elems) * es + small
        bwd_bytes = (out_elems + x.numel()) * es + small
        return [x, tok, pos], [ids_restore], grad, fwd_bytes, bwd_bytes
    if op == "norm_mse_loss":
        imgs = torch.randn(N, C, IMG, IMG, generator=gen).to(dtype)
        pred = torch.randn(N, L, PATCH, generator=gen).to(dtype).requires_grad_(need_grad)
        fwd_bytes = (pred.numel() + imgs.numel()) * es + mask.numel() * 4
        bwd_bytes = fwd_bytes + pred.numel() * es
        return [pred], [imgs, mask], None, fwd_bytes, bwd_bytes
    raise ValueError(op)


def _functions(op):
    """(fastmae fn, reference fn) of ``op``, both taking ``*leaves, *consts`` of ``_setup``."""
    if op == "gather_mask":
        return (lambda x, ids: ops.gather_mask(x, ids, P_SIZE),
                lambda x, ids: gather_reference(x, ids, P_SIZE))
    if op == "unshuffle_scatter":
        return (lambda a, b, c, ids: ops.unshuffle_scatter(a, b, ids, c),
                lambda a, b, c, ids: unshuffle_scatter_ref(a, b, ids, c))
    if op == "norm_mse_loss":
        return (lambda pr, imgs, mask: ops.norm_mse_loss(pr, imgs, mask, P_SIZE),
                lambda pr, imgs, mask: loss_reference(pr, imgs, mask, P_SIZE))
    raise ValueError(op)


def _allocator_info():
    return {k: os.environ.get(k, "") for k in ALLOCATOR_ENV}


def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", ["gather_mask", "unshuffle_scatter", "norm_mse_loss"])
def test_bench_op(op, mode, dtype, benchmark):
    if not _backend.has_extension():
        pytest.skip(f"the C++ extension is unavailable: {_backend.extension_error()}")
    with config.override(backend="cpp"):  # the references are plain torch, never fastmae ops
        _bench_op(op, mode, dtype, benchmark)


def _bench_op(op, mode, dtype, benchmark):
    full = mode == "full"
    first = _setup(op, DTYPES[dtype], full, seed=0)
    tensors = first[0] + first[1] + ([first[2]] if full and first[2] is not None else [])
    set_bytes = sum(t.numel() * t.element_size() for t in tensors)
    llc = llc_bytes()
    nsets = INPUT_SETS or min(32, max(2, math.ceil(2 * llc / set_bytes) + 1))
    sets = [first] + [_setup(op, DTYPES[dtype], full, seed=s) for s in range(1, nsets)]
    fast_fn, ref_fn = _functions(op)
    torch._dynamo.reset()
    fns = {"fastmae": fast_fn, "eager": ref_fn, "compiled": torch.compile(ref_fn)}
    copies = [(torch.randn(COPY_BYTES // 4), torch.empty(COPY_BYTES // 4)) for _ in range(COPY_PAIRS)]
    for src, dst in copies:
        dst.copy_(src)  # first touch outside the timing
    counter = [0]  # calls made: each takes the next input set (and the next copy pair)

    def call(provider):
        if provider == "copy":
            src, dst = copies[counter[0] % COPY_PAIRS]
            counter[0] += 1
            dst.copy_(src)
            return None
        leaves, consts, grad = sets[counter[0] % nsets][:3]
        counter[0] += 1
        if not full:
            with torch.no_grad():
                return fns[provider](*leaves, *consts)
        for t in leaves:
            t.grad = None
        out = fns[provider](*leaves, *consts)
        out.backward(grad)
        return out

    times = {p: [] for p in PROVIDERS}
    faults = {p: [] for p in PROVIDERS}
    cycles = [0]

    def cycle():
        k = cycles[0]
        cycles[0] += 1
        for provider in PROVIDERS[k % len(PROVIDERS):] + PROVIDERS[:k % len(PROVIDERS)]:
            f0, t0 = _minflt(), time.perf_counter()
            call(provider)
            t1, f1 = time.perf_counter(), _minflt()
            if k >= WARMUP:
                times[provider].append(t1 - t0)
                faults[provider].append(f1 - f0)

    for _ in range(WARMUP):
        cycle()
    benchmark.group = f"{op} {mode} {dtype}"
    benchmark.pedantic(cycle, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    stats = {p: dict(median_ms=1e3 * statistics.median(times[p]), min_ms=1e3 * min(times[p]),
                     max_ms=1e3 * max(times[p]), faults_per_call=statistics.median(faults[p]), rounds=len(times[p]))
             for p in PROVIDERS}
    fwd_bytes, bwd_bytes = first[3], first[4]
    benchmark.extra_info.update(op=op, mode=mode, dtype=dtype, bytes=fwd_bytes + bwd_bytes if full else fwd_bytes,
                                copy_bytes=2 * COPY_BYTES, providers=stats, input_sets=nsets, llc_bytes=llc,
                                shape=dict(N=N, C=C, H=IMG, W=IMG, p=P_SIZE, K=K, D=D_DEC),
                                threads=torch.get_num_threads(), allocator=_allocator_info(), backend="cpp",
                                rounds=ROUNDS, warmup=WARMUP, tier=TIER)
    # the fastmae and reference results must agree (a benchmark of a wrong kernel is worthless)
    if not full:
        leaves, consts = first[0], first[1]
        with torch.no_grad():
            got = fast_fn(*leaves, *consts)
            tol = 1e-4 if dtype == "fp32" else 5e-2
            torch.testing.assert_close(got.float(), ref_fn(*leaves, *consts).float(), rtol=tol, atol=tol)
