"""Ahead-of-time compilation of every fastmae Triton kernel, without a GPU.

For each launch configuration the launchers can choose (``launch_configs()`` in each module of
``fastmae.kernels``: every dtype, vector width and constexpr variant), compile for sm_80 and sm_90
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``, giving the pointer
arguments the 16-byte alignment a launch on freshly allocated tensors specialises
(``tt.divisibility 16``). Integer sizes get no divisibility: vectorisation must come from the
kernels' ``VEC`` parameter, whatever the sizes. Then read, per kernel:

- registers, shared memory, stack and LOCAL (spilled) bytes, from the cubin, with the
  ``cuobjdump`` shipped in the triton wheel;
- the widest global load and store in the PTX (16 bytes = 128-bit ``ld.global.v4.b32``).

Usage: ``python bench/triton_aot.py [--cc 80 90] [--module ...] [--jobs 2] [--summary]
[--json out.json]`` prints one row per (configuration, target), then a per-kernel summary. ``compile_all()`` returns the same records for tests. Needs the triton
NVIDIA backend (no GPU); must run with ``TRITON_INTERPRET`` unset or 0 (the script clears it
before importing the kernels).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile

if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402

KERNEL_MODULES = ("gather_mask", "unshuffle_scatter", "norm_mse_loss", "resized_crop")
_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[A-Za-z0-9_:]+)*)")
_RESOURCES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


@dataclasses.dataclass
class Record:
    kernel: str  # kernel name
    config: str  # human-readable configuration
    cc: int  # compute capability (80, 90)
    num_warps: int
    regs: int
    shared: int  # static shared memory (cubin) or dynamic (Triton metadata), bytes, the larger
    stack: int
    local: int  # spilled bytes per thread: must be 0
    max_load_bytes: int  # widest global load in the PTX
    max_store_bytes: int  # widest global store in the PTX
    expect_load_bytes: int  # what the contiguous paths of this configuration must reach
    expect_store_bytes: int

    @property
    def vectorised(self) -> bool:
        return self.max_load_bytes >= self.expect_load_bytes and self.max_store_bytes >= self.expect_store_bytes


def backend_error() -> str | None:
    """Why AOT compilation for NVIDIA targets is impossible here, or None."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means no backend
        return f"triton's NVIDIA backend is not importable: {type(e).__name__}: {e}"
    if not os.path.exists(cuobjdump_path()):
        return f"cuobjdump not found at {cuobjdump_path()}"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1 is set: kernels are interpreted functions, nothing to compile"
    return None


