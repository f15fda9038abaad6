"""GPU measurements: the Triton kernels against the torch reference compositions, and the MAE
training step, fast against reference, on one CUDA device.

    python -m fastmae.bench.gpu ops   [--json out.json]   # fused ops, ViT-B shapes, N = 64 and 256
    python -m fastmae.bench.gpu model [--json out.json]   # training step, compiled and eager, bf16 and fp32
    python -m fastmae.bench.gpu overhead                  # host time of one op call, by layer
    python -m fastmae.bench.gpu profile [--json out.json] # a step's GPU time by kernel category, and GPU idle

``fastmae bench --device cuda`` runs ``ops`` and ``model`` and renders them with the CPU results.

``ops``: each op at ViT-B MAE shapes (L=196, K=49, p=16, C=3, decoder width 512), forward and
forward+backward ("full"), fp32 and bf16, through three providers: ``triton`` (the public
``fastmae.ops`` function; Triton on CUDA), ``eager`` (the op's torch reference composition) and
``compiled`` (that composition under ``torch.compile``). Times are ``triton.testing.do_bench``
medians (CUDA events; the L2 cache is flushed before every call, so no run is served from a warm
cache) of the call captured in a CUDA graph: device time, the same work for every provider.
``triton host us`` is the same call timed as Python issues it, launches and dispatch included
(at these sizes the host is slower than the device). Backward is taken with
``torch.autograd.grad`` (no ``.grad`` accumulation). Bytes are the op's minimal traffic (each
input read once, each output written once); their rate is compared with a device-to-device copy
measured in the same run (read + write counted) and with the H100's datasheet 3.35 TB/s.

``model``: one training step (zero_grad, forward with mask ratio 0.75, backward, fused AdamW) of
``mae_vit_base_patch16`` at 224x224 and of the small configuration of ``bench/model_step.py``, for
fast-compiled (fullgraph), ref-compiled, ref-eager and fast-eager, rotating the providers each
round; medians of CUDA-event times, peak memory per provider (``max_memory_allocated`` over one
step, less what the providers built before it hold), compile time (first call minus a steady
step), and the bf16 matmul rate of a large ``torch.mm`` in the same run as the ceiling. A
provider name may add ``-ckpt`` (grad checkpointing, fast model), ``-obw``
(``fastmae.optim.OptimizerInBackward``) and an attention backend (``-sdpa``, ``-math``,
``-xformers``; fast model) and, to a compiled one, ``-graphs`` (``mode="reduce-overhead"``: CUDA
graphs; the peak memory column then misses the graphs' pool, allocated during warm-up), e.g.
``fast-eager-ckpt-obw``, ``fast-compiled-graphs``.

``profile``: the same step per provider (``ref-compiled``, ``fast-compiled`` and
``fast-compiled-math`` by default, ViT-B, fp32 and bf16): its median time (CUDA events), and from
``torch.profiler`` the GPU time per step of each kernel category: fastmae's Triton kernels,
attention (fused attention kernels and softmax; the math path's two products count as gemm),
gemm, optimizer, other inductor kernels, other. The step runs on one stream, so step time less
kernel time is time the GPU waited for the host. ``--json`` adds the top kernels of each.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import triton.testing

from fastmae import ops
from fastmae.ops.attention import ATTN_BACKENDS
from fastmae.ops.gather_mask import gather_mask_ref
from fastmae.ops.norm_mse_loss import norm_mse_loss_ref
from fastmae.ops.unshuffle_scatter import unshuffle_scatter_ref

DEV = torch.device("cuda")
H100_BYTES_PER_S = 3.35e12
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
L, K, P_SIZE, C, IMG, D_DEC = 196, 49, 16, 3, 224, 512
PATCH = P_SIZE * P_SIZE * C


def bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")


def graph_ms(call) -> float:
    """Device time of ``call``: captured once in a CUDA graph (after a warm-up on a side stream),
    its replays timed. Host work (Python, dispatch, launch) is left out."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return bench_ms(graph.replay)


def copy_rate() -> float:
    """Bytes/s (read + write) of a 1 GiB device-to-device copy."""
    src = torch.randn(2**28, device=DEV)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3)


