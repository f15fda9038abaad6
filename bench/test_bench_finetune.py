"""Fine-tuning benchmark: fastmae's classifier (``fastmae.vit``) against timm's ViT of the same
architecture, on the CPU.

What runs (bench/finetune_step.py describes the step, the feature extraction, the configurations
and the providers):

- ``test_finetune_step[config-precision]``: one fine-tuning step (forward with global pooling,
  cross-entropy on random labels, backward, fused AdamW) of the providers fast-compiled,
  timm-compiled, timm-eager and fast-eager, timed side by side: each benchmark round is one cycle
  that runs every provider's step once, in an order rotated every round (A B C D, B C D A, ...),
  each call timed alone, and one large ``torch.mm`` in the step's precision (the matmul ceiling,
  sampled in the same cycles). Per provider ``extra_info`` holds the median step time, images/s,
  the share of the ceiling (counted FLOPs per image x batch / step time / mm rate) and the compile
  time (first call minus a steady step); the speed-ups fastmae over timm in each mode are stored
  beside them. Before timing, the fp32 logits of fastmae's and timm's models on the batch are
  compared (``max_abs_logit_diff``): the same weights, the same function.
- ``test_feature_extraction[config-mode-precision]``: what linear probing and k-NN run: the pooled
  features before the head, eval mode, ``torch.no_grad``, fastmae against timm side by side
  (rotated), eager or compiled (``mode``), at 4x the step's batch; images/s and the ratio.
- ``test_finetune_peak_memory[config-variant-precision]``: ``bench/memory.py --model finetune`` in
  a fresh subprocess per variant (fast-eager, timm-eager, fast-compiled, timm-compiled): bytes of
  live tensors at the step's high-water mark (resting state plus the step's own peak from the
  profiler), at the batch of ``test_finetune_step``. The report puts it in the step's table.

Run through ``fastmae bench`` (its ``finetune`` suite; ``--only finetune``), or by hand::

    python -m pytest bench/test_bench_finetune.py --benchmark-enable --benchmark-json=finetune.json
    python -m fastmae.bench.report finetune.json --out report/

Environment (the knobs of ``bench/test_bench_model.py``, read the same way): ``FASTMAE_BENCH_CONFIGS``
(default ``vitb,small``; here ``vitb`` is the ViT-B/16 classifier at 224 and ``small`` the
``vit_tiny_patch8`` classifier at 64), ``FASTMAE_BENCH_BATCH`` (ViT-B batch, default 8),
``FASTMAE_BENCH_SMALL_BATCH`` (default 64), ``FASTMAE_BENCH_ROUNDS`` (default 5),
``FASTMAE_BENCH_WARMUP`` (default 2), ``FASTMAE_BENCH_MM_N`` (default 2048),
``FASTMAE_BENCH_MEMORY_VARIANTS`` (comma-separated names of ``MEMORY_VARIANTS``, default all),
``FASTMAE_BENCH_MEMORY_CACHE`` (``fresh``: an empty inductor cache per memory process, the default;
``shared``: the user's cache), ``FASTMAE_BENCH_TIER``, ``FASTMAE_BENCH_SMOKE=1`` (small only, batch 2,
one round). Run with the default allocator, as the MAE step is (bench/README.md).
"""
from __future__ import annotations

import os
import statistics

import pytest
import torch

from fastmae.bench import finetune_step as FT
from fastmae.bench import model_step as S
from fastmae.config import bench_setting

SMOKE = FT.SMOKE
CONFIG_NAMES = [c for c in bench_setting("FASTMAE_BENCH_CONFIGS", "small" if SMOKE else "vitb,small").split(",") if c]
ROUNDS = int(bench_setting("FASTMAE_BENCH_ROUNDS", "1" if SMOKE else "5"))
WARMUP = int(bench_setting("FASTMAE_BENCH_WARMUP", "1" if SMOKE else "2"))
MM_N = int(bench_setting("FASTMAE_BENCH_MM_N", "512" if SMOKE else "2048"))
TIER = bench_setting("FASTMAE_BENCH_TIER", "smoke" if SMOKE else "")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ENV_KEYS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD",
            "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE", "OMP_NUM_THREADS")
LOGIT_TOLERANCE = 1e-3  # fp32 logits of fastmae's and timm's models on the same weights and images

for _c in CONFIG_NAMES:
    if _c not in FT.CONFIGS:
        raise ValueError(f"FASTMAE_BENCH_CONFIGS names {_c!r}; the fine-tuning suite knows {', '.join(FT.CONFIGS)}")


def _env():
    from fastmae import config

    return {**{k: os.environ.get(k, "") for k in ENV_KEYS}, "fastmae_backend": config.settings().backend}


def _timm_version() -> str:
    import timm

    return timm.__version__


class Bench:
    """Per configuration: fastmae's and timm's classifiers (same weights), their optimizers, the
    batch, and each provider's step function, built once per pytest run."""

    def __init__(self, config: str):
        torch._dynamo.reset()  # compiled code of earlier configurations (the models share forward's code object)
        self.config, self.batch = config, FT.batch_size(config)
        self.models = {impl: FT.build_classifier(config, impl) for impl in ("fast", "timm")}
        self.imgs, self.labels = FT.make_batch(config, self.batch)
        self.logit_diff = FT.logits_difference(self.models["fast"], self.models["timm"], self.imgs[:4])
        if not self.logit_diff <= LOGIT_TOLERANCE:
            raise AssertionError(f"fastmae's and timm's {config} classifiers disagree by {self.logit_diff} on the "
                                 "same weights: the benchmark would compare different functions")
        self.opts = {impl: FT.make_optimizer(m) for impl, m in self.models.items()}
        self.compiled = {impl: FT.compile_model(m, impl) for impl, m in self.models.items()}
        self.flops_per_image = FT.counted_flops(config)

    def step_fn(self, provider: str, precision: str):
        impl, mode = provider.split("-")
        runner = self.compiled[impl] if mode == "compiled" else self.models[impl]
        opt = self.opts[impl]
        return lambda: FT.train_step(runner, opt, self.imgs, self.labels, precision)


