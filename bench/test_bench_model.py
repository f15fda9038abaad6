"""End-to-end training-step benchmark: forward + backward + AdamW of MAE, fast against reference.

What runs (bench/model_step.py describes the step, configurations and providers):

- ``test_train_step[config-precision]``: the providers fast-compiled, ref-compiled, ref-eager and
  fast-eager timed side by side. Each benchmark round is one cycle that runs every provider's step
  once, in an order rotated every round (A B C D, B C D A, ...), and one large ``torch.mm`` in the
  step's precision (the matmul ceiling, sampled in the same cycles). Per provider ``extra_info``
  holds the median step time, images/s, the share of the matmul ceiling reached (nominal FLOPs
  per image x batch / step time / mm rate) and the compile time (first call minus a steady step).
  The pytest-benchmark statistics themselves are of the whole cycle and mean little.
- ``test_gemm_bound``: every GEMM of one eager fast-model step, recorded with its shapes, strides
  and dtype, replayed with fresh operands: the GEMM time and rate at these shapes, the part of
  the ceiling a perfect model could reach (where the math attention backend runs, its batched
  matmuls are among these GEMMs). Attention forward + backward, with the model's backend, at the
  shape of every attention call is timed beside it.
- ``test_attention_backends``: attention forward + backward per backend at the model's shapes.
- ``test_optimizer_step``: fused AdamW over the model's parameters alone (and once the default
  per-parameter loop, for the record).
- ``test_train_step`` also records each provider's tensor peak of one steady step, in this
  process (``bench/memory.py``'s method: resting bytes plus the step's own peak from the
  profiler's memory events), after its timed cycles.
- ``test_peak_memory``: ``bench/memory.py`` in a fresh subprocess per variant (its method is in its
  docstring), each with an empty inductor cache, so its ``first_step_s`` is a cold compile plus
  one step, comparable between providers; the benchmark time is that subprocess's wall time.
  (The ``compile_s`` of ``test_train_step`` is taken with one shared cache: kernels the two models
  have in common are compiled by whichever comes first, so it favours the second.)

Run on a quiet machine (PERF.md; state the allocator setting), or through ``fastmae bench``, which
runs this suite and renders it::

    python -m pytest bench/test_bench_model.py --benchmark-enable --benchmark-json=model.json
    python -m fastmae.bench.report model.json --out report/

Environment (``fastmae bench`` sets these for its tiers): ``FASTMAE_BENCH_CONFIGS`` (default
``vitb,small``), ``FASTMAE_BENCH_BATCH`` (ViT-B batch, default 16), ``FASTMAE_BENCH_SMALL_BATCH``
(default 64), ``FASTMAE_BENCH_ROUNDS`` (timed cycles, default 5), ``FASTMAE_BENCH_WARMUP`` (untimed
cycles after the first call, default 2), ``FASTMAE_BENCH_MM_N`` (size of the ceiling's square
matmul, default 2048), ``FASTMAE_BENCH_MEMORY_VARIANTS`` (comma-separated, default all of
``MEMORY_VARIANTS``), ``FASTMAE_BENCH_MEMORY_CACHE`` (``fresh``, the default: an empty inductor
cache per memory process; ``shared``: the user's cache, so ``first_step_s`` is no cold compile),
``FASTMAE_BENCH_TIER`` (a label recorded with the results), ``FASTMAE_BENCH_SMOKE=1`` (a smoke run
of the suite: small configuration only, batch 2, one round, a 512 matmul; no meaningful figure).
Compile time depends on inductor's cache: for a cold figure set
``TORCHINDUCTOR_FX_GRAPH_CACHE=0 TORCHINDUCTOR_AUTOGRAD_CACHE=0``.
"""
from __future__ import annotations

import os
import statistics

import pytest
import torch

from fastmae.bench import memory as M
from fastmae.config import bench_setting
from fastmae.bench import model_step as S

