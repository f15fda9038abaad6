"""``fastmae bench``: its help, the renderer on synthetic results (tables, plots), the CUDA rows
without a CUDA device, and the suites importable from the installed package."""
import argparse
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

from fastmae import cli
from fastmae.bench import cli as bench_cli
from fastmae.bench import report

ENV = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
MACHINE = dict(date="2026-01-02T03:04:05+00:00", cpu="Test CPU 9000", cores=2, usable_cores=2, torch_threads=2,
               python="3.11.7", torch="2.14.1", triton="3.8.0", fastmae="0.1.0",
               allocator={"MALLOC_MMAP_THRESHOLD_": "", "MALLOC_TRIM_THRESHOLD_": "", "LD_PRELOAD": ""},
               allocator_label="default", forced_backend="", cpu_backend="cpp", cpp_extension_error=None,
               cuda_device=None, cuda_backend=None)
TUNED = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296", "LD_PRELOAD": ""}
# median step seconds per provider at batch 16 (fp32)
STEP_S = {"fast-compiled": 0.8, "ref-compiled": 1.0, "fast-eager": 1.6, "ref-eager": 2.0}
PEAK_MB = {"fast-compiled": 300, "ref-compiled": 400, "fast-eager": 350, "ref-eager": 500}


def _train_step(precision, scale):
    providers = {}
    for p, s in STEP_S.items():
        s *= scale
        providers[p] = dict(median_s=s, min_s=s, times_s=[s] * 5, images_per_s=16 / s, pct_of_ceiling=50.0 / s,
                            compile_s=30.0 if "compiled" in p else None, first_call_s=31.0,
                            resting_bytes=100 * 2**20, step_peak_bytes=(PEAK_MB[p] - 100) * 2**20,
                            tensor_peak_bytes=PEAK_MB[p] * 2**20)
    return dict(kind="train_step", config="small", config_title="a small MAE", precision=precision, batch=16,
                rounds=5, warmup=1, flops_per_image=8e9, counted_flops_per_image=8e9, mm_n=2048, mm_rate=100e9,
                mm_rates=[100e9] * 5, providers=providers, env={}, tier="quick")


def _op(op, dtype, allocator, fast_ms):
    providers = {p: dict(median_ms=ms, min_ms=ms, max_ms=ms, faults_per_call=0, rounds=5)
                 for p, ms in (("fastmae", fast_ms), ("eager", 10 * fast_ms), ("compiled", 2 * fast_ms),
                               ("copy", 4.0))}
    return dict(op=op, mode="full", dtype=dtype, bytes=60_000_000, copy_bytes=2 * 64 * 2**20, providers=providers,
                input_sets=3, llc_bytes=32 * 2**20, shape=dict(N=64, C=3, H=224, W=224, p=16, K=49, D=512),
                threads=2, allocator=allocator, backend="cpp", rounds=5, warmup=2, tier="quick")


def _write_results(folder):
    model = dict(machine_info=dict(fastmae=MACHINE), datetime=MACHINE["date"], benchmarks=[
        dict(name="test_train_step[small-fp32]", extra_info=_train_step("fp32", 1.0)),
        dict(name="test_train_step[small-bf16]", extra_info=_train_step("bf16", 0.5))])
    ops = []
    for allocator in ({k: "" for k in TUNED}, TUNED):
        for op in report.OP_NAMES:
            for dtype in ("fp32", "bf16"):
                ops.append(dict(name=f"test_bench_op[{op}-full-{dtype}]", extra_info=_op(op, dtype, allocator, 2.0)))
    (folder / "model-default.json").write_text(json.dumps(model))
    (folder / "ops-default.json").write_text(json.dumps(dict(machine_info=dict(fastmae=MACHINE), benchmarks=ops)))
    run = dict(kind="fastmae-bench-run", command="fastmae bench --quick --out X", tier="quick",
               description="the quick tier", duration_s=300.0, suite_durations_s={"model-default": 200.0},
               suite_returncodes={"model-default": 0}, cuda=dict(requested=True, available=False))
    (folder / "run.json").write_text(json.dumps(run))


