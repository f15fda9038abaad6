"""Render fastmae's benchmark results as ``report.md`` and PNG plots.

    python -m fastmae.bench.report RESULTS [RESULTS ...] --out DIR

``RESULTS`` are JSON files, or folders whose ``*.json`` are read: pytest-benchmark JSON of
``test_bench_model.py``, ``test_bench_finetune.py``, ``test_bench_video.py``, ``test_bench_maskalign.py``
and ``test_bench_ops.py``
(``--benchmark-json``), the JSON of ``gpu.py ops``
and ``gpu.py model`` (``--json``), and the ``run.json`` that ``fastmae bench`` writes (the command,
its tier, its duration, whether CUDA was asked for and present). ``fastmae bench`` calls
``render()`` on its output folder.

What ``report.md`` holds:

- what the results were measured on (``environment.describe()``, recorded in every JSON): machine,
  date, versions, allocator settings, fused-op backend; and what the run measured (configurations,
  batches, rounds), read from the results themselves;
- the training step per configuration, precision and provider (fast/reference, eager/compiled):
  median step time, images/s, speed-ups, the share of the matmul ceiling (the step's FLOPs at the
  rate of a large ``torch.mm`` in the same precision, sampled in the same cycles), compile time and
  the step's peak memory;
- the fine-tuning step of the classifier, fastmae against timm (eager and compiled, fp32 and
  bf16): step time, images/s, speed-ups over timm, the share of the matmul ceiling, compile time
  and the step's peak memory in a fresh process (``memory.py --model finetune``); and feature
  extraction (eval, ``no_grad``: what linear probing and k-NN run), images/s, fastmae against timm;
- the VideoMAE pre-training step, fast against its reference twin (eager and compiled, fp32 and
  bf16): clips/s, step time, speed-ups, the share of the matmul ceiling, compile time and the
  step's peak memory in a fresh process (``memory.py --model video``);
- the MaskAlign pre-training step, the fast student against its reference twin with the same frozen
  teacher (eager and compiled, fp32 and bf16), and the teacher's forward alone: images/s, step time,
  speed-ups of the whole step and of the student's part, the teacher's share of the step, the share
  of the matmul ceiling, compile time and the step's peak memory in a fresh process (``memory.py
  --model maskalign``);
- the fused ops against their eager and compiled references: median times, speed-ups, the op's
  minimal bytes per second against the copy bandwidth measured in the same test, page faults per
  call, and the byte floor projected for an H100 (3.35 TB/s datasheet: a projection, never a
  measurement);
- where present (the full tier): the step's GEMMs alone, attention per backend, the optimizer
  alone, and peak memory in a fresh process per variant;
- CUDA: the same tables from ``gpu.py``, or "no CUDA device".

Plots (``train_step_<device>.png``, ``peak_memory_<device>.png``, ``ops_<device>.png``,
``finetune_step_<device>.png``, ``finetune_peak_memory_<device>.png``, ``features_<device>.png``,
``video_step_<device>.png``, ``video_peak_memory_<device>.png``, ``maskalign_step_<device>.png``,
``maskalign_peak_memory_<device>.png``) need
matplotlib (``pip install "fastmae[bench]"``); without it the report says so and keeps its tables.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import statistics
import sys

from fastmae.bench.environment import NO_CUDA, allocator_label

H100_BYTES_PER_S = 3.35e12
STEP_PROVIDERS = ("fast-compiled", "ref-compiled", "fast-eager", "ref-eager")
FINETUNE_PROVIDERS = ("fast-compiled", "timm-compiled", "fast-eager", "timm-eager")
FEATURE_PROVIDERS = ("fast", "timm")
VIDEO_PROVIDERS = STEP_PROVIDERS
MASKALIGN_PROVIDERS = STEP_PROVIDERS + ("teacher-only",)
OP_NAMES = ("gather_mask", "unshuffle_scatter", "norm_mse_loss")
OP_PROVIDERS = ("fastmae", "eager", "compiled")
NO_MATPLOTLIB = "matplotlib is not installed (pip install \"fastmae[bench]\"): no plots"


# ---------------------------------------------------------------------------- loading
@dataclasses.dataclass
class Results:
    """Every result of the given files, in rows of one shape per kind whatever the device."""

    envs: list = dataclasses.field(default_factory=list)  # environment.describe() per file, with "file"
    runs: list = dataclasses.field(default_factory=list)  # run.json records
    steps: list = dataclasses.field(default_factory=list)  # one row per (step test, provider)
    ops: list = dataclasses.field(default_factory=list)  # one row per op test
    memory: list = dataclasses.field(default_factory=list)  # fresh-process peak memory (memory.py)
    gemm_bound: list = dataclasses.field(default_factory=list)
    attention: list = dataclasses.field(default_factory=list)
    optimizer: list = dataclasses.field(default_factory=list)
    finetune: list = dataclasses.field(default_factory=list)  # one row per (fine-tuning step test, provider)
    features: list = dataclasses.field(default_factory=list)  # one row per (feature test, provider)
    finetune_memory: list = dataclasses.field(default_factory=list)  # fresh-process peak of the fine-tuning step
    video: list = dataclasses.field(default_factory=list)  # one row per (VideoMAE step test, provider)
    video_memory: list = dataclasses.field(default_factory=list)  # fresh-process peak of the VideoMAE step
    maskalign: list = dataclasses.field(default_factory=list)  # one row per (MaskAlign step test, provider)
    maskalign_memory: list = dataclasses.field(default_factory=list)  # fresh-process peak of the MaskAlign step
    loader: list = dataclasses.field(default_factory=list)  # loader.json records (bench/loader.py)
    files: list = dataclasses.field(default_factory=list)

    def devices(self, kind: str) -> list[str]:
        return sorted({r["device"] for r in getattr(self, kind)})


def _json_files(paths) -> list[str]:
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(glob.glob(os.path.join(path, "*.json")))
        else:
            files.append(path)
    return files


def load(paths) -> Results:
    res = Results()
    for path in _json_files(paths):
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict):
            continue
        if data.get("kind") == "fastmae-bench-run":
            res.runs.append(data)
        elif data.get("kind") == "fastmae-bench-loader":
            res.files.append(path)
            res.loader.append(data)
        elif "benchmarks" in data:
            res.files.append(path)
            _load_pytest_benchmark(res, path, data)
        elif isinstance(data.get("rows"), list):
            res.files.append(path)
            _load_gpu(res, path, data)
    for run in res.runs:  # the command's own view, after the results' (which say what each suite ran on)
        if run.get("environment"):
            res.envs.append(dict(run["environment"], file=os.path.basename(path), device="cpu"))
    return res


def _load_pytest_benchmark(res: Results, path: str, data: dict) -> None:
    mi = data.get("machine_info", {})
    env = dict(mi.get("fastmae") or {})
    if not env:  # a JSON written without bench/conftest.py: what pytest-benchmark itself recorded
        env = dict(cpu=mi.get("cpu", {}).get("brand_raw", mi.get("processor", "?")),
                   cores=mi.get("cpu", {}).get("count"), date=data.get("datetime"))
    env.update(file=os.path.basename(path), device="cpu")
    res.envs.append(env)
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        kind = info.get("kind")
        if kind == "train_step":
            _add_cpu_steps(res, info)
        elif kind == "memory":
            res.memory.append(dict(info, device="cpu", allocator=allocator_label(info.get("env", {}))))
        elif kind == "finetune_step":
            _add_finetune_steps(res, info)
        elif kind == "features":
            _add_features(res, info)
        elif kind == "finetune_memory":
            res.finetune_memory.append(dict(info, device="cpu", allocator=allocator_label(info.get("env", {}))))
        elif kind == "video_step":
            _add_video_steps(res, info)
        elif kind == "video_memory":
            res.video_memory.append(dict(info, device="cpu", allocator=allocator_label(info.get("env", {}))))
        elif kind == "maskalign_step":
            _add_maskalign_steps(res, info)
        elif kind == "maskalign_memory":
            res.maskalign_memory.append(dict(info, device="cpu", allocator=allocator_label(info.get("env", {}))))
        elif kind in ("gemm_bound", "attention", "optimizer"):
            getattr(res, kind).append(dict(info, allocator=allocator_label(info.get("env", {}))))
        elif "op" in info and "providers" in info:
            _add_cpu_op(res, info)


def _add_cpu_steps(res: Results, info: dict) -> None:
    alloc = allocator_label(info.get("env", {}))
    for provider, s in info["providers"].items():
        res.steps.append(dict(
            device="cpu", allocator=alloc, config=info["config"], config_title=info.get("config_title"),
            batch=info["batch"], precision=info["precision"], provider=provider, step_s=s["median_s"],
            images_per_s=s["images_per_s"], pct_ceiling=s.get("pct_of_ceiling"), compile_s=s.get("compile_s"),
            peak_bytes=s.get("tensor_peak_bytes"), peak_method="live tensors at the step's high-water mark",
            mm_rate=info.get("mm_rate"), mm_desc=f"{info['precision']} torch.mm {info.get('mm_n')}^3",
            mm_samples=len(info.get("mm_rates", [])), flops_per_image=info.get("flops_per_image"),
            rounds=info.get("rounds"), warmup=info.get("warmup"), tier=info.get("tier")))


def _add_finetune_steps(res: Results, info: dict) -> None:
    alloc = allocator_label(info.get("env", {}))
    for provider, s in info["providers"].items():
        res.finetune.append(dict(
            device="cpu", allocator=alloc, config=info["config"], config_title=info.get("config_title"),
            batch=info["batch"], precision=info["precision"], provider=provider, step_s=s["median_s"],
            images_per_s=s["images_per_s"], pct_ceiling=s.get("pct_of_ceiling"), compile_s=s.get("compile_s"),
            mm_rate=info.get("mm_rate"), mm_desc=f"{info['precision']} torch.mm {info.get('mm_n')}^3",
            mm_samples=len(info.get("mm_rates", [])), flops_per_image=info.get("flops_per_image"),
            logit_diff=info.get("max_abs_logit_diff"), timm=info.get("timm"),
            rounds=info.get("rounds"), warmup=info.get("warmup"), tier=info.get("tier")))


def _add_features(res: Results, info: dict) -> None:
    alloc = allocator_label(info.get("env", {}))
    for provider, s in info["providers"].items():
        res.features.append(dict(
            device="cpu", allocator=alloc, config=info["config"], config_title=info.get("config_title"),
            batch=info["batch"], precision=info["precision"], mode=info["mode"], provider=provider,
            call_s=s["median_s"], images_per_s=s["images_per_s"], feature_diff=info.get("max_abs_feature_diff"),
            timm=info.get("timm"), rounds=info.get("rounds"), warmup=info.get("warmup"), tier=info.get("tier")))


def _add_video_steps(res: Results, info: dict) -> None:
    """One row per provider; ``images_per_s`` and ``flops_per_image`` hold clips/s and FLOPs per
    clip, so the step plots serve both."""
    alloc = allocator_label(info.get("env", {}))
    for provider, s in info["providers"].items():
        res.video.append(dict(
            device="cpu", allocator=alloc, config=info["config"], config_title=info.get("config_title"),
            batch=info["batch"], precision=info["precision"], provider=provider, step_s=s["median_s"],
            images_per_s=s["clips_per_s"], pct_ceiling=s.get("pct_of_ceiling"), compile_s=s.get("compile_s"),
            mm_rate=info.get("mm_rate"), mm_desc=f"{info['precision']} torch.mm {info.get('mm_n')}^3",
            mm_samples=len(info.get("mm_rates", [])), flops_per_image=info.get("flops_per_clip"),
            loss_rel_diff=info.get("loss_rel_diff"), output_diff=info.get("max_abs_output_diff"),
            num_masked=info.get("num_masked"),
            num_tokens=info.get("num_tokens"), rounds=info.get("rounds"), warmup=info.get("warmup"),
            tier=info.get("tier")))


def _add_maskalign_steps(res: Results, info: dict) -> None:
    """One row per provider (the four student providers and teacher-only); ``flops_per_image`` is
    the whole step's (the teacher's own for teacher-only, whose row also carries the step's)."""
    alloc = allocator_label(info.get("env", {}))
    for provider, s in info["providers"].items():
        teacher = provider == "teacher-only"
        res.maskalign.append(dict(
            device="cpu", allocator=alloc, config=info["config"], config_title=info.get("config_title"),
            batch=info["batch"], precision=info["precision"], provider=provider, step_s=s["median_s"],
            images_per_s=s["images_per_s"], pct_ceiling=s.get("pct_of_ceiling"), compile_s=s.get("compile_s"),
            teacher_share=s.get("teacher_share"),
            mm_rate=info.get("mm_rate"), mm_desc=f"{info['precision']} torch.mm {info.get('mm_n')}^3",
            mm_samples=len(info.get("mm_rates", [])),
            flops_per_image=info.get("teacher_flops_per_image") if teacher else info.get("flops_per_image"),
            step_flops_per_image=info.get("flops_per_image"),
            teacher_flops_per_image=info.get("teacher_flops_per_image"),
            loss_rel_diff=info.get("loss_rel_diff"), num_kept=info.get("num_kept"),
            num_patches=info.get("num_patches"), mask_ratio=info.get("mask_ratio"), teacher=info.get("teacher"),
            rounds=info.get("rounds"), warmup=info.get("warmup"), tier=info.get("tier")))