SMOKE = S.SMOKE
CONFIG_NAMES = [c for c in bench_setting("FASTMAE_BENCH_CONFIGS", "small" if SMOKE else "vitb,small").split(",") if c]
ROUNDS = int(bench_setting("FASTMAE_BENCH_ROUNDS", "1" if SMOKE else "5"))
WARMUP = int(bench_setting("FASTMAE_BENCH_WARMUP", "1" if SMOKE else "2"))
MM_N = int(bench_setting("FASTMAE_BENCH_MM_N", "512" if SMOKE else "2048"))
TIER = bench_setting("FASTMAE_BENCH_TIER", "smoke" if SMOKE else "")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ENV_KEYS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD",
            "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE", "OMP_NUM_THREADS")

for _c in CONFIG_NAMES:
    if _c not in S.CONFIGS:
        raise ValueError(f"FASTMAE_BENCH_CONFIGS names {_c!r}; choose from {', '.join(S.CONFIGS)}")


def _env():
    from fastmae import config

    return {**{k: os.environ.get(k, "") for k in ENV_KEYS}, "fastmae_backend": config.settings().backend}


def _backend_name():
    from fastmae.ops import _backend
    return _backend.select_backend(torch.device("cpu"))


class Bench:
    """Per configuration: both models (same weights), their optimizers, the images, and each
    provider's step function, built once per pytest run."""

    def __init__(self, config: str):
        self.config, self.batch = config, S.batch_size(config)
        self.models = {impl: S.build_model(config, impl) for impl in ("fast", "ref")}
        self.opts = {impl: S.make_optimizer(m) for impl, m in self.models.items()}
        self.compiled = {impl: S.compile_model(m, impl) for impl, m in self.models.items()}
        self.imgs = S.make_images(config, self.batch)
        nominal = S.CONFIGS[config]["nominal_gflop_per_image"]
        self.counted_flops = S.counted_flops(config)
        self.flops_per_image = nominal * 1e9 if nominal else self.counted_flops
        self.compile_s = {}

    def tensor_peak(self, provider: str, step) -> dict:
        """Bytes of live tensors at the high-water mark of one more step of ``provider``, measured
        as ``bench/memory.py`` does (resting state plus the step's own peak from the profiler),
        in this process: the gradients of the last step are freed first, so they count in the
        step's peak."""
        opt = self.opts[provider.split("-")[0]]
        opt.zero_grad(set_to_none=True)
        rest = M.resting_bytes(self.models[provider.split("-")[0]], opt)
        peak = M.step_tensor_peak(step)
        return dict(resting_bytes=rest, step_peak_bytes=peak, tensor_peak_bytes=rest + peak)

    def step_fn(self, provider: str, precision: str):
        impl, mode = provider.split("-")
        runner = self.compiled[impl] if mode == "compiled" else self.models[impl]
        opt = self.opts[impl]
        return lambda: S.train_step(runner, opt, self.imgs, precision)


_benches: dict = {}


def get_bench(config: str) -> Bench:
    if config not in _benches:
        _benches.clear()  # one configuration's models in memory at a time
        _benches[config] = Bench(config)
    return _benches[config]


@pytest.mark.parametrize("precision", S.PRECISIONS)
@pytest.mark.parametrize("config", CONFIG_NAMES)
def test_train_step(config, precision, benchmark):
    bench = get_bench(config)
    steps = {p: bench.step_fn(p, precision) for p in S.PROVIDERS}
    times, first, mm_rates, ceiling = S.time_side_by_side(benchmark, steps, group=f"train step {config} {precision}",
                                                          rounds=ROUNDS, warmup=WARMUP, dtype=DTYPES[precision],
                                                          mm_n=MM_N)
    per = {p: dict(S.provider_stats(times[p], first[p], batch=bench.batch, flops=bench.flops_per_image * bench.batch,
                                    ceiling=ceiling, compiled=p.endswith("compiled")), **bench.tensor_peak(p, steps[p]))
           for p in steps}
    med = {p: per[p]["median_s"] for p in steps}
    benchmark.extra_info.update(
        kind="train_step", config=config, config_title=S.CONFIGS[config]["title"], precision=precision,
        batch=bench.batch, rounds=ROUNDS, warmup=WARMUP,
        flops_per_image=bench.flops_per_image, counted_flops_per_image=bench.counted_flops,
        mm_n=MM_N, mm_rate=ceiling, mm_rates=mm_rates, providers=per,
        speedup_fast_compiled_vs_ref_compiled=med["ref-compiled"] / med["fast-compiled"],
        speedup_fast_compiled_vs_ref_eager=med["ref-eager"] / med["fast-compiled"],
        speedup_ref_compiled_vs_ref_eager=med["ref-eager"] / med["ref-compiled"],
        speedup_fast_eager_vs_ref_eager=med["ref-eager"] / med["fast-eager"],
        op_backend=_backend_name(), threads=torch.get_num_threads(), env=_env(), tier=TIER)