# ---------------------------------------------------------------------------- op cases
def _masks(N):
    ids_shuffle = torch.rand(N, L, device=DEV).argsort(1)
    ids_restore = ids_shuffle.argsort(1)
    mask = torch.ones(N, L, device=DEV)
    mask[:, :K] = 0
    return ids_shuffle[:, :K].contiguous(), ids_restore, torch.gather(mask, 1, ids_restore)


def op_cases(N: int, dtype: torch.dtype):
    """{op: (fast fn, reference fn, leaves, grad of the output, fwd bytes, bwd bytes)}."""
    s = dtype.itemsize
    ids_keep, ids_restore, mask = _masks(N)
    imgs = torch.randn(N, C, IMG, IMG, device=DEV, dtype=dtype)
    x = torch.randn(N, 1 + K, D_DEC, device=DEV, dtype=dtype)
    tok = torch.randn(D_DEC, device=DEV, dtype=dtype)
    pos = torch.randn(1 + L, D_DEC, device=DEV, dtype=dtype)
    pred = torch.randn(N, L, PATCH, device=DEV, dtype=dtype)
    target = imgs.detach()  # the loss's images are data (imgs itself becomes gather_mask's leaf)
    img_bytes = imgs.numel() * s
    cases = {
        "gather_mask": (
            lambda a: ops.gather_mask(a, ids_keep, P_SIZE),
            lambda a: gather_mask_ref(a, ids_keep, P_SIZE),
            [imgs], torch.randn(N, K, PATCH, device=DEV, dtype=dtype),
            2 * N * K * PATCH * s, N * K * PATCH * s + img_bytes),
        "unshuffle_scatter": (
            lambda a, t, q: ops.unshuffle_scatter(a, t, ids_restore, q),
            lambda a, t, q: unshuffle_scatter_ref(a, t, ids_restore, q),
            [x, tok, pos], torch.randn(N, 1 + L, D_DEC, device=DEV, dtype=dtype),
            (x.numel() + pos.numel() + N * (1 + L) * D_DEC) * s,
            (N * (1 + L) * D_DEC + x.numel() + pos.numel() + D_DEC) * s),
        "norm_mse_loss": (
            lambda a: ops.norm_mse_loss(a, target, mask, P_SIZE),
            lambda a: norm_mse_loss_ref(a, target, mask, None, P_SIZE, True, 1e-6),
            [pred], torch.ones((), device=DEV),
            pred.numel() * s + img_bytes, 2 * pred.numel() * s + img_bytes),
    }
    return cases


def run_ops(args) -> list[dict]:
    rate = copy_rate()
    print(f"device {torch.cuda.get_device_name()}: copy {rate / 1e12:.2f} TB/s (read + write)", flush=True)
    rows = []
    for N in args.batches:
        for dname, dtype in DTYPES.items():
            for op, (fast, ref, leaves, grad, fwd_bytes, bwd_bytes) in op_cases(N, dtype).items():
                leaves = [t.requires_grad_() for t in leaves]
                compiled = torch.compile(ref)
                providers = {"triton": fast, "eager": ref, "compiled": compiled}
                for mode in ("forward", "full"):
                    times = {}
                    for name, fn in providers.items():
                        if mode == "forward":
                            def call(fn=fn):
                                with torch.no_grad():
                                    fn(*leaves)
                        else:
                            def call(fn=fn):
                                torch.autograd.grad(fn(*leaves), leaves, grad)
                        times[f"{name}_host"] = bench_ms(call)  # as called from Python, launches included
                        try:
                            times[name] = graph_ms(call)
                        except Exception as e:  # report, keep measuring the rest
                            print(f"# {op} {mode} {dname} {name}: no CUDA graph ({type(e).__name__}: {e})")
                            times[name] = float("nan")
                    nbytes = fwd_bytes if mode == "forward" else fwd_bytes + bwd_bytes
                    row = dict(op=op, mode=mode, dtype=dname, N=N, bytes=nbytes, copy_bytes_per_s=rate,
                               **{f"{k}_ms": v for k, v in times.items()})
                    rows.append(row)
                    print(_op_line(row), flush=True)
    return rows


