"""``fastmae env`` (also ``python -m fastmae env``): what fastmae runs on and why.

Versions, whether the C++ extension loaded (and if not, why and how to fix it), the CPU
instruction set its kernels use, the implementation of the fused ops per device, and every
FASTMAE_* setting with where its value came from. Paste it into a bug report.
"""
from __future__ import annotations

import importlib
import os
import platform
import sys

import torch

from . import __version__, config
from .ops import _backend

_ISA_NAMES = {0: "base x86-64 (SSE2)", 1: "AVX2 + FMA + F16C", 2: "AVX-512 with AVX512-BF16"}


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except ImportError:
        return "not installed"
    except Exception as e:  # noqa: BLE001 - a broken install is what this report is for
        return f"fails to import ({type(e).__name__}: {e})"


def cpu_name() -> str:
    """The CPU's model name (Linux), or what the platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _backend_line(device: str) -> str:
    try:
        return _backend.select_backend(device)
    except (RuntimeError, ValueError) as e:
        return f"none ({e})"


def rows() -> list[tuple[str, str]]:
    """The report as (label, value) rows."""
    out = [
        ("fastmae", f"{__version__} ({os.path.dirname(os.path.abspath(__file__))})"),
        ("python", sys.version.split()[0]),
        ("torch", f"{torch.__version__} (CUDA build {torch.version.cuda or 'none'})"),
        ("torchvision", _version("torchvision")),
        ("triton", _version("triton")),
        ("xformers", _version("xformers")),
        ("CPU", f"{cpu_name()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"),
    ]
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        out.append(("CUDA devices", names))
    else:
        out.append(("CUDA devices", "none"))
    err = _backend.extension_error()
    if err is None:
        out.append(("C++ extension", "loaded (fastmae._C)"))
    else:
        out.append(("C++ extension", f"NOT loaded: {err}. CPU tensors fall back to torch math; to fix: "
                                     f"{_backend.build_hint()} (a C++ compiler and ninja are needed, and the torch "
                                     "it will run with)"))
    cfg_error = config.error()
    if cfg_error is not None:
        out.append(("settings", f"REFUSED: {cfg_error}; the fused ops raise until it is fixed"))
    else:
        s = config.settings()
        if err is None:
            cap = s.cpp_args[0]
            best = int(torch.ops.fastmae_C.cpu_isa(2))
            used = int(torch.ops.fastmae_C.cpu_isa(cap))
            out.append(("CPU kernels' ISA", f"{_ISA_NAMES[used]}" + ("" if used == best else
                                                                     f" (capped by FASTMAE_CPU_ISA; the CPU runs {_ISA_NAMES[best]})")))
        out.append(("fused ops on CPU", _backend_line("cpu")))
        out.append(("fused ops on CUDA", _backend_line("cuda")))
    out.append(("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "unset")))
    for var in config.VARIABLES:
        raw = os.environ.get(var.name)
        if var.bench and raw is None:
            continue  # the benchmark knobs: shown only when set
        out.append((var.name, f"{raw!r} (from the environment)" if raw is not None else f"{var.default} (default)"))
    known = {v.name for v in config.VARIABLES}
    for name, value in config.active_variables().items():
        if name not in known:
            out.append((name, f"{value!r}: not a fastmae setting (a typo?); ignored"))
    return out


def report() -> str:
    table = rows()
    width = max(len(label) for label, _ in table)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in table)


def main() -> int:
    print(report())
    return 0


def settings_table() -> str:
    """The README's table of every FASTMAE_* setting, made from ``fastmae.config.VARIABLES``."""
    lines = ["| variable | values | default | what for |", "|---|---|---|---|"]
    for v in config.VARIABLES:
        values = " \\| ".join(f"`{x}`" if x else "(empty)" for x in v.values) or "text"
        lines.append(f"| `{v.name}` | {values} | `{v.default}` | {v.doc} |")
    return "\n".join(lines)
