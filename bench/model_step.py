"""The end-to-end training step the model benchmarks time and measure, shared by
``bench/test_bench_model.py`` (speed) and ``bench/memory.py`` (peak memory, fresh process).

A step is ``zero_grad(set_to_none=True)``, the forward under the chosen precision, ``backward``
and one AdamW step. Every provider gets the same step:

- ``fast-compiled``: ``torch.compile(fastmae model, fullgraph=True)``;
- ``ref-compiled``: ``torch.compile(reference model)`` (default options: the peer to beat);
- ``ref-eager`` / ``fast-eager``: the models without compilation.

Both models hold the same weights (the fast one loads the reference's state_dict) and see the
same images and masking ratio (0.75). The optimizer is ``torch.optim.AdamW(fused=True)`` with the
MAE recipe's betas and weight decay for every provider: on CPU the default (a per-parameter
for-loop, ``foreach`` is a CUDA default only) is ~10x slower and would dominate the step; the
optimizer's own cost is measured separately (``test_optimizer_step``).

Configurations:

- ``vitb``: ``mae_vit_base_patch16`` at 224x224 (encoder 768-d x 12, decoder 512-d x 8, patch 16),
  batch 16 (``FASTMAE_BENCH_BATCH``). Nominal cost 59 GFLOP per image per step (3x forward).
- ``small``: a ViT-Tiny encoder (192-d, 12 blocks, 3 heads) on 96x96 images with patch 8
  (L = 144, K = 36) and a light decoder (256-d, 4 blocks, 8 heads of 32, MLP ratio 4), batch 64
  (``FASTMAE_BENCH_SMALL_BATCH``): small GEMMs, so the fused ops and per-kernel overheads weigh
  more. Its FLOPs are counted (``FlopCounterMode``), not assumed.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastmae
from fastmae import reference
from fastmae.config import bench_setting

CONFIGS = {
    "vitb": dict(title="ViT-B/16 MAE at 224x224 (encoder 768-d x 12, decoder 512-d x 8)",
                 name="mae_vit_base_patch16", kwargs=dict(norm_pix_loss=True), img=224,
                 batch_env="FASTMAE_BENCH_BATCH", default_batch=16, nominal_gflop_per_image=59.0),
    "small": dict(title="ViT-Tiny-width MAE at 96x96, patch 8 (encoder 192-d x 12, decoder 256-d x 4)",
                  name="mae_vit_base_patch16",
                  kwargs=dict(img_size=96, patch_size=8, embed_dim=192, depth=12, num_heads=3,
                              decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8, mlp_ratio=4,
                              norm_pix_loss=True),
                  img=96, batch_env="FASTMAE_BENCH_SMALL_BATCH", default_batch=64, nominal_gflop_per_image=None),
}
PROVIDERS = ("fast-compiled", "ref-compiled", "ref-eager", "fast-eager")
PRECISIONS = ("fp32", "bf16")
MASK_RATIO = 0.75
GEMM_OPS = ("mm", "addmm", "bmm", "baddbmm")


SMOKE = bench_setting("FASTMAE_BENCH_SMOKE", "0") == "1"


def batch_size(config: str) -> int:
    cfg = CONFIGS[config]
    return int(bench_setting(cfg["batch_env"], "2" if SMOKE else str(cfg["default_batch"])))


def build_model(config: str, impl: str, grad_checkpointing: bool = False, seed: int = 0,
                attn_backend: str = "auto") -> torch.nn.Module:
    """The reference (``impl='ref'``) or fast (``'fast'``) model of a configuration; both hold the
    weights the reference draws from ``seed``. ``grad_checkpointing`` and ``attn_backend`` are
    options of the fast model."""
    cfg = CONFIGS[config]
    torch.manual_seed(seed)
    ref = fastmae.create_model(cfg["name"], reference_impl=True, **cfg["kwargs"])
    if impl == "ref":
        if grad_checkpointing or attn_backend != "auto":
            raise ValueError("grad_checkpointing and attn_backend are options of the fast model only")
        return ref
    if impl != "fast":
        raise ValueError(f"impl must be 'fast' or 'ref', got {impl!r}")
    fast = fastmae.create_model(cfg["name"], grad_checkpointing=grad_checkpointing, attn_backend=attn_backend,
                                **cfg["kwargs"])
    fast.load_state_dict(ref.state_dict(), strict=True)
    return fast


def make_optimizer(model: torch.nn.Module, in_backward: bool = False):
    """Fused AdamW with the MAE recipe's betas and weight decay; ``in_backward``: the same, one per
    parameter, stepped during backward (``fastmae.optim.OptimizerInBackward``)."""
    opts = dict(lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)
    if in_backward:
        from fastmae.optim import OptimizerInBackward
        return OptimizerInBackward(model.parameters(), torch.optim.AdamW, **opts)
    return torch.optim.AdamW(model.parameters(), **opts)


def make_images(config: str, batch: int, seed: int = 1) -> torch.Tensor:
    img = CONFIGS[config]["img"]
    return torch.randn(batch, 3, img, img, generator=torch.Generator().manual_seed(seed))


def precision_context(precision: str):
    if precision == "fp32":
        return nullcontext()
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def train_step(model, opt, imgs, precision: str) -> None:
    """One training step (masks drawn inside the model, as in training)."""
    opt.zero_grad(set_to_none=True)
    with precision_context(precision):
        loss, _, _ = model(imgs, mask_ratio=MASK_RATIO)
    loss.backward()
    opt.step()


def compile_model(model: torch.nn.Module, impl: str, mode: str | None = None) -> torch.nn.Module:
    """fullgraph for the fast model (it has no graph break: tests/test_compile.py); the reference
    compiles with defaults, as a user would. ``mode`` is torch.compile's (``"reduce-overhead"``:
    CUDA graphs)."""
    return torch.compile(model, fullgraph=(impl == "fast"), mode=mode)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def rotated_cycle(providers, calls, times):
    """A cycle function: every provider's call once, each timed alone into ``times[provider]``,
    the order rotated every cycle (A B C, B C A, ...), so no provider always runs first."""
    cycle_no = [0]

    def cycle():
        k = cycle_no[0] % len(providers)
        cycle_no[0] += 1
        for p in providers[k:] + providers[:k]:
            times[p].append(timed(calls[p]))

    return cycle


def time_side_by_side(benchmark, steps: dict, *, group: str, rounds: int, warmup: int, dtype: torch.dtype,
                      mm_n: int) -> tuple[dict, dict, list, float]:
    """The step suites' timing: each provider's ``steps[p]`` called once (timed: it compiles the
    compiled ones), ``warmup`` more calls each, then ``rounds`` benchmark rounds, each one rotated
    cycle of every provider (:func:`rotated_cycle`) and one sample of the matmul ceiling in the
    step's ``dtype``. Returns ``(times, first_call_s, mm_rates, ceiling)`` (the median rate)."""
    providers = list(steps)
    first = {p: timed(steps[p]) for p in providers}
    for _ in range(warmup):
        for p in providers:
            steps[p]()
    times = {p: [] for p in providers}
    mm_rates = []
    run_providers = rotated_cycle(providers, steps, times)

    def cycle():
        run_providers()
        mm_rates.append(matmul_rate(dtype, mm_n, reps=2))

    benchmark.group = group
    benchmark.pedantic(cycle, rounds=rounds, iterations=1, warmup_rounds=0)
    return times, first, mm_rates, statistics.median(mm_rates)


