"""Render the op benchmarks (pytest-benchmark JSON from bench/test_bench_ops.py) as a markdown table.

    python bench/report.py bench/ops.json [more.json ...]

Per op, mode and dtype: median ms of fastmae (C++ backend), the eager reference and the compiled
reference; fastmae's speed-up over both; the op's minimal bytes moved at fastmae's median, as GB/s
and as a share of the copy bandwidth measured in the same run (test_copy_bandwidth); and the byte
floor projected for an H100 (3.35 TB/s datasheet bandwidth): a projection, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import sys

H100_BYTES_PER_S = 3.35e12
PROVIDERS = ("fastmae", "eager", "compiled")


def load(paths):
    """{(op, mode, dtype): {provider: (median seconds, extra_info)}} and machine/allocator notes."""
    rows, notes = {}, []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        mi = data.get("machine_info", {})
        notes.append(f"{path}: {mi.get('cpu', {}).get('brand_raw', mi.get('processor', '?'))}, "
                     f"{data.get('datetime', '?')}")
        for b in data["benchmarks"]:
            info = b.get("extra_info", {})
            if "op" not in info:
                continue
            key = (info["op"], info["mode"], info["dtype"])
            rows.setdefault(key, {})[info["provider"]] = (b["stats"]["median"], info)
    return rows, notes


def _fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def render(rows, notes) -> str:
    copy = rows.pop(("copy", "copy", "fp32"), {}).get("copy")
    copy_bw = copy[1]["bytes"] / copy[0] if copy else None
    allocators = {json.dumps(info.get("allocator", {}), sort_keys=True)
                  for provs in rows.values() for _, info in provs.values()}
    out = ["# fastmae op benchmarks (CPU)", ""]
    out += [f"- {n}" for n in notes]
    out.append(f"- copy bandwidth (dst.copy_(src), read + write): "
               f"{_fmt(copy_bw and copy_bw / 1e9, '.1f')} GB/s")
    out.append(f"- allocator environment: {'; '.join(sorted(allocators)) or 'n/a'}")
    out.append("- H100 floor: minimal bytes / 3.35 TB/s (datasheet), a projection, never a measurement")
    out.append("")
    out.append("| op | mode | dtype | fastmae ms | eager ms | compiled ms | x eager | x compiled | MB moved "
               "| GB/s | % of copy | H100 floor us |")
    out.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (op, mode, dtype) in sorted(rows):
        provs = rows[(op, mode, dtype)]
        med = {p: provs[p][0] if p in provs else None for p in PROVIDERS}
        nbytes = next(iter(provs.values()))[1]["bytes"]
        fast = med["fastmae"]
        gbs = nbytes / fast / 1e9 if fast else None
        pct = 100 * nbytes / fast / copy_bw if fast and copy_bw else None
        speedup = {p: med[p] / fast if fast and med[p] else None for p in ("eager", "compiled")}
        out.append(
            f"| {op} | {mode} | {dtype} | {_fmt(fast and fast * 1e3, '.2f')} | "
            f"{_fmt(med['eager'] and med['eager'] * 1e3, '.2f')} | "
            f"{_fmt(med['compiled'] and med['compiled'] * 1e3, '.2f')} | {_fmt(speedup['eager'], '.1f')} | "
            f"{_fmt(speedup['compiled'], '.1f')} | {nbytes / 1e6:.1f} | {_fmt(gbs, '.1f')} | {_fmt(pct, '.0f')} | "
            f"{nbytes / H100_BYTES_PER_S * 1e6:.1f} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON file(s) (--benchmark-json)")
    args = parser.parse_args(argv)
    rows, notes = load(args.json)
    if not rows:
        print("no fastmae op benchmarks in the given files", file=sys.stderr)
        return 1
    sys.stdout.write(render(rows, notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