def test_render_writes_the_tables_and_plots(tmp_path):
    _write_results(tmp_path)
    written = report.render([str(tmp_path)], str(tmp_path / "out"))
    text = (tmp_path / "out" / "report.md").read_text()
    # what it ran on
    for needle in ("Test CPU 9000; 2 logical cores", "fastmae 0.1.0, torch 2.14.1, triton 3.8.0",
                   "default (glibc malloc", "tuned (MALLOC_MMAP_THRESHOLD_=MALLOC_TRIM_THRESHOLD_=4294967296)",
                   "training step on CPU: cpp", "ops suite on CPU: cpp (forced)", "2026-01-02",
                   "fastmae benchmarks (quick tier)", "timed rounds: 5", "small = a small MAE, batch 16"):
        assert needle in text, needle
    # training step: images/s = batch / median, speed-ups over the references, % of ceiling, peak and its ratio
    assert "| small | 16 | fp32 | fast-compiled | 800 | 20.0 | 2.50 | 1.25 | 62 | 30.0 | 300 | 0.75 |" in text
    assert "| small | 16 | fp32 | ref-eager | 2000 | 8.00 | 1.00 | 0.50 | 25 | n/a | 500 | 1.00 |" in text
    assert "| small | 16 | bf16 | fast-eager | 800 | 20.0 | 1.25 | 0.62 | 62 | n/a | 350 | 0.70 |" in text
    assert "fp32 torch.mm 2048^3 at 100.0 GFLOP/s (median of 5 samples); the step costs 8.00 GFLOP per image, " \
           "so the ceiling is 12.5 images/s" in text
    # ops, one row per op, dtype and allocator: 60 MB in 2 ms = 30 GB/s against a 33.6 GB/s copy
    assert "| gather_mask | full | fp32 | default | 2.00 | 20.0 | 4.00 | 10.0 | 2.0 | 60.0 | 30.0 | 33.6 | 89 | 89 | " \
           "0/0 | 17.9 |" in text
    assert "| norm_mse_loss | full | bf16 | tuned | 2.00 |" in text
    assert text.count("| unshuffle_scatter | full |") == 4
    # without a CUDA device the CUDA rows say so
    assert "| cuda | training step (fastmae.bench.gpu model) | no CUDA device |" in text
    assert "| cuda | fused ops (fastmae.bench.gpu ops) | no CUDA device |" in text
    pngs = sorted(os.path.basename(p) for p in written if p.endswith(".png"))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert pngs == [] and report.NO_MATPLOTLIB in text
        return
    assert pngs == ["ops_cpu.png", "peak_memory_cpu.png", "train_step_cpu.png"]
    for name in pngs:
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in text


FT_STEP_S = {"fast-compiled": 0.25, "timm-compiled": 0.5, "fast-eager": 0.4, "timm-eager": 0.8}
FT_PEAK_MB = {"fast-compiled": 150, "timm-compiled": 200, "fast-eager": 160, "timm-eager": 320}