def maskalign_peaks(res: Results) -> dict:
    """``{(config, batch, precision, allocator, variant): fresh-process memory row}``."""
    return {(m["config"], m["batch"], m["precision"], m["allocator"], m["variant"]): m for m in res.maskalign_memory}


def video_peaks(res: Results) -> dict:
    """``{(config, batch, precision, allocator, variant): fresh-process memory row}``."""
    return {(m["config"], m["batch"], m["precision"], m["allocator"], m["variant"]): m for m in res.video_memory}


def finetune_peaks(res: Results) -> dict:
    """``{(config, batch, precision, allocator, variant): fresh-process memory row}``."""
    return {(m["config"], m["batch"], m["precision"], m["allocator"], m["variant"]): m for m in res.finetune_memory}


def _add_cpu_op(res: Results, info: dict) -> None:
    prov = info["providers"]
    copy = prov.get("copy")
    shape = info.get("shape", {})
    res.ops.append(dict(
        device="cpu", allocator=allocator_label(info.get("allocator", {})), op=info["op"], mode=info["mode"],
        dtype=info["dtype"], fastmae_label=f"fastmae ({info.get('backend', 'cpp')})",
        N=shape.get("N"), shape=shape,
        **{f"{p}_s": prov[p]["median_ms"] / 1e3 if p in prov else None for p in OP_PROVIDERS},
        faults={p: prov[p].get("faults_per_call") for p in prov},
        bytes=info["bytes"], copy_Bps=info["copy_bytes"] / (copy["median_ms"] / 1e3) if copy else None,
        copy_desc=f"dst.copy_(src) of {info['copy_bytes'] / 2 / 2**20:.0f} MiB in every cycle of the same test",
        input_sets=info.get("input_sets"), llc_bytes=info.get("llc_bytes"),
        rounds=info.get("rounds") or min((p.get("rounds", 0) for p in prov.values()), default=None),
        warmup=info.get("warmup"), tier=info.get("tier")))


def _load_gpu(res: Results, path: str, data: dict) -> None:
    rows = data["rows"]
    env = dict(data.get("environment") or {})
    env.setdefault("torch", data.get("torch"))
    env.setdefault("triton", data.get("triton"))
    env.update(file=os.path.basename(path), device="cuda", cuda_device=data.get("device"))
    res.envs.append(env)
    alloc = "CUDA caching allocator"
    for r in rows:
        if "provider" in r and "step_ms" in r:  # gpu.py model
            flops = None
            if r.get("pct_ceiling") and r.get("mm_tflops"):  # pct = 100 flops*batch / step / mm rate
                flops = r["pct_ceiling"] / 100 * r["mm_tflops"] * 1e12 * (r["step_ms"] / 1e3) / r["batch"]
            res.steps.append(dict(
                device="cuda", allocator=alloc, config=r["config"], config_title=None, batch=r["batch"],
                precision=r["precision"], provider=r["provider"], step_s=r["step_ms"] / 1e3,
                images_per_s=r["img_per_s"], pct_ceiling=r.get("pct_ceiling"),
                compile_s=r.get("compile_s") if "compiled" in r["provider"] else None,
                peak_bytes=r["peak_gib"] * 2**30 if r.get("peak_gib") is not None else None,
                peak_method="torch.cuda.max_memory_allocated over one step",
                mm_rate=r["mm_tflops"] * 1e12 if r.get("mm_tflops") else None,
                mm_desc=f"{r['precision']} 8192^3 matmul", mm_samples=None, flops_per_image=flops,
                rounds=(data.get("args") or {}).get("rounds"), warmup=3, tier=None))
        elif "op" in r and "triton_ms" in r:  # gpu.py ops
            res.ops.append(dict(
                device="cuda", allocator=alloc, op=r["op"], mode=r["mode"], dtype=r["dtype"],
                fastmae_label="fastmae (triton)", N=r.get("N"), shape=dict(N=r.get("N")),
                fastmae_s=r["triton_ms"] / 1e3, eager_s=r.get("eager_ms", 0) / 1e3 or None,
                compiled_s=r.get("compiled_ms", 0) / 1e3 or None, faults={}, bytes=r["bytes"],
                copy_Bps=r.get("copy_bytes_per_s"), copy_desc="1 GiB device-to-device copy in the same run",
                host_s=r.get("triton_host_ms", 0) / 1e3 or None, input_sets=None, llc_bytes=None,
                rounds=None, warmup=None, tier=None))


# ---------------------------------------------------------------------------- formatting
def markdown_table(headers, rows, numeric_from: int) -> list[str]:
    """Lines of a markdown table. Columns from ``numeric_from`` on are right-aligned (the numbers);
    cells are rendered with ``str``, so format numbers before passing them."""
    def line(cells):
        return "| " + " | ".join(str(c) for c in cells) + " |"

    align = ["---" if k < numeric_from else "---:" for k in range(len(headers))]
    return [line(headers), "|" + "|".join(align) + "|"] + [line(r) for r in rows]


def _f(x, spec=".2f"):
    return "n/a" if x is None else format(x, spec)


def _ratio(a, b):
    return a / b if a and b else None


def _sig(x: float) -> str:
    """3 significant figures, no exponent for the magnitudes of these reports."""
    if x is None:
        return "n/a"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def _env_for(res: Results, device: str) -> dict:
    for e in res.envs:
        if e.get("device") == device:
            return e
    return res.envs[0] if res.envs else {}


def machine_line(env: dict, device: str = "cpu") -> str:
    """``AMD EPYC, 2 cores, 2026-12-05`` (the CPU) or the CUDA device's name, and the date."""
    date = (env.get("date") or "")[:10] or "date not recorded"
    if device == "cuda":
        return f"{env.get('cuda_device') or 'CUDA device'}, {date}"
    cores = env.get("usable_cores") or env.get("cores")
    return f"{env.get('cpu') or 'CPU not recorded'}, {cores if cores is not None else '?'} cores, {date}"


