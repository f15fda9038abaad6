"""Peak memory of one training step, measured in a fresh process.

    python -m fastmae.bench.memory --config vitb --impl fast --compiled --precision fp32 --batch 16
        [--grad-checkpointing] [--optimizer-in-backward]
    python -m fastmae.bench.memory --model finetune --config vitb --impl timm --compiled --precision bf16 --batch 8
    python -m fastmae.bench.memory --model video --config vits --impl ref --precision fp32 --batch 2
    python -m fastmae.bench.memory --model maskalign --config small --impl fast --compiled --precision fp32

prints one JSON object. ``--model mae`` (the default): the MAE pre-training step
(bench/model_step.py; ``--impl`` fast or ref). ``--model finetune``: the fine-tuning step of the
classifier (bench/finetune_step.py; ``--impl`` fast, timm or ref; its own ``vitb`` and ``small``
configurations). ``--model video``: the VideoMAE pre-training step (bench/video_step.py; ``--impl``
fast or ref; its own ``vits``, ``vitb`` and ``small`` configurations). ``--model maskalign``: the
MaskAlign pre-training step (bench/maskalign_step.py; ``--impl`` fast or ref; its own ``vitb`` and
``small`` configurations; the frozen teacher is built too, eager, and its weights count in the
resting state). The process builds the model and its fused AdamW, runs warm-up steps (compilation,
optimizer state creation, first-touch of every buffer), then measures one steady-state step two ways:

- ``tensor_peak_bytes`` (the figure the comparison uses): bytes of live CPU tensors at the step's
  high-water mark. The resting state (``resting_bytes``: parameters, buffers, optimizer state,
  summed over unique storages) plus the peak of what the step itself allocates, read from
  ``torch.profiler`` with ``profile_memory=True``: every CPU allocation and free during the step
  is an event carrying the running total of bytes allocated since profiling began, so its maximum
  is the step's own peak (activations kept for backward, gradients, temporaries, the optimizer's
  scratch). Gradients are set to None before the step, so they count in the step's peak.
  This is what PyTorch's allocator hands out, independent of how malloc caches memory.
- ``rss_step_peak_bytes``: the process's resident-set high-water mark during that step (VmHWM,
  reset just before the step through /proc/self/clear_refs). It includes the interpreter,
  libraries and compiled code and what glibc keeps cached, so it is larger and noisier; it is
  reported so the tensor accounting can be cross-checked (the step's RSS growth should be close
  to the step's tensor peak). ``ru_maxrss_bytes`` is the whole process's high-water mark,
  compilation included.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

from fastmae.bench import finetune_step as FT
from fastmae.bench import maskalign_step as MA
from fastmae.bench import model_step as S
from fastmae.bench import video_step as VS


def _vm_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_rss_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def resting_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes of the parameters, buffers and optimizer state, each storage counted once."""
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    optimizers = getattr(opt, "optimizers", {0: opt}).values()  # OptimizerInBackward: one per parameter
    for state in (st for o in optimizers for st in o.state.values()):
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each storage counted once."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in list(module.parameters()) + list(module.buffers())}
    return sum(storages.values())