def _op_line(r) -> str:
    t = r["triton_ms"]
    gbs = r["bytes"] / (t * 1e-3) / 1e9
    return (f"| {r['op']} | {r['mode']} | {r['dtype']} | {r['N']} | {t * 1e3:.1f} | {r['triton_host_ms'] * 1e3:.1f} | "
            f"{r['eager_ms'] * 1e3:.1f} | "
            f"{r['compiled_ms'] * 1e3:.1f} | {r['eager_ms'] / t:.1f} | {r['compiled_ms'] / t:.1f} | "
            f"{r['bytes'] / 1e6:.1f} | {gbs:.0f} | {100 * gbs * 1e9 / r['copy_bytes_per_s']:.0f} | "
            f"{r['bytes'] / H100_BYTES_PER_S * 1e6:.1f} |")


OPS_HEADER = ("| op | mode | dtype | N | triton us | triton host us | eager us | compiled us | x eager | x compiled | "
              "MB | GB/s | % of copy | 3.35 TB/s floor us |\n"
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


# ---------------------------------------------------------------------------- host overhead
def run_overhead(args) -> list[dict]:
    """Where the host time of one op call goes (gather_mask, ViT-B, N = 64, fp32): the public
    op, its backward custom op called directly (main thread) and through autograd (the engine's
    thread), the Triton launchers without the custom-op layer, and the device time of the
    launcher against the op (the difference is the index check and the inverse map)."""
    import cProfile
    import pstats

    from fastmae.kernels import gather_mask as gk

    N = 64
    imgs = torch.randn(N, C, IMG, IMG, device=DEV, requires_grad=True)
    ids_keep, _, _ = _masks(N)
    grad = torch.randn(N, K, PATCH, device=DEV)
    out = ops.gather_mask(imgs, ids_keep, P_SIZE)
    calls = {
        "op forward": lambda: ops.gather_mask(imgs, ids_keep, P_SIZE),
        "op backward (direct)": lambda: torch.ops.fastmae.gather_mask_backward(grad, ids_keep, P_SIZE, IMG, IMG),
        "op forward + autograd.grad": lambda: torch.autograd.grad(ops.gather_mask(imgs, ids_keep, P_SIZE), imgs, grad),
        "autograd.grad of a saved graph": lambda: torch.autograd.grad(out, imgs, grad, retain_graph=True),
        "launcher forward": lambda: gk.gather_mask_forward(imgs.detach(), ids_keep, P_SIZE),
        "launcher backward": lambda: gk.gather_mask_backward(grad, ids_keep, P_SIZE, IMG, IMG),
    }
    rows = []
    for name, fn in calls.items():
        host = bench_ms(fn)
        try:
            dev = graph_ms(fn)
        except Exception as e:
            print(f"# {name}: no CUDA graph ({type(e).__name__}: {e})")
            dev = float("nan")
        rows.append(dict(call=name, host_ms=host, device_ms=dev))
        print(f"| {name} | {host * 1e3:.1f} | {dev * 1e3:.1f} |", flush=True)
    prof = cProfile.Profile()
    fn = calls["op backward (direct)"]
    torch.cuda.synchronize()
    prof.enable()
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    return rows


OVERHEAD_HEADER = "| call | host us | device us |\n|---|---:|---:|"


# ---------------------------------------------------------------------------- training step
def _model_step_module():
    from fastmae.bench import model_step as ms

    torch.backends.cuda.matmul.allow_tf32 = True  # what a GPU user runs in "fp32"
    torch.backends.cudnn.allow_tf32 = True
    return ms


def _provider_step(ms, config: str, provider: str, imgs: torch.Tensor, precision: str):
    """One training step (zero_grad, forward, backward, AdamW) of ``provider``, e.g.
    ``fast-compiled``, ``fast-eager-ckpt-obw``, ``fast-compiled-math``, as a function.
    ``graphs`` compiles with ``mode="reduce-overhead"`` (forward and backward replayed as CUDA
    graphs; the optimizer step stays eager)."""
    impl, *flags = provider.split("-")
    attn = next((f for f in flags if f in ATTN_BACKENDS), "auto")
    model = ms.build_model(config, impl, grad_checkpointing="ckpt" in flags, attn_backend=attn).to(DEV)
    opt = ms.make_optimizer(model, in_backward="obw" in flags)
    if "graphs" in flags and "compiled" not in flags:
        raise ValueError(f"{provider}: 'graphs' needs 'compiled' (CUDA graphs come from torch.compile)")
    mode = "reduce-overhead" if "graphs" in flags else None
    run = ms.compile_model(model, impl, mode) if "compiled" in flags else model

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss, _, _ = run(imgs, mask_ratio=ms.MASK_RATIO)
        loss.backward()
        opt.step()

    return step


def run_model(args) -> list[dict]:
    ms = _model_step_module()
    rows = []
    for config in args.configs:
        batch = args.vitb_batch if config == "vitb" else args.small_batch
        for precision in args.precisions:
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            imgs = ms.make_images(config, batch).to(DEV)
            steps = {}
            compile_s = {}
            for provider in args.providers:
                torch.cuda.synchronize()
                others = torch.cuda.memory_allocated()  # the providers built before this one stay resident
                step = _provider_step(ms, config, provider, imgs, precision)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                step()
                torch.cuda.synchronize()
                first = time.perf_counter() - t0
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated() - others  # weights, AdamW state, last step's grads
                step()
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - others  # this provider's own high-water mark
                steps[provider] = (step, [], peak, base)
                compile_s[provider] = first
            for rnd in range(args.rounds):  # rotate the providers each round
                order = list(steps)[rnd % len(steps):] + list(steps)[:rnd % len(steps)]
                for provider in order:
                    fn, times = steps[provider][:2]
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(args.steps_per_round):
                        fn()
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end) / args.steps_per_round)
            a = torch.randn(8192, 8192, device=DEV, dtype=dtype)
            b = torch.randn(8192, 8192, device=DEV, dtype=dtype)
            mm_rate = 2 * 8192**3 / (bench_ms(lambda: a @ b) * 1e-3)
            flops = ms.counted_flops(config) if config == "small" else 59e9  # per image, fwd + bwd
            for provider, (_, times, peak, base) in steps.items():
                med = statistics.median(times)
                steady = med * 1e-3
                row = dict(config=config, batch=batch, precision=precision, provider=provider, step_ms=med,
                           min_ms=min(times), img_per_s=batch / steady, peak_gib=peak / 2**30,
                           resting_gib=base / 2**30, compile_s=compile_s[provider] - steady,
                           mm_tflops=mm_rate / 1e12, pct_ceiling=100 * flops * batch / steady / mm_rate)
                rows.append(row)
                print(f"| {config} | {batch} | {precision} | {provider} | {med:.1f} | {row['img_per_s']:.0f} | "
                      f"{row['pct_ceiling']:.0f} | {row['peak_gib']:.2f} | {row['compile_s']:.0f} |", flush=True)
            del steps
            torch.cuda.empty_cache()
    return rows


