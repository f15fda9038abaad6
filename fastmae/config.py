"""Every ``FASTMAE_*`` setting, read once from the environment when fastmae is imported.

The fused ops ask this module which implementation to run and pass the C++ kernels their
choices as arguments; nothing else in fastmae reads ``os.environ`` for a ``FASTMAE_*`` variable.
``VARIABLES`` documents each one (the README's table and ``fastmae env`` are made from it).

To change a setting inside a process (tests, benchmarks), use :func:`override`, which restores
the previous settings on exit::

    with fastmae.config.override(backend="torch"):
        loss, pred, mask = model(imgs)
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Iterator, Mapping


@dataclasses.dataclass(frozen=True)
class Variable:
    name: str
    values: tuple[str, ...]  # accepted values; () for free text
    default: str
    doc: str
    bench: bool = False  # a knob of the benchmark suites (fastmae bench sets them for its runs)


VARIABLES = (
    Variable("FASTMAE_BACKEND", ("auto", "torch", "cpp", "triton"), "auto",
             "Implementation of the fused ops. auto: Triton on CUDA tensors, the C++ kernels on CPU "
             "tensors (torch math, with one warning, if the extension is not built), torch math "
             "elsewhere. triton on CPU tensors needs TRITON_INTERPRET=1 set before the import."),
    Variable("FASTMAE_CPU_ISA", ("auto", "avx512", "avx2", "base"), "auto",
             "Caps the instruction set of the C++ kernels' hot loops (auto: the best the CPU runs; "
             "avx512 needs AVX512-BF16). To test the other variants on a machine that has more."),
    Variable("FASTMAE_CPU_STREAM", ("auto", "always", "never"), "auto",
             "Streaming (non-temporal) stores in the C++ kernels. auto: outputs of 16 MiB or more, "
             "and from 1 MiB those a matmul reads next. always/never: to test both paths."),
    Variable("FASTMAE_REQUIRE_EXTENSION", ("0", "1"), "0",
             "1: a missing or stale C++ extension is an error instead of a warning and a fallback "
             "to torch math (CI sets it so that a broken build cannot pass as the fallback)."),
    Variable("FASTMAE_NO_EXTENSION", ("0", "1"), "0",
             "Read by setup.py at install time: 1 skips building the C++ extension."),
    # The benchmark suites' knobs: `fastmae bench` sets them for the pytest processes it starts;
    # set them yourself only to run a suite by hand (bench/README.md).
    Variable("FASTMAE_BENCH_TIER", ("", "smoke", "quick", "full"), "",
             "Benchmarks: the tier a suite's results are labelled with.", bench=True),
    Variable("FASTMAE_BENCH_SMOKE", ("0", "1"), "0",
             "Benchmarks: 1 shrinks every suite to a smoke run (no meaningful figure).", bench=True),
    Variable("FASTMAE_BENCH_CONFIGS", (), "vitb,small",
             "Benchmarks: training-step configurations, comma-separated (smoke: small).", bench=True),
    Variable("FASTMAE_BENCH_BATCH", (), "16", "Benchmarks: ViT-B batch (smoke: 2).", bench=True),
    Variable("FASTMAE_BENCH_SMALL_BATCH", (), "64", "Benchmarks: batch of the small configuration (smoke: 2).",
             bench=True),
    Variable("FASTMAE_BENCH_ROUNDS", (), "5 (ops 15)", "Benchmarks: timed rounds (smoke: 1).", bench=True),
    Variable("FASTMAE_BENCH_WARMUP", (), "2 (ops 5)", "Benchmarks: warm-up rounds (smoke: 1).", bench=True),
    Variable("FASTMAE_BENCH_MM_N", (), "2048", "Benchmarks: size of the matmul that measures the ceiling.",
             bench=True),
    Variable("FASTMAE_BENCH_MODES", (), "forward,full", "Benchmarks: fused-op modes, comma-separated.", bench=True),
    Variable("FASTMAE_BENCH_INPUT_SETS", (), "0",
             "Benchmarks: input sets the op suite rotates through (0: enough to exceed twice the LLC).", bench=True),
    Variable("FASTMAE_BENCH_MEMORY_VARIANTS", (), "all",
             "Benchmarks: peak-memory variants, comma-separated.", bench=True),
    Variable("FASTMAE_BENCH_MEMORY_CACHE", ("fresh", "shared"), "fresh",
             "Benchmarks: inductor cache of each peak-memory process.", bench=True),
)
_BY_NAME = {v.name: v for v in VARIABLES}
# Enum values passed to the C++ kernels (csrc/common.h: CpuIsa, StreamMode).
ISA_CAPS = {"base": 0, "avx2": 1, "avx512": 2, "auto": 2}
STREAM_MODES = {"never": 0, "always": 1, "auto": 2}


@dataclasses.dataclass(frozen=True)
class Settings:
    backend: str = "auto"
    cpu_isa: str = "auto"
    cpu_stream: str = "auto"
    require_extension: bool = False

    @property
    def cpp_args(self) -> tuple[int, int]:
        """(isa_cap, stream_mode): the trailing arguments of every C++ kernel."""
        return ISA_CAPS[self.cpu_isa], STREAM_MODES[self.cpu_stream]


_FIELDS = {"FASTMAE_BACKEND": "backend", "FASTMAE_CPU_ISA": "cpu_isa", "FASTMAE_CPU_STREAM": "cpu_stream",
           "FASTMAE_REQUIRE_EXTENSION": "require_extension"}


def _parse(name: str, raw: str) -> str:
    var = _BY_NAME[name]
    value = raw.strip().lower() or var.default
    if value not in var.values:
        raise ValueError(f"{name}={raw!r} is not one of {', '.join(var.values)}")
    return value


def from_environ(environ: Mapping[str, str] = os.environ) -> Settings:
    """Settings from an environment mapping; a ValueError names a variable with a bad value."""
    kwargs = {}
    for name, field in _FIELDS.items():
        if name in environ:
            value = _parse(name, environ[name])
            kwargs[field] = value == "1" if field == "require_extension" else value
    return Settings(**kwargs)


_BENCH_ENV = {v.name: os.environ[v.name] for v in VARIABLES if v.bench and v.name in os.environ}


def bench_setting(name: str, default: str) -> str:
    """A benchmark knob (``FASTMAE_BENCH_*``) as the environment gave it at import, or ``default``."""
    var = _BY_NAME.get(name)
    if var is None or not var.bench:
        raise KeyError(f"{name} is not a benchmark setting")
    value = _BENCH_ENV.get(name, "").strip()
    if value and var.values and value not in var.values:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(var.values)}")
    return value or default


def active_variables(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The FASTMAE_* variables set in ``environ`` (known or not), for reports."""
    return {k: v for k, v in sorted(environ.items()) if k.startswith("FASTMAE_")}


try:
    _current: Settings | None = from_environ()
    _error: str | None = None
except ValueError as e:  # reported at the first use (and by `fastmae env`), not at import
    _current, _error = None, str(e)


def settings() -> Settings:
    """The settings in force."""
    if _current is None:
        raise ValueError(f"bad fastmae setting: {_error}")
    return _current


def error() -> str | None:
    """Why the environment's settings were refused, or None."""
    return _error


@contextlib.contextmanager
def override(**changes) -> Iterator[Settings]:
    """Settings with ``changes`` (field names of :class:`Settings`) in force inside the block.
    Values are checked as the environment's are. Not thread-safe: meant for tests and benchmarks."""
    global _current, _error
    names = {field: name for name, field in _FIELDS.items()}
    for field, value in changes.items():
        if field not in names:
            raise TypeError(f"unknown setting {field!r}; choose from {', '.join(names)}")
        if field != "require_extension":
            changes[field] = _parse(names[field], str(value))
    saved = (_current, _error)
    base = _current if _current is not None else Settings()
    _current, _error = dataclasses.replace(base, **changes), None
    try:
        yield _current
    finally:
        _current, _error = saved
