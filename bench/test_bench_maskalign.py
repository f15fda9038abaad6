"""MaskAlign pre-training benchmark: fastmae's MaskAlign student (``fastmae.maskalign``) against its
plain-PyTorch twin (the official computation), both aligned with the same frozen teacher, on the CPU.

What runs (bench/maskalign_step.py describes the step, the teacher, the masks, the configurations
and the providers):

- ``test_maskalign_step[config-precision]``: one pre-training step (the frozen teacher's forward,
  the student's alignment loss on the visible patches, backward, fused AdamW) of the providers
  fast-compiled, ref-compiled, ref-eager and fast-eager, and the teacher's forward alone
  (teacher-only), timed side by side: each benchmark round is one cycle that runs every provider
  once, in an order rotated every round (A B C D E, B C D E A, ...), each call timed alone, and one
  large ``torch.mm`` in the step's precision (the matmul ceiling, sampled in the same cycles). Per
  provider ``extra_info`` holds the median time, images/s, the share of the ceiling (counted FLOPs
  per image x batch / time / mm rate; the teacher's own FLOPs for teacher-only) and the compile time
  (first call minus a steady step); per student provider the teacher's share of its step (teacher-only
  median / step median). Beside them: the speed-ups fast-compiled over ref-eager and over
  ref-compiled and fast-eager over ref-eager, of the whole step, and of the student's part alone
  estimated as step median minus teacher-only median. Before timing, the fp32 losses of the fast and
  the reference student on the batch are compared (relative difference at most 1e-4), and both are
  checked to keep exactly the drawn patches: the same weights, the same function, the same tokens.
- ``test_maskalign_peak_memory[config-variant-precision]``: ``bench/memory.py --model maskalign`` in
  a fresh subprocess per variant (fast-compiled, ref-compiled, ref-eager, fast-eager): bytes of live
  tensors at the step's high-water mark (resting state, the teacher's weights included, plus the
  step's own peak from the profiler), at the batch of ``test_maskalign_step``. The report puts it in
  the step's table.

Run through ``fastmae bench`` (its ``maskalign`` suite; ``--only maskalign``), or by hand::

    python -m pytest bench/test_bench_maskalign.py --benchmark-enable --benchmark-json=maskalign.json
    python -m fastmae.bench.report maskalign.json --out report/

MAE's own step for comparison: ``bench/test_bench_model.py`` (``FASTMAE_BENCH_CONFIGS=vitb
FASTMAE_BENCH_BATCH=8 python -m pytest bench/test_bench_model.py -k test_train_step ...``: the
batch of ``vitb`` here); render both JSON files together and the report shows both steps.

Environment (the knobs of ``bench/test_bench_video.py``, read the same way): ``FASTMAE_BENCH_CONFIGS``
(default ``vitb``; ``small`` is the 64x64 configuration), ``FASTMAE_BENCH_BATCH`` (batch of ``vitb``,
default 8), ``FASTMAE_BENCH_SMALL_BATCH`` (batch of ``small``, default 32), ``FASTMAE_BENCH_ROUNDS``
(default 5), ``FASTMAE_BENCH_WARMUP`` (default 2), ``FASTMAE_BENCH_MM_N`` (default 2048),
``FASTMAE_BENCH_MEMORY_VARIANTS`` (comma-separated names of ``MEMORY_VARIANTS``, default all),
``FASTMAE_BENCH_MEMORY_CACHE`` (``fresh``: an empty inductor cache per memory process, the default;
``shared``: the user's cache), ``FASTMAE_BENCH_TIER``, ``FASTMAE_BENCH_SMOKE=1`` (small only, batch 1,
one round, a 512 matmul; no meaningful figure).
"""
from __future__ import annotations

import os

import pytest
import torch

from fastmae.bench import maskalign_step as M
from fastmae.bench import model_step as S
from fastmae.config import bench_setting

