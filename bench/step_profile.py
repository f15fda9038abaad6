"""Where a compiled training step spends its time, from the profiler: the GEMMs it runs
(``aten::mm``/``addmm``/``bmm``/``baddbmm`` calls, inductor's extern kernels included), the
optimizer step, and the rest (inductor's generated kernels, attention, the fused ops).

The GEMMs inside the step are the floor for any model that does the same matrix work: the step
cannot get faster than them without doing less of it. (bench/test_bench_model.py's
``test_gemm_bound`` replays the recorded GEMMs eagerly; in bf16 that replay was slower than the
compiled step's own GEMMs, so it was no floor there; this script measures them in place.)

    python -m fastmae.bench.step_profile --config vitb --precision bf16 --impl fast ref --steps 3

One process per run; each model is compiled (fullgraph for the fast one), warmed up for two
steps, then profiled over ``--steps`` steps. Times are per step, wall-clock of the profiled
steps and self CPU time of the ops (on the calling thread: intra-op threads run inside it).
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from fastmae.bench import model_step as S


def profile_step(config: str, impl: str, precision: str, steps: int) -> dict:
    model = S.build_model(config, impl)
    model.train()
    opt = S.make_optimizer(model)
    imgs = S.make_images(config, S.batch_size(config))
    step_model = S.compile_model(model, impl)
    t0 = time.perf_counter()
    S.train_step(step_model, opt, imgs, precision)
    compile_s = time.perf_counter() - t0
    S.train_step(step_model, opt, imgs, precision)

    def step():
        opt.zero_grad(set_to_none=True)
        with S.precision_context(precision):
            loss, _, _ = step_model(imgs, mask_ratio=S.MASK_RATIO)
        loss.backward()
        with record_function("optimizer_step"):
            opt.step()

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - t0) / steps
    gemm_us, opt_us, by_op = 0.0, 0.0, {}
    for evt in prof.key_averages():
        name = evt.key
        if name in ("aten::" + op for op in S.GEMM_OPS):
            gemm_us += evt.self_cpu_time_total
            by_op[name] = evt.self_cpu_time_total / steps / 1e6
        if name == "optimizer_step":
            opt_us += evt.cpu_time_total
    return dict(config=config, impl=impl, precision=precision, batch=imgs.shape[0], steps=steps,
                compile_and_first_step_s=compile_s, step_s=wall, gemm_s=gemm_us / steps / 1e6,
                gemm_by_op_s=by_op, optimizer_s=opt_us / steps / 1e6,
                threads=torch.get_num_threads())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(S.CONFIGS), default="vitb")
    ap.add_argument("--precision", choices=S.PRECISIONS, default="bf16")
    ap.add_argument("--impl", nargs="+", choices=("fast", "ref"), default=["fast", "ref"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", help="write the rows here as well")
    args = ap.parse_args()
    rows = []
    for impl in args.impl:
        torch._dynamo.reset()
        r = profile_step(args.config, impl, args.precision, args.steps)
        rows.append(r)
        print(f"{args.config} {args.precision} {impl}-compiled: step {r['step_s']:.3f} s (profiled), "
              f"GEMMs {r['gemm_s']:.3f} s ({100 * r['gemm_s'] / r['step_s']:.0f}%), "
              f"optimizer {r['optimizer_s']:.3f} s, rest {r['step_s'] - r['gemm_s'] - r['optimizer_s']:.3f} s; "
              f"compile + first step {r['compile_and_first_step_s']:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