def _finetune_results():
    """Synthetic results of test_bench_finetune.py: the step (fp32), feature extraction, memory."""
    providers = {p: dict(median_s=s, min_s=s, times_s=[s] * 5, images_per_s=32 / s, pct_of_ceiling=10 / s,
                         compile_s=20.0 if "compiled" in p else None, first_call_s=21.0)
                 for p, s in FT_STEP_S.items()}
    step = dict(kind="finetune_step", config="small", config_title="a small classifier", precision="fp32",
                batch=32, rounds=5, warmup=1, flops_per_image=1e9, mm_n=2048, mm_rate=100e9, mm_rates=[100e9] * 5,
                providers=providers, max_abs_logit_diff=0.0, timm="1.0.31", env={}, tier="quick")
    feats = dict(kind="features", config="small", config_title="a small classifier", mode="eager", precision="fp32",
                 batch=128, rounds=5, warmup=1, max_abs_feature_diff=0.0, timm="1.0.31", env={}, tier="quick",
                 providers={"fast": dict(median_s=0.1, images_per_s=1280.0), "timm": dict(median_s=0.2,
                                                                                         images_per_s=640.0)})
    benchmarks = [dict(name="test_finetune_step[small-fp32]", extra_info=step),
                  dict(name="test_feature_extraction[small-eager-fp32]", extra_info=feats)]
    for variant, mb in FT_PEAK_MB.items():
        benchmarks.append(dict(name=f"test_finetune_peak_memory[small-{variant}-fp32]", extra_info=dict(
            kind="finetune_memory", variant=variant, model="finetune", config="small", precision="fp32", batch=32,
            impl=variant.split("-")[0], compiled="compiled" in variant, resting_bytes=50 * 2**20,
            step_peak_bytes=(mb - 50) * 2**20, tensor_peak_bytes=mb * 2**20, rss_step_peak_bytes=900 * 2**20,
            first_step_s=5.0, inductor_cache="shared", env={}, tier="quick")))
    return dict(machine_info=dict(fastmae=MACHINE), datetime=MACHINE["date"], benchmarks=benchmarks)


def test_render_finetune_tables(tmp_path):
    (tmp_path / "finetune-default.json").write_text(json.dumps(_finetune_results()))
    written = report.render([str(tmp_path)], str(tmp_path / "out"))
    text = (tmp_path / "out" / "report.md").read_text()
    assert "## Fine-tuning step (CPU): fastmae's classifier against timm" in text
    assert "fine-tuning step (CPU): small = a small classifier, batch 32, fp32" in text
    # images/s = batch / median; speed-ups over timm; peak (fresh process) and its ratio to timm in the same mode
    assert "| small | 32 | fp32 | fast-compiled | 250 | 128 | 3.20 | 2.00 | 40 | 20.0 | 150 | 0.75 |" in text
    assert "| small | 32 | fp32 | timm-eager | 800 | 40.0 | 1.00 | 0.62 | 12 | n/a | 320 | 1.00 |" in text
    assert "| small | 32 | fp32 | fast-eager | 400 | 80.0 | 2.00 | 1.25 | 25 | n/a | 160 | 0.50 |" in text
    assert "the ceiling is 100 images/s; fp32 logits of fastmae and timm on the batch differ by at most 0" in text
    assert "| small | 32 | fp32 | fast-compiled | 150 | 0.75 | 50 | 100 | 900 | 5.0 | shared |" in text
    # feature extraction: fastmae / timm is the images/s ratio
    assert "| small | 128 | fp32 | eager | 100 | 200 | 1280 | 640 | 2.00 | 0 |" in text
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    pngs = sorted(os.path.basename(p) for p in written if p.endswith(".png"))
    assert pngs == ["features_cpu.png", "finetune_peak_memory_cpu.png", "finetune_step_cpu.png"]
    for name in pngs:
        assert f"]({name})" in text


VIDEO_STEP_S = {"fast-compiled": 0.5, "ref-compiled": 0.8, "fast-eager": 0.625, "ref-eager": 1.0}
VIDEO_PEAK_MB = {"fast-compiled": 300, "ref-compiled": 400, "fast-eager": 320, "ref-eager": 500}


