"""VideoMAE pre-training benchmark: fastmae's ``PretrainVisionTransformer`` (``fastmae.video``)
against its plain-PyTorch twin (the official computation), on the CPU.

What runs (bench/video_step.py describes the step, the configurations and the providers):

- ``test_video_step[config-precision]``: one pre-training step (forward on tube-masked clips,
  ``videomae_loss``, backward, fused AdamW) of the providers fast-compiled, ref-compiled,
  ref-eager and fast-eager, timed side by side: each benchmark round is one cycle that runs every
  provider's step once, in an order rotated every round (A B C D, B C D A, ...), each call timed
  alone, and one large ``torch.mm`` in the step's precision (the matmul ceiling, sampled in the
  same cycles). Per provider ``extra_info`` holds the median step time, clips/s, the share of the
  ceiling (counted FLOPs per clip x batch / step time / mm rate) and the compile time (first call
  minus a steady step); the speed-ups fast-compiled over ref-eager and over ref-compiled, and
  fast-eager over ref-eager, are stored beside them. Before timing, the fp32 losses of the fast
  and the reference model on the batch are compared (relative difference at most 1e-4; the
  largest output difference is recorded beside it): the same weights, the same function.
- ``test_video_peak_memory[config-variant-precision]``: ``bench/memory.py --model video`` in a
  fresh subprocess per variant (fast-compiled, ref-compiled, ref-eager, fast-eager): bytes of live
  tensors at the step's high-water mark (resting state plus the step's own peak from the
  profiler), at the batch of ``test_video_step``. The report puts it in the step's table.

Run through ``fastmae bench`` (its ``video`` suite; ``--only video``), or by hand::

    python -m pytest bench/test_bench_video.py --benchmark-enable --benchmark-json=video.json
    python -m fastmae.bench.report video.json --out report/

Environment (the knobs of ``bench/test_bench_model.py``, read the same way): ``FASTMAE_BENCH_CONFIGS``
(default ``vits,vitb``; ``small`` is the 8x64x64 configuration), ``FASTMAE_BENCH_BATCH`` (batch of
``vits`` and ``vitb``, default 2 and 1), ``FASTMAE_BENCH_SMALL_BATCH`` (default 4),
``FASTMAE_BENCH_ROUNDS`` (default 5), ``FASTMAE_BENCH_WARMUP`` (default 2), ``FASTMAE_BENCH_MM_N``
(default 2048), ``FASTMAE_BENCH_MEMORY_VARIANTS`` (comma-separated names of ``MEMORY_VARIANTS``,
default all), ``FASTMAE_BENCH_MEMORY_CACHE`` (``fresh``: an empty inductor cache per memory process,
the default; ``shared``: the user's cache), ``FASTMAE_BENCH_TIER``, ``FASTMAE_BENCH_SMOKE=1`` (small
only, batch 1, one round, a 512 matmul; no meaningful figure).
"""
from __future__ import annotations

import os

import pytest
import torch

from fastmae.bench import model_step as S
from fastmae.bench import video_step as V
from fastmae.config import bench_setting

SMOKE = V.SMOKE
CONFIG_NAMES = [c for c in bench_setting("FASTMAE_BENCH_CONFIGS", "small" if SMOKE else "vits,vitb").split(",") if c]
ROUNDS = int(bench_setting("FASTMAE_BENCH_ROUNDS", "1" if SMOKE else "5"))
WARMUP = int(bench_setting("FASTMAE_BENCH_WARMUP", "1" if SMOKE else "2"))
MM_N = int(bench_setting("FASTMAE_BENCH_MM_N", "512" if SMOKE else "2048"))
TIER = bench_setting("FASTMAE_BENCH_TIER", "smoke" if SMOKE else "")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ENV_KEYS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD",
            "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE", "OMP_NUM_THREADS")
LOSS_RTOL = 1e-4  # fp32 losses of the fast and the reference model on the same weights, clips and masks

for _c in CONFIG_NAMES:
    if _c not in V.CONFIGS:
        raise ValueError(f"FASTMAE_BENCH_CONFIGS names {_c!r}; the video suite knows {', '.join(V.CONFIGS)}")


def _env():
    from fastmae import config

    return {**{k: os.environ.get(k, "") for k in ENV_KEYS}, "fastmae_backend": config.settings().backend}


