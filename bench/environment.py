"""What a benchmark ran on: the machine, the versions, the allocator settings and the fused-op
backend. Recorded into every pytest-benchmark JSON (``conftest.py``) and every ``gpu.py`` JSON,
and rendered at the top of ``report.md``.

Queries the CUDA runtime only when ``describe()`` is called, never at import.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform

# glibc reads these when a process starts: they must be in the environment the process starts
# with, so they are recorded, never set from inside.
ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX", "LD_PRELOAD")
# PERF.md's tuned setting: large blocks stay on the heap instead of being unmapped and
# page-faulted back on the next allocation.
TUNED_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
NO_CUDA = "no CUDA device"  # what the report says in the place of CUDA figures on a machine without one


def cpu_model() -> str:
    from fastmae.envinfo import cpu_name

    return cpu_name()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def allocator_env(env=None) -> dict:
    env = os.environ if env is None else env
    return {k: env.get(k, "") for k in ALLOCATOR_ENV}


def allocator_label(env: dict) -> str:
    """A short name for an allocator environment: ``default`` (glibc as configured by nobody),
    ``tuned`` (PERF.md's thresholds), the thresholds themselves otherwise, plus a preloaded
    allocator's file name."""
    malloc = {k: v for k, v in env.items() if k.startswith("MALLOC_") and v}
    if not malloc:
        label = "default"
    elif malloc == TUNED_ALLOCATOR:
        label = "tuned"
    else:
        label = " ".join(f"{k}={v}" for k, v in sorted(malloc.items()))
    preload = env.get("LD_PRELOAD", "")
    if preload:
        label += " + " + ", ".join(os.path.basename(p) for p in preload.replace(":", " ").split())
    return label


def describe() -> dict:
    """The machine and software a benchmark ran on (JSON-serialisable)."""
    import torch

    import fastmae
    from fastmae import config
    from fastmae.ops import _backend

    try:
        cpu_backend = _backend.select_backend(torch.device("cpu"))
    except (RuntimeError, ValueError) as e:  # a forced backend that cannot run here
        cpu_backend = f"unavailable ({e})"
    cuda = torch.cuda.is_available()
    return dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        cpu=cpu_model(), cores=os.cpu_count(), usable_cores=usable_cores(), torch_threads=torch.get_num_threads(),
        python=platform.python_version(), platform=platform.platform(),
        torch=torch.__version__, triton=_version("triton"), fastmae=getattr(fastmae, "__version__", None),
        fastmae_path=os.path.dirname(os.path.abspath(fastmae.__file__)),
        allocator=allocator_env(), allocator_label=allocator_label(allocator_env()),
        forced_backend="" if config.error() or config.settings().backend == "auto" else config.settings().backend,
        cpu_backend=cpu_backend, settings={k: v for k, v in config.active_variables().items()},
        cpp_extension_error=_backend.extension_error(),
        cuda_device=torch.cuda.get_device_name() if cuda else None,
        cuda_backend=("triton" if _backend.has_triton() else "torch") if cuda else None,
    )