@pytest.mark.parametrize("precision", S.PRECISIONS)
@pytest.mark.parametrize("config", CONFIG_NAMES)
def test_gemm_bound(config, precision, benchmark):
    """The step's GEMMs alone at their real shapes, and its attention calls alone."""
    from fastmae.ops import attention

    bench = get_bench(config)
    gemms, _ = S.record_step_ops(bench.models["fast"], bench.opts["fast"], bench.imgs, precision)
    bench.opts["fast"].zero_grad(set_to_none=True)
    run = S.replay_gemms(gemms)
    run()
    gemm_flops = sum(S.gemm_flops(desc) for _, desc, _ in gemms)
    # attention forward + backward (the model's backend choice) at the shape of every attention call
    attn_shapes = S.attention_shapes(bench.models["fast"], bench.imgs, precision)
    qkv = [[torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3)] for shape, dtype in attn_shapes]

    def run_attention():
        for q, k, v in qkv:
            attention(q, k, v, backend=bench.models["fast"].attn_backend).sum().backward()

    run_attention()
    attn_times, mm_rates = [], []

    def cycle():
        attn_times.append(S.timed(run_attention))
        mm_rates.append(S.matmul_rate(DTYPES[precision], MM_N, reps=2))
        run()

    benchmark.group = f"gemm bound {config} {precision}"
    benchmark.pedantic(cycle, rounds=max(ROUNDS, 3), iterations=1, warmup_rounds=0)
    # the benchmark's own stats include the attention and mm samples: time the GEMMs alone again
    gemm_s = statistics.median([S.timed(run) for _ in range(max(ROUNDS, 3))])
    ceiling = statistics.median(mm_rates)
    benchmark.extra_info.update(
        kind="gemm_bound", config=config, precision=precision, batch=bench.batch, gemm_calls=len(gemms),
        gemm_flops=gemm_flops, gemm_s=gemm_s, gemm_rate=gemm_flops / gemm_s, mm_rate=ceiling,
        gemm_pct_of_mm_rate=100 * gemm_flops / gemm_s / ceiling,
        attention_calls=len(attn_shapes), attention_s=statistics.median(attn_times),
        flops_per_image=bench.flops_per_image, threads=torch.get_num_threads(), env=_env(), tier=TIER)