class Bench:
    """Per configuration: the fast and the reference model (same weights), their optimizers, the
    batch, and each provider's step function, built once per pytest run."""

    def __init__(self, config: str):
        torch._dynamo.reset()  # compiled code of earlier configurations (the models share forward's code object)
        self.config, self.batch = config, V.batch_size(config)
        self.models = {impl: V.build_model(config, impl) for impl in V.IMPLS}
        self.videos, self.mask, self.num_masked = V.make_batch(config, self.batch)
        self.loss_fast, self.loss_ref, self.output_diff = V.compare(self.models["fast"], self.models["ref"],
                                                                    self.videos, self.mask, self.num_masked)
        self.loss_rel_diff = abs(self.loss_fast - self.loss_ref) / abs(self.loss_ref)
        if not self.loss_rel_diff <= LOSS_RTOL:
            raise AssertionError(f"the fast and the reference {config} models give fp32 losses {self.loss_fast} and "
                                 f"{self.loss_ref} on the same weights and clips: the benchmark would compare "
                                 "different functions")
        self.opts = {impl: V.make_optimizer(m) for impl, m in self.models.items()}
        self.compiled = {impl: V.compile_model(m, impl) for impl, m in self.models.items()}
        self.flops_per_clip = V.counted_flops(config)

    def step_fn(self, provider: str, precision: str):
        impl, mode = provider.split("-")
        runner = self.compiled[impl] if mode == "compiled" else self.models[impl]
        opt = self.opts[impl]
        return lambda: V.train_step(runner, opt, self.videos, self.mask, self.num_masked, precision)


_benches: dict = {}


def get_bench(config: str) -> Bench:
    if config not in _benches:
        _benches.clear()  # one configuration's models in memory at a time
        _benches[config] = Bench(config)
    return _benches[config]


@pytest.mark.parametrize("precision", V.PRECISIONS)
@pytest.mark.parametrize("config", CONFIG_NAMES)
def test_video_step(config, precision, benchmark):
    bench = get_bench(config)
    steps = {p: bench.step_fn(p, precision) for p in V.PROVIDERS}
    times, first, mm_rates, ceiling = S.time_side_by_side(benchmark, steps, group=f"video step {config} {precision}",
                                                          rounds=ROUNDS, warmup=WARMUP, dtype=DTYPES[precision],
                                                          mm_n=MM_N)
    per = {p: S.provider_stats(times[p], first[p], batch=bench.batch, flops=bench.flops_per_clip * bench.batch,
                               ceiling=ceiling, compiled=p.endswith("compiled"), per_s="clips_per_s") for p in steps}
    med = {p: per[p]["median_s"] for p in steps}
    for opt in bench.opts.values():
        opt.zero_grad(set_to_none=True)
    cfg = V.CONFIGS[config]
    benchmark.extra_info.update(
        kind="video_step", config=config, config_title=cfg["title"], precision=precision, batch=bench.batch,
        frames=cfg["frames"], img=cfg["img"], mask_ratio=V.MASK_RATIO, num_masked=bench.num_masked,
        num_tokens=int(bench.mask.shape[1]), rounds=ROUNDS, warmup=WARMUP, flops_per_clip=bench.flops_per_clip,
        mm_n=MM_N, mm_rate=ceiling, mm_rates=mm_rates, providers=per,
        loss_fast=bench.loss_fast, loss_ref=bench.loss_ref, loss_rel_diff=bench.loss_rel_diff,
        max_abs_output_diff=bench.output_diff,
        speedup_fast_compiled_vs_ref_eager=med["ref-eager"] / med["fast-compiled"],
        speedup_fast_compiled_vs_ref_compiled=med["ref-compiled"] / med["fast-compiled"],
        speedup_fast_eager_vs_ref_eager=med["ref-eager"] / med["fast-eager"],
        threads=torch.get_num_threads(), env=_env(), tier=TIER)


MEMORY_VARIANTS = {  # name: (impl, compiled)
    "fast-compiled": ("fast", True),
    "ref-compiled": ("ref", True),
    "ref-eager": ("ref", False),
    "fast-eager": ("fast", False),
}
MEMORY_RUN, MEMORY_CACHE = S.memory_variants(MEMORY_VARIANTS, "video")


@pytest.mark.parametrize("precision", V.PRECISIONS)
@pytest.mark.parametrize("variant", MEMORY_RUN)
@pytest.mark.parametrize("config", CONFIG_NAMES)
def test_video_peak_memory(config, variant, precision, benchmark, tmp_path):
    _benches.clear()  # free this process's models before the subprocess runs
    impl, compiled = MEMORY_VARIANTS[variant]
    args = ["--model", "video", "--config", config, "--impl", impl, "--precision", precision,
            "--batch", str(V.batch_size(config))] + (["--compiled"] if compiled else [])
    out = S.measure_memory(benchmark, args, group=f"video peak memory {config} {precision}", cache=MEMORY_CACHE,
                           tmp_path=tmp_path)
    benchmark.extra_info.update(kind="video_memory", variant=variant, env=_env(), tier=TIER,
                                inductor_cache=MEMORY_CACHE, **out)