_benches: dict = {}


def get_bench(config: str) -> Bench:
    if config not in _benches:
        _benches.clear()  # one configuration's models in memory at a time
        _benches[config] = Bench(config)
    return _benches[config]


@pytest.mark.parametrize("precision", FT.PRECISIONS)
@pytest.mark.parametrize("config", CONFIG_NAMES)
def test_finetune_step(config, precision, benchmark):
    bench = get_bench(config)
    steps = {p: bench.step_fn(p, precision) for p in FT.PROVIDERS}
    times, first, mm_rates, ceiling = S.time_side_by_side(benchmark, steps,
                                                          group=f"finetune step {config} {precision}", rounds=ROUNDS,
                                                          warmup=WARMUP, dtype=DTYPES[precision], mm_n=MM_N)
    per = {p: S.provider_stats(times[p], first[p], batch=bench.batch, flops=bench.flops_per_image * bench.batch,
                               ceiling=ceiling, compiled=p.endswith("compiled")) for p in steps}
    med = {p: per[p]["median_s"] for p in steps}
    for impl in ("fast", "timm"):
        bench.opts[impl].zero_grad(set_to_none=True)
    benchmark.extra_info.update(
        kind="finetune_step", config=config, config_title=FT.CONFIGS[config]["title"], precision=precision,
        batch=bench.batch, rounds=ROUNDS, warmup=WARMUP, flops_per_image=bench.flops_per_image,
        mm_n=MM_N, mm_rate=ceiling, mm_rates=mm_rates, providers=per, max_abs_logit_diff=bench.logit_diff,
        speedup_fast_compiled_vs_timm_compiled=med["timm-compiled"] / med["fast-compiled"],
        speedup_fast_eager_vs_timm_eager=med["timm-eager"] / med["fast-eager"],
        speedup_fast_compiled_vs_timm_eager=med["timm-eager"] / med["fast-compiled"],
        timm=_timm_version(), threads=torch.get_num_threads(), env=_env(), tier=TIER)


@pytest.mark.parametrize("precision", FT.PRECISIONS)
@pytest.mark.parametrize("mode", ("eager", "compiled"))
@pytest.mark.parametrize("config", CONFIG_NAMES)
def test_feature_extraction(config, mode, precision, benchmark):
    _benches.clear()  # the step's models (and their optimizer state) are not needed here
    torch._dynamo.reset()  # each test compiles its own two models afresh (inductor's cache still serves)
    batch = FT.batch_size(config) * FT.FEATURE_BATCH_FACTOR
    imgs, _ = FT.make_batch(config, batch)
    providers = ["fast", "timm"]
    models = {impl: FT.build_classifier(config, impl) for impl in providers}
    calls = {}
    for impl in providers:
        fn = FT.feature_fn(models[impl], impl, precision, compiled=(mode == "compiled"))
        calls[impl] = (lambda fn=fn: fn(imgs))
    first = {p: S.timed(calls[p]) for p in providers}  # compiles when asked
    diff = float((calls["fast"]() - calls["timm"]()).float().abs().max())
    for _ in range(WARMUP):
        for p in providers:
            calls[p]()
    times = {p: [] for p in providers}
    benchmark.group = f"features {config} {mode} {precision}"
    benchmark.pedantic(S.rotated_cycle(providers, calls, times), rounds=max(ROUNDS, 3), iterations=1,
                       warmup_rounds=0)
    per = {}
    for p in providers:
        med = statistics.median(times[p])
        per[p] = dict(median_s=med, min_s=min(times[p]), times_s=times[p], images_per_s=batch / med,
                      first_call_s=first[p])
    benchmark.extra_info.update(
        kind="features", config=config, config_title=FT.CONFIGS[config]["title"], mode=mode, precision=precision,
        batch=batch, rounds=max(ROUNDS, 3), warmup=WARMUP, providers=per, max_abs_feature_diff=diff,
        speedup_fast_vs_timm=per["timm"]["median_s"] / per["fast"]["median_s"],
        timm=_timm_version(), threads=torch.get_num_threads(), env=_env(), tier=TIER)


MEMORY_VARIANTS = {  # name: (impl, compiled)
    "fast-compiled": ("fast", True),
    "timm-compiled": ("timm", True),
    "timm-eager": ("timm", False),
    "fast-eager": ("fast", False),
}
MEMORY_RUN, MEMORY_CACHE = S.memory_variants(MEMORY_VARIANTS, "fine-tuning")


@pytest.mark.parametrize("precision", FT.PRECISIONS)
@pytest.mark.parametrize("variant", MEMORY_RUN)
@pytest.mark.parametrize("config", CONFIG_NAMES)
def test_finetune_peak_memory(config, variant, precision, benchmark, tmp_path):
    _benches.clear()  # free this process's models before the subprocess runs
    impl, compiled = MEMORY_VARIANTS[variant]
    args = ["--model", "finetune", "--config", config, "--impl", impl, "--precision", precision,
            "--batch", str(FT.batch_size(config))] + (["--compiled"] if compiled else [])
    out = S.measure_memory(benchmark, args, group=f"finetune peak memory {config} {precision}", cache=MEMORY_CACHE,
                           tmp_path=tmp_path)
    benchmark.extra_info.update(kind="finetune_memory", variant=variant, env=_env(), tier=TIER,
                                inductor_cache=MEMORY_CACHE, timm=_timm_version(), **out)