MODEL_HEADER = ("| config | batch | precision | provider | step ms | img/s | % of mm ceiling | peak GiB | "
                "compile s |\n|---|---:|---|---|---:|---:|---:|---:|---:|")


# ---------------------------------------------------------------------------- where a step's GPU time goes
# kernel name fragments of each category, first match wins
KERNEL_CATEGORIES = (
    ("fastmae", ("_gather_mask", "_unshuffle_scatter", "_norm_mse_loss")),
    ("attention", ("fmha", "attention", "flash", "softmax")),
    ("gemm", ("gemm", "xmma", "cutlass", "cublas", "nvjet", "splitk")),
    ("optimizer", ("adam", "multi_tensor")),
    ("inductor", ("triton_",)),
)


def kernel_category(name: str) -> str:
    low = name.lower()
    return next((cat for cat, keys in KERNEL_CATEGORIES if any(k in low for k in keys)), "other")


def run_profile(args) -> list[dict]:
    """Per provider: the median step time (CUDA events, one step each), and from
    ``torch.profiler`` over ``--profile-steps`` steps, the GPU time of each kernel category per
    step. The GPU runs one stream, so step time less kernel time is time the GPU waited."""
    from torch.profiler import ProfilerActivity, profile

    ms = _model_step_module()
    rows = []
    for config in args.configs:
        batch = args.vitb_batch if config == "vitb" else args.small_batch
        for precision in args.precisions:
            imgs = ms.make_images(config, batch).to(DEV)
            for provider in args.providers:
                torch._dynamo.reset()
                step = _provider_step(ms, config, provider, imgs, precision)
                for _ in range(4):
                    step()
                times = []
                for _ in range(8):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    step()
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end))
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(args.profile_steps):
                        step()
                    torch.cuda.synchronize()
                per_cat, per_kernel = {}, {}
                for e in prof.events():
                    if e.device_type == torch.autograd.DeviceType.CUDA:
                        ms_per_step = e.time_range.elapsed_us() / 1e3 / args.profile_steps
                        cat = kernel_category(e.name)
                        per_cat[cat] = per_cat.get(cat, 0.0) + ms_per_step
                        per_kernel[e.name[:100]] = per_kernel.get(e.name[:100], 0.0) + ms_per_step
                step_ms, busy = statistics.median(times), sum(per_cat.values())
                cats = [c for c, _ in KERNEL_CATEGORIES] + ["other"]
                top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:25]
                rows.append(dict(config=config, batch=batch, precision=precision, provider=provider, step_ms=step_ms,
                                 kernel_ms=busy, categories=per_cat, top_kernels=top))
                print(f"| {config} | {precision} | {provider} | {step_ms:.1f} | {busy:.1f} | {step_ms - busy:.1f} | "
                      + " | ".join(f"{per_cat.get(c, 0.0):.2f}" for c in cats) + " |", flush=True)
                del step
                torch.cuda.empty_cache()
    return rows


