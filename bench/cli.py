"""``fastmae bench``: run the benchmark suites and write their report.

    fastmae bench --quick --out DIR     # under 10 minutes on an idle 2-core CPU
    fastmae bench --out DIR             # the full suites: ViT-B and the small configuration, every op
                                        # shape and mode, fresh-process memory, GEMM/attention bounds

Each suite runs in its own pytest process (``python -m pytest`` on the installed suite file, with
its own empty pytest configuration, so no project's ``pytest.ini`` or ``PYTEST_ADDOPTS`` changes
it), once per allocator setting: glibc reads its ``MALLOC_*`` settings when a process starts, so a
setting is a property of the process (PERF.md: "the allocator is part of the measurement on CPU").
What DIR receives:

- ``model-<allocator>.json``, ``finetune-<allocator>.json``, ``video-<allocator>.json``,
  ``maskalign-<allocator>.json``, ``ops-<allocator>.json``: pytest-benchmark JSON of
  ``test_bench_model.py``, ``test_bench_finetune.py``, ``test_bench_video.py``,
  ``test_bench_maskalign.py`` and ``test_bench_ops.py`` (with
  ``machine_info["fastmae"]``: machine,
  versions, allocator, backend); ``*.log`` beside each: the suite's output;
- ``gpu-model.json``, ``gpu-ops.json``: ``gpu.py`` on the CUDA device, where there is one;
- ``run.json``: the command, tier, durations and exit codes, whether CUDA was asked for and present;
- ``report.md`` and the PNG plots (``report.py``).

A run first removes those files (by these names only) from DIR, so a report never mixes runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

from fastmae.bench import environment

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
HELP = "benchmark fastmae against the reference MAE; write report.md and plots"
DESCRIPTION = ("Benchmark fastmae on this machine: the MAE training step (fast against reference, eager and "
               "compiled, fp32 and bf16, beside the matmul ceiling; images/s and peak memory), the fine-tuning "
               "step of the classifier and its feature extraction (fastmae against timm), the VideoMAE pre-training "
               "step (fast against its reference twin, eager and compiled, fp32 and bf16; clips/s and peak memory), "
               "the MaskAlign pre-training step (the student fast against its reference twin with the same frozen "
               "teacher, eager and compiled, fp32 and bf16; images/s, the teacher's share and peak memory) "
               "and the fused ops "
               "(against their eager and compiled references, beside the copy bandwidth), on the CPU and, where "
               "there is one, the CUDA device. Writes the pytest-benchmark JSON, report.md and PNG plots to --out. "
               "Plots need matplotlib: pip install \"fastmae[bench]\".")
ALLOCATORS = ("default", "tuned")


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str  # model, finetune, video, maskalign or ops: the JSON is <name>-<allocator>.json
    file: str  # the pytest file in this package
    title: str
    env: dict  # the suite's knobs (documented in its module docstring)
    select: str | None  # pytest -k expression, or None for every test
    allocators: tuple  # allocator settings it runs under, in this order


# The quick tier. Training step: the "small" configuration (ViT-Tiny-width encoder, 256-d decoder,
# 96x96 images, ~8 GFLOP per image per step) at batch 16 instead of ViT-B, whose four compilations
# alone would exceed the budget on 2 cores; 5 timed rounds after one warm-up round (PERF.md asks
# for medians over at least 5); peak memory from the profiler in the same process rather than one
# fresh process per variant (each of those pays interpreter start-up and a compilation). Ops: ViT-B
# shapes, forward + backward only, 5 timed rounds after 2 warm-up cycles (the full suite: 15 after
# 5, forward alone too). Compilation dominates the quick tier: four models (fast and reference,
# fp32 and bf16) and six op references.
QUICK = (
    Suite("model", "test_bench_model.py", "training step, small configuration, batch 16",
          dict(FASTMAE_BENCH_CONFIGS="small", FASTMAE_BENCH_SMALL_BATCH="16", FASTMAE_BENCH_ROUNDS="5",
               FASTMAE_BENCH_WARMUP="1", FASTMAE_BENCH_MM_N="2048", FASTMAE_BENCH_TIER="quick"),
          "test_train_step", ("default",)),
    # Fine-tuning: the small classifier (vit_tiny_patch8 at 64x64) at batch 32, fastmae against timm,
    # eager and compiled, fp32 and bf16, 5 timed rounds; its peak memory in a fresh process per
    # provider and precision with the inductor cache the step just filled (no cold compile); feature
    # extraction in eager mode only (the compiled one costs four more compilations).
    Suite("finetune", "test_bench_finetune.py", "fine-tuning step and feature extraction, small classifier, "
                                                "fastmae against timm",
          dict(FASTMAE_BENCH_CONFIGS="small", FASTMAE_BENCH_SMALL_BATCH="32", FASTMAE_BENCH_ROUNDS="5",
               FASTMAE_BENCH_WARMUP="1", FASTMAE_BENCH_MM_N="2048", FASTMAE_BENCH_MEMORY_CACHE="shared",
               FASTMAE_BENCH_TIER="quick"),
          "test_finetune_step or test_finetune_peak_memory or (test_feature_extraction and eager)", ("default",)),
    Suite("ops", "test_bench_ops.py", "fused ops, ViT-B shapes, forward + backward",
          dict(FASTMAE_BENCH_MODES="full", FASTMAE_BENCH_ROUNDS="5", FASTMAE_BENCH_WARMUP="2",
               FASTMAE_BENCH_TIER="quick"),
          None, ALLOCATORS),
)
# Quick suites that run only when --only names them (eight more compilations would break the quick
# tier's ten minutes): `fastmae bench --quick --only video maskalign`.
QUICK_OPTIONAL = (
    # VideoMAE: the small configuration (ViT-S widths at 8x64x64, 64 tubelets) at batch 4, fast against
    # its reference twin, eager and compiled, fp32 and bf16, 5 timed rounds; peak memory in a fresh
    # process per provider in fp32 only, with the inductor cache the step just filled. Four
    # compilations, as in the fine-tuning suite; ViT-S and ViT-B at 16x224x224 are the full tier's.
    Suite("video", "test_bench_video.py", "VideoMAE pre-training step, small configuration (8x64x64), fast "
                                          "against reference",
          dict(FASTMAE_BENCH_CONFIGS="small", FASTMAE_BENCH_SMALL_BATCH="4", FASTMAE_BENCH_ROUNDS="5",
               FASTMAE_BENCH_WARMUP="1", FASTMAE_BENCH_MM_N="2048", FASTMAE_BENCH_MEMORY_CACHE="shared",
               FASTMAE_BENCH_TIER="quick"),
          "test_video_step or (test_video_peak_memory and fp32)", ("default",)),
    # MaskAlign: the small configuration (a ViT-Tiny-width student at 64x64, patch 8, 6 blocks, with a
    # teacher of the same shape) at batch 32, the fast student against its reference twin with one
    # shared eager teacher, eager and compiled, fp32 and bf16, and the teacher's forward alone, 5 timed
    # rounds; peak memory in a fresh process per provider in fp32 only, with the inductor cache the
    # step just filled. Four compilations; ViT-B/16 at 224 is the full tier's.
    Suite("maskalign", "test_bench_maskalign.py", "MaskAlign pre-training step, small configuration (64x64), fast "
                                                  "student against reference, same teacher",
          dict(FASTMAE_BENCH_CONFIGS="small", FASTMAE_BENCH_SMALL_BATCH="32", FASTMAE_BENCH_ROUNDS="5",
               FASTMAE_BENCH_WARMUP="1", FASTMAE_BENCH_MM_N="2048", FASTMAE_BENCH_MEMORY_CACHE="shared",
               FASTMAE_BENCH_TIER="quick"),
          "test_maskalign_step or (test_maskalign_peak_memory and fp32)", ("default",)),
)
# The full tier: the suites with their own defaults (ViT-B batch 16 and small batch 64, 5 rounds;
# every op in both modes, 15 rounds), every test, both allocator settings.
FULL = (
    Suite("model", "test_bench_model.py", "training step, ViT-B and small configurations, every test",
          dict(FASTMAE_BENCH_TIER="full"), None, ALLOCATORS),
    Suite("finetune", "test_bench_finetune.py", "fine-tuning step and feature extraction, ViT-B and small "
                                                "classifiers, fastmae against timm",
          dict(FASTMAE_BENCH_TIER="full"), None, ALLOCATORS),
    Suite("video", "test_bench_video.py", "VideoMAE pre-training step, ViT-S and ViT-B at 16x224x224, fast "
                                          "against reference",
          dict(FASTMAE_BENCH_TIER="full"), None, ALLOCATORS),
    Suite("maskalign", "test_bench_maskalign.py", "MaskAlign pre-training step, ViT-B/16 student and teacher at "
                                                  "224, fast student against reference, same teacher",
          dict(FASTMAE_BENCH_TIER="full"), None, ALLOCATORS),
    Suite("ops", "test_bench_ops.py", "fused ops, ViT-B shapes, forward and forward + backward",
          dict(FASTMAE_BENCH_TIER="full"), None, ALLOCATORS),
)
QUICK_TEXT = ("the training step of the small configuration at batch 16 (fp32 and bf16; fast and "
              "reference, eager and compiled; 5 timed rounds; default allocator), the fine-tuning step of the small "
              "classifier (vit_tiny_patch8 at 64x64) at batch 32 against timm (fp32 and bf16; eager and compiled; "
              "5 timed rounds; peak memory in a fresh process; eager feature extraction at batch 128; default "
              "allocator) and the fused ops at ViT-B shapes, forward + backward (fp32 and bf16; 5 timed rounds; "
              "default and tuned allocator). With --only video and/or maskalign, the small configurations of the "
              "VideoMAE step (ViT-S widths at 8x64x64, batch 4) and the MaskAlign step (a ViT-Tiny-width student "
              "and teacher at 64x64, batch 32) against their references (fp32 and bf16; eager and compiled; 5 "
              "timed rounds; fp32 peak memory in a fresh process; four compilations each), which the plain quick "
              "tier leaves out. `fastmae bench` without --quick runs ViT-B, the VideoMAE ViT-S and ViT-B at "
              "16x224x224, MaskAlign ViT-B/16 at 224 and every op mode with more rounds.")
FULL_TEXT = ("test_bench_model.py (ViT-B batch 16 and small batch 64, every test), test_bench_finetune.py "
             "(the ViT-B/16 classifier at batch 8 and the small one at batch 64 against timm, every test), "
             "test_bench_video.py (VideoMAE ViT-S at batch 2 and ViT-B at batch 1, 16x224x224 clips, against the "
             "reference, every test: per allocator eight compilations in the steps and eight cold ones in the "
             "fresh-process memory runs), test_bench_maskalign.py (the MaskAlign ViT-B/16 student with a ViT-B/16 "
             "teacher at 224, batch 8, against the reference student, every test) and test_bench_ops.py (every op "
             "and mode, 15 rounds), each under the default and the tuned allocator.")
# gpu.py's arguments per tier (CUDA graphs and CUDA events; see gpu.py)
GPU_ARGS = {
    "quick": {"ops": ["--batches", "64"], "model": ["--configs", "vitb", "--rounds", "3", "--steps-per-round", "3"]},
    "full": {"ops": [], "model": []},
}
PYTEST_INI = "[pytest]\n"  # an empty configuration: the suites' behaviour comes from their env knobs only


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder for the JSON results, their logs, report.md and the PNG plots (created if "
                             "needed; a run replaces the files of an earlier run there)")
    parser.add_argument("--quick", action="store_true",
                        help="the quick tier, under 10 minutes on an idle 2-core CPU: " + QUICK_TEXT)
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # the suites' FASTMAE_BENCH_SMOKE
    parser.add_argument("--device", choices=("all", "cpu", "cuda"), default="all",
                        help="cpu: the CPU suites; cuda: fastmae.bench.gpu's ops and model on the CUDA device; all "
                             "(default): both, the CUDA rows saying 'no CUDA device' where there is none")
    parser.add_argument("--only", nargs="+", choices=("model", "finetune", "video", "maskalign", "ops"),
                        default=None, metavar="SUITE",
                        help="run only these suites: model (MAE training step), finetune (fine-tuning step and "
                             "feature extraction against timm), video (VideoMAE pre-training step against its "
                             "reference), maskalign (MaskAlign pre-training step against its reference, same "
                             "teacher), ops (fused ops) (default: all)")
    parser.add_argument("--allocator", choices=("default", "tuned", "both"), default=None,
                        help="glibc malloc setting of the CPU suites: default (no MALLOC_* variables), tuned "
                             "(MALLOC_MMAP_THRESHOLD_=MALLOC_TRIM_THRESHOLD_=4294967296, PERF.md) or both (default: "
                             "the tier's choice: quick runs the steps under default and the ops under both, the full "
                             "tier everything under both)")
    parser.add_argument("--render-only", action="store_true",
                        help="run nothing: render report.md and the plots from the JSON files already in --out")


def _command_line(args) -> str:
    """The command as a user would type it, rebuilt from ``args`` (the process's own argv may be
    another program's, e.g. when called in-process)."""
    parts = ["fastmae", "bench"] + (["--quick"] if args.quick else []) + ["--out", args.out]
    if args.device != "all":
        parts += ["--device", args.device]
    if args.only:
        parts += ["--only", *args.only]
    if args.allocator:
        parts += ["--allocator", args.allocator]
    if getattr(args, "smoke", False):
        parts.append("--smoke")
    return " ".join(shlex.quote(p) for p in parts)


def _loadavg() -> float | None:
    """The 1-minute load average (runnable processes), where the system tells it."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _allocator_env(base: dict, setting: str) -> dict:
    env = {k: v for k, v in base.items() if k not in environment.TUNED_ALLOCATOR}
    if setting == "tuned":
        env.update(environment.TUNED_ALLOCATOR)
    return env


def _stream(cmd: list[str], env: dict, log_path: str) -> int:
    """Run ``cmd`` in the folder of ``log_path``, its output both to the terminal and to
    ``log_path``; its exit code. (``python -m`` puts its working folder first on sys.path: run
    from a checkout's root, it would import the checkout's fastmae instead of the installed one.)"""
    env = dict(env, PYTHONSAFEPATH="1")  # the same, for Python >= 3.11
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, cwd=os.path.dirname(log_path))
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
            return proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise


def pytest_command(suite: Suite, json_path: str, ini_path: str) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", os.path.join(BENCH_DIR, suite.file), "-c", ini_path,
           "--rootdir", BENCH_DIR, "--confcutdir", BENCH_DIR, "-p", "no:cacheprovider", "--import-mode=importlib",
           "--assert=plain",  # no rewritten bytecode written into the installed package
           "-v", "-rs", "--benchmark-enable", "--benchmark-json", json_path,
           "--benchmark-storage", "file://" + os.path.join(os.path.dirname(ini_path), "storage"),  # not in --out
           # pytest-benchmark's own table: one per test function, short (its statistics are of a
           # whole side-by-side cycle; the figures are in extra_info and the report)
           "--benchmark-columns", "median,rounds", "--benchmark-group-by", "func"]
    if suite.select:
        cmd += ["-k", suite.select]
    return cmd


def _output_names() -> list[str]:
    names = ["report.md", "run.json", "loader.json"]
    for suite in ("model", "finetune", "video", "maskalign", "ops"):
        for alloc in ALLOCATORS:
            names += [f"{suite}-{alloc}.json", f"{suite}-{alloc}.log"]
    for what in ("ops", "model"):
        names += [f"gpu-{what}.json", f"gpu-{what}.log"]
    for kind in ("train_step", "peak_memory", "finetune_step", "finetune_peak_memory", "features", "video_step",
                 "video_peak_memory", "maskalign_step", "maskalign_peak_memory", "ops"):
        names += [f"{kind}_{dev}.png" for dev in ("cpu", "cuda")]
    return names


def run(args) -> int:
    from fastmae.bench import report

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    if args.render_only:
        written = report.render([out], out)
        for path in written:
            print(f"wrote {path}")
        return 0
    for name in _output_names():
        path = os.path.join(out, name)
        if os.path.isfile(path):
            os.remove(path)
    tier = "quick" if args.quick else "full"
    available = (*QUICK, *QUICK_OPTIONAL) if args.quick and args.only else QUICK if args.quick else FULL
    suites = [s for s in available if args.only is None or s.name in args.only]
    if getattr(args, "smoke", False):  # tiny shapes, one round: checks the plumbing, measures nothing
        tier = "smoke"
        suites = [dataclasses.replace(s, env=dict(FASTMAE_BENCH_SMOKE="1", FASTMAE_BENCH_TIER="smoke"))
                  for s in suites]
    allocators = None if args.allocator is None else (ALLOCATORS if args.allocator == "both" else (args.allocator,))
    cpu_text = dict(quick=QUICK_TEXT, full=FULL_TEXT).get(tier, "smoke run: tiny shapes, one round; no meaningful "
                                                                 "figure")
    if args.device == "cuda":
        description = f"CUDA only: fastmae.bench.gpu ops and model ({tier} tier)"
    elif args.device == "all":
        description = cpu_text + f" CUDA, where there is a device: fastmae.bench.gpu ops and model ({tier} tier)."
    else:
        description = cpu_text
    record = dict(kind="fastmae-bench-run", command=_command_line(args), tier=tier, description=description,
                  started=time.time(),
                  suite_durations_s={}, suite_returncodes={}, suite_loadavg={}, results=[])
    base_env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    t_start = time.perf_counter()
    runs = [(s, a) for s in suites for a in (allocators or s.allocators)] if args.device in ("all", "cpu") else []
    with tempfile.TemporaryDirectory(prefix="fastmae-bench-") as tmp:
        ini = os.path.join(tmp, "pytest.ini")
        with open(ini, "w") as f:
            f.write(PYTEST_INI)
        for k, (suite, alloc) in enumerate(runs, 1):
            key = f"{suite.name}-{alloc}"
            json_path = os.path.join(out, f"{key}.json")
            print(f"\n== fastmae bench [{k}/{len(runs)}] {suite.title}; {alloc} allocator -> {json_path}",
                  flush=True)
            env = _allocator_env(dict(base_env, **suite.env), alloc)
            record["suite_loadavg"][key] = _loadavg()  # other work on the machine skews the figures
            t0 = time.perf_counter()
            rc = _stream(pytest_command(suite, json_path, ini), env, os.path.join(out, f"{key}.log"))
            record["suite_durations_s"][key] = time.perf_counter() - t0
            record["suite_returncodes"][key] = rc
            if os.path.isfile(json_path):
                record["results"].append(os.path.basename(json_path))
            if rc != 0:
                print(f"== {key}: pytest exited with {rc} (see {key}.log); the report keeps what it recorded",
                      flush=True)
            elif not os.path.isfile(json_path):  # every test skipped: the reason is in the log
                record["suite_returncodes"][key] = "no results"
                print(f"== {key}: no results (every test skipped; see {key}.log)", flush=True)
    if args.device in ("all", "cpu") and args.only is None:  # the input pipeline, in its own worker processes
        print("\n== fastmae bench: the input pipeline (bench/loader.py)", flush=True)
        from fastmae.bench import loader as loader_bench

        t0 = time.perf_counter()
        try:
            smoke = tier == "smoke"
            loader_bench.run(None, out, batch=8 if smoke else 64, size=64 if smoke else 224,
                             batches=1 if smoke else 4, rounds=1 if smoke else 5)
            record["results"].append("loader.json")
            record["suite_returncodes"]["loader"] = 0
        except Exception as e:  # noqa: BLE001 - the report keeps the other suites' figures
            print(f"== loader: failed: {type(e).__name__}: {e}", flush=True)
            record["suite_returncodes"]["loader"] = f"failed: {type(e).__name__}"
        record["suite_durations_s"]["loader"] = time.perf_counter() - t0
    record["cuda"] = _run_cuda(args, tier, out, record, suites)
    record["environment"] = environment.describe()
    record["duration_s"] = time.perf_counter() - t_start
    with open(os.path.join(out, "run.json"), "w") as f:
        json.dump(record, f, indent=1)
    written = report.render([os.path.join(out, name) for name in record["results"] + ["run.json"]], out)
    files = written + [os.path.join(out, n) for n in record["results"]]
    print(f"\nfastmae bench: {record['duration_s'] / 60:.1f} min; wrote {', '.join(files)}")
    failed = [k for k, v in record["suite_returncodes"].items() if v != 0]
    if failed:
        print(f"fastmae bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _run_cuda(args, tier: str, out: str, record: dict, suites) -> dict:
    """gpu.py's ops and model on the CUDA device, or why not."""
    requested = args.device in ("all", "cuda")
    if not requested:
        return dict(requested=False, available=None, status="not requested (--device cpu)")
    import torch

    if not torch.cuda.is_available():
        print("\n== fastmae bench: no CUDA device; the report's CUDA rows say so", flush=True)
        return dict(requested=True, available=False, status=environment.NO_CUDA)
    names = [s.name for s in suites]
    for what in ("ops", "model"):
        if what not in names:
            continue
        key = f"gpu-{what}"
        json_path = os.path.join(out, f"{key}.json")
        print(f"\n== fastmae bench: {what} on {torch.cuda.get_device_name()} -> {json_path}", flush=True)
        cmd = [sys.executable, "-m", "fastmae.bench.gpu", what, *GPU_ARGS.get(tier, GPU_ARGS["quick"])[what],
               "--json", json_path]
        record["suite_loadavg"][key] = _loadavg()
        t0 = time.perf_counter()
        rc = _stream(cmd, dict(os.environ), os.path.join(out, f"{key}.log"))
        record["suite_durations_s"][key] = time.perf_counter() - t0
        record["suite_returncodes"][key] = rc
        if os.path.isfile(json_path):
            record["results"].append(os.path.basename(json_path))
    return dict(requested=True, available=True, device=torch.cuda.get_device_name())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastmae bench", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