def step_tensor_peak(fn) -> int:
    """Peak bytes allocated (and still live) during ``fn``, from the profiler's memory events.

    An event's "Total Allocated" is a running total kept for the whole process: frees made while
    no profiler runs are not subtracted from it, so after an earlier profiled call it starts
    above zero. The peak is taken from the total before the first event of this call, which
    makes the figure the same in a fresh process and after other profiled steps."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    mem = sorted((e for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0),
                 key=lambda e: e["ts"])
    if not mem:
        return 0
    start = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
    return max(0, max(e["args"]["Total Allocated"] for e in mem) - start)


def _measure_step(step, resting, opt, warmup: int, **meta) -> dict:
    """Run ``step`` once (compiling when asked) and ``warmup - 1`` more times, then measure one
    steady-state step: ``resting`` holds the modules whose parameters and buffers rest in memory."""
    t0 = time.perf_counter()
    step()
    first_step_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    opt.zero_grad(set_to_none=True)
    rest = resting_bytes(resting, opt)
    rss_before = _vm_kib("VmRSS")
    rss_reset = _reset_rss_peak()
    peak = step_tensor_peak(step)
    rss_peak = _vm_kib("VmHWM") if rss_reset else None
    return dict(
        **meta, threads=torch.get_num_threads(),
        resting_bytes=rest, step_peak_bytes=peak, tensor_peak_bytes=rest + peak,
        rss_before_step_bytes=None if rss_before is None else rss_before * 1024,
        rss_step_peak_bytes=None if rss_peak is None else rss_peak * 1024,
        ru_maxrss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        first_step_s=first_step_s,
    )


def measure(config: str, impl: str, compiled: bool, precision: str, batch: int,
            grad_checkpointing: bool = False, optimizer_in_backward: bool = False, warmup: int = 2) -> dict:
    model = S.build_model(config, impl, grad_checkpointing=grad_checkpointing)
    opt = S.make_optimizer(model, in_backward=optimizer_in_backward)
    runner = S.compile_model(model, impl) if compiled else model
    imgs = S.make_images(config, batch)
    return _measure_step(lambda: S.train_step(runner, opt, imgs, precision), model, opt, warmup,
                         config=config, impl=impl, compiled=compiled, precision=precision, batch=batch,
                         grad_checkpointing=grad_checkpointing, optimizer_in_backward=optimizer_in_backward)


def measure_finetune(config: str, impl: str, compiled: bool, precision: str, batch: int, warmup: int = 2) -> dict:
    """``measure`` for the fine-tuning step (bench/finetune_step.py)."""
    model = FT.build_classifier(config, impl)
    opt = FT.make_optimizer(model)
    runner = FT.compile_model(model, impl) if compiled else model
    imgs, labels = FT.make_batch(config, batch)
    return _measure_step(lambda: FT.train_step(runner, opt, imgs, labels, precision), model, opt, warmup,
                         model="finetune", config=config, impl=impl, compiled=compiled, precision=precision,
                         batch=batch)


def measure_video(config: str, impl: str, compiled: bool, precision: str, batch: int, warmup: int = 2) -> dict:
    """``measure`` for the VideoMAE pre-training step (bench/video_step.py)."""
    model = VS.build_model(config, impl)
    opt = VS.make_optimizer(model)
    runner = VS.compile_model(model, impl) if compiled else model
    videos, mask, num_masked = VS.make_batch(config, batch)
    return _measure_step(lambda: VS.train_step(runner, opt, videos, mask, num_masked, precision), model, opt,
                         warmup, model="video", config=config, impl=impl, compiled=compiled, precision=precision,
                         batch=batch)


def measure_maskalign(config: str, impl: str, compiled: bool, precision: str, batch: int, warmup: int = 2) -> dict:
    """``measure`` for the MaskAlign pre-training step (bench/maskalign_step.py): the student's step
    with the frozen teacher's forward in it; the resting state counts the teacher's weights too."""
    teacher = MA.build_teacher(config)
    model = MA.build_model(config, impl)
    opt = MA.make_optimizer(model)
    runner = MA.compile_model(model, impl) if compiled else model
    imgs, _, noise = MA.make_batch(config, batch, teacher)
    return _measure_step(lambda: MA.train_step(runner, opt, teacher, imgs, noise, precision),
                         torch.nn.ModuleList([model, teacher]), opt, warmup, model="maskalign", config=config,
                         impl=impl, compiled=compiled, precision=precision, batch=batch,
                         teacher_bytes=_module_bytes(teacher))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Peak memory of one MAE training step, one fine-tuning step, "
                                                 "one VideoMAE or one MaskAlign pre-training step (fresh process).")
    parser.add_argument("--model", choices=["mae", "finetune", "video", "maskalign"], default="mae",
                        help="mae: the MAE pre-training step (default); finetune: the classifier's fine-tuning "
                             "step; video: the VideoMAE pre-training step; maskalign: the MaskAlign pre-training "
                             "step (student and frozen teacher)")
    parser.add_argument("--config", choices=sorted(set(S.CONFIGS) | set(FT.CONFIGS) | set(VS.CONFIGS)
                                                   | set(MA.CONFIGS)),
                        default="vitb")
    parser.add_argument("--impl", choices=["fast", "ref", "timm"], default="fast",
                        help="fast or ref (any model); timm (--model finetune only)")
    parser.add_argument("--compiled", action="store_true")
    parser.add_argument("--precision", choices=list(S.PRECISIONS), default="fp32")
    parser.add_argument("--batch", type=int, default=None, help="default: the configuration's benchmark batch")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--optimizer-in-backward", action="store_true",
                        help="step AdamW per parameter during backward (fastmae.optim.OptimizerInBackward)")
    args = parser.parse_args(argv)
    if args.model == "finetune":
        if args.config not in FT.CONFIGS or args.grad_checkpointing or args.optimizer_in_backward:
            parser.error(f"--model finetune takes --config {' or '.join(FT.CONFIGS)} and neither "
                         "--grad-checkpointing nor --optimizer-in-backward")
        result = measure_finetune(args.config, args.impl, args.compiled, args.precision,
                                  args.batch or FT.batch_size(args.config))
        print(json.dumps(result))
        return 0
    if args.model == "video":
        if args.config not in VS.CONFIGS or args.impl == "timm" or args.grad_checkpointing \
                or args.optimizer_in_backward:
            parser.error(f"--model video takes --config {' or '.join(VS.CONFIGS)}, --impl fast or ref and neither "
                         "--grad-checkpointing nor --optimizer-in-backward")
        result = measure_video(args.config, args.impl, args.compiled, args.precision,
                               args.batch or VS.batch_size(args.config))
        print(json.dumps(result))
        return 0
    if args.model == "maskalign":
        if args.config not in MA.CONFIGS or args.impl == "timm" or args.grad_checkpointing \
                or args.optimizer_in_backward:
            parser.error(f"--model maskalign takes --config {' or '.join(MA.CONFIGS)}, --impl fast or ref and "
                         "neither --grad-checkpointing nor --optimizer-in-backward")
        result = measure_maskalign(args.config, args.impl, args.compiled, args.precision,
                                   args.batch or MA.batch_size(args.config))
        print(json.dumps(result))
        return 0
    if args.impl == "timm" or args.config not in S.CONFIGS:
        parser.error(f"--model mae takes --impl fast or ref and --config {' or '.join(S.CONFIGS)}")
    batch = args.batch or S.batch_size(args.config)
    result = measure(args.config, args.impl, args.compiled, args.precision, batch, args.grad_checkpointing,
                     args.optimizer_in_backward)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