PROFILE_HEADER = ("| config | precision | provider | step ms | kernels ms | GPU idle ms | "
                  + " | ".join(c for c, _ in KERNEL_CATEGORIES) + " | other |\n|---|---|---|"
                  + "---:|" * (4 + len(KERNEL_CATEGORIES)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p_ops = sub.add_parser("ops")
    p_ops.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    p_over = sub.add_parser("overhead")
    p_model = sub.add_parser("model")
    p_model.add_argument("--vitb-batch", type=int, default=64)
    p_model.add_argument("--small-batch", type=int, default=256)
    p_model.add_argument("--configs", nargs="+", default=["vitb", "small"], choices=["vitb", "small"])
    p_model.add_argument("--precisions", nargs="+", default=["bf16", "fp32"])
    p_model.add_argument("--providers", nargs="+", default=["fast-compiled", "ref-compiled", "ref-eager", "fast-eager"])
    p_model.add_argument("--rounds", type=int, default=7)
    p_model.add_argument("--steps-per-round", type=int, default=5)
    p_prof = sub.add_parser("profile")
    p_prof.add_argument("--vitb-batch", type=int, default=64)
    p_prof.add_argument("--small-batch", type=int, default=256)
    p_prof.add_argument("--configs", nargs="+", default=["vitb"], choices=["vitb", "small"])
    p_prof.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p_prof.add_argument("--providers", nargs="+", default=["ref-compiled", "fast-compiled", "fast-compiled-math"])
    p_prof.add_argument("--profile-steps", type=int, default=3)
    for p in (p_ops, p_over, p_model, p_prof):
        p.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("fastmae.bench.gpu needs a CUDA device (no CUDA device here)")
    if args.what == "ops":
        print(OPS_HEADER, flush=True)
        rows = run_ops(args)
    elif args.what == "overhead":
        print(OVERHEAD_HEADER, flush=True)
        rows = run_overhead(args)
    elif args.what == "model":
        print(MODEL_HEADER, flush=True)
        rows = run_model(args)
    else:
        print(PROFILE_HEADER, flush=True)
        rows = run_profile(args)
    if args.json:
        from fastmae.bench.environment import describe

        with open(args.json, "w") as f:
            json.dump(dict(suite=f"gpu-{args.what}", device=torch.cuda.get_device_name(), torch=torch.__version__,
                           triton=triton.__version__, environment=describe(), args=vars(args), rows=rows),
                      f, indent=1)


if __name__ == "__main__":
    main()