SMOKE = M.SMOKE
CONFIG_NAMES = [c for c in bench_setting("FASTMAE_BENCH_CONFIGS", "small" if SMOKE else "vitb").split(",") if c]
ROUNDS = int(bench_setting("FASTMAE_BENCH_ROUNDS", "1" if SMOKE else "5"))
WARMUP = int(bench_setting("FASTMAE_BENCH_WARMUP", "1" if SMOKE else "2"))
MM_N = int(bench_setting("FASTMAE_BENCH_MM_N", "512" if SMOKE else "2048"))
TIER = bench_setting("FASTMAE_BENCH_TIER", "smoke" if SMOKE else "")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ENV_KEYS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD",
            "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE", "OMP_NUM_THREADS")
LOSS_RTOL = 1e-4  # fp32 losses of the fast and the reference student on the same weights, images and masks
TEACHER_TEXT = "fastmae ViT encoder (random weights, seeded) in fastmae.maskalign.Teacher; one module, eager, " \
               "shared by every provider"

for _c in CONFIG_NAMES:
    if _c not in M.CONFIGS:
        raise ValueError(f"FASTMAE_BENCH_CONFIGS names {_c!r}; the maskalign suite knows {', '.join(M.CONFIGS)}")


def _env():
    from fastmae import config

    return {**{k: os.environ.get(k, "") for k in ENV_KEYS}, "fastmae_backend": config.settings().backend}


class Bench:
    """Per configuration: the teacher, the fast and the reference student (same weights), their
    optimizers, the batch and its masks, and each provider's step function, built once per pytest
    run."""

    def __init__(self, config: str):
        torch._dynamo.reset()  # compiled code of earlier configurations (the students share forward's code object)
        self.config, self.batch = config, M.batch_size(config)
        self.teacher = M.build_teacher(config)
        self.models = {impl: M.build_model(config, impl) for impl in M.IMPLS}
        self.imgs, self.ids_keep, self.noise = M.make_batch(config, self.batch, self.teacher)
        self.loss_fast, self.loss_ref = M.compare(self.models["fast"], self.models["ref"], self.teacher, self.imgs,
                                                  self.noise, self.ids_keep)
        self.loss_rel_diff = abs(self.loss_fast - self.loss_ref) / abs(self.loss_ref)
        if not self.loss_rel_diff <= LOSS_RTOL:
            raise AssertionError(f"the fast and the reference {config} students give fp32 losses {self.loss_fast} and "
                                 f"{self.loss_ref} on the same weights, teacher and images: the benchmark would "
                                 "compare different functions")
        self.opts = {impl: M.make_optimizer(m) for impl, m in self.models.items()}
        self.compiled = {impl: M.compile_model(m, impl) for impl, m in self.models.items()}
        self.flops_per_image, self.teacher_flops_per_image = M.counted_flops(config)

    def step_fn(self, provider: str, precision: str):
        if provider == "teacher-only":
            return lambda: M.teacher_step(self.teacher, self.imgs, precision)
        impl, mode = provider.split("-")
        runner = self.compiled[impl] if mode == "compiled" else self.models[impl]
        opt = self.opts[impl]
        return lambda: M.train_step(runner, opt, self.teacher, self.imgs, self.noise, precision)


_benches: dict = {}


def get_bench(config: str) -> Bench:
    if config not in _benches:
        _benches.clear()  # one configuration's models in memory at a time
        _benches[config] = Bench(config)
    return _benches[config]


def _ratio(num, den):
    return num / den if num is not None and den is not None and num > 0 and den > 0 else None