def cuobjdump_path() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def access_bytes(ptx: str) -> tuple[int, int]:
    """Widest global load and store of float data in ``ptx``, in bytes.

    Accesses with 64-bit elements (``.b64``/``.u64``/``.s64``) are left out: in these kernels they
    are the int64 index tensors and offset tables, never float data (fp32/bf16/fp16 vectors are
    emitted as ``.b32`` lanes, or ``.b16`` when scalar), so the width reported is that of the
    float streams the configurations make claims about."""
    widest = {"ld": 0, "st": 0}
    for op, quals in _ACCESS.findall(ptx):
        parts = quals.split(".")
        lanes = next((int(q[1:]) for q in parts if re.fullmatch(r"v\d+", q)), 1)
        bits = next((int(q[1:]) for q in parts if re.fullmatch(r"[bfsu]\d+", q)), 0)
        if bits == 64:
            continue
        widest[op] = max(widest[op], lanes * bits // 8)
    return widest["ld"], widest["st"]


def resource_usage(cubin: bytes) -> dict:
    """REG / STACK / SHARED / LOCAL of the single kernel in ``cubin``, via cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump_path(), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    m = _RESOURCES.search(out)
    if m is None:
        raise RuntimeError(f"cannot read resource usage from cuobjdump output:\n{out}")
    reg, stack, shared, local = map(int, m.groups())
    return {"regs": reg, "stack": stack, "shared": shared, "local": local}


def compile_config(cfg, cc: int) -> Record:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = cfg.kernel
    names = list(fn.arg_names)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in cfg.aligned}
    src = ASTSource(fn, dict(cfg.signature), dict(cfg.constexprs), attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": cfg.num_warps})
    res = resource_usage(compiled.asm["cubin"])
    ld, st = access_bytes(compiled.asm["ptx"])
    return Record(kernel=fn.__name__, config=cfg.label(), cc=cc, num_warps=cfg.num_warps, regs=res["regs"],
                  shared=max(res["shared"], int(compiled.metadata.shared)), stack=res["stack"], local=res["local"],
                  max_load_bytes=ld, max_store_bytes=st,
                  expect_load_bytes=cfg.vector_loads, expect_store_bytes=cfg.vector_stores)


def all_configs(modules=KERNEL_MODULES):
    """Every launch configuration of the kernels in ``modules``, plus, per kernel, its widest
    configuration with every integer argument typed i64: what triton's specialisation gives a
    launch whose sizes or strides reach 2**31."""
    import importlib
    configs = []
    for name in modules:
        mod_configs = importlib.import_module(f"fastmae.kernels.{name}").launch_configs()
        configs += mod_configs
        def width(cfg):
            return (cfg.vector_loads + cfg.vector_stores,
                    sum(v for k, v in cfg.constexprs.items() if k.startswith("VEC")),
                    sum(v is True for v in cfg.constexprs.values()))  # optional passes on
        widest = {}
        for cfg in mod_configs:
            if cfg.name not in widest or width(cfg) > width(widest[cfg.name]):
                widest[cfg.name] = cfg
        for cfg in widest.values():
            sig = {k: ("i64" if v == "i32" else v) for k, v in cfg.signature.items()}
            configs.append(dataclasses.replace(cfg, name=cfg.name + "+i64", signature=sig))
    return configs


_worker_configs: dict = {}


def _compile_task(task) -> Record:
    """Worker side of ``compile_all(jobs > 1)``: (module, index in its launch_configs(), cc)."""
    module, index, cc = task
    if module not in _worker_configs:
        _worker_configs[module] = all_configs((module,))
    return compile_config(_worker_configs[module][index], cc)


def compile_all(ccs=(80, 90), modules=KERNEL_MODULES, jobs: int = 1) -> list[Record]:
    """Compile every launch configuration of every kernel for every target in ``ccs``
    (``jobs`` worker processes; compiled kernels are cached by triton, so reruns are fast)."""
    err = backend_error()
    if err is not None:
        raise RuntimeError(err)
    tasks = [(m, i, cc) for m in modules for i in range(len(all_configs((m,)))) for cc in ccs]
    if jobs <= 1:
        return [_compile_task(t) for t in tasks]
    import concurrent.futures
    import multiprocessing
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_compile_task, tasks, chunksize=8))


def summary(records: list[Record]) -> list[dict]:
    """Per (kernel, cc): configuration count and the worst figures over its configurations."""
    rows = {}
    for r in records:
        row = rows.setdefault((r.kernel, r.cc), {"kernel": r.kernel, "cc": r.cc, "configs": 0, "max_regs": 0,
                                                 "max_shared": 0, "max_local": 0, "vectorised": 0})
        row["configs"] += 1
        row["max_regs"] = max(row["max_regs"], r.regs)
        row["max_shared"] = max(row["max_shared"], r.shared)
        row["max_local"] = max(row["max_local"], r.local)
        row["vectorised"] += r.vectorised
    return list(rows.values())


def format_table(records: list[Record], full: bool = True) -> str:
    lines = []
    if full:
        lines.append(f"{'configuration':<78} {'sm':>3} {'REG':>4} {'SHARED':>7} {'LOCAL':>6} "
                     f"{'ld B':>5} {'st B':>5} {'need':>9}  vec")
        for r in records:
            need = f"{r.expect_load_bytes}/{r.expect_store_bytes}"
            lines.append(f"{r.config:<78} {r.cc:>3} {r.regs:>4} {r.shared:>7} {r.local:>6} "
                         f"{r.max_load_bytes:>5} {r.max_store_bytes:>5} {need:>9}  "
                         f"{'yes' if r.vectorised else 'NO'}")
        lines.append("")
    lines.append("| kernel | sm | configs | max REG | max SHARED (B) | max LOCAL (B) | vectorised as required |")
    lines.append("|---|---|---|---|---|---|---|")
    for s in summary(records):
        lines.append(f"| `{s['kernel']}` | {s['cc']} | {s['configs']} | {s['max_regs']} | {s['max_shared']} | "
                     f"{s['max_local']} | {s['vectorised']}/{s['configs']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cc", type=int, nargs="+", default=[80, 90], help="compute capabilities (default 80 90)")
    ap.add_argument("--module", nargs="+", default=list(KERNEL_MODULES), choices=KERNEL_MODULES)
    ap.add_argument("--json", help="also write the records to this JSON file")
    ap.add_argument("--summary", action="store_true", help="print only the per-kernel summary")
    ap.add_argument("--jobs", type=int, default=1, help="compile in this many processes (default 1)")
    args = ap.parse_args(argv)
    records = compile_all(tuple(args.cc), tuple(args.module), args.jobs)
    print(format_table(records, full=not args.summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in records], f, indent=1)
    bad = [r for r in records if r.local or not r.vectorised]
    if bad:
        print(f"\n{len(bad)} configuration(s) spill or miss vectorisation", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