def _video_results():
    """Synthetic results of test_bench_video.py: the step (fp32) and its fresh-process memory."""
    providers = {p: dict(median_s=s, min_s=s, times_s=[s] * 5, clips_per_s=4 / s, pct_of_ceiling=10 / s,
                         compile_s=40.0 if "compiled" in p else None, first_call_s=41.0)
                 for p, s in VIDEO_STEP_S.items()}
    med = VIDEO_STEP_S
    step = dict(kind="video_step", config="small", config_title="a small VideoMAE", precision="fp32", batch=4,
                frames=8, img=64, mask_ratio=0.9, num_masked=56, num_tokens=64, rounds=5, warmup=1,
                flops_per_clip=2e9, mm_n=2048, mm_rate=100e9, mm_rates=[100e9] * 5, providers=providers,
                loss_fast=1.2, loss_ref=1.2, loss_rel_diff=0.0, max_abs_output_diff=1.5e-6,
                speedup_fast_compiled_vs_ref_eager=med["ref-eager"] / med["fast-compiled"],
                speedup_fast_compiled_vs_ref_compiled=med["ref-compiled"] / med["fast-compiled"],
                speedup_fast_eager_vs_ref_eager=med["ref-eager"] / med["fast-eager"], env={}, tier="quick")
    benchmarks = [dict(name="test_video_step[small-fp32]", extra_info=step)]
    for variant, mb in VIDEO_PEAK_MB.items():
        benchmarks.append(dict(name=f"test_video_peak_memory[small-{variant}-fp32]", extra_info=dict(
            kind="video_memory", variant=variant, model="video", config="small", precision="fp32", batch=4,
            impl=variant.split("-")[0], compiled="compiled" in variant, resting_bytes=100 * 2**20,
            step_peak_bytes=(mb - 100) * 2**20, tensor_peak_bytes=mb * 2**20, rss_step_peak_bytes=900 * 2**20,
            first_step_s=5.0, inductor_cache="shared", env={}, tier="quick")))
    return dict(machine_info=dict(fastmae=MACHINE), datetime=MACHINE["date"], benchmarks=benchmarks)


def test_render_video_tables(tmp_path):
    (tmp_path / "video-default.json").write_text(json.dumps(_video_results()))
    written = report.render([str(tmp_path)], str(tmp_path / "out"))
    text = (tmp_path / "out" / "report.md").read_text()
    assert "## VideoMAE pre-training step (CPU): fastmae's model against its reference twin" in text
    assert "VideoMAE pre-training step (CPU): small = a small VideoMAE, batch 4 clip(s), fp32" in text
    assert "### small, batch 4, fp32" in text
    # clips/s = batch / median; speed-ups over the reference; peak (fresh process) and its ratio in the same mode
    assert "| fast-compiled | 8.00 | 500 | 2.00 | 1.60 | 20 | 40.0 | 300 | 0.75 |" in text
    assert "| ref-eager | 4.00 | 1000 | 1.00 | 0.80 | 10 | n/a | 500 | 1.00 |" in text
    assert "| fast-eager | 6.40 | 625 | 1.60 | 1.28 | 16 | n/a | 320 | 0.64 |" in text
    assert ("fast-compiled / ref-eager **2.00x**; fast-compiled / ref-compiled **1.60x**; "
            "fast-eager / ref-eager **1.60x**") in text
    assert "the step costs 2.00 GFLOP per clip (counted), so the ceiling is 50.0 clips/s" in text
    assert "differ by 0 (relative), their outputs by at most 1.5e-06; 56 of 64 tubelets masked per clip" in text
    assert "| small | 4 | fp32 | ref-compiled | 400 | 1.00 | 100 | 300 | 900 | 5.0 | shared |" in text
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    pngs = sorted(os.path.basename(p) for p in written if p.endswith(".png"))
    assert pngs == ["video_peak_memory_cpu.png", "video_step_cpu.png"]
    for name in pngs:
        assert f"]({name})" in text


MASKALIGN_STEP_S = {"fast-compiled": 0.5, "ref-compiled": 0.8, "fast-eager": 0.625, "ref-eager": 1.0,
                    "teacher-only": 0.25}
MASKALIGN_PEAK_MB = {"fast-compiled": 300, "ref-compiled": 400, "fast-eager": 320, "ref-eager": 500}


