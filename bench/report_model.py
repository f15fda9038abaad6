"""Render the training-step benchmarks (pytest-benchmark JSON from bench/test_bench_model.py) as
markdown: step times side by side with speed-ups and shares of the matmul ceiling, compile times,
the GEMM and optimizer bounds, and peak memory against the compiled reference.

    python bench/report_model.py bench/model.json [more.json ...]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _table import markdown_table  # noqa: E402

GOALS = {  # (config, precision, provider): (min speed-up over ref-compiled, min % of ceiling)
    ("vitb", "fp32", "fast-compiled"): (1.05, 90),
    ("vitb", "bf16", "fast-compiled"): (1.15, 75),
    ("small", "fp32", "fast-compiled"): (1.3, None),
    ("small", "bf16", "fast-compiled"): (1.3, None),
}


def load(paths):
    out = {"train_step": [], "gemm_bound": [], "attention": [], "optimizer": [], "memory": []}
    notes = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        mi = data.get("machine_info", {})
        notes.append(f"{path}: {mi.get('cpu', {}).get('brand_raw', '?')}, {data.get('datetime', '?')}")
        for b in data["benchmarks"]:
            info = b.get("extra_info", {})
            if info.get("kind") in out:
                out[info["kind"]].append(info)
    return out, notes


def _f(x, spec=".2f"):
    return "n/a" if x is None else format(x, spec)


def render(res, notes) -> str:
    lines = ["# fastmae training-step benchmarks (CPU)", ""] + [f"- {n}" for n in notes]
    envs = {json.dumps(i.get("env", {}), sort_keys=True) for k in res.values() for i in k}
    lines += [f"- environment: {'; '.join(sorted(envs))}", ""]
    fp32_eager = {i["config"]: i["providers"]["ref-eager"]["median_s"]
                  for i in res["train_step"] if i["precision"] == "fp32"}
    for i in res["train_step"]:
        c, p = i["config"], i["precision"]
        lines += [f"## {c}, {p}, batch {i['batch']} ({i['rounds']} rounds, A B C D rotated)", "",
                  f"matmul ceiling ({p} mm {i['mm_n']}^3): {i['mm_rate'] / 1e9:.1f} GFLOP/s; "
                  f"{i['flops_per_image'] / 1e9:.2f} GFLOP per image (counted: "
                  f"{i['counted_flops_per_image'] / 1e9:.2f}); fused-op backend {i['op_backend']}", ""]
        ref_c = i["providers"]["ref-compiled"]["median_s"]
        rows = []
        for name, s in i["providers"].items():
            goal = GOALS.get((c, p, name))
            x_rc = ref_c / s["median_s"]
            x_eager = fp32_eager[c] / s["median_s"] if c in fp32_eager else None
            mark = ""
            if goal:
                ok = x_rc >= goal[0] and (goal[1] is None or s["pct_of_ceiling"] >= goal[1])
                mark = f" ({'meets' if ok else 'misses'} goal {goal[0]}x" + (
                    f", {goal[1]}%)" if goal[1] else ")")
            rows.append([f"{name}{mark}", f"{s['median_s']:.3f}", f"{s['images_per_s']:.1f}",
                         f"{s['pct_of_ceiling']:.0f}", f"{x_rc:.2f}", _f(x_eager), _f(s["compile_s"], ".1f")])
        lines += markdown_table(["provider", "median s", "img/s", "% of ceiling", "x ref-compiled",
                                 "x ref-eager fp32", "compile s"], rows, numeric_from=1)
        lines.append("")
    if res["gemm_bound"]:
        lines += ["## Bounds: the step's GEMMs alone at their shapes, attention alone", ""]
        rows = [[i["config"], i["precision"], i["gemm_calls"], f"{i['gemm_flops'] / 1e9:.1f}", f"{i['gemm_s']:.3f}",
                 f"{i['gemm_rate'] / 1e9:.1f}", f"{i['gemm_pct_of_mm_rate']:.0f}", f"{i['attention_s']:.3f}"]
                for i in res["gemm_bound"]]
        lines += markdown_table(["config", "precision", "GEMM calls", "GEMM GFLOP", "GEMM s", "GEMM GFLOP/s",
                                 "% of mm rate", "attention s"], rows, numeric_from=2)
        lines.append("")
    if res["attention"]:
        lines += ["## Attention forward + backward per backend (ms per call)", ""]
        rows = []
        for i in res["attention"]:
            for shape, calls in i["calls_per_step"].items():
                ms = {b: i["median_s"].get(f"{shape} {b}") for b in ("sdpa", "math", "math-compiled")}
                rows.append([i["config"], i["precision"], shape, calls] + [_f(v and v * 1e3) for v in ms.values()])
        lines += markdown_table(["config", "precision", "shape [B, heads, S, d]", "calls/step", "sdpa", "math",
                                 "math compiled"], rows, numeric_from=3)
        lines.append("")
    if res["optimizer"]:
        lines += ["## Optimizer alone", ""]
        rows = [[i["config"], f"{i['params'] / 1e6:.1f} M", f"{i['fused_adamw_s']:.3f}", f"{i['default_adamw_s']:.3f}",
                 f"{i['bytes_moved'] / i['fused_adamw_s'] / 1e9:.1f}"] for i in res["optimizer"]]
        lines += markdown_table(["config", "params", "fused AdamW s", "default AdamW (loop) s", "GB/s"], rows,
                                numeric_from=1)
        lines.append("")
    if res["memory"]:
        lines += ["## Peak memory of a training step (fresh process; bench/memory.py)", ""]
        rows = []
        base = {(i["config"], i["precision"]): i for i in res["memory"] if i["variant"] == "ref-compiled"}
        for i in res["memory"]:
            b = base.get((i["config"], i["precision"]))
            x = i["tensor_peak_bytes"] / b["tensor_peak_bytes"] if b else None
            xs = i["step_peak_bytes"] / b["step_peak_bytes"] if b else None
            rss = i.get("rss_step_peak_bytes")
            rows.append([i["config"], i["precision"], i["variant"], i["batch"], f"{i['tensor_peak_bytes'] / 2**20:.0f}",
                         _f(x), f"{i['resting_bytes'] / 2**20:.0f}", f"{i['step_peak_bytes'] / 2**20:.0f}", _f(xs),
                         _f(rss and rss / 2**20, ".0f"), _f(i.get("first_step_s"), ".0f")])
        lines += markdown_table(["config", "precision", "variant", "batch", "tensor peak MB", "x ref-compiled",
                                 "resting MB", "step peak MB", "x ref-compiled (step)", "RSS step peak MB",
                                 "cold compile + step s"], rows, numeric_from=3)
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON file(s) (--benchmark-json)")
    args = parser.parse_args(argv)
    res, notes = load(args.json)
    if not any(res.values()):
        print("no training-step benchmarks in the given files", file=sys.stderr)
        return 1
    sys.stdout.write(render(res, notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