# ---------------------------------------------------------------------------- report sections
def _header(res: Results, plots_note: str | None) -> list[str]:
    run = res.runs[-1] if res.runs else {}
    cpu_env = _env_for(res, "cpu")
    rows = [("date", cpu_env.get("date") or "?")]
    cores = cpu_env.get("cores")
    usable = cpu_env.get("usable_cores")
    rows.append(("machine", f"{cpu_env.get('cpu', '?')}; {cores if cores is not None else '?'} logical cores"
                 + (f" ({usable} usable)" if usable and usable != cores else "")
                 + (f"; torch threads {cpu_env['torch_threads']}" if cpu_env.get("torch_threads") else "")))
    cuda_envs = [e for e in res.envs if e.get("device") == "cuda"]
    if cuda_envs:
        gpu = ", ".join(sorted({e.get("cuda_device") or "?" for e in cuda_envs}))
    elif run.get("cuda", {}).get("requested") and not run["cuda"].get("available"):
        gpu = NO_CUDA
    else:
        gpu = cpu_env.get("cuda_device") or (NO_CUDA if "cuda_device" in cpu_env else "not recorded")
    rows.append(("GPU", gpu))
    versions = sorted({(e.get("fastmae"), e.get("torch"), e.get("triton"), e.get("python")) for e in res.envs
                       if e.get("torch")})
    rows.append(("versions", "; ".join(f"fastmae {v[0] or '?'}, torch {v[1] or '?'}, triton {v[2] or 'not installed'}"
                                        + (f", python {v[3]}" if v[3] else "") for v in versions) or "not recorded"))
    paths = sorted({e["fastmae_path"] for e in res.envs if e.get("fastmae_path")})
    if paths:
        rows.append(("fastmae from", ", ".join(paths)))
    allocs = sorted({r["allocator"] for r in res.steps + res.ops + res.memory + res.finetune + res.features
                     + res.finetune_memory + res.video + res.video_memory + res.maskalign + res.maskalign_memory
                     if r["device"] == "cpu"})
    rows.append(("allocator (CPU)", "; ".join(_allocator_text(a) for a in allocs) or "n/a"))
    backends = []
    if any(r["device"] == "cpu" for r in res.steps + res.video + res.maskalign):
        forced = cpu_env.get("forced_backend")
        backends.append(f"training step on CPU: {cpu_env.get('cpu_backend', '?')} (fastmae's choice for CPU "
                        f"tensors{'; FASTMAE_BACKEND=' + forced if forced else ''})")
    if any(r["device"] == "cpu" for r in res.ops):
        backends.append("ops suite on CPU: cpp (forced), against plain-torch references")
    if cuda_envs:
        backends.append("CUDA: triton")
    rows.append(("fused-op backend", "; ".join(backends) or "n/a"))
    if cpu_env.get("cpp_extension_error"):
        rows.append(("C++ extension", f"unavailable: {cpu_env['cpp_extension_error']}"))
    if run:
        rows.append(("command", f"`{run.get('command', '?')}`"))
        if run.get("duration_s") is not None:
            rows.append(("duration", f"{run['duration_s'] / 60:.1f} min" + (
                " (" + ", ".join(f"{k} {v / 60:.1f} min" for k, v in run.get("suite_durations_s", {}).items()) + ")"
                if run.get("suite_durations_s") else "")))
        loads = {k: v for k, v in run.get("suite_loadavg", {}).items() if v is not None}
        if loads:
            rows.append(("load average", "1-minute load average as each suite started (the suite itself not yet "
                         "running: well above 0 means other work shared the machine): "
                         + ", ".join(f"{k} {v:.1f}" for k, v in loads.items())))
        failed = [f"{k}: {v if isinstance(v, str) else f'exit code {v}'}"
                  for k, v in run.get("suite_returncodes", {}).items() if v not in (0, None)]
        if failed:
            rows.append(("failed suites", "; ".join(failed) + " (each suite's log is beside this report, as "
                                                              "<suite>.log; the tables hold what was recorded)"))
    if plots_note:
        rows.append(("plots", plots_note))
    title = "# fastmae benchmarks" + (f" ({run['tier']} tier)" if run.get("tier") else "")
    lines = [title, ""] + markdown_table(["", ""], rows, numeric_from=2) + [""]
    lines += ["What this run measured:", ""] + [f"- {t}" for t in _measured(res, run)] + [""]
    if any(r["device"] == "cpu" for r in res.steps + res.ops + res.finetune + res.features + res.video
           + res.maskalign):
        lines += ["Every CPU figure is a median over rounds in which the compared providers ran side by side, in "
                  "an order rotated every round; compare ratios within one table, not across runs (PERF.md).", ""]
    return lines


def _allocator_text(label: str) -> str:
    if label == "default":
        return "default (glibc malloc, no MALLOC_* settings)"
    if label.startswith("tuned"):
        return label.replace("tuned", "tuned (MALLOC_MMAP_THRESHOLD_=MALLOC_TRIM_THRESHOLD_=4294967296)", 1)
    return label


def _suite_measured(rows: list, providers, what: str, per: str = "", extra=lambda rs: "",
                    tail=lambda rs: "") -> list[str]:
    """What a side-by-side step suite's CPU rows cover, a line per configuration and batch."""
    rows = [r for r in rows if r["device"] == "cpu"]
    out = []
    for config, batch in sorted({(r["config"], r["batch"]) for r in rows}):
        rs = [r for r in rows if r["config"] == config and r["batch"] == batch]
        title = next((r["config_title"] for r in rs if r.get("config_title")), config)
        precisions = sorted({r["precision"] for r in rs}, key=_precision_rank)
        out.append(f"{what} (CPU): {config} = {title}, batch {batch}{per}, {' and '.join(precisions)}; providers "
                   f"{', '.join(_ordered({r['provider'] for r in rs}, providers))}{extra(rs)}; timed rounds: "
                   f"{_span(r['rounds'] for r in rs)}, after the first call (compilation) and "
                   f"{_span(r['warmup'] for r in rs)} warm-up round(s); matmul ceiling sampled once per round"
                   + tail(rs))
    return out


def _memory_measured(mem: list, providers, what: str, model: str) -> list[str]:
    """What a suite's fresh-process peaks (``memory.py --model MODEL``) cover, one line."""
    if not mem:
        return []
    return [f"peak memory of the {what} in a fresh process (memory.py --model {model}): "
            f"{', '.join(_ordered({m['variant'] for m in mem}, providers))}; inductor cache "
            f"{', '.join(sorted({m.get('inductor_cache', 'fresh') for m in mem}))}"]


def _measured(res: Results, run: dict) -> list[str]:
    """What the results cover, read from the results themselves."""
    out = []
    if run.get("description"):
        out.append(run["description"])
    out += _suite_measured(res.steps, STEP_PROVIDERS, "training step", tail=lambda rs: (
        f" ({rs[0]['mm_desc'].split(' ', 1)[1]}); peak memory: one more step per provider under the profiler, in the "
        f"same process"))
    out += _suite_measured(res.finetune, FINETUNE_PROVIDERS, "fine-tuning step", extra=lambda rs: (
        f" (timm {', '.join(sorted({r['timm'] for r in rs if r.get('timm')}))})" if any(r.get("timm") for r in rs)
        else ""))
    feats = [r for r in res.features if r["device"] == "cpu"]
    for config, batch in sorted({(r["config"], r["batch"]) for r in feats}):
        rs = [r for r in feats if r["config"] == config and r["batch"] == batch]
        out.append(f"feature extraction (CPU): {config}, batch {batch}, eval mode under no_grad, "
                   f"{' and '.join(sorted({r['precision'] for r in rs}, key=_precision_rank))}, "
                   f"{' and '.join(sorted({r['mode'] for r in rs}, reverse=True))}; fastmae against timm; timed "
                   f"rounds: {_span(r['rounds'] for r in rs)}")
    out += _memory_measured(res.finetune_memory, FINETUNE_PROVIDERS, "fine-tuning step", "finetune")
    out += _suite_measured(res.video, VIDEO_PROVIDERS, "VideoMAE pre-training step", per=" clip(s)")
    out += _memory_measured(res.video_memory, VIDEO_PROVIDERS, "VideoMAE step", "video")
    out += _suite_measured(res.maskalign, MASKALIGN_PROVIDERS, "MaskAlign pre-training step")
    out += _memory_measured(res.maskalign_memory, MASKALIGN_PROVIDERS, "MaskAlign step", "maskalign")
    if res.memory:
        variants = sorted({m["variant"] for m in res.memory})
        out.append(f"peak memory in a fresh process (memory.py): {len(variants)} variants ({', '.join(variants)})")
    ops = [r for r in res.ops if r["device"] == "cpu"]
    if ops:
        shape = ops[0]["shape"]
        shape_text = ", ".join(f"{k}={v}" for k, v in shape.items())
        vitb = (" (ViT-B/16 MAE at 224, batch 64)" if (shape.get("N"), shape.get("H"), shape.get("D")) == (64, 224, 512)
                else "")
        out.append(f"fused ops (CPU): {', '.join(_ordered({r['op'] for r in ops}, OP_NAMES))} at {shape_text}{vitb}; "
                   f"modes {', '.join(sorted({r['mode'] for r in ops}))} "
                   f"(full = forward + backward); {', '.join(sorted({r['dtype'] for r in ops}, key=_precision_rank))}; "
                   f"timed rounds: {_span(r['rounds'] for r in ops)}, after {_span(r['warmup'] for r in ops)} warm-up "
                   f"cycle(s); copy bandwidth: {ops[0]['copy_desc']}; {_span(r['input_sets'] for r in ops)} input sets "
                   f"in turn per test (cold caches)")
    for dev in ("cuda",):
        if any(r["device"] == dev for r in res.steps + res.ops):
            cfgs = sorted({(r["config"], r["batch"]) for r in res.steps if r["device"] == dev})
            out.append("CUDA: " + "; ".join(
                [f"training step {c} batch {b}" for c, b in cfgs]
                + [f"fused ops at N={n}" for n in sorted({r['N'] for r in res.ops if r['device'] == dev})]))
    return out or ["nothing (no results in the given files)"]


def _precision_rank(name: str) -> int:
    return ("fp32", "bf16").index(name) if name in ("fp32", "bf16") else 9


def _span(values) -> str:
    vals = sorted({v for v in values if v is not None})
    if not vals:
        return "?"
    return str(vals[0]) if len(vals) == 1 else f"{vals[0]}-{vals[-1]}"


def _ordered(names, order) -> list[str]:
    return [n for n in order if n in names] + sorted(n for n in names if n not in order)