@pytest.mark.parametrize("precision", M.PRECISIONS)
@pytest.mark.parametrize("config", CONFIG_NAMES)
def test_maskalign_step(config, precision, benchmark):
    bench = get_bench(config)
    steps = {p: bench.step_fn(p, precision) for p in M.PROVIDERS}
    times, first, mm_rates, ceiling = S.time_side_by_side(benchmark, steps,
                                                          group=f"maskalign step {config} {precision}", rounds=ROUNDS,
                                                          warmup=WARMUP, dtype=DTYPES[precision], mm_n=MM_N)
    per = {p: S.provider_stats(times[p], first[p], batch=bench.batch, ceiling=ceiling, compiled=p.endswith("compiled"),
                               flops=(bench.teacher_flops_per_image if p == "teacher-only" else bench.flops_per_image)
                               * bench.batch) for p in steps}
    med = {p: per[p]["median_s"] for p in steps}
    teacher_s = med["teacher-only"]
    for p in M.STUDENT_PROVIDERS:
        per[p]["teacher_share"] = teacher_s / med[p]
    student = {p: med[p] - teacher_s for p in M.STUDENT_PROVIDERS}  # estimates: step minus the teacher alone
    for opt in bench.opts.values():
        opt.zero_grad(set_to_none=True)
    cfg = M.CONFIGS[config]
    benchmark.extra_info.update(
        kind="maskalign_step", config=config, config_title=cfg["title"], precision=precision, batch=bench.batch,
        img=cfg["img"], mask_ratio=M.MASK_RATIO, num_kept=int(bench.ids_keep.shape[1]),
        num_patches=int(bench.noise.shape[1]), recipe=dict(M.RECIPE, mask_type="attention (drawn once)"),
        teacher=TEACHER_TEXT, rounds=ROUNDS, warmup=WARMUP, flops_per_image=bench.flops_per_image,
        teacher_flops_per_image=bench.teacher_flops_per_image, mm_n=MM_N, mm_rate=ceiling, mm_rates=mm_rates,
        providers=per, loss_fast=bench.loss_fast, loss_ref=bench.loss_ref, loss_rel_diff=bench.loss_rel_diff,
        speedup_fast_compiled_vs_ref_eager=med["ref-eager"] / med["fast-compiled"],
        speedup_fast_compiled_vs_ref_compiled=med["ref-compiled"] / med["fast-compiled"],
        speedup_fast_eager_vs_ref_eager=med["ref-eager"] / med["fast-eager"],
        student_s_estimate=student,
        student_speedup_fast_compiled_vs_ref_eager=_ratio(student["ref-eager"], student["fast-compiled"]),
        student_speedup_fast_compiled_vs_ref_compiled=_ratio(student["ref-compiled"], student["fast-compiled"]),
        student_speedup_fast_eager_vs_ref_eager=_ratio(student["ref-eager"], student["fast-eager"]),
        threads=torch.get_num_threads(), env=_env(), tier=TIER)


MEMORY_VARIANTS = {  # name: (impl, compiled)
    "fast-compiled": ("fast", True),
    "ref-compiled": ("ref", True),
    "ref-eager": ("ref", False),
    "fast-eager": ("fast", False),
}
MEMORY_RUN, MEMORY_CACHE = S.memory_variants(MEMORY_VARIANTS, "maskalign")


@pytest.mark.parametrize("precision", M.PRECISIONS)
@pytest.mark.parametrize("variant", MEMORY_RUN)
@pytest.mark.parametrize("config", CONFIG_NAMES)
def test_maskalign_peak_memory(config, variant, precision, benchmark, tmp_path):
    _benches.clear()  # free this process's models before the subprocess runs
    impl, compiled = MEMORY_VARIANTS[variant]
    args = ["--model", "maskalign", "--config", config, "--impl", impl, "--precision", precision,
            "--batch", str(M.batch_size(config))] + (["--compiled"] if compiled else [])
    out = S.measure_memory(benchmark, args, group=f"maskalign peak memory {config} {precision}", cache=MEMORY_CACHE,
                           tmp_path=tmp_path)
    benchmark.extra_info.update(kind="maskalign_memory", variant=variant, env=_env(), tier=TIER,
                                inductor_cache=MEMORY_CACHE, **out)
