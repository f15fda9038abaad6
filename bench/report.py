"""Render the op benchmarks (pytest-benchmark JSON from bench/test_bench_ops.py) as a markdown table.

    python bench/report.py bench/ops.json [more.json ...]

Per op, mode and dtype, from the side-by-side cycles of one test (each provider's median ms over
the same rounds): fastmae (C++ backend), the eager reference and the compiled reference;
fastmae's speed-up over both; the op's minimal bytes moved at fastmae's median, as GB/s and as a
share of the copy bandwidth: the copy sampled in the same cycles ("copy GB/s", "% of copy") and
the median of those copy rates over every test of the file ("% of run copy"; the copy rate moves
with where its fresh buffers land, 25-65 GB/s between tests of one run here, while it is steady
within a test, so the pooled rate is the steadier yardstick); the median page faults per call of fastmae
and of the eager reference (first touches of fresh memory: the allocator's doing, paid inside
the timing); and the byte floor projected for an H100 (3.35 TB/s datasheet bandwidth): a
projection, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _table import markdown_table  # noqa: E402

H100_BYTES_PER_S = 3.35e12


def load(paths):
    """[(path, extra_info)] of every op benchmark, and machine notes."""
    rows, notes = [], []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        mi = data.get("machine_info", {})
        notes.append(f"{path}: {mi.get('cpu', {}).get('brand_raw', mi.get('processor', '?'))}, "
                     f"{data.get('datetime', '?')}")
        for b in data["benchmarks"]:
            info = b.get("extra_info", {})
            if "op" in info and "providers" in info:
                rows.append((path, info))
    return rows, notes


def _fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def _copy_rate(info):
    copy = info["providers"].get("copy")
    return info["copy_bytes"] / (copy["median_ms"] / 1e3) if copy else None


def render(rows, notes) -> str:
    out = ["# fastmae op benchmarks (CPU)", ""]
    rates = sorted(r for r in (_copy_rate(info) for _, info in rows) if r)
    run_copy = rates[len(rates) // 2] if rates else None
    out += [f"- {n}" for n in notes]
    allocators = sorted({json.dumps(info.get("allocator", {}), sort_keys=True) for _, info in rows})
    out.append(f"- allocator environment: {'; '.join(allocators) or 'n/a'}")
    sets = [info.get("input_sets") or 0 for _, info in rows]
    llc = {info.get("llc_bytes") for _, info in rows}
    out.append(f"- input sets rotated per call: {min(sets)} to {max(sets)} per test (together > 2x the "
               f"LLC of {', '.join(_fmt(x and x / 2**20, '.0f') for x in llc)} MiB)")
    out.append("- copy: dst.copy_(src) of 64 MB (read + write; 4 pairs in turn), sampled in every cycle of the same test; "
               f"median over the tests (run copy): {_fmt(run_copy and run_copy / 1e9, '.1f')} GB/s, "
               f"range {_fmt(rates and rates[0] / 1e9, '.1f')}-{_fmt(rates and rates[-1] / 1e9, '.1f')}")
    out.append("- H100 floor: minimal bytes / 3.35 TB/s (datasheet), a projection, never a measurement")
    out.append("")
    headers = ["op", "mode", "dtype", "fastmae ms", "eager ms", "compiled ms", "x eager", "x compiled", "MB moved",
               "GB/s", "copy GB/s", "% of copy", "% of run copy", "faults/call fastmae / eager", "H100 floor us"]
    table = []
    for _, info in sorted(rows, key=lambda r: (r[1]["op"], r[1]["mode"], r[1]["dtype"], r[0])):
        prov = info["providers"]
        med = {p: prov[p]["median_ms"] / 1e3 if p in prov else None for p in ("fastmae", "eager", "compiled", "copy")}
        nbytes = info["bytes"]
        fast = med["fastmae"]
        copy_bw = _copy_rate(info)
        gbs = nbytes / fast / 1e9 if fast else None
        pct = 100 * nbytes / fast / copy_bw if fast and copy_bw else None
        pct_run = 100 * nbytes / fast / run_copy if fast and run_copy else None
        speedup = {p: med[p] / fast if fast and med[p] else None for p in ("eager", "compiled")}
        flt = "/".join(_fmt(prov.get(p, {}).get("faults_per_call"), ".0f") for p in ("fastmae", "eager"))
        table.append([
            info["op"], info["mode"], info["dtype"], _fmt(fast and fast * 1e3, ".2f"),
            _fmt(med["eager"] and med["eager"] * 1e3, ".2f"), _fmt(med["compiled"] and med["compiled"] * 1e3, ".2f"),
            _fmt(speedup["eager"], ".1f"), _fmt(speedup["compiled"], ".1f"), f"{nbytes / 1e6:.1f}", _fmt(gbs, ".1f"),
            _fmt(copy_bw and copy_bw / 1e9, ".1f"), _fmt(pct, ".0f"), _fmt(pct_run, ".0f"), flt,
            f"{nbytes / H100_BYTES_PER_S * 1e6:.1f}"])
    out += markdown_table(headers, table, numeric_from=3)
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