def _multi_alloc(rows) -> bool:
    return len({r["allocator"] for r in rows}) > 1


def _step_section(res: Results, device: str, plots: dict) -> list[str]:
    rows = [r for r in res.steps if r["device"] == device]
    lines = [f"## Training step ({device.upper()})", ""]
    if not rows:
        return lines + ["No training-step results (the suite's log is beside this report).", ""]
    multi = _multi_alloc(rows)
    lines += ["Forward + backward + fused AdamW, fast against reference (same weights, images and mask ratio "
              "0.75). \"x ref-eager\" and \"x ref-compiled\" are speed-ups over the reference in the same "
              "precision; \"% of ceiling\" is the step's matmul FLOPs per second as a share of the matmul "
              "rate measured in the same run; peak memory is bytes of live tensors at the step's high-water "
              "mark" + (" (CPU: resting state plus the step's own peak from the profiler)" if device == "cpu"
                        else " (torch.cuda.max_memory_allocated)") + "; \"peak x ref\" compares with the "
              "reference in the same mode (eager or compiled).", ""]
    groups = {}
    for r in rows:
        groups.setdefault((r["config"], r["batch"], r["precision"], r["allocator"]), []).append(r)
    table = []
    for (config, batch, precision, alloc), rs in sorted(groups.items(), key=lambda kv: (
            kv[0][0], kv[0][1], _precision_rank(kv[0][2]), kv[0][3])):
        by = {r["provider"]: r for r in rs}
        for name in _ordered(set(by), STEP_PROVIDERS):
            r = by[name]
            ref_e, ref_c = by.get("ref-eager"), by.get("ref-compiled")
            mode_ref = by.get("ref-compiled" if "compiled" in name else "ref-eager")
            table.append([config, batch, precision] + ([alloc] if multi else []) + [
                name, _sig(r["step_s"] * 1e3), _sig(r["images_per_s"]),
                _f(_ratio(ref_e and ref_e["step_s"], r["step_s"])), _f(_ratio(ref_c and ref_c["step_s"], r["step_s"])),
                _f(r["pct_ceiling"], ".0f"), _f(r["compile_s"], ".1f"),
                _f(r["peak_bytes"] and r["peak_bytes"] / 2**20, ".0f"),
                _f(_ratio(r["peak_bytes"], mode_ref and mode_ref["peak_bytes"]))])
    headers = ["config", "batch", "precision"] + (["allocator"] if multi else []) + [
        "provider", "step ms", "images/s", "x ref-eager", "x ref-compiled", "% of ceiling", "compile s",
        "peak MiB", "peak x ref"]
    lines += markdown_table(headers, table, numeric_from=len(headers) - 8) + [""]
    lines += ["Matmul ceiling (measured in the same run as the steps above):", ""]
    seen = set()
    for (config, batch, precision, alloc), rs in sorted(groups.items(), key=lambda kv: (
            kv[0][0], kv[0][1], _precision_rank(kv[0][2]), kv[0][3])):
        r = rs[0]
        key = (config, batch, precision, alloc)
        if key in seen or not r.get("mm_rate"):
            continue
        seen.add(key)
        ceil_ips = r["mm_rate"] / r["flops_per_image"] if r.get("flops_per_image") else None
        rate = f"{r['mm_rate'] / 1e12:.0f} TFLOP/s" if r["mm_rate"] >= 1e13 else f"{r['mm_rate'] / 1e9:.1f} GFLOP/s"
        lines.append(f"- {config} {precision}" + (f" ({alloc})" if multi else "") + f": {r['mm_desc']} at {rate}"
                     + (f" (median of {r['mm_samples']} samples)" if r.get("mm_samples") else "")
                     + (f"; the step costs {r['flops_per_image'] / 1e9:.2f} GFLOP per image, so the ceiling is "
                        f"{_sig(ceil_ips)} images/s" if ceil_ips else ""))
    lines.append("")
    for key in ("train_step", "peak_memory"):
        if plots.get((key, device)):
            lines += [f"![{key.replace('_', ' ')} ({device})]({plots[(key, device)]})", ""]
    return lines


def _peak_table(mem: list, peaks: dict, providers, base: str, multi: bool) -> list[str]:
    """A step suite's fresh-process peaks (memory.py), a row per variant: its tensor peak against the
    ``base`` implementation's (``timm`` or ``ref``) in the same mode (eager or compiled), the
    resting state (with a "teacher MiB" column where the variants hold a teacher), the step's own
    peak, RSS, the first step's time and the inductor cache."""
    teacher = any(m.get("teacher_bytes") is not None for m in mem)
    rows = []
    for m in sorted(mem, key=lambda m: (m["config"], m["batch"], _precision_rank(m["precision"]), m["allocator"],
                                        providers.index(m["variant"]) if m["variant"] in providers else 9)):
        mode = "compiled" if "compiled" in m["variant"] else "eager"
        ref = peaks.get((m["config"], m["batch"], m["precision"], m["allocator"], f"{base}-{mode}"))
        rss = m.get("rss_step_peak_bytes")
        rows.append([m["config"], m["batch"], m["precision"]] + ([m["allocator"]] if multi else []) + [
            m["variant"], f"{m['tensor_peak_bytes'] / 2**20:.0f}",
            _f(_ratio(m["tensor_peak_bytes"], ref and ref["tensor_peak_bytes"])), f"{m['resting_bytes'] / 2**20:.0f}"]
            + ([_f(m.get("teacher_bytes") and m["teacher_bytes"] / 2**20, ".0f")] if teacher else [])
            + [f"{m['step_peak_bytes'] / 2**20:.0f}", _f(rss and rss / 2**20, ".0f"), _f(m.get("first_step_s"), ".1f"),
               m.get("inductor_cache", "fresh")])
    headers = ["config", "batch", "precision"] + (["allocator"] if multi else []) + [
        "variant", "tensor peak MiB", f"x {base}", "resting MiB"] + (["teacher MiB"] if teacher else []) + [
        "step peak MiB", "RSS step peak MiB", "first step s", "inductor cache"]
    return markdown_table(headers, rows, numeric_from=4 + multi) + [""]


def _plots_and_peaks(kind: str, mem: list, device: str, plots: dict, peaks: dict, providers, base: str,
                     multi: bool, what: str, resting: str = "") -> list[str]:
    """The end of a step suite's section: its two plots (``{kind}_step``, ``{kind}_peak_memory``),
    then its fresh-process peaks (``memory.py --model {kind}``) on ``device``."""
    lines = []
    for key in (f"{kind}_step", f"{kind}_peak_memory"):
        if plots.get((key, device)):
            lines += [f"![{key.replace('_', ' ')} ({device})]({plots[(key, device)]})", ""]
    mem = [m for m in mem if m["device"] == device]
    if mem:
        lines += [f"Peak memory of {what}, one fresh process per variant (memory.py --model {kind}; {resting}"
                  "\"first step s\" includes compilation, cold when the inductor cache is fresh; RSS includes the "
                  "interpreter, libraries and what malloc keeps):", ""]
        lines += _peak_table(mem, peaks, providers, base, multi)
    return lines


def _by_setting(rows: list) -> list:
    """Step rows grouped by (config, batch, precision, allocator), in report order."""
    groups = {}
    for r in rows:
        groups.setdefault((r["config"], r["batch"], r["precision"], r["allocator"]), []).append(r)
    return sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], _precision_rank(kv[0][2]), kv[0][3]))


def _finetune_section(res: Results, device: str, plots: dict) -> list[str]:
    """The fine-tuning step, fastmae against timm, with the fresh-process peak of each provider,
    then feature extraction."""
    rows = [r for r in res.finetune if r["device"] == device]
    lines = [f"## Fine-tuning step ({device.upper()}): fastmae's classifier against timm", ""]
    if not rows:
        lines += ["No fine-tuning results (the suite's log is beside this report).", ""]
        return lines + _features_section(res, device, plots)
    multi = _multi_alloc(rows)
    peaks = finetune_peaks(res)
    lines += ["Forward with global pooling + cross-entropy on random labels + backward + fused AdamW, fastmae's "
              "classifier (fastmae.vit) against timm's VisionTransformer of the same architecture (same weights, "
              "images and labels). \"x timm-eager\" and \"x timm-compiled\" are speed-ups over timm in the same "
              "precision (above 1: fastmae faster); \"% of ceiling\" is the step's counted FLOPs per second as a "
              "share of the matmul rate measured in the same run; \"peak MiB\" is bytes of live tensors at the "
              "step's high-water mark in a fresh process (memory.py --model finetune: resting state plus the "
              "step's own peak from the profiler), \"peak x timm\" against timm in the same mode (eager or "
              "compiled).", ""]
    order = _by_setting(rows)
    table = []
    for (config, batch, precision, alloc), rs in order:
        by = {r["provider"]: r for r in rs}
        for name in _ordered(set(by), FINETUNE_PROVIDERS):
            r = by[name]
            timm_e, timm_c = by.get("timm-eager"), by.get("timm-compiled")
            mode = "compiled" if "compiled" in name else "eager"
            peak = peaks.get((config, batch, precision, alloc, name))
            timm_peak = peaks.get((config, batch, precision, alloc, f"timm-{mode}"))
            peak_b = peak and peak["tensor_peak_bytes"]
            table.append([config, batch, precision] + ([alloc] if multi else []) + [
                name, _sig(r["step_s"] * 1e3), _sig(r["images_per_s"]),
                _f(_ratio(timm_e and timm_e["step_s"], r["step_s"])),
                _f(_ratio(timm_c and timm_c["step_s"], r["step_s"])),
                _f(r["pct_ceiling"], ".0f"), _f(r["compile_s"], ".1f"),
                _f(peak_b and peak_b / 2**20, ".0f"), _f(_ratio(peak_b, timm_peak and timm_peak["tensor_peak_bytes"]))])
    headers = ["config", "batch", "precision"] + (["allocator"] if multi else []) + [
        "provider", "step ms", "images/s", "x timm-eager", "x timm-compiled", "% of ceiling", "compile s",
        "peak MiB", "peak x timm"]
    lines += markdown_table(headers, table, numeric_from=len(headers) - 8) + [""]
    lines += ["Matmul ceiling and checks (the same run as the steps above):", ""]
    for (config, batch, precision, alloc), rs in order:
        r = rs[0]
        if not r.get("mm_rate"):
            continue
        ceil_ips = r["mm_rate"] / r["flops_per_image"] if r.get("flops_per_image") else None
        lines.append(f"- {config} {precision}" + (f" ({alloc})" if multi else "")
                     + f": {r['mm_desc']} at {r['mm_rate'] / 1e9:.1f} GFLOP/s"
                     + (f" (median of {r['mm_samples']} samples)" if r.get("mm_samples") else "")
                     + (f"; the step costs {r['flops_per_image'] / 1e9:.2f} GFLOP per image (counted), so the "
                        f"ceiling is {_sig(ceil_ips)} images/s" if ceil_ips else "")
                     + (f"; fp32 logits of fastmae and timm on the batch differ by at most {r['logit_diff']:.2g}"
                        if r.get("logit_diff") is not None else ""))
    lines.append("")
    lines += _plots_and_peaks("finetune", res.finetune_memory, device, plots, peaks, FINETUNE_PROVIDERS, "timm",
                              multi, "the fine-tuning step")
    return lines + _features_section(res, device, plots)