def provider_stats(times: list, first_s: float, *, batch: int, flops: float, ceiling: float, compiled: bool,
                   per_s: str = "images_per_s") -> dict:
    """One provider's entry in a step benchmark's ``extra_info``: median and min step time, the
    samples, items per second (``per_s``), the share of the matmul ceiling of ``flops`` per step,
    and the compile time (first call minus a steady step) of a compiled provider."""
    med = statistics.median(times)
    return dict(median_s=med, min_s=min(times), times_s=times, **{per_s: batch / med},
                pct_of_ceiling=100 * flops / med / ceiling, compile_s=first_s - med if compiled else None,
                first_call_s=first_s)


def memory_variants(names: dict, suite: str) -> tuple[list, str]:
    """``FASTMAE_BENCH_MEMORY_VARIANTS`` (default: every name of ``names``, checked) and
    ``FASTMAE_BENCH_MEMORY_CACHE`` (``fresh`` or ``shared``) of a suite's peak-memory test."""
    run = [v for v in bench_setting("FASTMAE_BENCH_MEMORY_VARIANTS", ",".join(names)).split(",") if v]
    for v in run:
        if v not in names:
            raise ValueError(f"FASTMAE_BENCH_MEMORY_VARIANTS names {v!r}; the {suite} suite knows {', '.join(names)}")
    cache = bench_setting("FASTMAE_BENCH_MEMORY_CACHE", "fresh")
    if cache not in ("fresh", "shared"):
        raise ValueError(f"FASTMAE_BENCH_MEMORY_CACHE must be fresh or shared, got {cache!r}")
    return run, cache