def _maskalign_results():
    """Synthetic results of test_bench_maskalign.py: the step (fp32) and its fresh-process memory."""
    med = MASKALIGN_STEP_S
    providers = {p: dict(median_s=s, min_s=s, times_s=[s] * 5, images_per_s=32 / s, pct_of_ceiling=10 / s,
                         compile_s=40.0 if "compiled" in p else None, first_call_s=41.0,
                         teacher_share=None if p == "teacher-only" else med["teacher-only"] / s)
                 for p, s in med.items()}
    step = dict(kind="maskalign_step", config="small", config_title="a small MaskAlign", precision="fp32", batch=32,
                img=64, mask_ratio=0.7, num_kept=19, num_patches=64, rounds=5, warmup=1, flops_per_image=2e9,
                teacher_flops_per_image=1e9, mm_n=2048, mm_rate=100e9, mm_rates=[100e9] * 5, providers=providers,
                loss_fast=1.2, loss_ref=1.2, loss_rel_diff=0.0, teacher="a shared eager teacher",
                speedup_fast_compiled_vs_ref_eager=med["ref-eager"] / med["fast-compiled"],
                speedup_fast_compiled_vs_ref_compiled=med["ref-compiled"] / med["fast-compiled"],
                speedup_fast_eager_vs_ref_eager=med["ref-eager"] / med["fast-eager"], env={}, tier="quick")
    benchmarks = [dict(name="test_maskalign_step[small-fp32]", extra_info=step)]
    for variant, mb in MASKALIGN_PEAK_MB.items():
        benchmarks.append(dict(name=f"test_maskalign_peak_memory[small-{variant}-fp32]", extra_info=dict(
            kind="maskalign_memory", variant=variant, model="maskalign", config="small", precision="fp32", batch=32,
            impl=variant.split("-")[0], compiled="compiled" in variant, resting_bytes=100 * 2**20,
            teacher_bytes=20 * 2**20, step_peak_bytes=(mb - 100) * 2**20, tensor_peak_bytes=mb * 2**20,
            rss_step_peak_bytes=900 * 2**20, first_step_s=5.0, inductor_cache="shared", env={}, tier="quick")))
    return dict(machine_info=dict(fastmae=MACHINE), datetime=MACHINE["date"], benchmarks=benchmarks)


def test_render_maskalign_tables(tmp_path):
    (tmp_path / "maskalign-default.json").write_text(json.dumps(_maskalign_results()))
    written = report.render([str(tmp_path)], str(tmp_path / "out"))
    text = (tmp_path / "out" / "report.md").read_text()
    assert "## MaskAlign pre-training step (CPU): fastmae's student against its reference twin" in text
    assert "MaskAlign pre-training step (CPU): small = a small MaskAlign, batch 32, fp32" in text
    assert "### small, batch 32, fp32" in text
    # images/s = batch / median; speed-ups over the reference; the teacher's share of each step; peak (fresh
    # process) and its ratio in the same mode; teacher-only: its own figures, no speed-up and no peak
    assert "| fast-compiled | 64.0 | 500 | 2.00 | 1.60 | 50 | 20 | 40.0 | 300 | 0.75 |" in text
    assert "| ref-eager | 32.0 | 1000 | 1.00 | 0.80 | 25 | 10 | n/a | 500 | 1.00 |" in text
    assert "| fast-eager | 51.2 | 625 | 1.60 | 1.28 | 40 | 16 | n/a | 320 | 0.64 |" in text
    assert "| teacher-only | 128 | 250 | n/a | n/a | n/a | 40 | n/a | n/a | n/a |" in text
    assert ("fast-compiled / ref-eager **2.00x**; fast-compiled / ref-compiled **1.60x**; "
            "fast-eager / ref-eager **1.60x**") in text
    # the student's part alone: step minus teacher-only (0.25, 0.55, 0.375, 0.75 s)
    assert ("fast-compiled / ref-eager 3.00x; fast-compiled / ref-compiled 2.20x; fast-eager / ref-eager 2.00x"
            in text)
    assert ("the step costs 2.00 GFLOP per image (counted on the reference twins), 1.00 of them the teacher's "
            "forward (50%), so the ceiling is 50.0 images/s") in text
    assert "differ by 0 (relative); 19 of 64 patches kept per image" in text
    assert "| small | 32 | fp32 | ref-compiled | 400 | 1.00 | 100 | 20 | 300 | 900 | 5.0 | shared |" in text
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    pngs = sorted(os.path.basename(p) for p in written if p.endswith(".png"))
    assert pngs == ["maskalign_peak_memory_cpu.png", "maskalign_step_cpu.png"]
    for name in pngs:
        assert f"]({name})" in text