def _video_section(res: Results, device: str, plots: dict) -> list[str]:
    """The VideoMAE pre-training step, fast against reference: a table per configuration,
    precision (and allocator), with the fresh-process peak of each provider."""
    rows = [r for r in res.video if r["device"] == device]
    lines = [f"## VideoMAE pre-training step ({device.upper()}): fastmae's model against its reference twin", ""]
    if not rows:
        return lines + ["No VideoMAE results (the suite's log is beside this report).", ""]
    multi = _multi_alloc(rows)
    peaks = video_peaks(res)
    lines += ["Forward on tube-masked clips (ratio 0.9) + the loss (normalised targets) + backward + fused "
              "AdamW, fastmae's PretrainVisionTransformer with its fused videomae_loss against its plain-PyTorch "
              "twin (reference_impl=True: the official computation) with the official script's loss as written "
              "(the targets of the whole clip, then the masked ones), same weights, clips and masks: the step "
              "VideoMAE's users run. \"x ref-eager\" and \"x ref-compiled\" "
              "are speed-ups over the reference in the same precision (above 1: fastmae faster); \"% of "
              "ceiling\" is the step's counted FLOPs per second as a share of the matmul rate measured in the "
              "same run; \"peak MiB\" is bytes of live tensors at the step's high-water mark in a fresh process "
              "(memory.py --model video: resting state plus the step's own peak from the profiler), \"peak x "
              "ref\" against the reference in the same mode (eager or compiled).", ""]
    order = _by_setting(rows)
    headers = ["provider", "clips/s", "step ms", "x ref-eager", "x ref-compiled", "% of ceiling", "compile s",
               "peak MiB", "peak x ref"]
    for (config, batch, precision, alloc), rs in order:
        by = {r["provider"]: r for r in rs}
        title = next((r["config_title"] for r in rs if r.get("config_title")), config)
        lines += [f"### {config}, batch {batch}, {precision}" + (f", {alloc} allocator" if multi else ""), "",
                  f"{title}.", ""]
        table = []
        for name in _ordered(set(by), VIDEO_PROVIDERS):
            r = by[name]
            ref_e, ref_c = by.get("ref-eager"), by.get("ref-compiled")
            mode = "compiled" if "compiled" in name else "eager"
            peak = peaks.get((config, batch, precision, alloc, name))
            ref_peak = peaks.get((config, batch, precision, alloc, f"ref-{mode}"))
            peak_b = peak and peak["tensor_peak_bytes"]
            table.append([name, _sig(r["images_per_s"]), _sig(r["step_s"] * 1e3),
                          _f(_ratio(ref_e and ref_e["step_s"], r["step_s"])),
                          _f(_ratio(ref_c and ref_c["step_s"], r["step_s"])),
                          _f(r["pct_ceiling"], ".0f"), _f(r["compile_s"], ".1f"),
                          _f(peak_b and peak_b / 2**20, ".0f"),
                          _f(_ratio(peak_b, ref_peak and ref_peak["tensor_peak_bytes"]))])
        lines += markdown_table(headers, table, numeric_from=1) + [""]
        step = {p: by[p]["step_s"] for p in by}
        speedups = [(label, _ratio(step.get(b), step.get(a))) for label, a, b in (
            ("fast-compiled / ref-eager", "fast-compiled", "ref-eager"),
            ("fast-compiled / ref-compiled", "fast-compiled", "ref-compiled"),
            ("fast-eager / ref-eager", "fast-eager", "ref-eager"))]
        lines.append("- speed-ups (clips/s over clips/s): " + "; ".join(f"{label} **{_f(v)}x**" for label, v in speedups
                                                                      if v is not None) + ".")
        r = rs[0]
        if r.get("mm_rate"):
            ceil_cps = r["mm_rate"] / r["flops_per_image"] if r.get("flops_per_image") else None
            lines.append(f"- matmul ceiling: {r['mm_desc']} at {r['mm_rate'] / 1e9:.1f} GFLOP/s"
                         + (f" (median of {r['mm_samples']} samples)" if r.get("mm_samples") else "")
                         + (f"; the step costs {r['flops_per_image'] / 1e9:.2f} GFLOP per clip (counted), so the "
                            f"ceiling is {_sig(ceil_cps)} clips/s" if ceil_cps else "") + ".")
        if r.get("loss_rel_diff") is not None:
            lines.append(f"- check: fp32 losses of the fast and the reference model on the batch differ by "
                         f"{r['loss_rel_diff']:.2g} (relative)"
                         + (f", their outputs by at most {r['output_diff']:.2g}" if r.get("output_diff") is not None
                            else "")
                         + (f"; {r['num_masked']} of {r['num_tokens']} tubelets masked per clip"
                            if r.get("num_masked") and r.get("num_tokens") else "") + ".")
        lines.append("")
    lines += _plots_and_peaks("video", res.video_memory, device, plots, peaks, VIDEO_PROVIDERS, "ref", multi,
                              "the VideoMAE step")
    return lines


def _maskalign_section(res: Results, device: str, plots: dict) -> list[str]:
    """The MaskAlign pre-training step, the fast student against its reference twin with one shared
    teacher, and the teacher alone: a table per configuration, precision (and allocator), with the
    fresh-process peak of each student provider."""
    rows = [r for r in res.maskalign if r["device"] == device]
    lines = [f"## MaskAlign pre-training step ({device.upper()}): fastmae's student against its reference twin", ""]
    if not rows:
        return lines + ["No MaskAlign results (the suite's log is beside this report).", ""]
    multi = _multi_alloc(rows)
    peaks = maskalign_peaks(res)
    lines += ["The frozen teacher's forward (eval, no_grad, with its last attention) + the student's alignment loss "
              "on the visible patches (the README recipe: attentive masking at 0.7, drawn once and the same for "
              "every provider; whitened targets, smooth-L1, top5 levels, linear fusion, linear heads; no drop "
              "path) + backward + fused AdamW, fastmae's MaskAlignViT against its plain-PyTorch twin "
              "(reference_impl=True: the official computation), same weights, images and masks. One teacher "
              "module, eager, serves every provider (as in `fastmae pretrain --compile`, which compiles the "
              "student only); \"teacher-only\" is its forward alone, timed in the same cycles, and \"teacher "
              "%\" its share of each step. \"x ref-eager\" and \"x ref-compiled\" are speed-ups of the whole "
              "step over the reference in the same precision (above 1: fastmae faster); \"% of ceiling\" is the "
              "counted FLOPs per second (the teacher's own for teacher-only) as a share of the matmul rate "
              "measured in the same run; \"peak MiB\" is bytes of live tensors at the step's high-water mark in "
              "a fresh process (memory.py --model maskalign: resting state, the teacher's weights included, plus "
              "the step's own peak from the profiler), \"peak x ref\" against the reference in the same mode. "
              "MAE's own step is the training-step section of the model suite (bench/test_bench_model.py; "
              "FASTMAE_BENCH_CONFIGS=vitb FASTMAE_BENCH_BATCH=8 gives it at this suite's ViT-B batch): render "
              "both JSON files together to see them side by side.", ""]
    order = _by_setting(rows)
    headers = ["provider", "images/s", "step ms", "x ref-eager", "x ref-compiled", "teacher %", "% of ceiling",
               "compile s", "peak MiB", "peak x ref"]
    for (config, batch, precision, alloc), rs in order:
        by = {r["provider"]: r for r in rs}
        title = next((r["config_title"] for r in rs if r.get("config_title")), config)
        lines += [f"### {config}, batch {batch}, {precision}" + (f", {alloc} allocator" if multi else ""), "",
                  f"{title}.", ""]
        table = []
        for name in _ordered(set(by), MASKALIGN_PROVIDERS):
            r = by[name]
            student = name != "teacher-only"
            ref_e, ref_c = by.get("ref-eager"), by.get("ref-compiled")
            mode = "compiled" if "compiled" in name else "eager"
            peak = peaks.get((config, batch, precision, alloc, name)) if student else None
            ref_peak = peaks.get((config, batch, precision, alloc, f"ref-{mode}"))
            peak_b = peak and peak["tensor_peak_bytes"]
            share = r.get("teacher_share")
            table.append([name, _sig(r["images_per_s"]), _sig(r["step_s"] * 1e3),
                          _f(_ratio(ref_e and ref_e["step_s"], r["step_s"]) if student else None),
                          _f(_ratio(ref_c and ref_c["step_s"], r["step_s"]) if student else None),
                          _f(share and 100 * share, ".0f"), _f(r["pct_ceiling"], ".0f"), _f(r["compile_s"], ".1f"),
                          _f(peak_b and peak_b / 2**20, ".0f"),
                          _f(_ratio(peak_b, ref_peak and ref_peak["tensor_peak_bytes"]))])
        lines += markdown_table(headers, table, numeric_from=1) + [""]
        step = {p: by[p]["step_s"] for p in by}
        pairs = (("fast-compiled / ref-eager", "fast-compiled", "ref-eager"),
                 ("fast-compiled / ref-compiled", "fast-compiled", "ref-compiled"),
                 ("fast-eager / ref-eager", "fast-eager", "ref-eager"))
        speedups = [(label, _ratio(step.get(b), step.get(a))) for label, a, b in pairs]
        lines.append("- speed-ups of the whole step (images/s over images/s): "
                     + "; ".join(f"{label} **{_f(v)}x**" for label, v in speedups if v is not None) + ".")
        t = step.get("teacher-only")
        if t is not None:
            student = {p: step[p] - t for p in step if p != "teacher-only"}
            est = [(label, _ratio(student.get(b), student.get(a))) for label, a, b in pairs]
            est = [(label, v) for label, v in est if v is not None]
            if est:
                lines.append("- the student's part alone (each step median minus the teacher-only median, an "
                             "estimate): " + "; ".join(f"{label} {_f(v)}x" for label, v in est) + ".")
        r = next((by[p] for p in _ordered(set(by), MASKALIGN_PROVIDERS) if p != "teacher-only"), rs[0])
        if r.get("mm_rate"):
            flops, tflops = r.get("step_flops_per_image"), r.get("teacher_flops_per_image")
            ceil_ips = r["mm_rate"] / flops if flops else None
            lines.append(f"- matmul ceiling: {r['mm_desc']} at {r['mm_rate'] / 1e9:.1f} GFLOP/s"
                         + (f" (median of {r['mm_samples']} samples)" if r.get("mm_samples") else "")
                         + (f"; the step costs {flops / 1e9:.2f} GFLOP per image (counted on the reference twins)"
                            + (f", {tflops / 1e9:.2f} of them the teacher's forward "
                               f"({100 * tflops / flops:.0f}%)" if tflops else "")
                            + f", so the ceiling is {_sig(ceil_ips)} images/s" if ceil_ips else "") + ".")
        if r.get("loss_rel_diff") is not None:
            lines.append(f"- check: fp32 losses of the fast and the reference student on the batch differ by "
                         f"{r['loss_rel_diff']:.2g} (relative)"
                         + (f"; {r['num_kept']} of {r['num_patches']} patches kept per image (the same for every "
                            f"provider)" if r.get("num_kept") and r.get("num_patches") else "") + ".")
        if r.get("teacher"):
            lines.append(f"- teacher: {r['teacher']}.")
        lines.append("")
    lines += _plots_and_peaks("maskalign", res.maskalign_memory, device, plots, peaks, MASKALIGN_PROVIDERS, "ref",
                              multi, "the MaskAlign step",
                              resting="\"resting MiB\" includes the teacher's weights, \"teacher MiB\"; ")
    return lines