def measure_memory(benchmark, args: list, *, group: str, cache: str, tmp_path) -> dict:
    """``python -m fastmae.bench.memory ARGS`` in a fresh process, as one benchmark round: its JSON
    result plus ``wall_s``. With ``cache="fresh"`` the process gets an empty inductor cache, so its
    ``first_step_s`` is a cold compile (+ one step), comparable between providers (a shared cache
    favours whichever compiles second)."""
    cmd = [sys.executable, "-m", "fastmae.bench.memory", *args]
    out = {}

    def run():
        env = dict(os.environ)
        if cache == "fresh":
            env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
        out.update(json.loads(proc.stdout.strip().splitlines()[-1]), wall_s=time.perf_counter() - t0)

    benchmark.group = group
    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    return out


def matmul_rate(dtype: torch.dtype, n: int, reps: int = 3) -> float:
    """FLOP/s of a large square ``torch.mm`` (the ceiling), best of ``reps``."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    c = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=c)
    best = min(timed(lambda: torch.mm(a, b, out=c)) for _ in range(reps))
    return 2 * n**3 / best


def counted_flops(config: str, precision: str = "fp32") -> float:
    """FLOPs of one training step's forward + backward per image, counted on the reference model
    (every Conv2d, GEMM and attention matmul; the optimizer's elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(config, "ref")
    imgs = make_images(config, 1)
    counter = FlopCounterMode(display=False)
    with counter, precision_context(precision):
        loss, _, _ = model(imgs, mask_ratio=MASK_RATIO)
    with counter:
        loss.backward()
    return float(counter.get_total_flops())


class RecordOps(TorchDispatchMode):
    """Records the GEMM and attention calls of a step:
    ``(op, name, [(shape, stride, dtype) | value, ...], kwargs)``."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in GEMM_OPS or "scaled_dot_product" in name:
            desc = [(tuple(a.shape), tuple(a.stride()), a.dtype) if isinstance(a, torch.Tensor) else a for a in args]
            self.calls.append((func, name, desc, dict(kwargs or {})))
        return func(*args, **(kwargs or {}))


def record_step_ops(model, opt, imgs, precision: str):
    """The GEMM calls of one eager training step (forward and backward) and the attention calls."""
    rec = RecordOps()
    opt.zero_grad(set_to_none=True)
    with rec:
        with precision_context(precision):
            loss, _, _ = model(imgs, mask_ratio=MASK_RATIO)
        loss.backward()
    gemms = [(f, d, kw) for f, n, d, kw in rec.calls if n in GEMM_OPS]
    attn = [(f, n, d) for f, n, d, _ in rec.calls if "scaled_dot_product" in n]
    return gemms, attn


def attention_shapes(model, imgs, precision: str):
    """[(q shape [B, heads, S, head_dim], dtype)] of every attention call in one forward, whichever
    backend runs it (hooks on the attention modules' inputs)."""
    shapes, hooks = [], []
    for m in model.modules():
        if isinstance(m, reference.Attention):
            def hook(mod, args):
                B, S, D = args[0].shape
                dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else args[0].dtype
                shapes.append(((B, mod.num_heads, S, D // mod.num_heads), dtype))
            hooks.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad(), precision_context(precision):
            model(imgs, mask_ratio=MASK_RATIO)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def gemm_flops(desc) -> float:
    """FLOPs of one recorded mm / addmm / bmm / baddbmm call."""
    shapes = [d[0] for d in desc if isinstance(d, tuple) and len(d) == 3 and isinstance(d[0], tuple)]
    a, b = shapes[-2], shapes[-1]  # the two multiplied operands are the last two tensors
    batch = a[0] if len(a) == 3 else 1
    return 2.0 * batch * a[-2] * a[-1] * b[-1]


def replay_gemms(gemms):
    """Fresh random operands with the recorded shapes, strides and dtypes, and a function that runs
    every GEMM once in the recorded order."""
    calls = []
    for func, desc, kwargs in gemms:
        args = [torch.empty_strided(d[0], d[1], dtype=d[2]).normal_()
                if isinstance(d, tuple) and len(d) == 3 and isinstance(d[0], tuple) else d for d in desc]
        calls.append((func, args, kwargs))

    def run():
        for func, args, kwargs in calls:
            func(*args, **kwargs)

    return run