def test_render_without_results_says_so(tmp_path):
    report.render([str(tmp_path)], str(tmp_path))
    text = (tmp_path / "report.md").read_text()
    assert "nothing (no results in the given files)" in text


def test_bench_help():
    proc = subprocess.run([sys.executable, "-m", "fastmae", "bench", "--help"], capture_output=True, text=True,
                          env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--quick", "--out", "--device", "--allocator", "--only", "--render-only", "no CUDA device",
                 "maskalign"):
        assert flag in proc.stdout, flag
    top = subprocess.run([sys.executable, "-m", "fastmae", "--help"], capture_output=True, text=True, env=ENV,
                         timeout=120)
    assert top.returncode == 0 and "bench" in top.stdout
    with pytest.raises(SystemExit) as code:
        cli.main(["bench"])  # --out is required
    assert code.value.code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report of a machine without a CUDA device")
def test_cuda_without_a_device_writes_no_cuda_rows(tmp_path, capsys):
    rc = cli.main(["bench", "--device", "cuda", "--out", str(tmp_path)])
    assert rc == 0
    text = (tmp_path / "report.md").read_text()
    assert "| GPU | no CUDA device |" in text
    assert text.count("| cuda |") == 2 and text.count("| no CUDA device |") == 3
    assert "## Training step (CPU)" not in text  # --device cuda runs no CPU suite
    assert "no CUDA device" in capsys.readouterr().out
    assert json.loads((tmp_path / "run.json").read_text())["cuda"] == dict(requested=True, available=False,
                                                                          status="no CUDA device")


def test_render_only_reads_the_folder(tmp_path):
    _write_results(tmp_path)
    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    assert bench_cli.run(parser.parse_args(["--out", str(tmp_path), "--render-only"])) == 0
    assert "| small | 16 | fp32 | fast-compiled |" in (tmp_path / "report.md").read_text()


def test_suites_import_from_the_package():
    """The suites ship in fastmae.bench and import each other from there (no sys.path edits)."""
    for name in ("model_step", "finetune_step", "video_step", "maskalign_step", "memory", "environment", "report",
                 "test_bench_model", "test_bench_finetune", "test_bench_video", "test_bench_maskalign",
                 "test_bench_ops"):
        importlib.import_module(f"fastmae.bench.{name}")
    folder = os.path.dirname(bench_cli.__file__)
    for name in os.listdir(folder):
        if name.endswith(".py"):
            with open(os.path.join(folder, name)) as f:
                assert "sys.path.insert" not in f.read(), name


@pytest.mark.slow
def test_bench_command_runs_the_ops_suite(tmp_path):
    """A real (tiny) run of the ops suite through the command: the JSON, the log and the report."""
    proc = subprocess.run([sys.executable, "-m", "fastmae", "bench", "--quick", "--smoke", "--only", "ops",
                           "--device", "cpu", "--allocator", "default", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=ENV, timeout=900, cwd=tmp_path)  # the installed fastmae
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "ops-default.json").read_text())
    assert data["machine_info"]["fastmae"]["cpu_backend"] in ("cpp", "torch")
    text = (tmp_path / "report.md").read_text()
    assert text.count("| gather_mask |") == 4 and "smoke" in text
    assert (tmp_path / "ops-default.log").read_text().count("PASSED") == 12