def _features_section(res: Results, device: str, plots: dict) -> list[str]:
    rows = [r for r in res.features if r["device"] == device]
    if not rows:
        return []
    multi = _multi_alloc(rows)
    lines = [f"### Feature extraction ({device.upper()}): linear probing and k-NN", "",
             "The pooled features before the head (fc_norm of the mean patch token), eval mode, torch.no_grad: "
             "fastmae's forward_features against timm's forward_head(forward_features(x), pre_logits=True), side "
             "by side in rotated rounds. \"fastmae / timm\" is fastmae's images/s over timm's (above 1: fastmae "
             "faster).", ""]
    groups = {}
    for r in rows:
        groups.setdefault((r["config"], r["batch"], r["precision"], r["allocator"], r["mode"]), {})[r["provider"]] = r
    table = []
    for (config, batch, precision, alloc, mode), by in sorted(groups.items(), key=lambda kv: (
            kv[0][0], kv[0][1], _precision_rank(kv[0][2]), kv[0][3], kv[0][4] != "eager")):
        f, t = by.get("fast"), by.get("timm")
        table.append([config, batch, precision] + ([alloc] if multi else []) + [
            mode, _sig(f and f["call_s"] * 1e3), _sig(t and t["call_s"] * 1e3), _sig(f and f["images_per_s"]),
            _sig(t and t["images_per_s"]), _f(_ratio(t and t["call_s"], f and f["call_s"])),
            _f((f or t or {}).get("feature_diff"), ".2g")])
    headers = ["config", "batch", "precision"] + (["allocator"] if multi else []) + [
        "mode", "fastmae ms", "timm ms", "fastmae images/s", "timm images/s", "fastmae / timm", "max feature diff"]
    lines += markdown_table(headers, table, numeric_from=len(headers) - 6) + [""]
    if plots.get(("features", device)):
        lines += [f"![feature extraction ({device})]({plots[('features', device)]})", ""]
    return lines


def _ops_section(res: Results, device: str, plots: dict) -> list[str]:
    rows = [r for r in res.ops if r["device"] == device]
    lines = [f"## Fused ops ({device.upper()})", ""]
    if not rows:
        return lines + ["No fused-op results (the suite's log is beside this report).", ""]
    multi = _multi_alloc(rows)
    run_copy = {}
    for alloc in {r["allocator"] for r in rows}:
        rates = [r["copy_Bps"] for r in rows if r["allocator"] == alloc and r["copy_Bps"]]
        run_copy[alloc] = statistics.median(rates) if rates else None
    fast_label = rows[0]["fastmae_label"]
    lines += [f"Each op through {fast_label}, its reference composition in eager PyTorch, and the same under "
              "torch.compile, on the same inputs. \"MB moved\" is the op's minimal traffic (each input read "
              "once, each output written once; full = forward + backward); \"GB/s\" that traffic at fastmae's "
              "median; \"% of copy\" against the copy measured in the same test"
              + (", \"% of run copy\" against the median copy rate over the run's tests (the copy rate moves "
                 "between tests, it is steady within one)" if device == "cpu" else "")
              + "; the H100 floor is the minimal bytes at 3.35 TB/s (datasheet): a projection, not a "
                "measurement.", ""]
    for alloc, rate in sorted(run_copy.items()):
        rates = [r["copy_Bps"] for r in rows if r["allocator"] == alloc and r["copy_Bps"]]
        lines.append(f"- copy bandwidth{' (' + alloc + ')' if multi else ''}: median {rate / 1e9:.1f} GB/s (read + "
                     f"write) over the tests, range {min(rates) / 1e9:.1f}-{max(rates) / 1e9:.1f}"
                     if rate else f"- copy bandwidth ({alloc}): n/a")
    lines.append("")
    table = []
    order = {n: k for k, n in enumerate(OP_NAMES)}
    for r in sorted(rows, key=lambda r: (order.get(r["op"], 9), r.get("N") or 0, r["mode"] != "full",
                                         r["dtype"] != "fp32", r["allocator"])):
        fast = r["fastmae_s"]
        gbs = r["bytes"] / fast if fast else None
        cells = [r["op"], r["mode"], r["dtype"]] + ([r["allocator"]] if multi else [])
        if device == "cuda":
            cells.append(r["N"])
        cells += [_sig(fast and fast * 1e3), _sig(r["eager_s"] and r["eager_s"] * 1e3),
                  _sig(r["compiled_s"] and r["compiled_s"] * 1e3), _f(_ratio(r["eager_s"], fast), ".1f"),
                  _f(_ratio(r["compiled_s"], fast), ".1f"), f"{r['bytes'] / 1e6:.1f}", _f(gbs and gbs / 1e9, ".1f"),
                  _f(r["copy_Bps"] and r["copy_Bps"] / 1e9, ".1f"),
                  _f(gbs and r["copy_Bps"] and 100 * gbs / r["copy_Bps"], ".0f")]
        if device == "cpu":
            rc = run_copy.get(r["allocator"])
            cells += [_f(gbs and rc and 100 * gbs / rc, ".0f"),
                      "/".join(_f(r["faults"].get(p), ".0f") for p in ("fastmae", "eager"))]
        else:
            cells.append(_sig(r["host_s"] and r["host_s"] * 1e3))
        cells.append(f"{r['bytes'] / H100_BYTES_PER_S * 1e6:.1f}")
        table.append(cells)
    headers = ["op", "mode", "dtype"] + (["allocator"] if multi else []) + (["N"] if device == "cuda" else []) + [
        "fastmae ms", "eager ms", "compiled ms", "x eager", "x compiled", "MB moved", "GB/s", "copy GB/s",
        "% of copy"] + (["% of run copy", "faults/call fastmae / eager"] if device == "cpu" else
                        ["fastmae host ms"]) + ["H100 floor us"]
    lines += markdown_table(headers, table, numeric_from=3 + multi) + [""]
    if plots.get(("ops", device)):
        lines += [f"![fused ops ({device})]({plots[('ops', device)]})", ""]
    return lines