@pytest.mark.parametrize("precision", S.PRECISIONS)
@pytest.mark.parametrize("config", CONFIG_NAMES)
def test_attention_backends(config, precision, benchmark):
    """fastmae.ops.attention forward + backward per backend (sdpa, math; compiled math too) at each
    distinct attention shape of the model (encoder, decoder), side by side: which backend the CPU
    default should be, and what attention costs in the step."""
    from fastmae.ops import attention

    bench = get_bench(config)
    calls = S.attention_shapes(bench.models["fast"], bench.imgs, precision)
    shapes = sorted({shape for shape, _ in calls})
    dtype = calls[0][1]
    fns = {"sdpa": lambda q, k, v: attention(q, k, v, backend="sdpa"),
           "math": lambda q, k, v: attention(q, k, v, backend="math")}
    fns["math-compiled"] = torch.compile(fns["math"], fullgraph=True)
    cases = []
    for shape in shapes:
        q, k, v = [torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3)]
        g = torch.randn(shape, dtype=dtype)
        for name, fn in fns.items():
            run = (lambda fn=fn, q=q, k=k, v=v, g=g: fn(q, k, v).backward(g))
            run()
            cases.append((shape, name, run))
    times = {(shape, name): [] for shape, name, _ in cases}

    def cycle():
        for shape, name, run in cases:
            times[(shape, name)].append(S.timed(run))

    benchmark.group = f"attention {config} {precision}"
    benchmark.pedantic(cycle, rounds=max(ROUNDS, 3), iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(
        kind="attention", config=config, precision=precision, dtype=str(dtype),
        calls_per_step={str(sh): sum(1 for c, _ in calls if c == sh) for sh in shapes},
        median_s={f"{sh} {name}": statistics.median(t) for (sh, name), t in times.items()},
        threads=torch.get_num_threads(), env=_env(), tier=TIER)


@pytest.mark.parametrize("config", CONFIG_NAMES)
def test_optimizer_step(config, benchmark):
    """Fused AdamW alone on the model's parameters (with gradients present)."""
    model = get_bench(config).models["fast"]
    params = [p for p in model.parameters() if p.requires_grad]
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for c in clones:
        c.grad = torch.randn_like(c)
    fused = S.make_optimizer(torch.nn.ParameterList(clones))
    fused.step()
    fused_times = []
    benchmark.group = f"optimizer {config}"
    benchmark.pedantic(lambda: fused_times.append(S.timed(fused.step)), rounds=max(ROUNDS, 3), iterations=1,
                       warmup_rounds=0)
    loop = torch.optim.AdamW(clones, lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)  # the CPU default
    loop.step()
    loop_s = min(S.timed(loop.step) for _ in range(1 if SMOKE else 2))
    n = sum(p.numel() for p in params)
    benchmark.extra_info.update(
        kind="optimizer", config=config, params=n, fused_adamw_s=statistics.median(fused_times),
        default_adamw_s=loop_s, bytes_moved=n * 4 * 7,  # reads p, g, m, v; writes p, m, v (fp32)
        threads=torch.get_num_threads(), env=_env(), tier=TIER)


MEMORY_VARIANTS = {  # name: (impl, compiled, grad_checkpointing, optimizer in backward)
    "ref-compiled": ("ref", True, False, False),
    "fast-compiled": ("fast", True, False, False),
    "fast-compiled-ckpt": ("fast", True, True, False),
    "fast-compiled-ckpt-obw": ("fast", True, True, True),
    "fast-eager-ckpt-obw": ("fast", False, True, True),
    "ref-eager": ("ref", False, False, False),
    "fast-eager": ("fast", False, False, False),
}


MEMORY_RUN, MEMORY_CACHE = S.memory_variants(MEMORY_VARIANTS, "model")


@pytest.mark.parametrize("precision", S.PRECISIONS)
@pytest.mark.parametrize("variant", MEMORY_RUN)
@pytest.mark.parametrize("config", CONFIG_NAMES)
def test_peak_memory(config, variant, precision, benchmark, tmp_path):
    _benches.clear()  # free this process's models before the subprocess runs
    impl, compiled, ckpt, in_backward = MEMORY_VARIANTS[variant]
    args = ["--config", config, "--impl", impl, "--precision", precision, "--batch", str(S.batch_size(config))]
    args += (["--compiled"] if compiled else []) + (["--grad-checkpointing"] if ckpt else [])
    args += ["--optimizer-in-backward"] if in_backward else []
    out = S.measure_memory(benchmark, args, group=f"peak memory {config} {precision}", cache=MEMORY_CACHE,
                           tmp_path=tmp_path)
    benchmark.extra_info.update(kind="memory", variant=variant, env=_env(), tier=TIER, inductor_cache=MEMORY_CACHE,
                                **out)