def _details_section(res: Results) -> list[str]:
    """The full tier's diagnostics: GEMM bound, attention backends, optimizer, fresh-process memory."""
    lines = []
    if res.gemm_bound:
        lines += ["## Bounds: the step's GEMMs alone at their shapes, attention alone (CPU)", ""]
        rows = [[i["config"], i["precision"], i["allocator"], i["gemm_calls"], f"{i['gemm_flops'] / 1e9:.1f}",
                 f"{i['gemm_s']:.3f}", f"{i['gemm_rate'] / 1e9:.1f}", f"{i['gemm_pct_of_mm_rate']:.0f}",
                 f"{i['attention_s']:.3f}"] for i in res.gemm_bound]
        lines += markdown_table(["config", "precision", "allocator", "GEMM calls", "GEMM GFLOP", "GEMM s",
                                 "GEMM GFLOP/s", "% of mm rate", "attention s"], rows, numeric_from=3) + [""]
    if res.attention:
        lines += ["## Attention forward + backward per backend (CPU, ms per call)", ""]
        rows = []
        for i in res.attention:
            for shape, calls in i["calls_per_step"].items():
                ms = [i["median_s"].get(f"{shape} {b}") for b in ("sdpa", "math", "math-compiled")]
                rows.append([i["config"], i["precision"], i["allocator"], shape, calls]
                            + [_f(v and v * 1e3) for v in ms])
        lines += markdown_table(["config", "precision", "allocator", "shape [B, heads, S, d]", "calls/step", "sdpa",
                                 "math", "math compiled"], rows, numeric_from=4) + [""]
    if res.optimizer:
        lines += ["## Optimizer alone (CPU)", ""]
        rows = [[i["config"], i["allocator"], f"{i['params'] / 1e6:.1f} M", f"{i['fused_adamw_s']:.3f}",
                 f"{i['default_adamw_s']:.3f}", f"{i['bytes_moved'] / i['fused_adamw_s'] / 1e9:.1f}"]
                for i in res.optimizer]
        lines += markdown_table(["config", "allocator", "params", "fused AdamW s", "default AdamW (loop) s", "GB/s"],
                                rows, numeric_from=2) + [""]
    if res.memory:
        lines += ["## Peak memory of a training step in a fresh process (CPU; memory.py)", "",
                  "One process per variant; \"cold compile + step\" is the first step of a process with an empty "
                  "inductor cache (unless the cache column says shared); RSS includes the interpreter, libraries "
                  "and what malloc keeps.", ""]
        base = {(i["config"], i["precision"], i["allocator"]): i for i in res.memory if i["variant"] == "ref-compiled"}
        rows = []
        for i in sorted(res.memory, key=lambda i: (i["config"], i["precision"], i["allocator"], i["variant"])):
            b = base.get((i["config"], i["precision"], i["allocator"]))
            rss = i.get("rss_step_peak_bytes")
            rows.append([i["config"], i["precision"], i["allocator"], i["variant"], i["batch"],
                         f"{i['tensor_peak_bytes'] / 2**20:.0f}",
                         _f(_ratio(i["tensor_peak_bytes"], b and b["tensor_peak_bytes"])),
                         f"{i['resting_bytes'] / 2**20:.0f}", f"{i['step_peak_bytes'] / 2**20:.0f}",
                         _f(rss and rss / 2**20, ".0f"), _f(i.get("first_step_s"), ".0f"),
                         i.get("inductor_cache", "fresh")])
        lines += markdown_table(["config", "precision", "allocator", "variant", "batch", "tensor peak MiB",
                                 "x ref-compiled", "resting MiB", "step peak MiB", "RSS step peak MiB",
                                 "cold compile + step s", "inductor cache"], rows, numeric_from=4) + [""]
    return lines


def _cuda_section(res: Results, plots: dict) -> list[str]:
    has = any(r["device"] == "cuda" for r in res.steps + res.ops)
    run = res.runs[-1] if res.runs else {}
    cuda = run.get("cuda", {})
    if has:
        return _step_section(res, "cuda", plots) + _ops_section(res, "cuda", plots)
    if not res.runs:
        return []
    status = NO_CUDA if cuda.get("requested") and not cuda.get("available") else (
        cuda.get("status") or "not run (fastmae bench --device cuda or --device all)")
    lines = ["## CUDA", ""]
    lines += markdown_table(["device", "suite", "result"],
                            [["cuda", "training step (fastmae.bench.gpu model)", status],
                             ["cuda", "fused ops (fastmae.bench.gpu ops)", status]], numeric_from=3)
    return lines + [""]


def render_markdown(res: Results, plots: dict | None = None, plots_note: str | None = None) -> str:
    plots = plots or {}
    lines = _header(res, plots_note)
    ran = {k.split("-")[0] for run in res.runs for k in run.get("suite_returncodes", {})}  # model, ops, gpu
    if any(r["device"] == "cpu" for r in res.steps) or "model" in ran:
        lines += _step_section(res, "cpu", plots)
    if any(r["device"] == "cpu" for r in res.finetune + res.features) or "finetune" in ran:
        lines += _finetune_section(res, "cpu", plots)
    if any(r["device"] == "cpu" for r in res.video) or "video" in ran:
        lines += _video_section(res, "cpu", plots)
    if any(r["device"] == "cpu" for r in res.maskalign) or "maskalign" in ran:
        lines += _maskalign_section(res, "cpu", plots)
    if any(r["device"] == "cpu" for r in res.ops) or "ops" in ran:
        lines += _ops_section(res, "cpu", plots)
    lines += _loader_section(res)
    lines += _details_section(res)
    lines += _cuda_section(res, plots)
    return "\n".join(lines).rstrip("\n") + "\n"


def _loader_section(res: Results) -> list[str]:
    """The input pipeline: images/s per DataLoader worker process, PIL against the fast path."""
    if not res.loader:
        return []
    lines = ["## Input pipeline (CPU)", "",
             "Images/s per DataLoader worker process (bench/loader.py): the official per-image PIL transform "
             "against `--loader fast` (decode in the worker, the fused crop-resize-flip-normalise in its collate), "
             "and the fast path's workers without the crop (read, decode, draw the box): what bounds it. Medians "
             "over rounds in alternating order.", ""]
    rows = []
    for r in res.loader:
        rows.append((f"{r['images']} images ({os.path.basename(str(r['data']).rstrip('/'))}), batch {r['batch']}, "
                     f"{r['size']} px, {r['workers']} worker(s)", _f(r["pil"], ".0f"), _f(r["fast"], ".0f"),
                     _f(_ratio(r["fast"], r["pil"])) + "x", _f(r["decode"], ".0f"), r.get("backend_cpu", "?")))
    lines += markdown_table(["data", "PIL", "fast", "fast / PIL", "decode only", "op backend"], rows, numeric_from=1)
    for r in res.loader:
        op = r.get("op_ms_per_image")
        if op:
            lines += ["", f"The fused op alone, one thread, on the decoded images with their drawn boxes: {op['op']:.3f} "
                          f"ms per image, against {op['reference']:.3f} for its reference (torchvision's resized_crop "
                          f"per image, then normalised): {_f(_ratio(op['reference'], op['op']))}x faster."]
    return lines + [""]


# ---------------------------------------------------------------------------- plots
COLORS = {"fast-compiled": "#1f77b4", "fast-eager": "#aec7e8", "ref-compiled": "#d62728", "ref-eager": "#ff9896",
          "teacher-only": "#7f7f7f",
          "timm-compiled": "#2ca02c", "timm-eager": "#98df8a", "fast": "#1f77b4", "timm": "#2ca02c",
          "fastmae": "#1f77b4", "eager": "#ff9896", "compiled": "#d62728"}


def _figure(panels: int, width: float, height: float, vertical: bool = False):
    """A figure of ``panels`` panels of ``width`` x ``height`` inches side by side (or one above
    the other), without pyplot (no global state, no display needed)."""
    from matplotlib.figure import Figure

    rows, cols = (panels, 1) if vertical else (1, panels)
    fig = Figure(figsize=(max(width * cols, 7.0), height * rows + 0.6), layout="constrained")
    return fig, [fig.add_subplot(rows, cols, k + 1) for k in range(panels)]


def _bars(ax, groups, series, values, fmt, log=False):
    """Grouped bars, ``values[(group, series)]``, each labelled with its value; group ``k`` is
    centred on x = k. A group name's " | " parts go on lines of their own."""
    n = max(len(series), 1)
    width = 0.8 / n
    crowded = len(groups) * n > 12
    for k, s in enumerate(series):
        xs, ys = [], []
        for g, group in enumerate(groups):
            v = values.get((group, s))
            if v is not None:
                xs.append(g - 0.4 + width * (k + 0.5))
                ys.append(v)
        bars = ax.bar(xs, ys, width, label=s, color=COLORS.get(s), edgecolor="black", linewidth=0.4)
        ax.bar_label(bars, labels=[fmt(v) for v in ys], fontsize=7, padding=2,
                     rotation=90 if n > 3 or crowded else 0)
    ax.set_xticks(range(len(groups)), [g.replace(" | ", "\n") for g in groups], fontsize=8)
    if log:
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def _legend(fig, axes):
    """One legend for the figure, below the plots (the series are the same in every panel)."""
    seen = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    fig.legend(list(seen.values()), list(seen), loc="outside lower center", ncols=min(len(seen), 5), fontsize=8)


def _limits(ax, values, markers=(), log=False):
    vals = [v for v in list(values) + list(markers) if v]
    if not vals:
        return
    if log:
        ax.set_ylim(min(vals) / 2, max(vals) * 4)
    else:
        ax.set_ylim(0, max(vals) * 1.25)


def plot_steps(res: Results, device: str, path: str, what: str, kind: str = "mae") -> bool:
    """``what``: ``images_per_s`` (with the matmul ceiling) or ``peak_bytes``; ``kind``: ``mae``
    (the MAE training step, fast against reference), ``finetune`` (the fine-tuning step, fastmae
    against timm), ``video`` (the VideoMAE pre-training step, fast against reference, in clips/s) or
    ``maskalign`` (the MaskAlign pre-training step, fast student against reference, teacher
    included; the teacher-only row is left out: its ceiling is another one); the peak of the last
    three is the fresh-process one."""
    if kind in ("finetune", "video", "maskalign"):
        peaks, source, order = {"finetune": (finetune_peaks(res), res.finetune, FINETUNE_PROVIDERS),
                                "video": (video_peaks(res), res.video, VIDEO_PROVIDERS),
                                "maskalign": (maskalign_peaks(res), res.maskalign, STEP_PROVIDERS)}[kind]
        rows = []
        for r in source:
            if r["provider"] not in order:
                continue
            m = peaks.get((r["config"], r["batch"], r["precision"], r["allocator"], r["provider"]))
            rows.append(dict(r, peak_bytes=m and m["tensor_peak_bytes"]))
    else:
        rows, order = res.steps, STEP_PROVIDERS
    rows = [r for r in rows if r["device"] == device and r.get(what) is not None]
    if not rows:
        return False
    env = _env_for(res, device)
    unit = "clips" if kind == "video" else "images"
    configs = sorted({(r["config"], r["batch"]) for r in rows})
    fig, axes = _figure(len(configs), 6.5, 4.8)
    multi = _multi_alloc(rows)
    for ax, (config, batch) in zip(axes, configs):
        rs = [r for r in rows if r["config"] == config and r["batch"] == batch]
        groups = []
        for r in sorted(rs, key=lambda r: (_precision_rank(r["precision"]), r["allocator"])):
            g = r["precision"] + (f" | {r['allocator']}" if multi else "")
            if g not in groups:
                groups.append(g)
        series = _ordered({r["provider"] for r in rs}, order)
        scale = 1.0 if what == "images_per_s" else 1 / 2**20
        values = {(r["precision"] + (f" | {r['allocator']}" if multi else ""), r["provider"]): r[what] * scale
                  for r in rs}
        _bars(ax, groups, series, values, _sig)
        top = max(values.values()) * 1.3
        if what == "images_per_s":
            # the matmul ceiling in images/s: drawn where it fits beside the bars (up to 3x the
            # tallest), else written at the top of its group with an arrow (bars stay readable)
            ceilings = {}
            for g, group in enumerate(groups):
                r = next(r for r in rs if r["precision"] + (f" | {r['allocator']}" if multi else "") == group)
                if r.get("mm_rate") and r.get("flops_per_image"):
                    ceilings[g] = r["mm_rate"] / r["flops_per_image"]
            fits = {g: c for g, c in ceilings.items() if c <= 3 * max(values.values())}
            top = max([top] + [c * 1.12 for c in fits.values()])
            for k, (g, ceil) in enumerate(sorted(ceilings.items())):
                if g in fits:
                    ax.hlines(ceil, g - 0.45, g + 0.45, colors="black", linestyles="--", linewidth=1.2,
                              label="matmul ceiling (same run)" if k == 0 else None)
                    ax.annotate(f"ceiling {_sig(ceil)}", (g + 0.45, ceil), textcoords="offset points", xytext=(0, 2),
                                ha="right", va="bottom", fontsize=7,
                                bbox=dict(boxstyle="square,pad=0.1", fc="white", ec="none", alpha=0.8))
                else:
                    ax.annotate(f"matmul ceiling {_sig(ceil)} {unit}/s (off scale)", (g, top), xytext=(0, -4),
                                textcoords="offset points", ha="center", va="top", fontsize=7,
                                arrowprops=None)
            ax.set_ylabel(f"{unit} / s (higher is better)")
        else:
            ax.set_ylabel("peak memory, MiB of live tensors (lower is better)"
                          + ("\nfresh process" if kind in ("finetune", "video", "maskalign") else ""))
        ax.set_ylim(0, top)
        ax.set_xlabel("precision" + (" | allocator" if multi else ""))
        ax.set_title(f"{config}, batch {batch}", fontsize=10)
    _legend(fig, axes)
    name = f"{unit}/s" if what == "images_per_s" else "peak memory"
    what_text = {"mae": ("MAE training step", "fast vs reference"), "finetune": ("Fine-tuning step", "fastmae vs timm"),
                 "video": ("VideoMAE pre-training step", "fast vs reference"),
                 "maskalign": ("MaskAlign pre-training step", "fast vs reference student, same teacher")}[kind]
    fig.suptitle(f"{what_text[0]} {name} on {device.upper()}, {what_text[1]}\n{machine_line(env, device)}",
                 fontsize=11)
    fig.savefig(path, dpi=110)
    return True


def plot_features(res: Results, device: str, path: str) -> bool:
    """Feature extraction images/s, fastmae against timm, per configuration."""
    rows = [r for r in res.features if r["device"] == device]
    if not rows:
        return False
    env = _env_for(res, device)
    configs = sorted({(r["config"], r["batch"]) for r in rows})
    fig, axes = _figure(len(configs), 5.5, 4.4)
    multi = _multi_alloc(rows)
    for ax, (config, batch) in zip(axes, configs):
        rs = sorted([r for r in rows if r["config"] == config and r["batch"] == batch],
                    key=lambda r: (r["mode"] != "eager", _precision_rank(r["precision"]), r["allocator"]))

        def group(r):
            return f"{r['mode']} | {r['precision']}" + (f" | {r['allocator']}" if multi else "")

        groups = []
        for r in rs:
            if group(r) not in groups:
                groups.append(group(r))
        values = {(group(r), r["provider"]): r["images_per_s"] for r in rs}
        _bars(ax, groups, _ordered({r["provider"] for r in rs}, FEATURE_PROVIDERS), values, _sig)
        _limits(ax, values.values())
        ax.set_ylabel("images / s (higher is better)")
        ax.set_xlabel("mode, precision" + (" | allocator" if multi else ""))
        ax.set_title(f"{config}, batch {batch}", fontsize=10)
    _legend(fig, axes)
    fig.suptitle(f"Feature extraction (eval, no_grad) on {device.upper()}, fastmae vs timm\n"
                 f"{machine_line(env, device)}", fontsize=11)
    fig.savefig(path, dpi=110)
    return True


def plot_ops(res: Results, device: str, path: str) -> bool:
    rows = [r for r in res.ops if r["device"] == device and r["fastmae_s"]]
    if not rows:
        return False
    env = _env_for(res, device)
    ops = _ordered({r["op"] for r in rows}, OP_NAMES)
    multi_alloc, multi_n = _multi_alloc(rows), len({r.get("N") for r in rows}) > 1
    ngroups = max(len({(r["mode"], r["dtype"], r["allocator"], r.get("N")) for r in rows if r["op"] == op})
                  for op in ops)
    fig, axes = _figure(len(ops), max(4.5, 0.9 * ngroups + 1.5), 4.4, vertical=ngroups > 4)
    for ax, op in zip(axes, ops):
        rs = sorted([r for r in rows if r["op"] == op],
                    key=lambda r: (r["mode"] != "full", r["dtype"] != "fp32", r.get("N") or 0, r["allocator"]))

        def group(r):
            return (f"{r['mode']} | {r['dtype']}" + (f" | {r['allocator']}" if multi_alloc else "")
                    + (f" | N={r['N']}" if multi_n else ""))

        groups = []
        for r in rs:
            if group(r) not in groups:
                groups.append(group(r))
        values = {}
        for r in rs:
            for p in OP_PROVIDERS:
                if r.get(f"{p}_s"):
                    values[(group(r), p)] = r[f"{p}_s"] * 1e3
        _bars(ax, groups, list(OP_PROVIDERS), values, _sig, log=True)
        markers, first = [], True
        for g, name in enumerate(groups):
            r = next(r for r in rs if group(r) == name)
            if r.get("copy_Bps"):
                floor = r["bytes"] / r["copy_Bps"] * 1e3
                markers.append(floor)
                ax.hlines(floor, g - 0.45, g + 0.45, colors="black", linestyles="--", linewidth=1.2,
                          label="byte floor: minimal bytes / copy rate (same test)" if first else None)
                first = False
        _limits(ax, values.values(), markers, log=True)
        ax.set_ylabel("ms per call, median (log scale; lower is better)")
        ax.set_xlabel("mode, dtype" + (" | allocator" if multi_alloc else "") + (" | batch" if multi_n else ""))
        ax.set_title(op, fontsize=10)
    _legend(fig, axes)
    fast_label = rows[0]["fastmae_label"]
    fig.suptitle(f"Fused ops on {device.upper()}: {fast_label} vs eager and compiled references\n"
                 f"{machine_line(env, device)}", fontsize=11)
    fig.savefig(path, dpi=110)
    return True


def render_plots(res: Results, out_dir: str) -> tuple[dict, str | None]:
    """Write the PNGs; returns ``{(kind, device): file name}`` and a note when plots are impossible."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return {}, NO_MATPLOTLIB
    plots = {}
    for device in sorted({r["device"] for r in res.steps + res.ops + res.finetune + res.features + res.video
                          + res.maskalign}):
        for kind, fn in (("train_step", lambda p: plot_steps(res, device, p, "images_per_s")),
                         ("peak_memory", lambda p: plot_steps(res, device, p, "peak_bytes")),
                         ("finetune_step", lambda p: plot_steps(res, device, p, "images_per_s", "finetune")),
                         ("finetune_peak_memory", lambda p: plot_steps(res, device, p, "peak_bytes", "finetune")),
                         ("features", lambda p: plot_features(res, device, p)),
                         ("video_step", lambda p: plot_steps(res, device, p, "images_per_s", "video")),
                         ("video_peak_memory", lambda p: plot_steps(res, device, p, "peak_bytes", "video")),
                         ("maskalign_step", lambda p: plot_steps(res, device, p, "images_per_s", "maskalign")),
                         ("maskalign_peak_memory",
                          lambda p: plot_steps(res, device, p, "peak_bytes", "maskalign")),
                         ("ops", lambda p: plot_ops(res, device, p))):
            name = f"{kind}_{device}.png"
            if fn(os.path.join(out_dir, name)):
                plots[(kind, device)] = name
    return plots, None


def render(paths, out_dir: str) -> list[str]:
    """Read the results in ``paths`` (files or folders), write ``report.md`` and the PNGs into
    ``out_dir``; returns the paths written."""
    res = load(paths)
    os.makedirs(out_dir, exist_ok=True)
    plots, note = render_plots(res, out_dir)
    md = os.path.join(out_dir, "report.md")
    with open(md, "w") as f:
        f.write(render_markdown(res, plots, note))
    return [md] + [os.path.join(out_dir, p) for p in plots.values()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="JSON files or folders of them")
    parser.add_argument("--out", default=None, help="folder for report.md and the PNGs (default: print the "
                                                    "Markdown, write no plot)")
    args = parser.parse_args(argv)
    if args.out is None:
        sys.stdout.write(render_markdown(load(args.results)))
        return 0
    for path in render(args.results, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
